"""The benchmark's folder layout, task recognition and the runner's persona choice."""

from __future__ import annotations

import json

import pytest

from personaplex.eval import layout
from personaplex.eval.runner import CONVERSATION_PROMPT, parse_prompt_overrides, prompt_for, sample_prompt


def make(root, task_dir, sample_id="1", **files):
    folder = root / task_dir / sample_id
    folder.mkdir(parents=True)
    (folder / "input.wav").write_bytes(b"")
    for name, value in files.items():
        (folder / name.replace("_json", ".json")).write_text(json.dumps(value))
    return folder


def test_tasks_are_recognised_by_annotations_then_names(tmp_path):
    make(tmp_path, "user_interruption", metadata_json={"timestamps": [1, 2]})  # v1.5: timing, not v1 interruption
    make(tmp_path, "synthetic_user_interruption", interrupt_json=[{}])
    make(tmp_path, "my_pauses", pause_json=[{}])
    make(tmp_path, "candor_turn_taking")
    make(tmp_path, "icc")
    for sample_id in ("10", "2"):
        make(tmp_path, "icc_backchannel", sample_id)
    (tmp_path / "notes").mkdir()
    found = {(s.task_dir, s.sample_id): s.task for s in layout.discover(tmp_path)}
    assert found == {("user_interruption", "1"): layout.OVERLAP, ("synthetic_user_interruption", "1"): layout.INTERRUPTION,
                     ("my_pauses", "1"): layout.PAUSE, ("candor_turn_taking", "1"): layout.TURN_TAKING,
                     ("icc", "1"): layout.BACKCHANNEL, ("icc_backchannel", "2"): layout.BACKCHANNEL,
                     ("icc_backchannel", "10"): layout.BACKCHANNEL}
    assert [s.sample_id for s in layout.discover(tmp_path / "icc_backchannel")] == ["2", "10"]  # one task folder
    assert {s.task_dir for s in layout.discover(tmp_path, [layout.PAUSE])} == {"my_pauses"}
    with pytest.raises(layout.DatasetError, match="unknown task"):
        layout.discover(tmp_path, ["pauses"])
    with pytest.raises(layout.DatasetError, match="no samples"):
        layout.discover(tmp_path, [layout.PERSONA])
    with pytest.raises(layout.DatasetError, match="missing turn_taking.json"):
        next(s for s in layout.discover(tmp_path) if s.task_dir == "candor_turn_taking").annotation("turn_taking.json")


def test_personas_per_task_and_overrides(tmp_path):
    assert prompt_for(layout.PAUSE, {}) == CONVERSATION_PROMPT == "You enjoy having a good conversation."
    assert prompt_for(layout.INTERRUPTION, {}).startswith("You are a wise and friendly teacher.")
    overrides = parse_prompt_overrides(["user_interruption=Be brief.", "You are calm."])
    assert prompt_for(layout.INTERRUPTION, overrides) == "Be brief." and prompt_for(layout.PAUSE, overrides) == "You are calm."
    folder = make(tmp_path, "persona", question_json={})
    (folder / "persona.txt").write_text("You work for Velo Rent.\n")
    [sample] = layout.discover(tmp_path)
    assert sample.task == layout.PERSONA and sample_prompt(sample, {}) == "You work for Velo Rent."
    assert sample_prompt(sample, {"persona": "Other."}) == "Other."


def test_summary_per_folder_and_per_task_over_several_folders():
    from personaplex.eval.scoring import summarize

    rows = {"candor/1": {"task": layout.TURN_TAKING, "task_dir": "candor", "tor": 1, "latency": 0.5},
            "candor/2": {"task": layout.TURN_TAKING, "task_dir": "candor", "tor": 0, "latency": None},
            "synthetic/1": {"task": layout.TURN_TAKING, "task_dir": "synthetic", "tor": 1, "latency": 0.2},
            "icc/1": {"task": layout.BACKCHANNEL, "task_dir": "icc", "tor": 0, "frequency": 0.1, "jsd": None}}
    summary = summarize(rows)
    assert summary["candor"] == {"task": layout.TURN_TAKING, "samples": 2, "tor": 0.5, "latency": 0.5}
    assert summary["smooth_turn_taking (all)"]["tor"] == pytest.approx(2 / 3)
    assert summary["smooth_turn_taking (all)"]["latency"] == pytest.approx(0.35)
    assert summary["icc"] == {"task": layout.BACKCHANNEL, "samples": 1, "tor": 0.0, "frequency": 0.1, "jsd": None}
    assert "backchannel (all)" not in summary
