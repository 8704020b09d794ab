"""LoRA on a derived SmolLM2 student: trainable parameters and AdamW memory vs full fine-tuning.

Each case is one real engine run (``workers.engine.trainer.train``) in a fresh process: the student is derived
from the packaged SmolLM2-135M-Instruct (every third layer: 10 of 30, weights copied), LoRA adapters are
attached by the engine itself (``adapters.attach`` when ``train.lora_r`` > 0) and the engine creates its AdamW
over ``adapters.trainable(...)`` as always. The script only watches: it records the AdamW the engine creates
(a subclass put in place of ``torch.optim.AdamW`` that remembers its instances) and, after the last step, sums
the bytes of every tensor in its state (``exp_avg``, ``exp_avg_sq``, ``step``) and counts the parameters it
holds. Also reported: the engine's own parameter counts, the engine's memory estimate of the AdamW states
(what routing and pre-flight use), seconds per step after a warm-up step, and the process's peak RSS
(``ru_maxrss``; it includes loading the 30-layer parent the student is derived from).

The runs train on hard labels (``ce``, no teacher) on BBC news articles packed into blocks, so nothing but the
student's own training is measured. Cases run one after the other (interleaved over ``--repeats``; medians).

    .venv/bin/python benchmarks/lora_memory.py [--steps 6] [--batch 4] [--length 128] [--repeats 1]
    .venv/bin/python benchmarks/lora_memory.py --dry     # a tiny random Llama parent, a few steps (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# A tiny random parent for --dry (4 layers, so every_third keeps 2).
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}
# name -> the engine's training settings for it (lora_r 0: full fine-tuning).
CASES: dict[str, dict[str, Any]] = {
    "full": {"lora_r": 0},
    "lora-r8": {"lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_targets": ""},
    "lora-r8-all-linear": {
        "lora_r": 8,
        "lora_alpha": 16.0,
        "lora_dropout": 0.0,
        "lora_targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    },
}


def write_data(work: Path, *, dry: bool, train_articles: int, eval_articles: int) -> tuple[Path, Path]:
    """BBC news articles (or, for --dry, a few synthetic lines) as train / eval JSONL files."""
    if dry:
        words = "the cat dog bird fish tree river stone cloud light sat ran flew on under over near".split()
        lines = [" ".join(words[(i * 5 + j * 3) % len(words)] for j in range(10 + i % 7)) for i in range(60)]
        paths = (work / "train.jsonl", work / "eval.jsonl")
        for path, rows in zip(paths, (lines[:48], lines[48:]), strict=True):
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        return paths
    from benchmarks.smollm2_pair import write_articles

    return write_articles(work, train_articles=train_articles, eval_articles=eval_articles)


def run_config(args: argparse.Namespace, work: Path, case: str, files: tuple[Path, Path]) -> dict[str, Any]:
    from workers.engine.pretrained import models_dir

    if args.dry:
        parent: dict[str, Any] = {"source": "config", "params": TINY_LLAMA}
    else:
        parent = {"source": "hf", "path": str(models_dir() / "SmolLM2-135M-Instruct")}
    steps = args.steps
    return {
        "task": "causal_lm",
        "scheme": "hard_labels",
        "student": {"source": "derived", "parent": parent, "params": {"layers": args.layers}},
        "dataset": {
            "source": "hf",
            "path": str(files[0]),
            "eval_path": str(files[1]),
            "max_length": args.length,
            "pack": True,
        },
        "terms": [{"name": "ce", "weight": 1.0}],
        "output_dir": str(work / case),
        "evaluate_teacher": False,
        "train": {
            "max_steps": steps,
            "batch_size": args.batch,
            "lr": 2e-4,
            "weight_decay": 0.0,
            "lr_schedule": "constant",
            "log_every": steps,
            "eval_every": steps * 10,
            "save_every": steps * 10,
            "device": "cpu",
            **CASES[case],
        },
    }


# --- one case, in its own process ---------------------------------------------------------------------------
def optimizer_state_bytes(optimizer: Any) -> int:
    import torch

    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


def current_rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def run_case(config: dict[str, Any], threads: int) -> dict[str, Any]:
    import torch

    from workers.engine.config import RunConfig
    from workers.engine.memory import estimate_run_memory
    from workers.engine.trainer import Callbacks, train

    torch.set_num_threads(threads)
    made: list[torch.optim.Optimizer] = []

    class RecordedAdamW(torch.optim.AdamW):
        """The engine's AdamW, unchanged, remembered so its state can be measured."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    torch.optim.AdamW = RecordedAdamW  # the trainer looks it up when it builds its optimizer
    marks: list[float] = []
    seen: dict[str, int] = {}

    def on_progress(step: int, total: int) -> None:
        marks.append(time.perf_counter())
        if step == total and made:  # after the last optimizer step, before the final evaluation
            optimizer = made[-1]
            params = [p for group in optimizer.param_groups for p in group["params"]]
            seen["optimizer_params"] = sum(p.numel() for p in params)
            seen["optimizer_tensors"] = len(params)
            seen["adamw_state_bytes"] = optimizer_state_bytes(optimizer)
            seen["rss_after_steps"] = current_rss_bytes()

    started = time.perf_counter()
    result = train(RunConfig.from_dict(config), Callbacks(on_progress=on_progress)).to_dict()
    seconds = time.perf_counter() - started
    timed = marks[1:] if len(marks) > 2 else marks  # the first step (allocations, warm-up) is not timed
    student = result.get("student", {})
    estimate = estimate_run_memory(config, on_cpu=True)
    return {
        **seen,
        "seconds": seconds,
        "s_per_step": (timed[-1] - timed[0]) / (len(timed) - 1) if len(timed) > 1 else None,
        # LoRA runs report trainable and total parameters (adapters included); a full run its student's size.
        "trainable_params": int(student.get("trainable_params") or seen.get("optimizer_params", 0)),
        "total_params": int(student.get("total_params") or student.get("params") or 0),
        "estimate_adamw_bytes": estimate.optimizer_states,
        "estimate_grad_bytes": estimate.student_grads,
        "perplexity": student.get("perplexity"),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


# --- the driver ---------------------------------------------------------------------------------------------
def mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="a tiny random parent and a few steps")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128, help="tokens per packed block")
    parser.add_argument("--layers", default="every_third", help="which parent layers the student keeps")
    parser.add_argument("--cases", default="full,lora-r8", help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=1, help="cases interleaved this many times (medians)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--train-articles", type=int, default=40)
    parser.add_argument("--eval-articles", type=int, default=4)
    parser.add_argument("--work", default="", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: run one case
    args = parser.parse_args()
    if args.child:
        config_path, out = args.child.split(",")
        config = json.loads(Path(config_path).read_text())
        Path(out).write_text(json.dumps(run_case(config, args.threads)))
        return 0

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}")
    if args.dry:
        args.steps, args.batch, args.length = min(args.steps, 3), min(args.batch, 2), min(args.length, 16)
    else:
        from workers.engine.pretrained import models_dir

        smol = models_dir() / "SmolLM2-135M-Instruct"
        if not smol.is_dir():
            print(f"{smol} is missing: python -m workers.engine prepare-models --only {smol.name}")
            return 1
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="distillweb-lora-"))
    work.mkdir(parents=True, exist_ok=True)
    files = write_data(
        work, dry=args.dry, train_articles=args.train_articles, eval_articles=args.eval_articles
    )
    started, load_before = time.perf_counter(), os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    for repeat in range(args.repeats):
        for case in cases:  # interleaved: A, B, A, B
            folder = work / f"{case}-{repeat}"
            folder.mkdir(parents=True, exist_ok=True)
            config_path, out = folder / "config.json", folder / "result.json"
            config_path.write_text(json.dumps(run_config(args, folder, case, files)))
            subprocess.run(
                [sys.executable, __file__, "--threads", str(args.threads), "--child", f"{config_path},{out}"],
                check=True, cwd=REPO, env=env,
            )
            row = json.loads(out.read_text())
            runs[case].append(row)
            print(f"{case} repeat {repeat}: {row['s_per_step']:.3f} s/step, AdamW state "
                  f"{mib(row['adamw_state_bytes'])}, peak RSS {mib(row['peak_rss'])}", file=sys.stderr)
    load_after = os.getloadavg()

    summary: dict[str, dict[str, Any]] = {}
    for case, rows in runs.items():
        first = rows[0]
        summary[case] = {
            **{k: first[k] for k in ("trainable_params", "total_params", "optimizer_params",
                                     "optimizer_tensors", "adamw_state_bytes", "estimate_adamw_bytes",
                                     "estimate_grad_bytes")},
            "s_per_step": statistics.median(r["s_per_step"] for r in rows),
            "peak_rss": statistics.median(r["peak_rss"] for r in rows),
            "rss_after_steps": statistics.median(r["rss_after_steps"] for r in rows),
            "perplexity": first["perplexity"],
        }
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{'dry (tiny parent)' if args.dry else 'SmolLM2-135M-Instruct parent'}, student layers "
        f"{args.layers}; {args.steps} steps × batch {args.batch} × {args.length} tokens, {args.threads} "
        f"thread(s), {args.repeats} repeat(s); load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after; {time.perf_counter() - started:.0f} s in all"
    )
    print("| case | trainable params | total params | trainable % | AdamW state (measured) | "
          "AdamW state (estimate) | s/step | peak RSS | RSS after the steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, s in summary.items():
        share = 100 * s["trainable_params"] / s["total_params"] if s["total_params"] else 0.0
        print(
            f"| {case} | {s['trainable_params']:,} | {s['total_params']:,} | {share:.2f}% | "
            f"{mib(s['adamw_state_bytes'])} | {mib(s['estimate_adamw_bytes'])} | {s['s_per_step']:.3f} | "
            f"{mib(s['peak_rss'])} | {mib(s['rss_after_steps'])} |"
        )
    if "full" in summary:
        for case, s in summary.items():
            if case != "full" and s["adamw_state_bytes"]:
                ratio = summary["full"]["adamw_state_bytes"] / s["adamw_state_bytes"]
                print(f"{case}: AdamW state {ratio:,.0f}× smaller than full fine-tuning")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
