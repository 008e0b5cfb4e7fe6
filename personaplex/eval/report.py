"""Reports of scored runs: a Markdown table and a figure comparing the run with other rows.

Other rows map a row label to ``{"<task folder or task>": {"<metric>": value}}``: by default the published
Full-Duplex-Bench results bundled with the package (``published``), plus any JSON file of that shape the user
gives (other checkpoints, other papers). A metric a row has no number for is shown as "–".
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PersonaplexError
from . import layout

LOWER_IS_BETTER = {"latency", "jsd", "stop_latency", "response_latency"}
# Take-over is wrong during a pause or a backchannel (the user keeps the floor) and right at a turn's end or after
# an interruption, so TOR's direction depends on the task.
LOWER_TOR_TASKS = {layout.PAUSE, layout.BACKCHANNEL}
LABELS = {"tor": "TOR", "latency": "latency (s)", "relevance": "relevance (0-5)", "frequency": "freq. (1/s)",
          "jsd": "JSD", "stop_latency": "stop latency (s)", "response_latency": "response latency (s)",
          "score": "score (0-5)", "pass_rate": "pass rate"}
MISSING = "\u2013"  # en dash: no number (not published, or no sample qualified)


def better(task: str, metric: str) -> str:
    """"lower" or "higher": which way a metric is better for a task, as the benchmark marks it."""
    if metric in LOWER_IS_BETTER or (metric == "tor" and task in LOWER_TOR_TASKS):
        return "lower"
    return "higher"


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
    return MISSING if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def _values(row: dict, group: str, task: str) -> dict:
    """A comparison row's numbers for a group: by task folder first, then by task."""
    return row.get(group) or row.get(task) or {}


def _header(task: str, name: str) -> str:
    return LABELS.get(name, name) + (" \u2193" if better(task, name) == "lower" else " \u2191")


def markdown(summary: dict[str, dict], title: str, others: dict[str, dict] | None = None, label: str = "this run",
             notes: list[str] | None = None) -> str:
    """One table per task folder: a row for the run and one per comparison row (every row in every table, so a
    missing number reads as "–", not as a missing model); ``notes`` (e.g. the published rows' sources) close it."""
    lines = [f"# {title}", ""]
    for group, entry in summary.items():
        task = entry["task"]
        names = [k for k in entry if k not in ("task", "samples")]
        lines += [f"## {group} ({task}, {entry['samples']} samples)", "",
                  "| model | " + " | ".join(_header(task, n) for n in names) + " |",
                  "|---" * (len(names) + 1) + "|",
                  f"| {label} | " + " | ".join(_cell(entry[n]) for n in names) + " |"]
        for row_label, row in (others or {}).items():
            values = _values(row, group, task)
            lines.append(f"| {row_label} | " + " | ".join(_cell(values.get(n)) for n in names) + " |")
        lines.append("")
    if notes:
        lines += ["Sources of the comparison rows:", "", *notes, ""]
    return "\n".join(lines)


def plot(summary: dict[str, dict], path: Path, title: str, others: dict[str, dict] | None = None,
         label: str = "this run") -> None:
    """One panel per (group, metric), a bar per row in the same colour in every panel ("–" where a row has no
    number), one legend for the figure; the lower/higher-is-better direction in each panel's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = [(group, name) for group, entry in summary.items() for name in entry if name not in ("task", "samples")]
    if not panels:
        raise ReportError("nothing to plot: the scores hold no metrics")
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows + 0.6), squeeze=False)
    series = [(label, summary)] + [(name, row) for name, row in (others or {}).items()]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = [cycle[i % len(cycle)] for i in range(len(series))]
    for ax, (group, name) in zip(axes.flat, panels):
        task = summary[group]["task"]
        arrow = "lower is better" if better(task, name) == "lower" else "higher is better"
        ax.set_title(f"{group}\n{LABELS.get(name, name)} ({arrow})", fontsize=8)
        values = [_values(data, group, task).get(name) for _, data in series]
        present = [v for v in values if v is not None]
        if not present:  # e.g. a latency when no sample took the turn, and none published
            ax.text(0.5, 0.5, "no value\n(no sample qualified)", ha="center", va="center", fontsize=8,
                    transform=ax.transAxes)
        ax.bar(range(len(values)), [0.0 if v is None else v for v in values], color=colours)
        if name in ("tor", "pass_rate", "jsd"):  # bounded metrics: the same scale in every panel, room for labels
            top = 1.15
        elif name in ("relevance", "score"):
            top = 5.6
        else:
            top = max(present + [0.0]) * 1.25 or 1.0
        ax.set_ylim(0, top)
        ax.set_xticks([])
        for i, v in enumerate(values):
            ax.text(i, 0.0 if v is None else v, MISSING if v is None else f"{v:.3f}", ha="center", va="bottom",
                    fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.legend(handles=[Patch(color=c, label=s) for c, (s, _) in zip(colours, series)], loc="lower center",
               ncol=min(len(series), 4), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.6 / (2.6 * rows + 0.6), 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _check_rows(rows, path: Path) -> dict[str, dict]:
    shape = '{"label": {"<task or folder>": {"<metric>": value}}}'
    if not isinstance(rows, dict) or not all(isinstance(r, dict) and all(isinstance(v, dict) for v in r.values())
                                              for r in rows.values()):
        raise ReportError(f"{path}: comparison rows must look like {shape}")
    return rows


def comparison_rows(paths: list[Path] | None = None, published: bool = False) -> tuple[dict[str, dict], list[str]]:
    """The rows to compare with and a Markdown line naming each one's source: the bundled published rows when
    ``published``, then every file of ``paths`` in order (a label given again replaces the earlier row)."""
    rows: dict[str, dict] = {}
    notes: dict[str, str] = {}
    if published:
        from . import published as bundled

        values = bundled.load()
        rows.update(bundled.comparison(values))
        notes.update(bundled.sources(values))
    for path in paths or []:
        for row_label, row in _check_rows(read_json(path), path).items():
            rows[row_label] = row
            notes[row_label] = str(path)
    return rows, [f"- {row_label}: {source}" for row_label, source in notes.items()]


PUBLISHED_OUTPUT_RATE = 24_000  # the published rows' outputs: the models' own rate


def quirks_note(scores: dict, published: bool) -> list[str]:
    """Note lines for a run next to published rows: scored without the benchmark's quirks, or backchannel outputs
    at another rate than the published rows' 24 kHz (the official scorer's VAD reads a file's times scaled by
    its rate / 16 kHz, so the rate moves the backchannel numbers)."""
    if not published:
        return []
    if scores.get("official_quirks") is False:
        return [("- note: this run was scored with --no-official-quirks, so its numbers do not compare with the "
                 "published rows")]
    rates = sorted({row["output_rate"] for row in scores.get("samples", {}).values()
                    if row.get("task") == layout.BACKCHANNEL and "output_rate" in row})
    if not rates:
        return []
    listed = ", ".join(f"{r / 1000:g} kHz" for r in rates)
    if rates == [PUBLISHED_OUTPUT_RATE]:
        return [f"- backchannel outputs at {listed}, as the published rows' (the official scorer reads their VAD "
                "times x1.5, for them as for this run)"]
    return [f"- note: backchannel outputs at {listed}, but the published rows were scored on 24 kHz outputs "
            "(whose VAD times the official scorer reads x1.5), so the backchannel numbers do not compare; "
            "run with the default --output-rate model"]


def write_report(scores_path: Path, out_dir: Path, title: str, others_paths: list[Path] | None, label: str,
                 published: bool = False) -> list[Path]:
    scores = read_json(scores_path)
    if "summary" not in scores:
        raise ReportError(f"{scores_path} holds no 'summary': give the scores.json a score command wrote")
    others, notes = comparison_rows(others_paths, published)
    notes += quirks_note(scores, published)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, figure = out_dir / "report.md", out_dir / "report.png"
    text = markdown(scores["summary"], title, others, label, notes)
    table.write_text(text + f"\n![{title}](report.png)\n", encoding="utf-8")
    plot(scores["summary"], figure, title, others, label)
    return [table, figure]
