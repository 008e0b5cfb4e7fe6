"""Recognition, voice activity and scoring on synthetic audio: espeak-ng speech placed at known times."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import sphn

pytest.importorskip("pocketsphinx")
pytest.importorskip("silero_vad")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed", allow_module_level=True)

from personaplex.audio import audio_file_format, resample
from personaplex.eval import layout, metrics
from personaplex.eval.asr import make_recognizer, transcribe_file
from personaplex.eval.persona_bench import synthesize
from personaplex.eval.scoring import score, score_sample
from personaplex.eval.vad import MissingDependency, benchmark_backchannel_segments, file_segments

RATE = 24_000
SENTENCE = "I think that the weather will be lovely for a long walk in the park tomorrow"


def voice(text: str) -> np.ndarray:
    """espeak-ng speech without the silence it leaves before and after the words."""
    audio = synthesize(text, RATE)
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    return audio[loud[0] : loud[-1] + 1]


def place(path: Path, total: float, *speech: tuple[float, str], rate: int = RATE) -> list[tuple[float, float]]:
    """Write ``total`` seconds of audio at ``rate`` with each (start, text) spoken at its start; returns the spans."""
    audio = np.zeros(int(total * RATE), np.float32)
    spans = []
    for start, text in speech:
        speech = voice(text)
        first = int(start * RATE)
        audio[first : first + len(speech)] = speech[: len(audio) - first]
        spans.append((start, start + len(speech) / RATE))
    path.parent.mkdir(parents=True, exist_ok=True)
    sphn.write_wav(str(path), resample(audio, RATE, rate), rate)
    return spans


@pytest.fixture(scope="module")
def recognizer():
    return make_recognizer("pocketsphinx")


def test_pocketsphinx_words_sit_where_the_speech_is(tmp_path, recognizer):
    [(start, end)] = place(tmp_path / "a.wav", 6.0, (1.5, SENTENCE))
    result = transcribe_file(recognizer, tmp_path / "a.wav")
    chunks = result["chunks"]
    assert len(chunks) >= 6 and result["text"] == " ".join(c["text"] for c in chunks)
    assert abs(chunks[0]["timestamp"][0] - start) < 0.3
    assert abs(chunks[-1]["timestamp"][1] - end) < 0.3
    assert all(a["timestamp"][0] <= b["timestamp"][0] for a, b in itertools.pairwise(chunks))
    place(tmp_path / "silence.wav", 2.0)
    assert transcribe_file(recognizer, tmp_path / "silence.wav") == {"text": "", "chunks": []}


def test_silero_segments_and_no_speech(tmp_path):
    spans = place(tmp_path / "a.wav", 8.0, (1.0, "hello there"), (4.0, "good morning to you"))
    segments, duration = file_segments(tmp_path / "a.wav")
    assert duration == pytest.approx(8.0)
    assert len(segments) == 2
    for (start, end), (s, e) in zip(spans, segments):
        assert abs(s - start) < 0.15 and abs(e - end) < 0.2
    place(tmp_path / "silence.wav", 3.0)
    assert file_segments(tmp_path / "silence.wav")[0] == []


def _on_tenths(value: float) -> bool:
    return abs(value * 10 - round(value * 10)) < 1e-9


def test_backchannel_vad_reads_files_as_the_official_scorer(tmp_path):
    """The official call: times rounded to 0.1 s, and a 24 kHz file read as 16 kHz (times x1.5, duration true)."""
    speech = ((1.0, "yeah"), (4.0, "okay sure"))
    spans = place(tmp_path / "16k.wav", 8.0, *speech, rate=16_000)
    place(tmp_path / "24k.wav", 8.0, *speech, rate=24_000)
    assert audio_file_format(tmp_path / "24k.wav") == (24_000, 8 * 24_000)
    for name in ("16k.wav", "24k.wav"):
        exact, duration = file_segments(tmp_path / name)
        assert duration == pytest.approx(8.0) and len(exact) == 2
        for (start, end), (s, e) in zip(spans, exact):  # the corrected reading sits on the speech either way
            assert abs(s - start) < 0.15 and abs(e - end) < 0.2
    # 16 kHz: the same VAD run, each time rounded to 0.1 s.
    exact16, _ = file_segments(tmp_path / "16k.wav")
    official16, duration16 = benchmark_backchannel_segments(tmp_path / "16k.wav")
    assert official16 == [(round(s, 1), round(e, 1)) for s, e in exact16] and duration16 == pytest.approx(8.0)
    assert official16 != exact16
    # 24 kHz: every time 1.5x the true one (the VAD hears slowed-down speech), on 0.1 s steps; the duration is true.
    official24, duration24 = benchmark_backchannel_segments(tmp_path / "24k.wav")
    assert duration24 == pytest.approx(8.0) and len(official24) == 2
    for (start, end), (s, e) in zip(spans, official24):
        assert _on_tenths(s) and _on_tenths(e)
        assert abs(s - 1.5 * start) < 0.2 and abs(e - 1.5 * end) < 0.25
    place(tmp_path / "silence.wav", 3.0)
    assert benchmark_backchannel_segments(tmp_path / "silence.wav") == ([], pytest.approx(3.0))


def test_backchannel_scores_of_a_24khz_output_follow_the_official_reading(tmp_path):
    """Two short replies ("yeah", then two words in 0.77 s): backchannels at their true times, but read from a
    24 kHz file the second lasts over 1 s, which makes it a turn for the official scorer."""
    speech = ((1.0, "yeah"), (4.0, "okay sure"))
    human = {"1": list(np.linspace(0.0, 1.0, 40))}
    chunks = {"text": "yeah okay sure", "chunks": [{"text": "yeah", "timestamp": [1.0, 1.38]},
                                                   {"text": "okay", "timestamp": [4.0, 4.35]},
                                                   {"text": "sure", "timestamp": [4.4, 4.77]}]}
    rows = {}
    for rate in (16_000, 24_000):
        folder = tmp_path / str(rate) / "icc_backchannel" / "1"
        place(folder / "input.wav", 8.0, (0.3, "so what do you think"), rate=16_000)
        place(folder / "output.wav", 8.0, *speech, rate=rate)
        (folder / "output.json").write_text(json.dumps(chunks))
        [sample] = layout.discover(folder.parent)
        rows[rate] = score_sample(sample, human=human), score_sample(sample, human=human, official=False)
    official16, corrected16 = rows[16_000]
    official24, corrected24 = rows[24_000]
    assert official16["tor"] == 0 and corrected16["tor"] == 0 and corrected24["tor"] == 0
    assert official24["tor"] == 1  # the last segment, 0.77 s of speech read as over 1 s
    for official in (official16, official24):
        [[s1, e1], [s2, e2]] = official["backchannels"]
        assert all(_on_tenths(t) for t in (s1, e1, s2, e2))
    scale = {16_000: 1.0, 24_000: 1.5}
    for rate, (official, corrected) in rows.items():
        assert official["frequency"] == corrected["frequency"] == pytest.approx(2 / 8.0)  # true duration
        starts = [s for s, _ in official["backchannels"]]
        assert starts == pytest.approx([scale[rate] * 1.0, scale[rate] * 4.0], abs=0.2)
        assert [s for s, _ in corrected["backchannels"]] == pytest.approx([1.0, 4.0], abs=0.1)
        # The distance is the benchmark's formula on the segments as read.
        assert official["jsd"] == pytest.approx(metrics.js_distance(
            [tuple(b) for b in official["backchannels"]], 8.0, human["1"]))
    assert abs(official24["jsd"] - corrected24["jsd"]) > 0.01


def test_stronger_recognisers_say_what_is_missing(tmp_path):
    for name, package in (("parakeet", "nemo"), ("whisper", "faster_whisper")):
        try:
            __import__(package)
        except ImportError:
            with pytest.raises(MissingDependency, match="needs"):
                make_recognizer(name)
        else:
            with pytest.raises(MissingDependency, match="weights not found"):
                make_recognizer(name, tmp_path / "absent")


def _sample(root: Path, task_dir: str, annotations: dict, output: list[tuple[float, str]], total: float = 7.0,
            user: list[tuple[float, str]] | None = None) -> layout.Sample:
    folder = root / task_dir / "1"
    place(folder / "input.wav", total, *(user or [(0.3, "so what do you think")]))
    place(folder / "output.wav", total, *output)
    for name, value in annotations.items():
        (folder / name).write_text(json.dumps(value))
    [sample] = layout.discover(root / task_dir)
    return sample


def _transcribe(sample: layout.Sample, recognizer) -> None:
    sample.output_json.write_text(json.dumps(transcribe_file(recognizer, sample.output_wav)))


@pytest.mark.slow
def test_turn_taking_latency_and_take_over_from_audio(tmp_path, recognizer):
    turn = {"turn_taking.json": [{"text": "[TURN-TAKING]", "timestamp": [2.0, 2.4]}]}
    on_time = _sample(tmp_path / "a", "candor_turn_taking", turn, [(2.5, SENTENCE)])
    early = _sample(tmp_path / "b", "candor_turn_taking", turn, [(1.0, SENTENCE)])
    silent = _sample(tmp_path / "c", "candor_turn_taking", turn, [])
    for sample in (on_time, early, silent):
        _transcribe(sample, recognizer)
    assert on_time.task == layout.TURN_TAKING
    row = score_sample(on_time)
    assert row["tor"] == 1 and abs(row["latency"] - 0.5) < 0.3
    assert score_sample(early) == {"tor": 1, "latency": 0.0}  # started before the user stopped: clipped
    assert score_sample(early, official=False)["latency"] == pytest.approx(-1.0, abs=0.3)
    assert score_sample(silent) == {"tor": 0, "latency": None}


@pytest.mark.slow
def test_pause_and_backchannel_from_audio(tmp_path, recognizer):
    pause = _sample(tmp_path, "synthetic_pause_handling", {"pause.json": [{"text": "[PAUSE]", "timestamp": [2, 3]}]},
                    [(2.2, SENTENCE)])
    quiet = _sample(tmp_path / "q", "candor_pause_handling", {"pause.json": [{"text": "[PAUSE]", "timestamp": [2, 3]}]}, [])
    backchannel = _sample(tmp_path, "icc_backchannel", {}, [(2.0, "yeah")], total=6.0)
    for sample in (pause, quiet, backchannel):
        _transcribe(sample, recognizer)
    assert score_sample(pause) == {"tor": 1} and score_sample(quiet) == {"tor": 0}
    row = score_sample(backchannel, human={"1": [1.0] * 30})
    assert row["tor"] == 0 and len(row["backchannels"]) == 1
    start, end = row["backchannels"][0]
    assert abs(start - 1.5 * 2.0) < 0.2 and end - start < 1.0  # a 24 kHz output: the official scorer reads x1.5
    assert abs(score_sample(backchannel, official=False)["backchannels"][0][0] - 2.0) < 0.15
    assert row["frequency"] == pytest.approx(1 / 6.0)
    assert 0.0 < row["jsd"] < 1.0
    summary = score([backchannel], progress=False)["summary"]["icc_backchannel"]
    assert summary["tor"] == 0.0 and summary["jsd"] is None and summary["frequency"] == pytest.approx(1 / 6)


@pytest.mark.slow
def test_v15_stop_and_response_latency_from_audio(tmp_path):
    user_spans = [(0.5, SENTENCE)]
    sample = _sample(tmp_path / "v1.5", "user_backchannel", {"metadata.json": {"timestamps": [1, 2]}},
                     [(5.5, "sure, here is my answer")], total=9.0, user=user_spans)
    (_, user_end), = [(s, s + len(voice(t)) / RATE) for s, t in user_spans]
    row = score_sample(sample)
    assert sample.task == layout.OVERLAP
    assert row["latency_stop_list"] == [] and row["stop_latency"] is None
    [(gap_start, gap_end)] = row["latency_resp_list"]
    assert abs(gap_start - user_end) < 0.2 and abs(gap_end - 5.5) < 0.15
    assert row["response_latency"] == pytest.approx(gap_end - gap_start)
    # The model talking over the user: the overlap is the stop latency.
    over = _sample(tmp_path / "w" / "v1.5", "talking_to_other", {"metadata.json": {"timestamps": [1, 2]}},
                   [(2.0, SENTENCE)], total=9.0, user=user_spans)
    [(stop_start, stop_end)] = score_sample(over)["latency_stop_list"]
    assert abs(stop_start - 2.0) < 0.15 and abs(stop_end - user_end) < 0.2


def test_synthetic_dataset_annotations_match_its_audio(tmp_path):
    from personaplex.eval.synthetic import build

    build(tmp_path)
    samples = layout.discover(tmp_path)
    assert {s.task for s in samples} == {layout.PAUSE, layout.TURN_TAKING, layout.INTERRUPTION, layout.BACKCHANNEL}
    assert layout.discover(tmp_path, [layout.PAUSE])[0].task_dir == "synthetic_pause_handling"
    pause = next(s for s in samples if s.task == layout.PAUSE)
    (first_end, second_start) = pause.annotation("pause.json")[0]["timestamp"]
    segments, _ = file_segments(pause.input_wav)
    assert len(segments) == 2
    assert abs(segments[0][1] - first_end) < 0.2 and abs(segments[1][0] - second_start) < 0.15
    interruption = next(s for s in samples if s.task == layout.INTERRUPTION)
    start, end = interruption.annotation("interrupt.json")[0]["timestamp"]
    segments, _ = file_segments(interruption.input_wav)
    assert abs(segments[-1][0] - start) < 0.15 and abs(segments[-1][1] - end) < 0.2
