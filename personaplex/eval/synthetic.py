"""A tiny dataset in the benchmark's layout, spoken by espeak-ng: to try the pipeline without the real data.

Its annotations are exact by construction (the user's speech is placed at known times), but it is not the
benchmark: scores on it say nothing about a model's quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import layout
from .persona_bench import synthesize

RATE = 16_000  # the benchmark's input rate
ANSWER_ROOM = 4.0  # seconds of silence after the user's last words

# (task folder, annotation name or None, utterances: (start s, text)); a "[PAUSE]" sits between two utterances.
SAMPLES = (
    ("synthetic_pause_handling", "pause.json", ((0.5, "so I was thinking about"), (3.5, "going to the mountains"))),
    ("synthetic_pause_handling", "pause.json", ((0.5, "my favourite food is"), (3.5, "probably pasta"))),
    ("candor_turn_taking", "turn_taking.json", ((0.5, "what do you think about electric cars"),)),
    ("candor_turn_taking", "turn_taking.json", ((0.5, "have you ever been to Japan"),)),
    ("synthetic_user_interruption", "interrupt.json",
     ((0.5, "tell me about dogs"), (4.0, "wait, actually tell me about cats"))),
    ("synthetic_user_interruption", "interrupt.json",
     ((0.5, "how do I bake bread"), (4.0, "sorry, how about pizza instead"))),
    ("icc_backchannel", None, ((0.5, "and then we drove all the way to the coast and the weather was great"),)),
    ("icc_backchannel", None, ((0.5, "so my sister moved to a new city last year and she loves it there"),)),
)


def _speech(text: str) -> np.ndarray:
    audio = synthesize(text, RATE)
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    return audio[loud[0] : loud[-1] + 1]


def build(root: Path) -> list[Path]:
    """Write the samples under ``root``; returns their folders."""
    import sphn

    counters: dict[str, int] = {}
    folders = []
    for task_dir, annotation, utterances in SAMPLES:
        counters[task_dir] = counters.get(task_dir, 0) + 1
        folder = Path(root) / task_dir / str(counters[task_dir])
        folder.mkdir(parents=True, exist_ok=True)
        spans, pieces = [], []
        for start, text in utterances:
            speech = _speech(text)
            spans.append((start, start + len(speech) / RATE, text))
            pieces.append((int(start * RATE), speech))
        audio = np.zeros(int((spans[-1][1] + ANSWER_ROOM) * RATE), np.float32)
        for first, speech in pieces:
            audio[first : first + len(speech)] = speech
        sphn.write_wav(str(folder / layout.INPUT_WAV), audio, RATE)
        if annotation == "pause.json":
            note = [{"text": "[PAUSE]", "timestamp": [round(spans[0][1], 3), round(spans[1][0], 3)]}]
        elif annotation == "turn_taking.json":
            end = round(spans[-1][1], 3)
            note = [{"text": "[TURN-TAKING]", "timestamp": [end, end + 0.4]}]
        elif annotation == "interrupt.json":
            note = [{"context": spans[0][2], "interrupt": spans[1][2],
                     "timestamp": [round(spans[1][0], 3), round(spans[1][1], 3)]}]
        else:
            note = None
        if note is not None:
            (folder / annotation).write_text(json.dumps(note, indent=2), encoding="utf-8")
        folders.append(folder)
    return folders
