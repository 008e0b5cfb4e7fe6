"""The whole evaluation through the command line with the demo model: run -> transcribe -> score -> report."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import sphn

pytest.importorskip("pocketsphinx")
pytest.importorskip("silero_vad")
pytest.importorskip("matplotlib")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed", allow_module_level=True)

from test_eval_judge import FakeChatServer

from personaplex.cli import main
from personaplex.eval.persona_bench import synthesize


def write_sample(folder: Path, rate: int, text: str, annotations: dict) -> float:
    folder.mkdir(parents=True)
    audio = np.concatenate([np.zeros(rate // 4, np.float32), synthesize(text, rate), np.zeros(rate, np.float32)])
    sphn.write_wav(str(folder / "input.wav"), audio, rate)
    for name, value in annotations.items():
        (folder / name).write_text(json.dumps(value))
    return len(audio) / rate


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "fdb"
    lengths = {
        "candor_pause_handling/1": write_sample(root / "candor_pause_handling" / "1", 16_000, "so I was thinking",
                                                {"pause.json": [{"text": "[PAUSE]", "timestamp": [1.0, 1.8]}]}),
        "candor_turn_taking/1": write_sample(root / "candor_turn_taking" / "1", 24_000, "what do you think",
                                             {"turn_taking.json": [{"text": "[TURN-TAKING]", "timestamp": [1.2, 1.6]}]}),
        "synthetic_user_interruption/1": write_sample(
            root / "synthetic_user_interruption" / "1", 16_000, "wait, tell me about cats",
            {"interrupt.json": [{"context": "tell me about dogs", "interrupt": "wait, tell me about cats",
                                 "timestamp": [0.25, 1.5]}]}),
        "icc_backchannel/1": write_sample(root / "icc_backchannel" / "1", 16_000, "and then we went to the beach", {}),
    }
    (root / "icc_gt_distribution.json").write_text(json.dumps({"1": [0.1] * 10}))
    return root, lengths


@pytest.mark.slow
def test_fdb_pipeline_with_the_demo_model(dataset, tmp_path, capsys):
    root, lengths = dataset
    assert main(["eval", "fdb", "run", "--data", str(root), "--model", "demo", "--seed", "3", "--batch-size", "2"]) == 0
    for key, seconds in lengths.items():  # the model's 24 kHz by default, with the input's duration
        audio, rate = sphn.read(str(root / key / "output.wav"))
        assert rate == 24_000 and abs(audio.shape[-1] / rate - seconds) < 1 / 16_000
    mtime = (root / "icc_backchannel/1/output.wav").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["eval", "fdb", "run", "--data", str(root), "--model", "demo"]) == 0  # resumed: nothing to redo
    assert "4 already done, 0 to run" in capsys.readouterr().err
    assert (root / "icc_backchannel/1/output.wav").stat().st_mtime_ns == mtime
    manifest = json.loads((root / "run_manifest.json").read_text())["runs"][0]
    assert manifest["model"] == "demo" and manifest["seed"] == 3 and manifest["samples"] == 4
    assert manifest["personas"]["user_interruption"].startswith("You are a wise and friendly teacher")
    assert manifest["personas"]["pause_handling"] == "You enjoy having a good conversation."
    assert manifest["output_rate"] == "model" and manifest["output_sample_rates"] == [24_000]

    assert main(["eval", "fdb", "transcribe", "--data", str(root)]) == 0
    for key in lengths:
        transcript = json.loads((root / key / "output.json").read_text())
        assert set(transcript) == {"text", "chunks"}

    reply = "Analysis: fine.\nI would rate the AI's response as 3."
    with FakeChatServer(reply_for=lambda body: reply) as judge:
        assert main(["eval", "fdb", "score", "--data", str(root), "--judge-url", judge.url]) == 0
    scores = json.loads((root / "scores.json").read_text())
    assert set(scores["summary"]) == {"candor_pause_handling", "candor_turn_taking", "synthetic_user_interruption",
                                      "icc_backchannel"}
    assert scores["official_quirks"] is True
    for key, row in scores["samples"].items():
        assert row["tor"] in (0, 1)
        if row["tor"] == 1 and row["task"] != "backchannel":
            assert row["latency"] >= 0.0
    interruption = scores["samples"]["synthetic_user_interruption/1"]
    assert (interruption.get("relevance") == 3) == (interruption["tor"] == 1)
    assert len(judge.requests) == interruption["tor"]
    backchannel = scores["samples"]["icc_backchannel/1"]
    assert (backchannel["jsd"] == 1.0) == (backchannel["backchannels"] == [])  # the human file was found
    assert "| PersonaPlex (published) |" in (root / "scores.md").read_text()  # published rows by default
    assert "--human-distribution" not in (root / "scores.md").read_text()

    # Without the human distribution there is no JSD ("–"), and the command says what it needs.
    (root / "icc_gt_distribution.json").rename(tmp_path / "icc_gt_distribution.json")
    capsys.readouterr()
    with FakeChatServer(reply_for=lambda body: reply) as judge, warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        assert main(["eval", "fdb", "score", "--data", str(root), "--judge-url", judge.url,
                     "--output", str(tmp_path / "no_jsd" / "scores.json")]) == 0
    err = capsys.readouterr().err
    assert "note: JSD (backchannel) needs the benchmark's human distribution: pass --human-distribution" in err
    # Nothing from the libraries underneath reaches the user (a torch FutureWarning once did).
    assert not [w for w in raised if issubclass(w.category, FutureWarning)], [str(w.message) for w in raised]
    assert "JSD is shown as \"–\"" in (tmp_path / "no_jsd" / "scores.md").read_text()
    (tmp_path / "icc_gt_distribution.json").rename(root / "icc_gt_distribution.json")

    compare = tmp_path / "compare.json"
    compare.write_text(json.dumps({"other checkpoint": {"pause_handling": {"tor": 0.5}}}))
    out = tmp_path / "report"
    assert main(["eval", "fdb", "report", "--scores", str(root / "scores.json"), "--out", str(out),
                 "--compare", str(compare), "--label", "demo"]) == 0
    table = (out / "report.md").read_text()
    assert "| demo |" in table and "| other checkpoint | 0.500 |" in table
    assert "| PersonaPlex (published) | 0.662 |" in table and "| Moshi (published) | 0.980 |" in table
    assert "backchannel outputs at 24 kHz, as the published rows'" in table
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The input's rate on request: the finished outputs are resampled to it, nothing runs again.
    capsys.readouterr()
    assert main(["eval", "fdb", "run", "--data", str(root), "--model", "demo", "--output-rate", "input"]) == 0
    assert "4 already done, 0 to run" in capsys.readouterr().err
    for key in lengths:
        audio, rate = sphn.read(str(root / key / "output.wav"))
        reference, input_rate = sphn.read(str(root / key / "input.wav"))
        assert (rate, audio.shape[-1]) == (input_rate, reference.shape[-1])  # time-aligned, sample for sample
    manifest = json.loads((root / "run_manifest.json").read_text())["runs"][-1]
    assert manifest["output_rate"] == "input" and manifest["output_sample_rates"] == [16_000, 24_000]


@pytest.mark.slow
def test_persona_pipeline_with_the_demo_model(tmp_path):
    root = tmp_path / "persona_set"
    assert main(["eval", "persona", "build", "--data", str(root), "--limit", "2"]) == 0
    folders = sorted((root / "persona").iterdir())
    assert [f.name for f in folders] == ["bakery_context_detail_1", "bakery_proper_noun"]
    assert "Crumb and Co" in (folders[0] / "persona.txt").read_text()
    assert main(["eval", "persona", "run", "--data", str(root), "--model", "demo", "--seed", "1"]) == 0
    manifest = json.loads((root / "run_manifest.json").read_text())["runs"][0]
    assert manifest["personas"] == {"persona": "each sample's persona.txt"}
    assert main(["eval", "persona", "transcribe", "--data", str(root)]) == 0

    def grade(body):
        user = body["messages"][1]["content"]
        return "Gives the name.\nScore: 5" if "proper_noun" in user else "Misses the hours.\nScore: 2"

    with FakeChatServer(reply_for=grade) as judge:
        assert main(["eval", "persona", "score", "--data", str(root), "--judge-url", judge.url]) == 0
    assert all("Role prompt: You work for Crumb and Co" in r["messages"][1]["content"] for r in judge.requests)
    summary = json.loads((root / "scores.json").read_text())["summary"]
    assert summary["persona"]["score"] == pytest.approx(3.5) and summary["persona"]["pass_rate"] == pytest.approx(0.5)
    assert summary["persona/proper_noun"]["score"] == 5
    assert "| this run | 3.500 | 0.500 |" in (root / "scores.md").read_text()
    assert main(["eval", "persona", "report", "--scores", str(root / "scores.json")]) == 0
    assert (root / "report.png").is_file()


def test_outputs_at_another_rate_than_asked_are_run_again(tmp_path):
    from personaplex.eval import layout
    from personaplex.eval.runner import is_done

    folder = tmp_path / "candor_pause_handling" / "1"
    folder.mkdir(parents=True)
    sphn.write_wav(str(folder / "input.wav"), np.zeros(16_000, np.float32), 16_000)
    (folder / "pause.json").write_text(json.dumps([{"text": "[PAUSE]", "timestamp": [0.2, 0.4]}]))
    [sample] = layout.discover(tmp_path)
    assert not is_done(sample) and not is_done(sample, "input")  # nothing written yet
    sphn.write_wav(str(sample.output_wav), np.zeros(24_000, np.float32), 24_000)
    assert not is_done(sample)  # the token list comes last: without it the run was cut short
    (folder / layout.TEXT_TOKENS_JSON).write_text("[]")
    assert is_done(sample) and is_done(sample, "input")  # the model's rate: converted when the input's is asked
    sphn.write_wav(str(sample.output_wav), np.zeros(16_000, np.float32), 16_000)
    assert is_done(sample, "input") and not is_done(sample)  # at the input's rate: the model's rate runs again


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "fdb", "run", "--data", str(tmp_path / "absent"), "--model", "demo"]) == 2
    assert capsys.readouterr().err.startswith("error: data folder not found")
    (tmp_path / "empty" / "x").mkdir(parents=True)
    assert main(["eval", "fdb", "score", "--data", str(tmp_path / "empty")]) == 2
    assert "no samples" in capsys.readouterr().err
    assert main(["eval", "fdb", "report", "--scores", str(tmp_path / "nope.json")]) == 2
    assert "file not found" in capsys.readouterr().err
    folder = tmp_path / "t" / "candor_turn_taking" / "1"
    folder.mkdir(parents=True)
    sphn.write_wav(str(folder / "input.wav"), np.zeros(2400, np.float32), 24_000)
    assert main(["eval", "fdb", "transcribe", "--data", str(tmp_path / "t")]) == 2
    assert "run the run step first" in capsys.readouterr().err
    assert main(["eval", "persona", "score", "--data", str(tmp_path / "t")]) == 2  # no persona samples there
    assert "no samples" in capsys.readouterr().err
    sphn.write_wav(str(folder / "output.wav"), np.zeros(2400, np.float32), 24_000)
    assert main(["eval", "fdb", "transcribe", "--data", str(tmp_path / "t"), "--asr", "whisper"]) == 2
    assert "error: the whisper recogniser needs faster-whisper" in capsys.readouterr().err
