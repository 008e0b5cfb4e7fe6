"""Score a run: per sample and per task, with the benchmark's definitions (see ``metrics``)."""

from __future__ import annotations

import json
from pathlib import Path

from . import layout, metrics
from .judge import Judge, rate_interruption
from .layout import DatasetError, Sample


def _transcript(sample: Sample) -> dict:
    if not sample.output_json.is_file():
        raise DatasetError(f"{sample.path}: no {layout.OUTPUT_JSON}; run 'personaplex eval fdb transcribe' first")
    with open(sample.output_json, encoding="utf-8") as f:
        return json.load(f)


def score_sample(sample: Sample, *, official: bool = True, judge: Judge | None = None,
                 human: dict | None = None) -> dict:
    """One sample's metrics as a JSON-ready dict."""
    task = sample.task
    if task == layout.OVERLAP:
        return _timing(sample)
    if task == layout.PERSONA:
        from .persona_bench import grade

        if judge is None:
            raise DatasetError("the persona set is graded by the judge: give --judge-url (and its API key)")
        return grade(judge, sample.path)
    chunks = _transcript(sample)["chunks"]
    if task == layout.PAUSE:
        return {"tor": int(metrics.takes_turn(chunks))}
    if task == layout.TURN_TAKING:
        reference = sample.annotation("turn_taking.json")[0]["timestamp"][0]  # where the user's turn ends
        result = metrics.turn_result(chunks, reference, official)
        return {"tor": int(result.takes_turn), "latency": result.latency}
    if task == layout.INTERRUPTION:
        note = sample.annotation("interrupt.json")[0]
        result = metrics.turn_result(chunks, note["timestamp"][1], official)
        row = {"tor": int(result.takes_turn), "latency": result.latency}
        if result.takes_turn and judge is not None:
            rating, answer = rate_interruption(judge, note["context"], note["interrupt"], _transcript(sample)["text"])
            row.update(relevance=rating, judge_answer=answer)
        return row
    if task == layout.BACKCHANNEL:
        from .vad import benchmark_backchannel_segments, file_segments

        # The official scorer's VAD call: times rounded to 0.1 s, a 24 kHz file's read 1.5x too late (see vad).
        read = benchmark_backchannel_segments if official else file_segments
        segments, duration = read(sample.output_wav)
        curve = None if human is None else human.get(sample.sample_id)
        result = metrics.backchannel_result(segments, chunks, duration, curve, official)
        from ..audio import audio_file_format

        return {"tor": int(result.takes_turn), "frequency": result.frequency, "jsd": result.js_distance,
                "backchannels": [list(b) for b in result.backchannels],
                "output_rate": audio_file_format(sample.output_wav)[0]}
    raise DatasetError(f"cannot score task {task}")


def _timing(sample: Sample) -> dict:
    from .vad import file_segments

    user = metrics.merge_segments(file_segments(sample.input_wav)[0], metrics.USER_MERGE_GAP)
    model = metrics.merge_segments(file_segments(sample.output_wav)[0], metrics.MODEL_MERGE_GAP)
    stops = metrics.stop_intervals(user, model)
    responses = metrics.response_intervals(user, model)
    return {"latency_stop_list": [list(i) for i in stops], "latency_resp_list": [list(i) for i in responses],
            "stop_latency": metrics.mean([e - s for s, e in stops]),
            "response_latency": metrics.mean([e - s for s, e in responses])}


AGGREGATES = {
    layout.PAUSE: ("tor",),
    layout.TURN_TAKING: ("tor", "latency"),
    layout.INTERRUPTION: ("tor", "relevance", "latency"),
    layout.BACKCHANNEL: ("tor", "frequency", "jsd"),
    layout.OVERLAP: ("stop_latency", "response_latency"),
    layout.PERSONA: ("score", "pass_rate"),
}


def summarize(rows: dict[str, dict]) -> dict[str, dict]:
    """Per task folder, per task when it spans several folders, per persona category: the mean of each metric over
    the samples that have it (latency: samples with TOR = 1)."""
    by_dir: dict[str, list[dict]] = {}
    by_task: dict[str, list[dict]] = {}
    for row in rows.values():
        by_dir.setdefault(row["task_dir"], []).append(row)
        by_task.setdefault(row["task"], []).append(row)
        if row["task"] == layout.PERSONA:  # also per question category
            by_dir.setdefault(f"persona/{row['category']}", []).append(row)
    for task, task_rows in by_task.items():  # a task over several folders (Candor and synthetic pauses): overall too
        if len({r["task_dir"] for r in task_rows}) > 1:
            by_dir[f"{task} (all)"] = task_rows
    summary = {}
    for task_dir, task_rows in sorted(by_dir.items()):
        task = task_rows[0]["task"]
        entry = {"task": task, "samples": len(task_rows)}
        for name in AGGREGATES[task]:
            entry[name] = metrics.mean([r[name] for r in task_rows if r.get(name) is not None])
        summary[task_dir] = entry
    return summary


def load_human_distribution(path: Path | None) -> dict | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise DatasetError(f"human backchannel distribution not found: {path} (the benchmark's icc_gt_distribution.json)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def score(samples: list[Sample], *, official: bool = True, judge: Judge | None = None,
          human: dict | None = None, progress: bool = True) -> dict:
    from tqdm import tqdm

    rows = {}
    for sample in tqdm(samples, desc="scoring", unit="sample", disable=None if progress else True):
        row = score_sample(sample, official=official, judge=judge, human=human)
        rows[f"{sample.task_dir}/{sample.sample_id}"] = {"task": sample.task, "task_dir": sample.task_dir, **row}
    return {"official_quirks": official, "judge": None if judge is None else judge.model,
            "summary": summarize(rows), "samples": rows}
