"""Teacher-output cache: two runs with the same teacher and data; the second runs no teacher forward.

Trains a teacher once (not timed), then runs the same ``offline`` distillation twice against one shared cache
folder and reports, per run: wall time, teacher forward passes (counted by a forward hook this script puts on
every teacher the trainer loads, and by ``TrainResult.teacher_forwards``), teacher loads, and the cache
entries (hit or miss, seconds, size).

    .venv/bin/python benchmarks/teacher_cache.py                      # BBC news topics, BERT teacher
    .venv/bin/python benchmarks/teacher_cache.py --task causal_lm     # fortunes corpus, Llama teacher, top-k

The causal LM variant needs the fortunes corpus (``sh workers/engine/fetch_corpora.sh``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BERT_TEACHER = {"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                "intermediate_size": 512, "vocab_size": 8000, "max_position_embeddings": 128}
LLAMA_TEACHER = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "intermediate_size": 512, "vocab_size": 8000,
                 "max_position_embeddings": 128}


def configs(task: str, work: Path, steps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(teacher training config, distillation config) as dicts; the teacher's final folder is filled in
    later."""
    if task == "classification":
        dataset = {"source": "builtin", "name": "bbc-news", "max_length": 64}
        teacher_params, terms = BERT_TEACHER, [{"name": "ce", "weight": 0.1},
                                               {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}}]
    else:
        dataset = {"source": "builtin", "name": "fortunes", "max_length": 64}
        teacher_params, terms = LLAMA_TEACHER, [{"name": "ce", "weight": 0.5},
                                                {"name": "topk", "weight": 0.5, "params": {"k": 64}}]
    student = {"source": "config", "params": {**teacher_params, "hidden_size": 64, "num_hidden_layers": 1,
                                              "num_attention_heads": 2, "num_key_value_heads": 2,
                                              "intermediate_size": 128}}
    if task == "classification":
        student["params"].pop("num_key_value_heads")
    common = {"task": task, "dataset": dataset, "cache_dir": str(work / "teacher-cache")}
    teacher_run = {
        **common,
        "student": {"source": "config", "params": teacher_params},
        "terms": [{"name": "ce"}],
        "scheme": "hard_labels",
        "evaluate_teacher": False,
        "output_dir": str(work / "teacher"),
        "train": {
            "max_steps": 40,
            "batch_size": 16,
            "lr": 1e-3,
            "eval_every": 1000,
            "save_every": 1000,
            "log_every": 10,
            "device": "cpu",
        },
    }
    distill = {
        **common,
        "student": student,
        "terms": terms,
        "scheme": "offline",
        "train": {
            "max_steps": steps,
            "batch_size": 16,
            "lr": 1e-3,
            "eval_every": 1000,
            "save_every": 1000,
            "log_every": 10,
            "device": "cpu",
        },
    }
    return teacher_run, distill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("classification", "causal_lm"), default="classification")
    parser.add_argument("--steps", type=int, default=20, help="distillation steps per run")
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from workers.engine import teachers, trainer
    from workers.engine.config import RunConfig

    hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="distillweb-cache-bench-"))
    teacher_run, distill = configs(args.task, work, args.steps)
    print(f"work folder: {work}", flush=True)
    started = time.perf_counter()
    teacher_dir = trainer.train(RunConfig.from_dict(teacher_run)).final_dir
    print(
        f"teacher trained in {time.perf_counter() - started:.1f} s (not part of the comparison)", flush=True
    )

    counts = {"forwards": 0, "loads": 0}
    real_load_model = teachers.load_model

    def counting_load_model(cfg, *, dataset, role):
        loaded = real_load_model(cfg, dataset=dataset, role=role)
        if role == "teacher":
            counts["loads"] += 1
            loaded.model.register_forward_hook(
                lambda *_: counts.__setitem__("forwards", counts["forwards"] + 1)
            )
        return loaded

    teachers.load_model = counting_load_model
    rows = []
    for name in ("first", "second"):
        counts.update(forwards=0, loads=0)
        cfg = RunConfig.from_dict({**distill, "teacher": {"source": "run", "path": teacher_dir},
                                   "output_dir": str(work / name)})
        t0 = time.perf_counter()
        result = trainer.train(cfg)
        wall = time.perf_counter() - t0
        rows.append(
            (name, wall, counts["forwards"], result.teacher_forwards, counts["loads"], result.teacher_cache)
        )

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), Python {platform.python_version()}, load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"task: {args.task}, dataset: {distill['dataset']['name']}, {args.steps} distillation steps\n")
    print("| run | wall s | teacher forwards (hook / result) | teacher loads | cache entries |")
    print("|---|---|---|---|---|")
    for name, wall, hooked, reported, loads, cache in rows:
        entries = ", ".join(f"{c['split']} {'hit' if c['hit'] else 'miss'} {c['seconds']:.2f} s "
                            f"{c['bytes'] / 1024:,.0f} KiB" for c in cache)
        print(f"| {name} | {wall:.1f} | {hooked} / {reported} | {loads} | {entries} |")
    saved = rows[0][1] - rows[1][1]
    print(f"\nsaved by the cache: {saved:.1f} s ({100 * saved / rows[0][1]:.0f}% of the first run)")
    return 0 if rows[1][2] == 0 and rows[1][4] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
