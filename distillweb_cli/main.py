"""distillweb: launch and follow distillation experiments from a shell, through the REST API.

    distillweb login --url https://distill.example.org --token dw_…
    distillweb submit experiment.yaml --wait
    distillweb status 12
    distillweb leaderboard 3 --csv > leaderboard.csv
    distillweb export-recipe 7 > recipe.yaml

Exit status: 0 on success, 1 when the server refuses or cannot be reached (or, with ``submit --wait``, when a
run failed or was cancelled), 2 for usage and configuration errors.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from . import config
from .client import ApiError, Client

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
ACTIVE = ("queued", "running")


# --- output helpers -------------------------------------------------------------------------------
def _cell(value: Any, width: int = 32) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    out.write("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip() + "\n")
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def format_metric(name: str, value: float | None) -> str:
    if value is None:
        return ""
    return f"{name} {100 * value:.1f}%" if name == "accuracy" else f"{name} {value:.4g}"


def _ref(record: dict[str, Any] | None) -> str:
    if not record:
        return ""
    version = record.get("version")
    return f"{record['name']} v{version}" if version else record["name"]


def _counts_line(experiment: dict[str, Any]) -> str:
    counts = experiment["run_counts"]
    done = counts["succeeded"] + counts["failed"] + counts["cancelled"]
    parts = [f"{n} {status}" for status, n in counts.items() if n]
    return f"{done}/{experiment['run_count']} runs done ({', '.join(parts) or 'no runs'})"


def _read_document(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise config.ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


# --- commands -------------------------------------------------------------------------------------
def cmd_login(args: argparse.Namespace, out: TextIO) -> int:
    url = config.normalise_url(args.url)
    token = args.token or getpass.getpass("API token (from the site's \"API token\" page): ").strip()
    if not token:
        raise config.ConfigError("no token given")
    teams = list(Client(url, token, timeout=args.timeout).pages("/api/teams/"))
    path = config.save(url=url, token=token)
    names = ", ".join(t["name"] for t in teams) or "no team yet"
    out.write(f"Logged in to {url} (teams: {names}). Saved to {path}.\n")
    return EXIT_OK


def cmd_submit(args: argparse.Namespace, out: TextIO) -> int:
    client = _client(args)
    if args.check:
        return _check(client, args, out)
    experiment = client.request("POST", "/api/experiments/import", params={"team": args.team},
                                body=_read_document(args.file), content_type="application/yaml")
    out.write(
        f"Experiment {experiment['id']} ({experiment['name']}) launched with {experiment['run_count']} "
        "runs.\n"
    )
    out.write(f"{experiment['url']}\n")
    if not args.wait:
        return EXIT_OK
    return _wait(client, experiment["id"], interval=args.interval, out=out)


LEVEL_MARKS = {"warning": "WARN", "error": "ERROR"}  # others (ok, notice, unknown) print as they are


def _check(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Print what launching the file would do (runs, pre-flight checks, errors); exit 1 if it cannot
    launch."""
    report = client.request("POST", "/api/experiments/import", params={"team": args.team, "check": "true"},
                            body=_read_document(args.file), content_type="application/yaml")
    out.write(f"{report['runs']} runs: {report['runs_described']}\n")
    for check in report["checks"]:
        out.write(
            f"  [{LEVEL_MARKS.get(check['level'], check['level'])}] {check['title']}: {check['summary']}\n"
        )
        for detail in check["details"]:
            out.write(f"      {detail}\n")
    for field, messages in report["errors"].items():
        for message in messages:
            out.write(
                f"  error: {field}: {message}\n" if field != "non_field_errors" else f"  error: {message}\n"
            )
    out.write("Ready to launch.\n" if report["can_launch"] else "It cannot launch as it is.\n")
    return EXIT_OK if report["can_launch"] else EXIT_FAILED


def _wait(client: Client, experiment_id: int, *, interval: float, out: TextIO) -> int:
    """Poll the experiment until no run is queued or running; a progress line meanwhile."""
    live = out.isatty()
    last = ""
    while True:
        experiment = client.get(f"/api/experiments/{experiment_id}/")
        counts = experiment["run_counts"]
        line = _counts_line(experiment)
        if line != last:
            out.write(("\r\033[K" if live else "") + line + ("" if live else "\n"))
            out.flush()
            last = line
        if not any(counts[s] for s in ACTIVE):
            break
        time.sleep(interval)
    if live:
        out.write("\n")
    failed = counts["failed"] + counts["cancelled"]
    out.write(f"Experiment {experiment_id}: {experiment['status']}.\n")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    client = _client(args)
    if args.experiment is not None:
        experiment = client.get(f"/api/experiments/{args.experiment}/")
        out.write(f"Experiment {experiment['id']} {experiment['name']} · {experiment['status']} · "
                  f"{_counts_line(experiment)}\n{experiment['url']}\n\n")
        runs = list(client.pages("/api/runs/", experiment=args.experiment, ordering="id", limit=500))
    else:
        runs = client.get("/api/runs/", limit=args.limit)["results"]
    rows = [
        (run["id"], _ref(run["student"]), ("baseline " if run["is_baseline"] else "") + _ref(run["recipe"])
         + (f" ({run['stage']})" if run["stage"] else ""), run["seed"], run["status"],
         f"{run['step']}/{run['total_steps']}", format_metric(run["metric"]["name"], run["metric"]["value"]))
        for run in runs
    ]
    if not rows:
        out.write("No runs.\n")
        return EXIT_OK
    print_table(("RUN", "STUDENT", "RECIPE", "SEED", "STATUS", "STEP", "METRIC"), rows, out)
    return EXIT_OK


def cmd_leaderboard(args: argparse.Namespace, out: TextIO) -> int:
    client = _client(args)
    params = {"max_params": args.max_params, "max_latency_ms": args.max_latency_ms, "metric": args.metric,
              "split": args.split, "scope": args.scope, "recipe": args.recipe, "family": args.family}
    if args.csv:  # the page's own CSV export: every column, spreadsheet-safe
        out.write(
            client.request("GET", f"/api/leaderboards/{args.dataset}/export.csv", params=params, raw=True)
        )
        return EXIT_OK
    first = client.get(f"/api/leaderboards/{args.dataset}/", **params, limit=500)
    rows = list(first["results"])
    next_url = first.get("next")
    while next_url:
        page = client.request("GET", next_url)
        rows += page["results"]
        next_url = page.get("next")
    metric = first["metric"]
    scale, unit = (100, "%") if metric["percent"] else (1, "")
    shown = f"{len(rows)} of {first['total']} rows" if len(rows) != first["total"] else f"{len(rows)} rows"
    out.write(f"{first['dataset']['name']}: ranked by {metric['label'].lower()} "
              f"({'higher' if metric['higher_is_better'] else 'lower'} is better), {shown}\n")
    if not rows:
        out.write("No finished runs match.\n")
        return EXIT_OK
    table = [
        (r["rank"], r["student"]["name"], "hard-label baseline" if r["is_baseline"] else _ref(r["recipe"]),
         r["seeds"], f"{scale * r['mean']:.2f}{unit} ± {scale * r['std']:.2f}",
         "" if r["retention"] is None else f"{100 * r['retention']:.1f}%",
         "" if r["kd_gain"] is None else f"{scale * r['kd_gain']:+.2f}{unit}",
         "" if r["params"] is None else f"{r['params']:,}",
         "" if r["latency_ms"] is None else f"{r['latency_ms']:.2f}",
         "*" if r["pareto"] else "")
        for r in rows
    ]
    print_table(("#", "STUDENT", "RECIPE", "SEEDS", metric["label"].upper(), "RETENTION", "KD GAIN", "PARAMS",
                 "LATENCY MS", "PARETO"), table, out)
    return EXIT_OK


def cmd_export_recipe(args: argparse.Namespace, out: TextIO) -> int:
    out.write(_client(args).request("GET", f"/api/recipes/{args.recipe}/export.yaml", raw=True))
    return EXIT_OK


def cmd_export_experiment(args: argparse.Namespace, out: TextIO) -> int:
    out.write(_client(args).request("GET", f"/api/experiments/{args.experiment}/export.yaml", raw=True))
    return EXIT_OK


def cmd_import_recipe(args: argparse.Namespace, out: TextIO) -> int:
    recipe = _client(args).request("POST", "/api/recipes/import", params={"team": args.team},
                                   body=_read_document(args.file), content_type="application/yaml")
    out.write(f"Recipe {recipe['id']}: {recipe['name']} v{recipe['version']} = {recipe['formula']}\n")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, out: TextIO) -> int:
    answer = _client(args).request("POST", f"/api/experiments/{args.experiment}/cancel/")
    out.write(f"Cancelling {answer['cancelled']} unfinished run(s) of experiment {args.experiment}.\n")
    return EXIT_OK


# --- wiring ---------------------------------------------------------------------------------------
def _client(args: argparse.Namespace) -> Client:
    settings = config.resolve(url=args.url, token=args.token)
    return Client(settings.url, settings.token, timeout=args.timeout)


def _positive_id(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an id (a whole number ≥ 1), got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillweb", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="server URL (default: DISTILLWEB_URL, then the saved login)")
    parser.add_argument("--token", help="API token (default: DISTILLWEB_TOKEN, then the saved login)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    login = commands.add_parser("login", help="check a token against a server and save both")
    login.add_argument("--url", required=True, help="e.g. https://distill.example.org")
    login.add_argument(
        "--token", help="the token (asked for when left out, so it stays out of shell history)"
    )
    login.set_defaults(func=cmd_login)

    submit = commands.add_parser("submit", help="launch the experiment in a YAML file")
    submit.add_argument("file", help="the experiment YAML (as `export-experiment` writes it); - reads stdin")
    submit.add_argument(
        "--team", type=_positive_id, help="team id (default: the YAML's team, or your only team)"
    )
    submit.add_argument(
        "--check",
        action="store_true",
        help="launch nothing: show the run count and the pre-flight checks (exit 1 if it cannot launch)",
    )
    submit.add_argument("--wait", action="store_true", help="follow the runs until they finish")
    submit.add_argument("--interval", type=float, default=5.0, help="seconds between checks with --wait")
    submit.set_defaults(func=cmd_submit)

    status = commands.add_parser("status", help="the runs of an experiment (or your most recent runs)")
    status.add_argument("experiment", nargs="?", type=_positive_id, help="experiment id")
    status.add_argument("--limit", type=int, default=20, help="recent runs to show without an experiment id")
    status.set_defaults(func=cmd_status)

    board = commands.add_parser("leaderboard", help="a dataset's leaderboard")
    board.add_argument("dataset", type=_positive_id, help="dataset id")
    board.add_argument("--csv", action="store_true", help="the page's CSV export (every column)")
    board.add_argument("--metric", help="rank by this quality metric (default: the dataset's primary one)")
    board.add_argument("--split", help="eval split key (default: the one with most results)")
    board.add_argument("--scope", choices=("team", "global"), help="global: the same data in all your teams")
    board.add_argument("--recipe", help="only this recipe (by name)")
    board.add_argument("--family", help="only this student family (mlp, bert, …)")
    board.add_argument("--max-params", type=int, help="only students with at most this many parameters")
    board.add_argument("--max-latency-ms", type=float, help="only students at most this slow (ms)")
    board.set_defaults(func=cmd_leaderboard)

    export_recipe = commands.add_parser("export-recipe", help="print a recipe as YAML")
    export_recipe.add_argument("recipe", type=_positive_id, help="recipe id")
    export_recipe.set_defaults(func=cmd_export_recipe)

    export_experiment = commands.add_parser("export-experiment", help="print an experiment as YAML")
    export_experiment.add_argument("experiment", type=_positive_id, help="experiment id")
    export_experiment.set_defaults(func=cmd_export_experiment)

    import_recipe = commands.add_parser("import-recipe", help="save the recipe in a YAML file")
    import_recipe.add_argument("file", help="the recipe YAML; - reads stdin")
    import_recipe.add_argument(
        "--team", type=_positive_id, help="team id (default: the YAML's team, or your only team)"
    )
    import_recipe.set_defaults(func=cmd_import_recipe)

    cancel = commands.add_parser("cancel", help="cancel every unfinished run of an experiment")
    cancel.add_argument("experiment", type=_positive_id, help="experiment id")
    cancel.set_defaults(func=cmd_cancel)
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run one command; returns the exit status (the console script exits with it)."""
    out, err = out or sys.stdout, err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (or --help)
        return int(exc.code or 0)
    try:
        return args.func(args, out)
    except config.ConfigError as exc:
        err.write(f"distillweb: {exc}\n")
        return EXIT_USAGE
    except ApiError as exc:
        err.write(
            f"distillweb: error {exc.describe()}\n" if exc.status else f"distillweb: {exc.describe()}\n"
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        err.write("\ndistillweb: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
