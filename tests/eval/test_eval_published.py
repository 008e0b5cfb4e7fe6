"""The published Full-Duplex-Bench rows bundled with the package, and reports that compare a run with them."""

from __future__ import annotations

import fnmatch
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import sphn

from personaplex.cli import main
from personaplex.eval import layout, published, synthetic
from personaplex.eval.report import better, comparison_rows, markdown, quirks_note
from personaplex.eval.scoring import AGGREGATES, summarize

ROOT = Path(__file__).resolve().parents[2]


def test_the_bundled_file_loads_and_every_row_names_its_source():
    values = published.load()
    assert {v.model for v in values} == {"PersonaPlex", "Moshi"}
    keys = [(v.model, v.task_dir, v.metric) for v in values]
    assert len(keys) == len(set(keys))  # one number per model, folder and metric
    for v in values:
        assert v.citation.strip() and v.url.startswith("https://")
        assert "Full-Duplex-Bench" in v.citation
        assert v.version in ("v1.0", "v1.5")
        assert math.isfinite(v.value) and v.value >= 0
    sources = published.sources(values)
    assert "arXiv:2602.06053" in sources["PersonaPlex (published)"]
    assert "arXiv:2503.04721" in sources["Moshi (published)"]


def test_rows_line_up_with_the_scorers_keys(tmp_path):
    for v in published.load():
        assert v.task in layout.TASKS
        assert v.metric in AGGREGATES[v.task], f"{v.model}: {v.metric} is not a {v.task} metric of the scorer"
        assert v.better == better(v.task, v.metric)
        folder = tmp_path / v.task_dir / "1"  # the folder name alone tells the layout its task
        folder.mkdir(parents=True, exist_ok=True)
        sphn.write_wav(str(folder / layout.INPUT_WAV), np.zeros(160, np.float32), 16_000)
        assert layout.task_of(folder.parent) == v.task
    # the tiny synthetic set uses the benchmark's folder names, so a demo run lines up too
    assert {task_dir for task_dir, _, _ in synthetic.SAMPLES} <= {v.task_dir for v in published.load()}


def test_directions_follow_the_benchmark():
    assert better(layout.PAUSE, "tor") == better(layout.BACKCHANNEL, "tor") == "lower"
    assert better(layout.TURN_TAKING, "tor") == better(layout.INTERRUPTION, "tor") == "higher"
    assert better(layout.BACKCHANNEL, "frequency") == better(layout.INTERRUPTION, "relevance") == "higher"
    assert better(layout.BACKCHANNEL, "jsd") == better(layout.TURN_TAKING, "latency") == "lower"


def test_comparison_rows_are_keyed_by_folder_and_by_unambiguous_task():
    rows = published.comparison()
    persona_plex = rows["PersonaPlex (published)"]
    assert persona_plex["synthetic_pause_handling"] == {"tor": 0.584}
    assert persona_plex["candor_pause_handling"] == {"tor": 0.662}
    assert "pause_handling" not in persona_plex  # two published folders, no overall number
    assert persona_plex["user_interruption"] == {"tor": 1.0, "relevance": 4.21, "latency": 0.4}
    assert rows["Moshi (published)"]["candor_turn_taking"] == {"tor": 0.941, "latency": 0.265}


def test_the_json_ships_in_the_wheel():
    config = (ROOT / "pyproject.toml").read_text()
    package_data = config.split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    line = re.search(r'^"personaplex\.eval" = \[(.*)\]$', package_data, re.MULTILINE)
    assert line, "pyproject.toml ships no package data for personaplex.eval"
    patterns = re.findall(r'"([^"]+)"', line.group(1))
    assert any(fnmatch.fnmatch(published.RESOURCE, p) for p in patterns)
    assert (ROOT / "personaplex" / "eval" / published.RESOURCE).is_file()


def _summary() -> dict:
    rows = {
        "synthetic_pause_handling/1": {"task": layout.PAUSE, "task_dir": "synthetic_pause_handling", "tor": 0},
        "candor_pause_handling/1": {"task": layout.PAUSE, "task_dir": "candor_pause_handling", "tor": 1},
        "candor_turn_taking/1": {"task": layout.TURN_TAKING, "task_dir": "candor_turn_taking", "tor": 0,
                                 "latency": None},
        "icc_backchannel/1": {"task": layout.BACKCHANNEL, "task_dir": "icc_backchannel", "tor": 0,
                              "frequency": 0.05, "jsd": 0.9},
        "synthetic_user_interruption/1": {"task": layout.INTERRUPTION, "task_dir": "synthetic_user_interruption",
                                          "tor": 1, "latency": 0.3},
    }
    return summarize(rows)


def test_markdown_holds_the_published_rows_and_dashes_for_what_is_not_published():
    others, notes = comparison_rows(published=True)
    text = markdown(_summary(), "Full-Duplex-Bench", others, "demo", notes)
    assert "| model | TOR ↓ |" in text  # pause handling: holding the floor is right
    assert "| PersonaPlex (published) | 0.584 |" in text and "| Moshi (published) | 0.985 |" in text
    assert "| PersonaPlex (published) | 0.327 | 0.025 | 0.649 |" in text
    assert "| Moshi (published) | 1.000 | 0.765 | 0.257 |" in text
    assert "| demo | 0.000 | – |" in text  # no sample took the turn: no latency
    overall = text.split("## pause_handling (all)")[1].split("##")[0]
    assert "| PersonaPlex (published) | – |" in overall  # no published overall pause number
    assert "Sources of the comparison rows:" in text and "arXiv:2602.06053" in text


def _scores_file(tmp_path, official: bool = True) -> Path:
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({"official_quirks": official, "summary": _summary(), "samples": {}}))
    return path


def test_report_compares_with_the_published_rows_by_default(tmp_path):
    pytest.importorskip("matplotlib")
    scores = _scores_file(tmp_path)
    assert main(["eval", "fdb", "report", "--scores", str(scores), "--out", str(tmp_path / "a")]) == 0
    table = (tmp_path / "a" / "report.md").read_text()
    assert "| PersonaPlex (published) | 0.992 | 0.070 |" in table and "| Moshi (published) |" in table
    assert (tmp_path / "a" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["eval", "fdb", "report", "--scores", str(scores), "--out", str(tmp_path / "b"), "--no-published"]) == 0
    assert "(published)" not in (tmp_path / "b" / "report.md").read_text()

    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"Moshi (published)": {"candor_turn_taking": {"tor": 0.5}},
                                "other checkpoint": {"smooth_turn_taking": {"tor": 0.25}}}))
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"third": {"candor_turn_taking": {"latency": 0.125}}}))
    assert main(["eval", "fdb", "report", "--scores", str(scores), "--out", str(tmp_path / "c"),
                 "--compare", str(mine), str(extra)]) == 0
    table = (tmp_path / "c" / "report.md").read_text()
    assert "| Moshi (published) | 0.500 | – |" in table  # the user's row replaced the published one
    assert "| other checkpoint | 0.250 | – |" in table and "| third | – | 0.125 |" in table
    assert "| PersonaPlex (published) | 0.992 | 0.070 |" in table
    assert f"- Moshi (published): {mine}" in table


def test_report_warns_when_the_run_was_scored_without_the_quirks(tmp_path):
    pytest.importorskip("matplotlib")
    scores = _scores_file(tmp_path, official=False)
    assert main(["eval", "fdb", "report", "--scores", str(scores)]) == 0
    assert "do not compare with the published rows" in (tmp_path / "report.md").read_text()


def test_reports_say_at_which_rate_the_backchannel_outputs_were_scored():
    def scores(*rates):
        rows = {f"icc_backchannel/{i}": {"task": layout.BACKCHANNEL, "output_rate": r} for i, r in enumerate(rates)}
        return {"official_quirks": True, "samples": rows}

    [same] = quirks_note(scores(24_000, 24_000), published=True)
    assert "at 24 kHz, as the published rows'" in same and "note:" not in same
    [other] = quirks_note(scores(16_000, 24_000), published=True)
    assert other.startswith("- note: backchannel outputs at 16 kHz, 24 kHz") and "do not compare" in other
    assert quirks_note(scores(16_000), published=False) == []
    assert quirks_note({"official_quirks": True, "samples": {}}, published=True) == []  # no backchannel task


def test_a_malformed_comparison_file_is_one_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"row": [1, 2]}))
    assert main(["eval", "fdb", "report", "--scores", str(_scores_file(tmp_path)), "--compare", str(bad)]) == 2
    assert "comparison rows must look like" in capsys.readouterr().err


def test_the_plot_is_drawn_with_the_published_rows(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from personaplex.eval import report

    drawn = {}

    real_bar = matplotlib.axes.Axes.bar

    def bar(self, x, heights, *args, **kwargs):
        drawn[self.get_title()] = list(heights)
        return real_bar(self, x, heights, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    others, _ = comparison_rows(published=True)
    report.plot(_summary(), tmp_path / "report.png", "Full-Duplex-Bench", others, "demo")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn["candor_turn_taking\nTOR (higher is better)"] == [0.0, 0.992, 0.941]
    assert drawn["synthetic_pause_handling\nTOR (lower is better)"] == [0.0, 0.584, 0.985]
    assert drawn["synthetic_user_interruption\nrelevance (0-5) (higher is better)"] == [0.0, 4.21, 0.765]
