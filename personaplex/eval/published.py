"""Published Full-Duplex-Bench results shipped with the package: the rows a report compares a run with by default.

``data/fdb_published.json`` holds one row per (model, task folder, metric), each naming its source; a metric a
source does not publish for a model is simply absent, and reports show it as "–". Metric names are the scorer's
keys and task folders the benchmark's, so the rows line up with a run's ``scores.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .layout import DatasetError

RESOURCE = "data/fdb_published.json"
LABEL_SUFFIX = " (published)"


@dataclass(frozen=True)
class PublishedValue:
    model: str
    version: str  # benchmark version: "v1.0" or "v1.5"
    task: str  # the scorer's task (layout.TASKS)
    task_dir: str  # the benchmark's task folder, e.g. candor_pause_handling
    metric: str  # the scorer's metric key (scoring.AGGREGATES)
    value: float
    better: str  # "higher" or "lower"
    citation: str
    url: str

    @property
    def label(self) -> str:
        return self.model + LABEL_SUFFIX


def load(path: Path | None = None) -> list[PublishedValue]:
    """The bundled rows (or those of ``path``, same format), with their sources resolved."""
    if path is None:
        text = resources.files("personaplex.eval").joinpath(RESOURCE).read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    data = json.loads(text)
    sources = data["sources"]
    values = []
    for row in data["rows"]:
        if row["source"] not in sources:
            raise DatasetError(f"published row {row['model']}/{row['task_dir']}/{row['metric']}: "
                               f"unknown source {row['source']!r}")
        source = sources[row["source"]]
        values.append(PublishedValue(row["model"], row["version"], row["task"], row["task_dir"], row["metric"],
                                     float(row["value"]), row["better"], source["citation"], source["url"]))
    return values


def comparison(values: list[PublishedValue] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Rows in the report's comparison format: ``{"<model> (published)": {"<task folder>": {metric: value}}}``.

    A task the model has published numbers for in a single folder is also keyed by the task, so a run whose
    folder is named differently still lines up; pause handling (Candor and synthetic sets) is not, since the
    published table gives no overall number."""
    values = load() if values is None else values
    rows: dict[str, dict[str, dict[str, float]]] = {}
    folders: dict[tuple[str, str], set[str]] = {}
    for v in values:
        rows.setdefault(v.label, {}).setdefault(v.task_dir, {})[v.metric] = v.value
        folders.setdefault((v.label, v.task), set()).add(v.task_dir)
    for (label, task), dirs in folders.items():
        if len(dirs) == 1:
            rows[label][task] = dict(rows[label][next(iter(dirs))])
    return rows


def sources(values: list[PublishedValue] | None = None) -> dict[str, str]:
    """Where each published row comes from: ``{"<model> (published)": "<citation> (<url>)"}``."""
    values = load() if values is None else values
    cited: dict[str, list[str]] = {}
    for v in values:
        text = f"{v.citation} ({v.url})"
        if text not in cited.setdefault(v.label, []):
            cited[v.label].append(text)
    return {label: "; ".join(texts) for label, texts in cited.items()}
