"""Per-rank peak memory of one training run: 1 process vs 2 ranks with DDP vs 2 ranks with FSDP2, on the CPU.

A ~34 M-parameter Llama student trained on hard labels (no teacher, a small batch), so the student's weights,
gradients and AdamW state dominate (4 + 4 + 8 bytes per parameter ≈ 0.54 GB in one process). Each rank's peak
resident set (``VmHWM`` from ``/proc``, read every 50 ms until it exits) is reported as measured and minus the
peak of a process that imports the same libraries and trains nothing (torch's own runtime). FSDP2 shards the
weights, gradients and optimizer state, so its per-rank figure should be about half of the 1-process one plus
what is not sharded (activations, the gathered layer during forward/backward). Contenders are interleaved, and
each is run ``--repeats`` times (median). Rank 0 also gathers the full model to save it and evaluates it
alone, so the largest rank and the smallest are both shown.

    .venv/bin/python benchmarks/distributed_memory.py [--repeats 2] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDENT = {
    "model_type": "llama",
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "intermediate_size": 1376,
    "vocab_size": 8192,
    "max_position_embeddings": 128,
}
BASELINE = "import torch, transformers, workers.engine.trainer; import time; time.sleep(0.3)"


def peak_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def watch(command: list[str], *, ranks: int) -> list[int]:
    """Run ``command``; the peak resident KiB of its ``ranks`` largest Python processes (the ranks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks: dict[int, int] = {}
    while process.poll() is None:
        for pid in descendants(process.pid) | {process.pid}:
            if (kib := peak_kib(pid)) is not None:
                peaks[pid] = max(peaks.get(pid, 0), kib)
        time.sleep(0.05)
    if process.returncode != 0:
        raise RuntimeError(process.stderr.read().decode(errors="replace")[-2000:])
    return sorted(peaks.values(), reverse=True)[:ranks]


def config(work: Path, name: str, *, steps: int, **train: object) -> Path:
    corpus = work / "corpus.txt"
    if not corpus.exists():
        words = "the a cat dog sat ran on under tree river red blue small large quiet loud".split()
        corpus.write_text(
            "\n".join(" ".join(words[(i * 5 + j) % len(words)] for j in range(40)) for i in range(400))
        )
    data = {
        "task": "causal_lm",
        "scheme": "hard_labels",
        "student": {"source": "config", "params": STUDENT},
        "dataset": {"source": "hf", "path": str(corpus), "max_length": 64, "pack": True},
        "terms": [{"name": "ce", "weight": 1.0}],
        "output_dir": str(work / name),
        "evaluate_teacher": False,
        "train": {
            "max_steps": steps,
            "batch_size": 4,
            "log_every": steps,
            "eval_every": steps * 10,
            "save_every": steps * 10,
            "device": "cpu",
            **train,
        },
    }
    path = work / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="distillweb-dist-memory-"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    contenders = {
        "1 process": ([sys.executable, "-m", "workers.engine", "run"], {}, 1),
        "2 ranks, DDP": ([*torchrun, "-m", "workers.engine", "run"], {"processes": 2, "strategy": "ddp"}, 2),
        "2 ranks, FSDP2": (
            [*torchrun, "-m", "workers.engine", "run"],
            {"processes": 2, "strategy": "fsdp"},
            2,
        ),
    }
    results: dict[str, list[int]] = {name: [] for name in contenders}
    others: dict[str, list[int]] = {name: [] for name in contenders}
    baseline = []
    for repeat in range(args.repeats):
        baseline.append(watch([sys.executable, "-c", BASELINE], ranks=1)[0])
        for name, (command, train, ranks) in contenders.items():
            slug = f"{name.replace(' ', '-').replace(',', '')}-{repeat}"
            path = config(work, slug, steps=args.steps, **train)
            peaks = watch([*command, str(path)], ranks=ranks)
            results[name].append(peaks[0])
            others[name].append(peaks[-1])
            print(f"{name}: {results[name][-1] / 1024:.0f} MiB peak per rank", file=sys.stderr)
    base = statistics.median(baseline)
    one = statistics.median(results["1 process"]) - base
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, CPU; student {STUDENT['hidden_size']}×"
        f"{STUDENT['num_hidden_layers']} layers, vocab {STUDENT['vocab_size']}; {args.steps} steps of "
        f"batch 4 × 64 tokens; median of {args.repeats}; runtime baseline {base / 1024:.0f} MiB"
    )
    print(
        "| run | largest rank: peak RSS (MiB) | minus runtime | vs 1 process | smallest rank: minus runtime |"
    )
    print("|---|---|---|---|---|")
    for name, peaks in results.items():
        peak, low = statistics.median(peaks), statistics.median(others[name])
        print(
            f"| {name} | {peak / 1024:.0f} | {(peak - base) / 1024:.0f} MiB | {(peak - base) / one:.2f}× | "
            f"{(low - base) / 1024:.0f} MiB ({(low - base) / one:.2f}×) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
