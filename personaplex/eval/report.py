"""Reports of scored runs: a Markdown table and a figure comparing the run with other rows.

Other rows (published results, other checkpoints) come from a JSON file the user gives, mapping a row label to
``{"<task folder or task>": {"<metric>": value}}``; no published numbers are bundled.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PersonaplexError

LOWER_IS_BETTER = {"latency", "jsd", "stop_latency", "response_latency"}
LABELS = {"tor": "TOR", "latency": "latency (s)", "relevance": "relevance (0-5)", "frequency": "freq. (1/s)",
          "jsd": "JSD", "stop_latency": "stop latency (s)", "response_latency": "response latency (s)",
          "score": "score (0-5)", "pass_rate": "pass rate"}


class ReportError(PersonaplexError):
    """A scores or comparison file is missing or malformed."""


def read_json(path: Path) -> dict:
    if not Path(path).is_file():
        raise ReportError(f"file not found: {path}")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{path} is not valid JSON ({error})") from error


def _cell(value) -> str:
    return "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def markdown(summary: dict[str, dict], title: str, others: dict[str, dict] | None = None, label: str = "this run") -> str:
    """One table per task folder: a row for the run and one per comparison row."""
    lines = [f"# {title}", ""]
    for group, entry in summary.items():
        names = [k for k in entry if k not in ("task", "samples")]
        lines += [f"## {group} ({entry['task']}, {entry['samples']} samples)", "",
                  "| model | " + " | ".join(LABELS.get(n, n) for n in names) + " |",
                  "|---" * (len(names) + 1) + "|",
                  f"| {label} | " + " | ".join(_cell(entry[n]) for n in names) + " |"]
        for row_label, row in (others or {}).items():
            values = row.get(group) or row.get(entry["task"])
            if values:
                lines.append(f"| {row_label} | " + " | ".join(_cell(values.get(n)) for n in names) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, dict], path: Path, title: str, others: dict[str, dict] | None = None,
         label: str = "this run") -> None:
    """One panel per (group, metric), a bar per row; the lower/higher-is-better direction in each panel's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(group, name) for group, entry in summary.items() for name in entry if name not in ("task", "samples")]
    if not panels:
        raise ReportError("nothing to plot: the scores hold no metrics")
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
    series = [(label, summary)] + [(name, row) for name, row in (others or {}).items()]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (group, name) in zip(axes.flat, panels):
        task = summary[group]["task"]
        labels, values = [], []
        for series_label, data in series:
            entry = data.get(group) or data.get(task) or {}
            if entry.get(name) is not None:
                labels.append(series_label)
                values.append(entry[name])
        if not values:  # e.g. a latency when no sample took the turn
            ax.text(0.5, 0.5, "no value\n(no sample qualified)", ha="center", va="center", fontsize=8,
                    transform=ax.transAxes)
            ax.set_xticks([])
        ax.bar(range(len(values)), values, color=colours[: len(values)])
        if name in ("tor", "pass_rate", "jsd"):
            ax.set_ylim(0, 1.05)
        elif name in ("relevance", "score"):
            ax.set_ylim(0, 5.2)
        else:
            ax.set_ylim(0, max(values + [0.0]) * 1.2 or 1.0)
        ax.set_xticks(range(len(values)), labels, rotation=20, fontsize=7)
        arrow = "lower is better" if name in LOWER_IS_BETTER else "higher is better"
        ax.set_title(f"{group}\n{LABELS.get(name, name)} ({arrow})", fontsize=8)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(scores_path: Path, out_dir: Path, title: str, others_path: Path | None, label: str) -> list[Path]:
    scores = read_json(scores_path)
    if "summary" not in scores:
        raise ReportError(f"{scores_path} holds no 'summary': give the scores.json a score command wrote")
    others = read_json(others_path) if others_path else None
    out_dir.mkdir(parents=True, exist_ok=True)
    table, figure = out_dir / "report.md", out_dir / "report.png"
    text = markdown(scores["summary"], title, others, label)
    table.write_text(text + f"\n![{title}](report.png)\n", encoding="utf-8")
    plot(scores["summary"], figure, title, others, label)
    return [table, figure]
