"""The Full-Duplex-Bench data layout: ``ROOT/<task folder>/<sample id>/input.wav`` plus annotation files.

A task folder's task is recognised from the annotation files its samples hold: ``pause.json`` (pause handling),
``turn_taking.json`` (smooth turn-taking), ``interrupt.json`` (user interruption), ``metadata.json`` (v1.5 overlap
sets, scored with the timing metrics), ``question.json`` (the persona set); failing that, from its name (e.g.
``candor_pause_handling``, ``icc_backchannel``). A folder with only audio is a backchannel set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import PersonaplexError

PAUSE = "pause_handling"
TURN_TAKING = "smooth_turn_taking"
BACKCHANNEL = "backchannel"
INTERRUPTION = "user_interruption"
OVERLAP = "overlap_timing"  # v1.5 sets: user_interruption, user_backchannel, talking_to_other, background_speech
PERSONA = "persona"  # the service-persona adherence set (``personaplex eval persona build``)
TASKS = (PAUSE, TURN_TAKING, BACKCHANNEL, INTERRUPTION, OVERLAP, PERSONA)

_ANNOTATIONS = {"pause.json": PAUSE, "turn_taking.json": TURN_TAKING, "interrupt.json": INTERRUPTION,
                "metadata.json": OVERLAP, "question.json": PERSONA}
_NAME_HINTS = (("pause", PAUSE), ("turn_taking", TURN_TAKING), ("turn-taking", TURN_TAKING),
               ("backchannel", BACKCHANNEL), ("interrupt", INTERRUPTION))

INPUT_WAV = "input.wav"
OUTPUT_WAV = "output.wav"
OUTPUT_JSON = "output.json"  # the benchmark's transcript format
TEXT_TOKENS_JSON = "output_text_tokens.json"  # the model's own text channel, one entry per frame
PERSONA_TXT = "persona.txt"  # a sample's own role prompt (persona set)


class DatasetError(PersonaplexError):
    """The data folder does not have the benchmark's layout."""


@dataclass(frozen=True)
class Sample:
    task: str
    task_dir: str  # the task folder's name (several folders may share a task)
    sample_id: str
    path: Path

    @property
    def input_wav(self) -> Path:
        return self.path / INPUT_WAV

    @property
    def output_wav(self) -> Path:
        return self.path / OUTPUT_WAV

    @property
    def output_json(self) -> Path:
        return self.path / OUTPUT_JSON

    def annotation(self, name: str):
        path = self.path / name
        if not path.is_file():
            raise DatasetError(f"{self.path}: missing {name} (needed to score {self.task})")
        with open(path, encoding="utf-8") as f:
            return json.load(f)


def _sample_dirs(task_dir: Path) -> list[Path]:
    return sorted((p for p in task_dir.iterdir() if p.is_dir() and (p / INPUT_WAV).is_file()), key=_natural)


def _natural(path: Path):
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def task_of(task_dir: Path) -> str | None:
    """The task a folder of samples belongs to: its annotation files first (a v1.5 ``user_interruption`` folder
    holds metadata.json, not interrupt.json), then its name; ``None`` when it holds no samples."""
    samples = _sample_dirs(task_dir)
    if not samples:
        return None
    for annotation, task in _ANNOTATIONS.items():
        if (samples[0] / annotation).is_file():
            return task
    name = task_dir.name.lower()
    for hint, task in _NAME_HINTS:
        if hint in name:
            return task
    return BACKCHANNEL


def discover(root: Path, tasks: list[str] | None = None) -> list[Sample]:
    """Every sample under ``root`` (a benchmark root holding task folders, or one task folder)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder not found: {root}")
    if tasks:
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise DatasetError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    task_dirs = [root] if _sample_dirs(root) else sorted(p for p in root.iterdir() if p.is_dir())
    samples = []
    for task_dir in task_dirs:
        task = task_of(task_dir)
        if task is None or (tasks and task not in tasks):
            continue
        samples += [Sample(task, task_dir.name, d.name, d) for d in _sample_dirs(task_dir)]
    if not samples:
        raise DatasetError(f"no samples (<task>/<id>/{INPUT_WAV}) under {root}" + (f" for {', '.join(tasks)}" if tasks else ""))
    return samples
