"""Recordings through the engine: each file streamed frame by frame (80 ms) after its persona's system prompt,
exactly like a live conversation, several at once in one batch (``personaplex offline``, ``personaplex eval fdb
run``). The agent's audio is written with the input's duration, and its text as a JSON list with one entry per
frame (reference format), its words as plain text beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import startup
from ..config import FRAME_SIZE, SAMPLE_RATE
from ..errors import UsageError
from . import model as model_flags
from .console import log


@dataclass
class Job:
    """One input file and what to do with it."""

    input_path: Path
    output_wav: Path
    output_text: Path
    text_prompt: str
    voice: str
    audio: np.ndarray | None = None  # mono float32 at 24 kHz


def transcript_path(output_text: Path) -> Path:
    """Where the agent's words go as plain text: beside the JSON token list, with .txt."""
    return output_text.with_suffix(".txt")


def run_recordings(jobs: list[Job], args: argparse.Namespace, *, context_policy: str | None = None) -> None:
    """Stream every job's recording through the engine, as a live caller would, and write what the agent said.

    ``args``: the flags of ``flags.add_model_arguments`` and ``flags.add_sampling_arguments``, ``batch_size``
    (conversations at once; None: as many as fit) and ``context_policy`` (what ``context_policy`` overrides).
    Every input is read before the model loads and every persona built before the first frame runs: a bad file
    fails fast.
    """
    import torch
    from tqdm import tqdm

    from ..audio import read_audio
    from ..engine import Engine, slots_that_fit
    from ..persona_store import PersonaStore

    context_policy = context_policy or args.context_policy
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    for job in jobs:  # read inputs before loading gigabytes of weights: bad files fail fast
        job.audio = read_audio(job.input_path)
    for job in jobs:
        job.output_wav.parent.mkdir(parents=True, exist_ok=True)
        job.output_text.parent.mkdir(parents=True, exist_ok=True)

    assets = model_flags.resolve_model_assets(args)
    frames = [-(-len(job.audio) // FRAME_SIZE) for job in jobs]
    loading = time.perf_counter()
    model = model_flags.load_model_for_args(args, assets, slots=min(len(jobs), args.batch_size or 4), input_frames=frames)
    log(f"start-up: load model (read weights, build) in {time.perf_counter() - loading:.2f} s")
    if model.untrained:
        log("note: the demo model has random, untrained weights: its speech and text are noise, not answers")
    slots = min(len(jobs), args.batch_size or min(64, slots_that_fit(model.lm, model.mimi)))
    log(f"model {model.name} on {model.device} ({model.lm.dtype}); {len(jobs)} input(s), {slots} at a time")

    # The command line's user may name voice files by path; each voice is encoded once, each persona built once
    # (the same store as the live server's). Every persona is checked before the first frame runs.
    personas = PersonaStore(model, allow_paths=True)
    prompts = [personas.system_prompt(job.voice, job.text_prompt) for job in jobs]

    # Continuous batching: a slot freed by a finished input takes the next one at once; the engine
    # guarantees each conversation the same frames as if it ran alone.
    engine = Engine(model.lm, model.mimi, max_slots=slots)
    longest = max(prompt.num_steps for prompt in prompts) + max(-(-len(j.audio) // FRAME_SIZE) for j in jobs)
    capturing = time.perf_counter()
    # No capture pauses once conversations run; only the graphs of the run's context policy.
    if engine.capture_graphs(up_to_frames=longest, pinning=context_policy == "pin-persona"):
        log(f"start-up: CUDA graphs ({engine.kernels.name} kernels) in {time.perf_counter() - capturing:.2f} s")
    sampling = model_flags.sampling_from_args(args)
    waiting = deque(zip(jobs, prompts))
    running: dict[int, Recording] = {}
    total_frames = sum(-(-len(job.audio) // FRAME_SIZE) for job in jobs)
    pcm = torch.zeros(slots, FRAME_SIZE)
    started = time.perf_counter()
    done_frames = 0  # counted here: a progress bar that is off (no terminal) counts nothing
    rate_reported = False
    first_frame = True
    with tqdm(total=total_frames, unit="frame", desc="conversations", file=sys.stderr, disable=None) as progress:
        def say(message: str) -> None:  # above the progress bar on a terminal, not inside it
            progress.write(message, file=sys.stderr)

        while waiting or running:
            for slot in engine.free_slots():
                if not waiting:
                    break
                job, prompt = waiting.popleft()
                engine.join(slot, slot + 1, prompt, sampling, context_policy=context_policy)
                running[slot] = Recording(job)
            pcm.zero_()
            for slot, recording in running.items():
                chunk = recording.next_input()
                pcm[slot, : len(chunk)] = torch.from_numpy(chunk)
            out = engine.step(pcm)
            if first_frame:
                first_frame = False
                say(f"start-up: first frame {startup.seconds_since_process_start():.2f} s after launch")
            progress.update(len(running))
            done_frames += len(running)
            for slot, recording in list(running.items()):
                recording.record(out.pcm[slot].numpy(), int(out.tokens[slot, 0]))
                if recording.done:
                    recording.write(model.tokenizer, say)
                    engine.leave(slot)
                    del running[slot]
            elapsed = time.perf_counter() - started
            if not rate_reported and elapsed >= RATE_REPORT_AFTER_SECONDS and (waiting or running):
                say(measured_rate(done_frames, total_frames, elapsed))
                rate_reported = True
    elapsed = time.perf_counter() - started
    seconds = sum(len(job.audio) for job in jobs) / SAMPLE_RATE
    log(f"processed {seconds:.1f} s of audio in {elapsed:.1f} s ({seconds / elapsed:.2g}x real time)")


# The up-front estimate comes from a quick measurement and can be far off on a busy machine: once the run
# has gone this long, the rate it really gets replaces it.
RATE_REPORT_AFTER_SECONDS = 10.0


def measured_rate(done_frames: int, total_frames: int, elapsed: float) -> str:
    """One line: the frame rate measured so far (all conversations together) and the time left at that rate."""
    from ..deploy.estimates import format_duration

    per_second = done_frames / max(elapsed, 1e-9)
    speed = per_second * FRAME_SIZE / SAMPLE_RATE  # seconds of audio per second of wall time
    rate = f"{per_second:.1f}" if per_second >= 1 else f"{per_second:.2g}"
    return (f"measured: {rate} frames/s ({speed:.2g}x real time) over the first {elapsed:.0f} s; "
            f"about {format_duration((total_frames - done_frames) / per_second)} left at this rate")


class Recording:
    """One input file streaming through a slot."""

    def __init__(self, job: Job):
        self.job = job
        self.frames = -(-len(job.audio) // FRAME_SIZE)
        self.position = 0
        self.agent_audio: list[np.ndarray] = []
        self.agent_text: list[int] = []

    def next_input(self) -> np.ndarray:
        return self.job.audio[self.position * FRAME_SIZE : (self.position + 1) * FRAME_SIZE]

    def record(self, pcm: np.ndarray, text_token: int) -> None:
        self.agent_audio.append(pcm)
        self.agent_text.append(text_token)
        self.position += 1

    @property
    def done(self) -> bool:
        return self.position >= self.frames

    def write(self, tokenizer, say=log) -> None:
        """The agent's audio with exactly the input's duration, and one JSON entry per frame."""
        import sphn

        job = self.job
        audio = np.concatenate(self.agent_audio)[: len(job.audio)]
        sphn.write_wav(str(job.output_wav), np.clip(audio, -1.0, 1.0).astype(np.float32), SAMPLE_RATE)
        # The token list keeps the reference format (one raw piece per frame, byte pieces as "<0xC3>"); the
        # text file is what was said, byte pieces joined into characters.
        with open(job.output_text, "w", encoding="utf-8") as f:
            json.dump([tokenizer.piece(t) for t in self.agent_text], f, ensure_ascii=False)
        transcript_path(job.output_text).write_text(tokenizer.transcript(self.agent_text) + "\n", encoding="utf-8")
        say(f"wrote {job.output_wav} ({len(job.audio) / SAMPLE_RATE:.2f} s), {job.output_text} and "
            f"{transcript_path(job.output_text).name}")
