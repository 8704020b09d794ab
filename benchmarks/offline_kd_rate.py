"""Offline KD step rate vs hard labels: what a cached top-k teacher costs per training step.

The limit for offline distillation is training the same student on hard labels alone: with a filled
teacher-output cache a KD step only adds a cache read and a top-k loss. This script trains a tiny Llama
student (built from a config, random weights, no download) on random-token rows (batch 8 × 128 tokens, one
CPU thread) through the engine's real path, ``workers.engine.trainer.train`` with a ``RunConfig``, and
compares:

- ``hard``: the ``hard_labels`` scheme, ``ce`` alone;
- ``topk``: the ``offline`` scheme, the ``topk`` term alone (forward KL on the teacher's top-64 plus the tail
  bucket, the engine's defaults) from a teacher-output cache filled beforehand (a cache hit: no teacher);
- ``ce+topk``: the ``offline`` scheme, ``0.5·ce + 0.5·topk``: both terms from one student softmax
  (``methods.combine`` hands them to ``sparse_losses.ce_topk``);
- ``ce+topk-apart``: the same recipe with that sharing turned off (each term its own pass over the
  vocabulary, as before it), the before/after comparison in the same interleaved rounds.

Each run is 1 + ``--intervals`` log intervals of ``--log-every`` steps; the first interval (warm-up, first
allocations) is dropped and the run's steady rate is the median of its other intervals' ``samples_per_s``
(the trainer's own metric points, so the whole per-step path counts and nothing one-off does: model load,
cache read, final save and evaluation fall outside the intervals). Contenders are interleaved (hard, topk,
ce+topk, hard, ...) for ``--repeats`` rounds; a contender's ratio is taken against the hard-label run of the
same round, and the report gives the median and the range over rounds.

    .venv/bin/python benchmarks/offline_kd_rate.py                   # V = 2k and V = 32k
    .venv/bin/python benchmarks/offline_kd_rate.py --vocab 2000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BATCH, SEQ_LEN, ROWS, K = 8, 128, 256, 64
STUDENT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
TEACHER = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 256,
}
CONTENDERS = {
    "hard": ("hard_labels", [{"name": "ce"}]),
    "topk": ("offline", [{"name": "topk", "params": {"k": K}}]),
    "ce+topk": (
        "offline",
        [{"name": "ce", "weight": 0.5}, {"name": "topk", "weight": 0.5, "params": {"k": K}}],
    ),
}
CONTENDERS["ce+topk-apart"] = CONTENDERS["ce+topk"]  # run with methods' ce/topk sharing off


def prepare(work: Path, vocab: int, seed: int = 0) -> None:
    """A word-level tokenizer of ``vocab`` tokens, random-token train/eval rows, and the student's and
    teacher's initial weights (random, seeded), all in ``work``."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab - 2)]
    tok = Tokenizer(
        models.WordLevel(
            {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}, unk_token="<pad>"
        )
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    rng = random.Random(seed)
    for name, rows in (("train", ROWS), ("eval", BATCH)):
        with (work / f"{name}.jsonl").open("w") as fh:
            for _ in range(rows):
                fh.write(json.dumps({"text": " ".join(rng.choices(words, k=SEQ_LEN + 8))}) + "\n")
    for role, shape in (("student", STUDENT), ("teacher", TEACHER)):
        torch.manual_seed(seed + (role == "teacher"))
        config = LlamaConfig(
            vocab_size=vocab,
            max_position_embeddings=SEQ_LEN,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
            tie_word_embeddings=False,
            **shape,
        )
        model = LlamaForCausalLM(config)
        if role == "teacher":  # a sharper teacher than a random init: most of its mass on a few tokens
            with torch.no_grad():
                model.lm_head.weight.mul_(40.0)
        model.save_pretrained(work / role)
        fast.save_pretrained(work / role)


def run_config(work: Path, contender: str, *, steps: int, log_every: int, tag: str) -> dict[str, Any]:
    scheme, terms = CONTENDERS[contender]
    return {
        "task": "causal_lm",
        "scheme": scheme,
        "student": {"source": "hf", "path": str(work / "student")},
        "teacher": {"source": "hf", "path": str(work / "teacher")} if scheme != "hard_labels" else None,
        "dataset": {
            "source": "hf",
            "path": str(work / "train.jsonl"),
            "eval_path": str(work / "eval.jsonl"),
            "max_length": SEQ_LEN,
        },
        "terms": terms,
        "evaluate_teacher": False,
        "cache_dir": str(work / "teacher-cache"),
        "output_dir": str(work / "runs" / tag),
        "train": {
            "max_steps": steps,
            "batch_size": BATCH,
            "lr": 1e-3,
            "lr_schedule": "constant",
            "eval_every": 10**6,
            "save_every": 10**6,
            "log_every": log_every,
            "device": "cpu",
            "seed": 0,
        },
    }


def steady_rate(
    work: Path, contender: str, *, intervals: int, log_every: int, tag: str, fill: bool = False
) -> tuple[float, float]:
    """Steps/s of one run, the median over its log intervals (the first, warm-up, dropped): by the wall clock
    (the trainer's ``samples_per_s``) and per second of this process's CPU time (steadier on a loaded
    machine: another job's share of the cores does not count)."""
    from workers.engine.config import RunConfig
    from workers.engine.trainer import Callbacks, train

    rates: list[float] = []
    cpu_marks: list[float] = []

    def on_metrics(step: int, metrics: dict[str, Any]) -> None:
        if "samples_per_s" in metrics:
            rates.append(metrics["samples_per_s"] / BATCH)
            cpu_marks.append(time.process_time())

    from workers.engine import methods

    cfg = run_config(work, contender, steps=(intervals + 1) * log_every, log_every=log_every, tag=tag)
    shared = methods._shared_ce_topk
    if contender.endswith("-apart"):
        methods._shared_ce_topk = lambda current, inputs: None
    try:
        result = train(RunConfig.from_dict(cfg), Callbacks(on_metrics=on_metrics))
    finally:
        methods._shared_ce_topk = shared
    if (
        contender != "hard"
        and not fill
        and not all(u["hit"] for u in result.teacher_cache if u["split"] == "train")
    ):
        raise RuntimeError(f"{contender}: the teacher cache missed; the timed run computed the teacher")
    cpu = [log_every / (b - a) for a, b in zip(cpu_marks, cpu_marks[1:], strict=False)]
    return statistics.median(rates[1:]), statistics.median(cpu)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def bench(vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"distillweb-kd-rate-{vocab}-"))
    prepare(work, vocab)
    started = time.perf_counter()
    for contender in args.contenders:  # fills the cache (the topk runs) and warms every path once, untimed
        steady_rate(work, contender, intervals=1, log_every=2, tag=f"warm-{contender}", fill=True)
    print(f"V={vocab}: prepared in {time.perf_counter() - started:.1f} s ({work})", flush=True)
    wall: dict[str, list[float]] = {c: [] for c in args.contenders}
    cpu: dict[str, list[float]] = {c: [] for c in args.contenders}
    for repeat in range(args.repeats):
        for contender in args.contenders:
            rate, cpu_rate = steady_rate(
                work,
                contender,
                intervals=args.intervals,
                log_every=args.log_every,
                tag=f"{contender}-{repeat}",
            )
            wall[contender].append(rate)
            cpu[contender].append(cpu_rate)
            print(
                f"  V={vocab} repeat {repeat} {contender:13s} {rate:7.3f} steps/s, "
                f"{cpu_rate:7.3f} per CPU s, load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
    summary: dict[str, Any] = {"vocab": vocab}
    for clock, rates in (("wall", wall), ("cpu", cpu)):
        summary[clock] = {
            c: (spread(r), spread([v / h for v, h in zip(r, rates["hard"], strict=True)]))
            for c, r in rates.items()
        }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[2000, 32000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--intervals", type=int, default=4, help="timed log intervals per run")
    parser.add_argument("--log-every", type=int, default=10, help="steps per log interval")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    args = parser.parse_args()
    if "hard" not in args.contenders:
        args.contenders.insert(0, "hard")

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread, "
        f"load {os.getloadavg()[0]:.2f}; batch {BATCH} × {SEQ_LEN}, k = {K}, {args.repeats} repeats of "
        f"{args.intervals} × {args.log_every} steps",
        flush=True,
    )
    results = [bench(vocab, args) for vocab in args.vocab]
    print(f"load after: {os.getloadavg()[0]:.2f}")
    print("median (range) over repeats; ratios against the hard-label run of the same repeat")
    for r in results:
        for clock, label in (("wall", "steps/s (wall)"), ("cpu", "steps per CPU s")):
            print(f"V={r['vocab']}, {label}")
            for contender, (rate, ratio) in r[clock].items():
                print(f"  {contender:13s} {rate}   vs hard {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
