"""Full-Duplex-Bench metric definitions (v1.0 tasks and the v1.5 timing metrics), as pure functions.

The definitions follow the benchmark's public evaluation scripts, including their quirks; each quirk is reproduced
by default (``official=True``) so numbers compare with published tables, and can be switched off:

* take-over (TOR): the model takes the turn when its transcript spans >= 1 s from the first word's start to the last
  word's end, or, when shorter, has more than 3 words. A last word without an end time is measured to its start.
* latency: first word's start minus the reference time (end of the user's turn / of the interruption); only
  samples with TOR = 1 count; a negative latency (the model started before the user stopped) is clipped to 0.
* backchannel: the VAD segments come as the official scorer's call gives them (``vad.benchmark_backchannel_segments``:
  times rounded to 0.1 s, and a file not at 16 kHz read as if it were, so a 24 kHz file's times are x1.5 while the
  duration stays true; ``official=False``: sample-accurate times of the audio resampled to 16 kHz). Quirk 1, the
  take-over of a sample is decided by the *last* short VAD segment unless a segment longer than 3 s appears first
  (``official=False``: any segment that qualifies as a turn decides TOR = 1). Quirk 2, every short segment counts as
  a backchannel, even one that made TOR = 1 (``official=False``: only segments that are backchannels by the
  word/duration rule). Frequency = backchannels / output duration (s). The distance to the human
  distribution is scipy's Jensen-Shannon *distance* (square root of the divergence, natural log) between 0.2 s
  window histograms (epsilon 1e-10, human curve linearly resampled to the run's length); a sample with no
  backchannel gets 1. (Not reproduced: scipy's NaN for identical distributions, which is reported as 0.)
* v1.5 timing: user speech segments merged over gaps <= 0.6 s, model segments over gaps <= 0.5 s; stop latency is
  each overlap of user and model speech (the shortest per end time), response latency the gap from a user segment's
  end to the next model segment's start (the later user end per model start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TURN_SECONDS = 1.0
TURN_WORDS = 3
BACKCHANNEL_MAX_SECONDS = 3.0
BACKCHANNEL_WINDOW = 0.2
EPSILON = 1e-10
USER_MERGE_GAP = 0.6
MODEL_MERGE_GAP = 0.5

Chunk = dict  # {"text": str, "timestamp": [start, end | None]}
Interval = tuple[float, float]


def takes_turn(chunks: list[Chunk]) -> bool:
    """The benchmark's take-over rule on a word-level transcript."""
    if not chunks:
        return False
    first_start = chunks[0]["timestamp"][0]
    last = chunks[-1]["timestamp"]
    last_time = last[0] if last[-1] is None else last[-1]
    if last_time - first_start < TURN_SECONDS:
        return len(chunks) > TURN_WORDS
    return True


def clipped_latency(chunks: list[Chunk], reference: float, official: bool = True) -> float:
    """Time from ``reference`` to the first word; negative (an early start) becomes 0 unless ``official`` is off."""
    latency = chunks[0]["timestamp"][0] - reference
    return max(latency, 0.0) if official else latency


@dataclass
class TurnResult:
    takes_turn: bool
    latency: float | None  # only when the model took the turn


def turn_result(chunks: list[Chunk], reference: float | None, official: bool = True) -> TurnResult:
    turn = takes_turn(chunks)
    latency = clipped_latency(chunks, reference, official) if turn and reference is not None else None
    return TurnResult(turn, latency)


def words_in(chunks: list[Chunk], start: float, end: float) -> list[str]:
    """Words of the transcript overlapping [start, end], with the benchmark's handling of missing end times."""
    words = []
    for chunk in chunks:
        t_start, t_end = chunk["timestamp"][0], chunk["timestamp"][1]
        if t_start is None or (t_end is None and t_start < end):
            continue
        if t_end is None:
            t_end = t_start
        if (t_start >= start and t_end <= end) or (t_start <= end and t_end > end) or (t_start <= start and t_end > start):
            words.append(chunk["text"])
    return words


@dataclass
class BackchannelResult:
    takes_turn: bool
    backchannels: list[Interval]
    frequency: float  # backchannels per second of output
    js_distance: float | None  # None when no human distribution was given


def _segment_is_turn(duration: float, words: int) -> bool:
    if words > TURN_WORDS:
        return True
    return not (duration < 1.0 and words <= 2)


def backchannel_result(segments: list[Interval], chunks: list[Chunk], duration: float,
                       human: list[float] | None = None, official: bool = True) -> BackchannelResult:
    """``segments``: VAD speech of the model's output (s); ``duration``: output length (s); ``human``: the
    human backchannel distribution for this sample (the benchmark's icc_gt_distribution.json entry)."""
    turn = False
    backchannels: list[Interval] = []
    for start, end in segments:
        length = end - start
        if length > BACKCHANNEL_MAX_SECONDS:
            turn = True
            break
        segment_turn = _segment_is_turn(length, len(words_in(chunks, start, end)))
        if official:
            turn = segment_turn  # the last short segment decides
            backchannels.append((start, end))
        else:
            turn = turn or segment_turn
            if not segment_turn:
                backchannels.append((start, end))
    frequency = len(backchannels) / duration if duration > 0 else 0.0
    distance = None if human is None else js_distance(backchannels, duration, human)
    return BackchannelResult(turn, backchannels, frequency, distance)


def backchannel_histogram(backchannels: list[Interval], duration: float) -> np.ndarray:
    """Normalised count of backchannels per 0.2 s window (a segment covers every window it touches)."""
    counts = np.zeros(int(duration / BACKCHANNEL_WINDOW) + 1)
    for start, end in backchannels:
        first, last = int(start / BACKCHANNEL_WINDOW), int(end / BACKCHANNEL_WINDOW)
        counts[first : min(last, len(counts) - 1) + 1] += 1
    counts = counts + EPSILON
    return counts / counts.sum()


def js_distance(backchannels: list[Interval], duration: float, human: list[float]) -> float:
    if not backchannels:
        return 1.0
    from scipy.interpolate import interp1d
    from scipy.spatial.distance import jensenshannon

    predicted = backchannel_histogram(backchannels, duration)
    human_curve = np.asarray(human, dtype=float)
    resized = interp1d(np.linspace(0, 1, len(human_curve)), human_curve, kind="linear", fill_value="extrapolate")(
        np.linspace(0, 1, len(predicted)))
    with np.errstate(invalid="ignore"):
        distance = float(jensenshannon(predicted, resized))
    # Identical shapes can leave a rounding-negative divergence, whose square root scipy reports as NaN
    # (which would turn the task's mean into NaN): that is a distance of 0.
    return 0.0 if math.isnan(distance) else distance


def merge_segments(segments: list[Interval], gap: float) -> list[Interval]:
    """Join speech segments separated by at most ``gap`` seconds."""
    merged: list[Interval] = []
    for start, end in sorted(segments):
        if merged and start - merged[-1][1] <= gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def stop_intervals(user: list[Interval], model: list[Interval]) -> list[Interval]:
    """Overlaps of user and model speech; of several ending at the same millisecond, the shortest."""
    overlaps = []
    i = j = 0
    while i < len(user) and j < len(model):
        start, end = max(user[i][0], model[j][0]), min(user[i][1], model[j][1])
        if end > start:
            overlaps.append((start, end))
        if user[i][1] < model[j][1]:
            i += 1
        else:
            j += 1
    shortest: dict[int, Interval] = {}
    for start, end in overlaps:
        key = round(end * 1000)
        if key not in shortest or end - start < shortest[key][1] - shortest[key][0]:
            shortest[key] = (start, end)
    return [(round(s, 3), round(e, 3)) for s, e in sorted(shortest.values(), key=lambda iv: iv[1])]


def response_intervals(user: list[Interval], model: list[Interval]) -> list[Interval]:
    """From each user segment's end to the next model start after it; per model start, the latest user end."""
    starts = [s for s, _ in model]
    gaps: dict[int, Interval] = {}
    for _, user_end in user:
        following = next((s for s in starts if s > user_end), None)
        if following is None:
            continue
        key = round(following * 1000)
        candidate = (round(user_end, 3), round(following, 3))
        if key not in gaps or candidate[0] > gaps[key][0]:
            gaps[key] = candidate
    return [gaps[k] for k in sorted(gaps, key=lambda k: gaps[k][1])]


def mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None
