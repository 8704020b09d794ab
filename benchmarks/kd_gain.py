"""Does distillation beat training on hard labels? Digits and BBC news topics, several seeds, engine only.

For each dataset a teacher is trained on all labels; then the same student is trained twice per seed on the
same data where only a fraction of the train labels is kept (the rest are unlabelled inputs, METHODS.md
"transfer set"): once with hard labels only (the baseline every experiment adds) and once distilled
(0.1·ce + 0.9·kd, τ = 4 on digits and 2 on BBC; see --temperature, --ce-weight) from the teacher over all
inputs. Reported: eval accuracy mean ± std over seeds and the KD gain, paired per seed.

    .venv/bin/python benchmarks/kd_gain.py [--seeds 3] [--only digits|bbc-news]
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
from workers.engine.trainer import train  # noqa: E402

CE = (LossTermConfig("ce", 1.0, {}),)


def kd_terms(temperature: float, ce_weight: float) -> tuple[LossTermConfig, ...]:
    return (
        LossTermConfig("ce", ce_weight, {}),
        LossTermConfig("kd", 1.0 - ce_weight, {"temperature": temperature}),
    )


SETUPS = {
    "digits": {
        "dataset": DatasetConfig(source="builtin", name="digits"),
        "teacher": ModelConfig(
            source="builtin", name="mlp", params={"hidden_sizes": [256, 256]}, num_labels=10
        ),
        "student": ModelConfig(source="builtin", name="mlp", params={"hidden_sizes": [16]}, num_labels=10),
        "teacher_train": TrainConfig(max_steps=600, batch_size=64, lr=1e-2, eval_every=600, save_every=600),
        "student_train": TrainConfig(max_steps=500, batch_size=64, lr=1e-2, eval_every=500, save_every=500),
        "labelled_fraction": 0.1,
        "temperature": 4.0,
    },
    "bbc-news": {
        "dataset": DatasetConfig(source="builtin", name="bbc-news", max_length=128),
        "teacher": ModelConfig(
            source="config",
            num_labels=5,
            params={
                "model_type": "bert",
                "hidden_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "intermediate_size": 256,
                "vocab_size": 8000,
                "max_position_embeddings": 128,
            },
        ),
        "student": ModelConfig(
            source="config",
            num_labels=5,
            params={
                "model_type": "bert",
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "vocab_size": 8000,
                "max_position_embeddings": 128,
            },
        ),
        "teacher_train": TrainConfig(
            max_steps=400, batch_size=32, lr=1e-3, warmup_steps=40, eval_every=400, save_every=400
        ),
        "student_train": TrainConfig(
            max_steps=1200, batch_size=32, lr=2e-3, warmup_steps=30, eval_every=1200, save_every=1200
        ),
        "labelled_fraction": 0.1,
        "temperature": 2.0,
    },
}


def run(cfg: RunConfig) -> dict:
    return train(cfg).to_dict()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", choices=sorted(SETUPS))
    parser.add_argument("--temperature", type=float, help="kd temperature (default: per dataset, 4 / 2)")
    parser.add_argument("--ce-weight", type=float, default=0.1)
    parser.add_argument("--student-steps", type=int, help="override the student runs' step count")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="distillweb-kd-gain-"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; work folder {work}")
    for name, setup in SETUPS.items():
        if args.only and name != args.only:
            continue
        started = time.perf_counter()
        temperature = args.temperature or setup["temperature"]
        kd = kd_terms(temperature, args.ce_weight)
        teacher_run = run(
            RunConfig(
                student=setup["teacher"],
                dataset=setup["dataset"],
                terms=CE,
                scheme="hard_labels",
                train=setup["teacher_train"],
                output_dir=str(work / name / "teacher"),
            )
        )
        teacher = ModelConfig(
            source="run", path=teacher_run["final_dir"], num_labels=setup["teacher"].num_labels
        )
        data = DatasetConfig(**{**setup["dataset"].__dict__, "labelled_fraction": setup["labelled_fraction"]})
        accuracy: dict[str, list[float]] = {"hard_labels": [], "kd": []}
        for seed in range(args.seeds):
            steps = {"max_steps": args.student_steps, "eval_every": args.student_steps,
                     "save_every": args.student_steps} if args.student_steps else {}
            student_train = TrainConfig(**{**setup["student_train"].__dict__, "seed": seed, **steps})
            for recipe, terms, scheme in (("hard_labels", CE, "hard_labels"), ("kd", kd, "offline")):
                result = run(
                    RunConfig(
                        student=setup["student"],
                        teacher=teacher if scheme != "hard_labels" else None,
                        dataset=data,
                        terms=terms,
                        scheme=scheme,
                        train=student_train,
                        output_dir=str(work / name / f"{recipe}-{seed}"),
                        cache_dir=str(work / "cache"),
                        evaluate_teacher=False,
                    )
                )
                accuracy[recipe].append(result["student"]["accuracy"])
                print(f"  {name} seed {seed} {recipe:11s} accuracy {result['student']['accuracy']:.4f}",
                      file=sys.stderr)
        gains = [k - h for k, h in zip(accuracy["kd"], accuracy["hard_labels"], strict=True)]

        def fmt(values: list[float]) -> str:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{100 * statistics.fmean(values):.2f} ± {100 * spread:.2f}"

        print(
            f"\n{name}: recipe {args.ce_weight:g}·ce + {1 - args.ce_weight:g}·kd(τ={temperature:g}), teacher "
            f"accuracy {100 * teacher_run['student']['accuracy']:.2f}%, "
            f"{int(100 * setup['labelled_fraction'])}% of train labels kept, {args.seeds} seeds, "
            f"{time.perf_counter() - started:.0f} s"
        )
        print("| student | hard labels (%) | kd (%) | KD gain (pp) |\n|---|---|---|---|")
        print(f"| {setup['student'].params} | {fmt(accuracy['hard_labels'])} | {fmt(accuracy['kd'])} | "
              f"{fmt(gains)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
