"""``personaplex eval fdb run``: every sample's ``input.wav`` through the batched engine into ``output.wav``.

Each sample runs as the offline tool runs a file (same code: continuous batching, the input streamed frame by
frame after the persona's prompt); ``output.wav`` is then written at the input's sample rate with exactly its
number of samples, so both share their origin and length. Samples whose outputs
exist are skipped, which makes a run resumable; ``run_manifest.json`` records what produced the outputs.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

from .. import offline
from ..audio import audio_file_format
from . import layout
from .layout import Sample

CONVERSATION_PROMPT = "You enjoy having a good conversation."
# The benchmark's recommendation for PersonaPlex: the assistant (teacher) role for interruptions.
TASK_PROMPTS = {layout.INTERRUPTION: offline.DEFAULT_TEXT_PROMPT}
MANIFEST = "run_manifest.json"


def prompt_for(task: str, overrides: dict[str, str]) -> str:
    """The role prompt a task runs with: an override, else the benchmark's recommendation."""
    return overrides.get(task) or overrides.get("*") or TASK_PROMPTS.get(task, CONVERSATION_PROMPT)


def sample_prompt(sample: Sample, overrides: dict[str, str]) -> str:
    own = sample.path / layout.PERSONA_TXT
    if own.is_file() and sample.task not in overrides:
        return own.read_text(encoding="utf-8").strip()
    return prompt_for(sample.task, overrides)


def is_done(sample: Sample) -> bool:
    # The token list is written after the audio: both present means the sample finished.
    return sample.output_wav.is_file() and (sample.path / layout.TEXT_TOKENS_JSON).is_file()


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
    todo = [s for s in samples if args.overwrite or not is_done(s)]
    offline.log(f"{len(samples)} sample(s) found, {len(samples) - len(todo)} already done, {len(todo)} to run")
    if args.seed < 0:
        args.seed = random.randrange(2**31)  # recorded in the manifest so the run can be repeated
    manifest_path = Path(args.data) / MANIFEST
    if todo:
        for sample in todo:  # a half-written output from an interrupted run is redone
            (sample.path / layout.TEXT_TOKENS_JSON).unlink(missing_ok=True)
        batch = argparse.Namespace(**vars(args))
        batch.input_dir = batch.output_dir = batch.text_prompt_file = None
        batch.input_wav = [s.input_wav for s in todo]
        batch.output_wav = [s.output_wav for s in todo]
        batch.output_text = [s.path / layout.TEXT_TOKENS_JSON for s in todo]
        batch.text_prompt = [sample_prompt(s, overrides) for s in todo]
        batch.voice_prompt = [args.voice_prompt]
        offline.run(batch)
    for sample in samples:
        if is_done(sample):
            match_input_rate(sample)
    write_manifest(manifest_path, args, samples, overrides)


def match_input_rate(sample: Sample) -> None:
    """Rewrite output.wav at input.wav's sample rate with exactly its number of samples.

    The engine speaks at 24 kHz; the benchmark's inputs are 16 kHz, and its scripts read some files assuming
    16 kHz, so an output with the input's rate and length stays comparable sample for sample.
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


def write_manifest(path: Path, args: argparse.Namespace, samples: list[Sample], overrides: dict[str, str]) -> None:
    import torch

    from .. import __version__

    runs = []
    if path.is_file():
        runs = json.loads(path.read_text(encoding="utf-8")).get("runs", [])
    tasks = sorted({s.task for s in samples})
    runs.append({
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": args.model, "hf_repo": args.hf_repo,
        "moshi_weight": None if args.moshi_weight is None else str(args.moshi_weight),
        "voice": args.voice_prompt, "personas": {t: persona_note(t, overrides) for t in tasks},
        "seed": args.seed, "sampling": {"temp_audio": args.temp_audio, "temp_text": args.temp_text,
                                        "topk_audio": args.topk_audio, "topk_text": args.topk_text,
                                        "greedy": args.greedy},
        "samples": len(samples), "quantize": args.quantize, "batch_size": args.batch_size,
        "versions": {"personaplex": __version__, "torch": torch.__version__, "python": platform.python_version()},
    })
    path.write_text(json.dumps({"runs": runs}, indent=2), encoding="utf-8")
