"""The first epoch of an offline run against an online run, and a 2-epoch offline run against a plain loop.

The offline scheme fills the teacher-output cache while the first epoch trains (each batch's teacher outputs
computed when the batch is first used), so its first epoch should cost about what an online epoch costs, and
from the second epoch on it runs no teacher at all. Contenders, each in its own process, interleaved
(A, B, C, D, A, B, C, D, …), on the pair and data of ``lm_distill_vs_trl.py`` (Llama 4 × 256 teacher, Llama
2 × 128 student, byte-level BPE of 2,000, 256 windows of 126 tokens, batch 8, forward KL at τ = 1):

- ``offline``: distillweb's ``offline`` scheme, ``topk`` term (k = 64 + tail), an empty cache: the first
  epoch fills it;
- ``offline-before``: the same with ``DISTILLWEB_TEACHER_CACHE_FILL=before`` (the whole split's teacher
  outputs computed before step 1, as before the fill moved into the first epoch);
- ``online``: distillweb's ``online`` scheme, same term (the teacher runs on every batch);
- ``plain``: a plain PyTorch loop that runs the teacher on every batch (dense forward KL).

Each figure is the wall time from the contender's start (models loaded by it: a cost the user pays) to the
end of epoch 1, and to the end of the last step (no final evaluation or save). Median of the repeats.

    .venv/bin/python benchmarks/first_epoch.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import lm_distill_vs_trl as pair  # noqa: E402  (the same pair, data and plain loop)

CONTENDERS = ("offline", "offline-before", "online", "plain")


def child(name: str, work: Path, out: Path, steps: int, steps_per_epoch: int, seed: int) -> None:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if name == "plain":
        result = pair.contender_plain(work, out, steps, steps_per_epoch, seed=seed)
    else:
        if name == "offline-before":
            os.environ["DISTILLWEB_TEACHER_CACHE_FILL"] = "before"
        scheme = "online" if name == "online" else "offline"
        result = pair.contender_distillweb(
            work, out, steps, steps_per_epoch, topk=64, seed=seed, scheme=scheme
        )
    marks = result["marks"]
    (out / "result.json").write_text(json.dumps({
        "epoch1_s": marks[steps_per_epoch - 1] - started,
        "run_s": marks[-1] - started,
        "first_step_s": marks[0] - started,
    }))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=str(REPO / "var" / "bench" / "lm-kd"))
    parser.add_argument("--train-rows", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--child")
    parser.add_argument("--out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(args.work)
    steps_per_epoch = args.train_rows // pair.BATCH
    steps = steps_per_epoch * args.epochs
    if args.child:
        child(args.child, work, Path(args.out), steps, steps_per_epoch, args.seed)
        return 0

    pair.prepare(work, train_rows=args.train_rows, eval_rows=64)
    pair.windowed(work, "train"), pair.windowed(work, "eval")
    names = args.contenders.split(",")
    results: dict[str, list[dict]] = {name: [] for name in names}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for repeat in range(args.repeats):
        for name in names:
            out = work / f"first-epoch-{name}-{repeat}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            subprocess.run([sys.executable, __file__, "--work", str(work), "--child", name, "--out", str(out),
                            "--train-rows", str(args.train_rows), "--epochs", str(args.epochs),
                            "--seed", str(repeat)], check=True, env=env)
            result = json.loads((out / "result.json").read_text())
            results[name].append(result)
            print(f"{name:15s} repeat {repeat}: first step {result['first_step_s']:.2f} s, epoch 1 "
                  f"{result['epoch1_s']:.2f} s, {args.epochs} epochs {result['run_s']:.2f} s",
                  file=sys.stderr)

    load = os.getloadavg()[0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, 1 thread per contender, load average "
          f"{load:.1f} at the end; {args.epochs} epochs of {steps_per_epoch} steps, batch {pair.BATCH} × "
          f"{pair.SEQ_LEN}, vocab {pair.VOCAB}; median (min–max) of {args.repeats} repeats")
    print("| contender | first step (s) | end of epoch 1 (s) | whole run (s) |")
    print("|---|---|---|---|")
    med = {}
    for name, rows in results.items():
        cells = []
        for key in ("first_step_s", "epoch1_s", "run_s"):
            values = [r[key] for r in rows]
            med[(name, key)] = statistics.median(values)
            cells.append(f"{med[(name, key)]:.2f} ({min(values):.2f}–{max(values):.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if "offline" in results and "online" in results:
        print(f"offline / online, epoch 1: {med[('offline', 'epoch1_s')] / med[('online', 'epoch1_s')]:.2f}×")
    if "offline" in results and "plain" in results:
        print(f"offline / plain, whole run: {med[('offline', 'run_s')] / med[('plain', 'run_s')]:.2f}×")
    if "offline-before" in results and "offline" in results:
        print(f"offline-before / offline, epoch 1: "
              f"{med[('offline-before', 'epoch1_s')] / med[('offline', 'epoch1_s')]:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
