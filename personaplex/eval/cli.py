"""``personaplex eval``: Full-Duplex-Bench (``fdb``) and the service-persona set (``persona``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..app.console import log
from ..app.flags import add_model_arguments, add_sampling_arguments
from ..errors import UsageError
from . import layout

FDB_TASKS = [t for t in layout.TASKS if t != layout.PERSONA]


def _data_argument(parser: argparse.ArgumentParser, tasks: bool) -> None:
    parser.add_argument("--data", type=Path, required=True,
                        help="benchmark root (ROOT/<task folder>/<id>/input.wav) or one task folder")
    if tasks:
        parser.add_argument("--tasks", nargs="+", choices=FDB_TASKS, metavar="TASK",
                            help=f"only these tasks ({', '.join(FDB_TASKS)}; default: every task folder found)")


def _add_run(parser: argparse.ArgumentParser, tasks: bool) -> None:
    _data_argument(parser, tasks)
    parser.add_argument("--text-prompt", nargs="+", metavar="[TASK=]TEXT",
                        help="role prompt for every task, or TASK=TEXT for one (default: the benchmark's "
                             "recommendation, the teacher prompt for user_interruption and 'You enjoy having a good "
                             "conversation.' for the others; persona samples use their own persona.txt)")
    parser.add_argument("--voice-prompt", default="NATF2", help="voice preset or file (default NATF2)")
    parser.add_argument("--batch-size", type=int, help="samples run at once (default: as many as fit, 4 on a CPU)")
    parser.add_argument("--overwrite", action="store_true", help="run samples that already have an output.wav again")
    parser.add_argument("--output-rate", choices=("model", "input"), default="model",
                        help="output.wav's sample rate: model (default) writes the model's 24 kHz, as the reference "
                             "pipeline wrote the outputs behind the published rows (the official backchannel scorer "
                             "reads its VAD times x1.5, as it did for them); input writes input.wav's rate and number "
                             "of samples. Both keep the input's duration")
    add_sampling_arguments(parser)
    add_model_arguments(parser)
    parser.set_defaults(run=_cmd_run)


def _add_transcribe(parser: argparse.ArgumentParser, tasks: bool) -> None:
    from .asr import BACKENDS

    _data_argument(parser, tasks)
    parser.add_argument("--asr", choices=BACKENDS, default="pocketsphinx",
                        help="recogniser: pocketsphinx (default, bundled English model, no download), parakeet "
                             "(NVIDIA NeMo, what the benchmark uses) or whisper (faster-whisper)")
    parser.add_argument("--asr-model", type=Path, help="local weights for parakeet (.nemo file) or whisper (model folder)")
    parser.add_argument("--overwrite", action="store_true", help="transcribe samples that already have an output.json")
    parser.set_defaults(run=_cmd_transcribe)


def _published_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-published", dest="published", action="store_false",
                        help="leave out the published PersonaPlex and Moshi rows bundled with the package "
                             "(shown by default next to the run)")


def _add_score(parser: argparse.ArgumentParser, tasks: bool) -> None:
    _data_argument(parser, tasks)
    parser.add_argument("--output", type=Path, help="scores file to write (default DATA/scores.json)")
    parser.add_argument("--no-official-quirks", dest="official", action="store_false",
                        help="score without the benchmark's quirks (see the README: backchannel take-over decided "
                             "by any segment, backchannel VAD times exact and at the file's true rate, negative "
                             "latencies kept); numbers then differ from published tables")
    if tasks:
        parser.add_argument("--human-distribution", type=Path,
                            help="the benchmark's icc_gt_distribution.json for the backchannel JSD "
                                 "(default: DATA/icc_gt_distribution.json when present; without it no JSD)")
        _published_argument(parser)
    judge = parser.add_argument_group("LLM judge (OpenAI chat-completions protocol)")
    judge.add_argument("--judge-url", help="API base URL, e.g. https://api.openai.com/v1 or http://localhost:8000/v1 "
                                           "(default: OpenAI's when the key variable is set; else no judge)")
    judge.add_argument("--judge-model", help="model name the server expects (default gpt-4-turbo, as the benchmark)")
    judge.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                       help="environment variable holding the API key (default OPENAI_API_KEY)")
    parser.set_defaults(run=_cmd_score)


def _add_report(parser: argparse.ArgumentParser, default_title: str, published: bool) -> None:
    parser.add_argument("--scores", type=Path, required=True, help="scores.json written by the score command")
    parser.add_argument("--out", type=Path, help="folder for report.md and report.png (default: beside the scores)")
    parser.add_argument("--compare", type=Path, nargs="+", action="extend", metavar="FILE",
                        help="JSON files of other rows to compare with: {\"label\": {\"<task or folder>\": "
                             "{\"<metric>\": value}}}; a label already shown (e.g. a published row) is replaced")
    parser.add_argument("--title", default=default_title, help="report title")
    parser.add_argument("--label", default="this run", help="the run's row label")
    if published:
        _published_argument(parser)
    parser.set_defaults(run=_cmd_report, published=published)


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Evaluate the model: Full-Duplex-Bench (fdb) and a service-persona adherence set (persona)."
    suites = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    fdb = suites.add_parser("fdb", help="Full-Duplex-Bench v1.0/v1.5: run, transcribe, score, report",
                            description="Full-Duplex-Bench: run -> transcribe -> score -> report.",
                            epilog="example: personaplex eval fdb run --data fdb_v1 && personaplex eval fdb transcribe "
                                   "--data fdb_v1 && personaplex eval fdb score --data fdb_v1 && "
                                   "personaplex eval fdb report --scores fdb_v1/scores.json")
    steps = fdb.add_subparsers(dest="step", required=True, metavar="STEP")
    _add_run(steps.add_parser("run", help="write every sample's output.wav (time-aligned with input.wav); resumable"), True)
    _add_transcribe(steps.add_parser("transcribe", help="write output.json (word timestamps) for every output.wav"), True)
    _add_score(steps.add_parser("score", help="compute the benchmark's metrics; write scores.json and a Markdown table"), True)
    _add_report(steps.add_parser("report", help="Markdown table and figure from scores.json, next to the published "
                                                 "PersonaPlex and Moshi results"), "Full-Duplex-Bench", True)
    tiny = steps.add_parser("synth", help="write a tiny synthetic dataset in the benchmark's layout (espeak-ng) "
                                          "to try the pipeline; its scores say nothing about a model")
    tiny.add_argument("--data", type=Path, required=True, help="folder to write it into")
    tiny.set_defaults(run=_cmd_synth)

    persona = suites.add_parser("persona", help="service-persona adherence: build, run, transcribe, score, report",
                                description="Scenarios with a company, an agent name, facts and constraints; one spoken "
                                            "question per category; the answers graded by an LLM judge.")
    steps = persona.add_subparsers(dest="step", required=True, metavar="STEP")
    build = steps.add_parser("build", help="synthesise the questions (espeak-ng) into DATA/persona/<id>/")
    build.add_argument("--data", type=Path, required=True, help="folder to write the set into")
    build.add_argument("--limit", type=int, help="only the first N questions")
    build.set_defaults(run=_cmd_persona_build)
    _add_run(steps.add_parser("run", help="write every question's output.wav; resumable"), False)
    _add_transcribe(steps.add_parser("transcribe", help="write output.json for every output.wav"), False)
    _add_score(steps.add_parser("score", help="grade the answers with the judge; write scores.json"), False)
    _add_report(steps.add_parser("report", help="Markdown table and figure from scores.json"), "Persona adherence", False)


def _tasks(args: argparse.Namespace) -> list[str]:
    return getattr(args, "tasks", None) or ([layout.PERSONA] if args.suite == "persona" else FDB_TASKS)


def _cmd_run(args: argparse.Namespace) -> None:
    from .runner import run

    args.tasks = _tasks(args)
    run(args)


def _cmd_transcribe(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .asr import make_recognizer, transcribe_file

    samples = layout.discover(args.data, _tasks(args))
    missing = [s for s in samples if not s.output_wav.is_file()]
    if missing:
        raise layout.DatasetError(f"{len(missing)} sample(s) have no {layout.OUTPUT_WAV} (first: {missing[0].path}); "
                                  "run the run step first")
    todo = [s for s in samples if args.overwrite or not s.output_json.is_file()]
    recognizer = make_recognizer(args.asr, args.asr_model)
    for sample in tqdm(todo, desc=f"transcribing ({recognizer.name})", unit="sample", file=sys.stderr, disable=None):
        result = transcribe_file(recognizer, sample.output_wav)
        tmp = sample.output_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
        tmp.replace(sample.output_json)
    log(f"transcribed {len(todo)} sample(s), {len(samples) - len(todo)} already had {layout.OUTPUT_JSON}")


def _judge(args: argparse.Namespace):
    from .judge import Judge

    if args.judge_url is None and not os.environ.get(args.judge_key_env):
        return None
    return Judge.from_env(args.judge_url, args.judge_model, args.judge_key_env)


def _cmd_score(args: argparse.Namespace) -> None:
    from .report import comparison_rows, markdown, quirks_note
    from .scoring import load_human_distribution, score

    samples = layout.discover(args.data, _tasks(args))
    judge = _judge(args)
    if judge is None and any(s.task == layout.INTERRUPTION for s in samples):
        log("note: no judge (--judge-url or $" + args.judge_key_env + "): user interruption relevance is skipped")
    human_path = getattr(args, "human_distribution", None)
    if human_path is None and (Path(args.data) / "icc_gt_distribution.json").is_file():
        human_path = Path(args.data) / "icc_gt_distribution.json"
    jsd_note = None
    if human_path is None and any(s.task == layout.BACKCHANNEL for s in samples):
        # The JSD compares the run's backchannel timing with people's; without their distribution it is "–".
        jsd_note = ("JSD (backchannel) needs the benchmark's human distribution: pass --human-distribution "
                    "PATH/icc_gt_distribution.json (or put that file in the data folder)")
        log(f"note: {jsd_note}")
    scores = score(samples, official=args.official, judge=judge, human=load_human_distribution(human_path))
    output = args.output or Path(args.data) / "scores.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(scores, indent=2), encoding="utf-8")
    published = getattr(args, "published", False)
    others, notes = comparison_rows(published=published)
    notes += quirks_note(scores, published)
    if jsd_note is not None:
        notes += [f"- note: JSD is shown as \"–\": {jsd_note}"]
    table = markdown(scores["summary"], "Full-Duplex-Bench" if args.suite == "fdb" else "Persona adherence",
                     others, notes=notes)
    output.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    log(f"wrote {output} and {output.with_suffix('.md')}")


def _cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    out = args.out or args.scores.parent
    for path in write_report(args.scores, out, args.title, args.compare, args.label, args.published):
        log(f"wrote {path}")


def _cmd_persona_build(args: argparse.Namespace) -> None:
    from .persona_bench import build

    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    folders = build(args.data, limit=args.limit)
    log(f"wrote {len(folders)} question(s) under {Path(args.data) / layout.PERSONA}")


def _cmd_synth(args: argparse.Namespace) -> None:
    from .synthetic import build

    folders = build(args.data)
    log(f"wrote {len(folders)} synthetic sample(s) under {args.data}")
