"""``personaplex eval fdb run``: every sample's ``input.wav`` through the batched engine into ``output.wav``.

Each sample runs as the offline tool runs a file (the same code, ``app/recordings.py``: continuous batching, the
input streamed frame by frame after the persona's prompt). ``output.wav`` has the input's origin and duration, at the model's 24 kHz by
default, as the reference pipeline wrote the outputs behind the published rows (the official backchannel scorer
reads a 24 kHz file's times x1.5, so the rate changes its numbers); ``--output-rate input`` writes it at the
input's rate with exactly its number of samples instead. Samples whose outputs exist at the asked rate are
skipped, which makes a run resumable; ``run_manifest.json`` records what produced the outputs, rate included.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

from ..app.console import log
from ..app.flags import DEFAULT_TEXT_PROMPT
from ..app.recordings import Job, run_recordings
from ..audio import audio_file_format
from ..config import SAMPLE_RATE
from ..errors import UsageError
from . import layout
from .layout import Sample

CONVERSATION_PROMPT = "You enjoy having a good conversation."
# The benchmark's recommendation for PersonaPlex: the assistant (teacher) role for interruptions.
TASK_PROMPTS = {layout.INTERRUPTION: DEFAULT_TEXT_PROMPT}
MANIFEST = "run_manifest.json"
MODEL_RATE, INPUT_RATE = "model", "input"  # --output-rate choices
OUTPUT_RATES = (MODEL_RATE, INPUT_RATE)


def prompt_for(task: str, overrides: dict[str, str]) -> str:
    """The role prompt a task runs with: an override, else the benchmark's recommendation."""
    return overrides.get(task) or overrides.get("*") or TASK_PROMPTS.get(task, CONVERSATION_PROMPT)


def sample_prompt(sample: Sample, overrides: dict[str, str]) -> str:
    own = sample.path / layout.PERSONA_TXT
    if own.is_file() and sample.task not in overrides:
        return own.read_text(encoding="utf-8").strip()
    return prompt_for(sample.task, overrides)


def is_done(sample: Sample, output_rate: str = MODEL_RATE) -> bool:
    """The sample finished, with an output that is (or, from the model, becomes) at the asked rate.

    The token list is written after the audio: both present means the run got through. An output at another
    rate (an earlier run with the other ``--output-rate``) is run again rather than resampled twice.
    """
    if not (sample.output_wav.is_file() and (sample.path / layout.TEXT_TOKENS_JSON).is_file()):
        return False
    rate, _ = audio_file_format(sample.output_wav)
    if output_rate == MODEL_RATE:
        return rate == SAMPLE_RATE
    return rate in (SAMPLE_RATE, audio_file_format(sample.input_wav)[0])


def parse_prompt_overrides(values: list[str] | None) -> dict[str, str]:
    """``TASK=TEXT`` pairs, or a bare TEXT for every task."""
    overrides = {}
    for value in values or []:
        task, sep, text = value.partition("=")
        if sep and task in layout.TASKS:
            overrides[task] = text
        else:
            overrides["*"] = value
    return overrides


def run(args: argparse.Namespace) -> None:
    samples = layout.discover(args.data, args.tasks)
    overrides = parse_prompt_overrides(args.text_prompt)
    output_rate = getattr(args, "output_rate", MODEL_RATE)
    if output_rate not in OUTPUT_RATES:
        raise UsageError(f"--output-rate must be one of {', '.join(OUTPUT_RATES)}, not {output_rate!r}")
    todo = [s for s in samples if args.overwrite or not is_done(s, output_rate)]
    log(f"{len(samples)} sample(s) found, {len(samples) - len(todo)} already done, {len(todo)} to run")
    if args.seed < 0:
        args.seed = random.randrange(2**31)  # recorded in the manifest so the run can be repeated
    manifest_path = Path(args.data) / MANIFEST
    if todo:
        for sample in todo:  # a half-written output from an interrupted run is redone
            (sample.path / layout.TEXT_TOKENS_JSON).unlink(missing_ok=True)
        jobs = [Job(s.input_wav, s.output_wav, s.path / layout.TEXT_TOKENS_JSON, sample_prompt(s, overrides),
                    args.voice_prompt) for s in todo]
        # Benchmark samples are shorter than the context: the reference's policy.
        run_recordings(jobs, args, context_policy="sliding")
    if output_rate == INPUT_RATE:
        for sample in samples:
            if is_done(sample, output_rate):
                match_input_rate(sample)
    rates = write_manifest(manifest_path, args, samples, overrides, output_rate)
    log(f"output.wav sample rate(s): {', '.join(f'{r} Hz' for r in rates) or 'none written'} "
                + ("(the model's, as the published rows' outputs)" if output_rate == MODEL_RATE else "(input.wav's)"))


def match_input_rate(sample: Sample) -> None:
    """Rewrite output.wav at input.wav's sample rate with exactly its number of samples (``--output-rate input``).

    The engine speaks at 24 kHz; the benchmark's inputs are 16 kHz. At the input's rate the output lines up with
    it sample for sample, and the official backchannel scorer reads its VAD times unscaled.
    """
    import numpy as np
    import sphn

    from ..audio import read_audio

    input_rate, input_samples = audio_file_format(sample.input_wav)
    output_rate, output_samples = audio_file_format(sample.output_wav)
    if (input_rate, input_samples) == (output_rate, output_samples):
        return
    audio = read_audio(sample.output_wav, input_rate)[:input_samples]
    audio = np.pad(audio, (0, input_samples - len(audio)))
    partial = sample.output_wav.with_suffix(".partial.wav")
    sphn.write_wav(str(partial), np.clip(audio, -1.0, 1.0).astype(np.float32), input_rate)
    partial.replace(sample.output_wav)


def persona_note(task: str, overrides: dict[str, str]) -> str:
    if task == layout.PERSONA and task not in overrides:
        return "each sample's persona.txt"
    return prompt_for(task, overrides)


def write_manifest(path: Path, args: argparse.Namespace, samples: list[Sample], overrides: dict[str, str],
                   output_rate: str = MODEL_RATE) -> list[int]:
    """Append this run to ``run_manifest.json``; returns the sample rates (Hz) of the finished outputs."""
    import torch

    from .. import __version__

    runs = []
    if path.is_file():
        runs = json.loads(path.read_text(encoding="utf-8")).get("runs", [])
    tasks = sorted({s.task for s in samples})
    rates = sorted({audio_file_format(s.output_wav)[0] for s in samples if s.output_wav.is_file()})
    runs.append({
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": args.model, "hf_repo": args.hf_repo,
        "moshi_weight": None if args.moshi_weight is None else str(args.moshi_weight),
        "voice": args.voice_prompt, "personas": {t: persona_note(t, overrides) for t in tasks},
        "seed": args.seed, "sampling": {"temp_audio": args.temp_audio, "temp_text": args.temp_text,
                                        "topk_audio": args.topk_audio, "topk_text": args.topk_text,
                                        "greedy": args.greedy},
        "samples": len(samples), "quantize": args.quantize, "batch_size": args.batch_size,
        "output_rate": output_rate, "output_sample_rates": rates,
        "versions": {"personaplex": __version__, "torch": torch.__version__, "python": platform.python_version()},
    })
    path.write_text(json.dumps({"runs": runs}, indent=2), encoding="utf-8")
    return rates
