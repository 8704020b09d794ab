"""A real pretrained pair, offline: all-MiniLM-L6-v2 fine-tuned on BBC topics → a derived 2-layer student.

The teacher is the packaged all-MiniLM-L6-v2 (prepared with ``python -m workers.engine prepare-models``) with
a fresh 5-way head, fine-tuned here on all BBC labels. The student is derived from the fine-tuned teacher
(layers 0 and 3 of 6, weights copied — the DistilBERT recipe) and trained with 10% of the labels, once on hard
labels and once distilled (0.1·ce + 0.9·kd, τ = 2) over all articles.

    .venv/bin/python benchmarks/pretrained_pair.py [--seeds 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.engine.config import DatasetConfig, LossTermConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from workers.engine.pretrained import models_dir  # noqa: E402
from workers.engine.trainer import train  # noqa: E402

CE = (LossTermConfig("ce", 1.0, {}),)
KD = (LossTermConfig("ce", 0.1, {}), LossTermConfig("kd", 0.9, {"temperature": 2.0}))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--student-steps", type=int, default=300)
    args = parser.parse_args()
    l6 = models_dir() / "all-MiniLM-L6-v2"
    if not l6.is_dir():
        print(f"{l6} is missing: run `python -m workers.engine prepare-models --only all-MiniLM-L6-v2`")
        return 1
    work = Path(tempfile.mkdtemp(prefix="distillweb-pair-"))
    data = DatasetConfig(source="builtin", name="bbc-news", max_length=128)
    started = time.perf_counter()
    teacher = train(
        RunConfig(
            student=ModelConfig(source="hf", path=str(l6), num_labels=5),
            dataset=data,
            terms=CE,
            scheme="hard_labels",
            train=TrainConfig(
                max_steps=args.teacher_steps,
                batch_size=16,
                lr=5e-5,
                warmup_steps=15,
                eval_every=args.teacher_steps,
                save_every=args.teacher_steps,
            ),
            output_dir=str(work / "teacher"),
        )
    ).to_dict()
    print(f"teacher: all-MiniLM-L6-v2 fine-tuned {args.teacher_steps} steps: accuracy "
          f"{100 * teacher['student']['accuracy']:.2f}%, {teacher['student']['params']:,} params, "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    teacher_cfg = ModelConfig(source="run", path=teacher["final_dir"], num_labels=5)
    student_cfg = ModelConfig(source="derived", parent=teacher_cfg, params={"layers": [0, 3]}, num_labels=5)
    labelled = DatasetConfig(**{**data.__dict__, "labelled_fraction": 0.1})
    results: dict[str, list[dict]] = {"hard_labels": [], "kd": []}
    for seed in range(args.seeds):
        for name, terms, scheme in (("hard_labels", CE, "hard_labels"), ("kd", KD, "offline")):
            result = train(
                RunConfig(
                    student=student_cfg,
                    teacher=teacher_cfg if scheme == "offline" else None,
                    dataset=labelled,
                    terms=terms,
                    scheme=scheme,
                    output_dir=str(work / f"{name}-{seed}"),
                    cache_dir=str(work / "cache"),
                    train=TrainConfig(
                        max_steps=args.student_steps,
                        batch_size=16,
                        lr=1e-4,
                        warmup_steps=30,
                        seed=seed,
                        eval_every=args.student_steps,
                        save_every=args.student_steps,
                    ),
                )
            ).to_dict()
            results[name].append(result["student"])
            print(f"  seed {seed} {name:11s} accuracy {100 * result['student']['accuracy']:.2f}%  "
                  f"latency p50 {result['student']['latency_ms_p50']:.2f} ms", file=sys.stderr)

    def mean(name: str, key: str) -> str:
        values = [100 * r[key] for r in results[name]]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.2f} ± {spread:.2f}"

    student = results["kd"][0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.seeds} seed(s); "
          f"{time.perf_counter() - started:.0f} s in all")
    print("| model | params | latency p50 (ms) | accuracy (%) |\n|---|---|---|---|")
    print(f"| teacher: all-MiniLM-L6-v2 fine-tuned (all labels) | {teacher['student']['params']:,} | "
          f"{teacher['student']['latency_ms_p50']:.2f} | {100 * teacher['student']['accuracy']:.2f} |")
    print(f"| derived 2-layer student, hard labels (10% labels) | {student['params']:,} | "
          f"{results['hard_labels'][0]['latency_ms_p50']:.2f} | {mean('hard_labels', 'accuracy')} |")
    print(f"| derived 2-layer student, kd (10% labels + all inputs) | {student['params']:,} | "
          f"{student['latency_ms_p50']:.2f} | {mean('kd', 'accuracy')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
