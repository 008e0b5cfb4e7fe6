"""Full-Duplex-Bench metrics on hand-made transcripts and segments, each checked against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from personaplex.eval import metrics


def words(*stamps):
    return [{"text": f"w{i}", "timestamp": list(s)} for i, s in enumerate(stamps)]


def test_take_over_rule_with_its_thresholds():
    assert not metrics.takes_turn([])  # no speech
    assert not metrics.takes_turn(words((1.0, 1.2), (1.3, 1.5), (1.6, 1.9)))  # 3 words in 0.9 s: a backchannel
    assert metrics.takes_turn(words((1.0, 1.1), (1.1, 1.2), (1.2, 1.3), (1.3, 1.4)))  # 4 words in 0.4 s
    assert metrics.takes_turn(words((2.0, 2.5), (2.5, 3.0)))  # exactly 1.0 s counts as a turn
    assert not metrics.takes_turn(words((2.0, 2.5), (2.5, 2.999)))
    # A last word without an end is measured to its start: 2.0 -> 2.9 is short.
    assert not metrics.takes_turn(words((2.0, 2.5), (2.9, None)))
    assert metrics.takes_turn(words((2.0, 2.5), (3.0, None)))


def test_latency_is_clipped_at_zero_when_speech_starts_before_the_user_stops():
    chunks = words((2.3, 2.8), (2.9, 3.5))
    assert metrics.turn_result(chunks, 2.0).latency == pytest.approx(0.3)
    early = words((1.5, 2.0), (2.1, 2.7))
    assert metrics.turn_result(early, 2.0).latency == 0.0
    assert metrics.turn_result(early, 2.0, official=False).latency == pytest.approx(-0.5)
    # No turn, no latency (it does not count in the average).
    assert metrics.turn_result(words((2.3, 2.4)), 2.0) == metrics.TurnResult(False, None)


def test_backchannels_frequency_and_take_over():
    chunks = words((1.1, 1.3), (3.05, 3.2), (3.2, 3.35))
    result = metrics.backchannel_result([(1.0, 1.5), (3.0, 3.4)], chunks, duration=10.0)
    assert not result.takes_turn
    assert result.backchannels == [(1.0, 1.5), (3.0, 3.4)]
    assert result.frequency == pytest.approx(2 / 10)
    assert result.js_distance is None  # no human distribution given


def test_backchannel_quirk_the_last_short_segment_decides():
    # A 1.5 s segment with 4 words is a turn, but a later short "yeah" resets TOR to 0 in the official scorer.
    chunks = words((1.0, 1.3), (1.3, 1.7), (1.7, 2.1), (2.1, 2.5), (5.0, 5.2))
    segments = [(1.0, 2.5), (5.0, 5.3)]
    official = metrics.backchannel_result(segments, chunks, duration=8.0)
    assert not official.takes_turn and len(official.backchannels) == 2
    fixed = metrics.backchannel_result(segments, chunks, duration=8.0, official=False)
    assert fixed.takes_turn and fixed.backchannels == [(5.0, 5.3)]
    assert fixed.frequency == pytest.approx(1 / 8)


def test_backchannel_segment_lengths_at_the_thresholds():
    # Longer than 3 s: a turn, and later segments are not looked at.
    long = metrics.backchannel_result([(0.0, 3.01), (5.0, 5.2)], words((5.0, 5.1)), duration=6.0)
    assert long.takes_turn and long.backchannels == []
    # Exactly 3 s is a short segment, but at >= 1 s it is a turn all the same.
    exact = metrics.backchannel_result([(0.0, 3.0)], words((0.5, 0.7)), duration=6.0)
    assert exact.takes_turn and exact.backchannels == [(0.0, 3.0)]
    # Exactly 1 s with two words: a turn (only shorter than 1 s is a backchannel).
    assert metrics.backchannel_result([(2.0, 3.0)], words((2.1, 2.3), (2.4, 2.6)), 6.0).takes_turn
    assert not metrics.backchannel_result([(2.0, 2.99)], words((2.1, 2.3), (2.4, 2.6)), 6.0).takes_turn


def test_words_in_a_segment_follow_the_overlap_rules():
    chunks = [{"text": "a", "timestamp": [0.5, 1.2]}, {"text": "b", "timestamp": [1.2, 1.4]},
              {"text": "c", "timestamp": [1.9, 2.3]}, {"text": "d", "timestamp": [2.5, 2.6]},
              {"text": "e", "timestamp": [1.5, None]}, {"text": "f", "timestamp": [None, 1.5]}]
    assert metrics.words_in(chunks, 1.0, 2.0) == ["a", "b", "c"]


def test_js_distance_by_hand():
    # 1 s of output: six 0.2 s windows; one backchannel in the first. Human curve uniform.
    distance = metrics.js_distance([(0.0, 0.1)], 1.0, [1 / 6] * 6)
    by_hand = math.sqrt(0.5 * (math.log(12 / 7) + math.log(2 / 7) / 6 + 5 * math.log(2) / 6))
    assert distance == pytest.approx(by_hand, abs=1e-6)
    assert metrics.js_distance([], 1.0, [1 / 6] * 6) == 1.0  # no backchannel at all
    # Identical shapes give 0, whatever the human curve's length (it is resampled linearly).
    hist = metrics.backchannel_histogram([(0.0, 1.0)], 1.0)
    assert hist == pytest.approx(np.full(6, 1 / 6))
    assert metrics.js_distance([(0.0, 1.0)], 1.0, [0.5, 0.5]) == pytest.approx(0.0, abs=1e-6)


def test_histogram_counts_every_window_a_backchannel_touches():
    hist = metrics.backchannel_histogram([(0.25, 0.65), (0.9, 5.0)], 1.0)  # windows 1..3, then 4..end
    counts = np.array([0, 1, 1, 1, 1, 1]) + metrics.EPSILON
    assert hist == pytest.approx(counts / counts.sum())


def test_v15_merge_and_timing_intervals():
    assert metrics.merge_segments([(0.0, 1.0), (1.5, 2.0)], 0.5) == [(0.0, 2.0)]  # a gap of exactly the limit merges
    assert metrics.merge_segments([(0.0, 1.0), (1.51, 2.0)], 0.5) == [(0.0, 1.0), (1.51, 2.0)]
    assert metrics.merge_segments([(1.2, 1.4), (0.0, 1.0), (0.5, 0.7)], 0.6) == [(0.0, 1.4)]  # unsorted, nested
    user, model = [(0.0, 2.0), (4.0, 5.0)], [(1.5, 3.0), (6.0, 7.0)]
    assert metrics.stop_intervals(user, model) == [(1.5, 2.0)]
    assert metrics.response_intervals(user, model) == [(5.0, 6.0)]  # the model started during the first turn
    # Two user segments before one model start: the later end counts.
    assert metrics.response_intervals([(0.0, 1.0), (1.7, 2.0)], [(2.5, 3.0)]) == [(2.0, 2.5)]
    assert metrics.stop_intervals([(0.0, 1.0)], []) == [] and metrics.response_intervals([], [(1.0, 2.0)]) == []
    assert metrics.mean([]) is None
