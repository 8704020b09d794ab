"""Store fidelity: the compact format-2 top-k store against float32 top-k, in bytes, time and training signal.

Trains a tiny Llama teacher on the fortunes corpus (not timed), then the same student with offline top-k KD
(``0.5·ce + 0.5·topk``, k = 64) for ``--seeds`` seeds from two teacher-output caches: ``float32``
(``DISTILLWEB_TOPK_STORE=float32``: format 1 with float32 values) and ``compact`` (format 2, the default).
Reports:

- bytes per token of each train entry (the whole entry folder / positions; format 2 also its records alone);
- fill time: the first run's teacher compute + write of the train entry (its ``teacher_cache`` seconds), and
  the write alone (the whole entry written as format 1 with float32 values and as format 2, best of 3);
- the stored distributions' difference: KL(float32 ‖ compact) per position over the top-k and the tail;
- read throughput: positions per second that ``gather_topk`` serves from each entry, in batches of the run's
  shape (padding counted; the two entries read in turns, the median of 3 rounds of 2 s), against the
  positions per second the training steps consumed;
- the fidelity goal: every student's eval KL(p_T‖p_S) against the real teacher over the whole vocabulary (the
  same yardstick for both arms; the runs' own ``kl_to_teacher`` is measured against each arm's eval entry),
  mean and spread over seeds, and the difference of the means against that spread.

With ``--smollm2 DIR`` (a prepared SmolLM2-135M-Instruct folder, ``prepare-models``) also the codec alone on
that model's top-64 (V = 49,152): bytes per token of a written store, encode and decode rates, and the KL of
the decoded distribution to the float32 one.

    .venv/bin/python benchmarks/store_fidelity.py
    .venv/bin/python benchmarks/store_fidelity.py --smollm2 var/models/SmolLM2-135M-Instruct

The corpus is the first ``--rows`` fortunes (``sh workers/engine/fetch_corpora.sh`` fetches them). The
teacher's top-k reaches the cache as float16 (``teachers._lm_topk_batch`` stores float16 log-probs), so the
``float32`` arm stores those values widened; the SmolLM2 part compares with true float32 top-k.
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

K, BATCH, MAX_LENGTH = 64, 16, 64
TEACHER = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 2000,
           "max_position_embeddings": 128}
STUDENT = {**TEACHER, "hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64}


def write_corpus(work: Path, rows_wanted: int) -> Path:
    """The first ``rows_wanted`` fortunes (in the corpus's sorted file order), one a line."""
    from workers.engine import data

    rows: list[str] = []
    for file in data.fortune_files(data.fortunes_dir()):
        rows += [" ".join(r.split()) for r in data.split_records(file.read_text(errors="replace"))]
        if len(rows) >= rows_wanted:
            break
    path = work / "corpus.txt"
    path.write_text("\n".join(r for r in rows[:rows_wanted] if r) + "\n")
    return path


def run_config(work: Path, name: str, cache: str, *, seed: int, steps: int, teacher: str | None) -> dict:
    train = {"max_steps": steps, "batch_size": BATCH, "lr": 3e-3, "eval_every": 10_000, "save_every": 10_000,
             "log_every": 10, "device": "cpu", "seed": seed}
    dataset = {"source": "hf", "path": str(work / "corpus.txt"), "max_length": MAX_LENGTH}
    common = {"task": "causal_lm", "dataset": dataset,
              "cache_dir": str(work / cache), "output_dir": str(work / name), "train": train}
    if teacher is None:  # the teacher itself
        return {**common, "student": {"source": "config", "params": TEACHER}, "terms": [{"name": "ce"}],
                "scheme": "hard_labels", "evaluate_teacher": False}
    return {**common, "student": {"source": "config", "params": STUDENT},
            "teacher": {"source": "run", "path": teacher}, "scheme": "offline", "evaluate_teacher": False,
            "terms": [{"name": "ce", "weight": 0.5}, {"name": "topk", "weight": 0.5, "params": {"k": K}}]}


def dense_eval_kl(teacher_dir: str, student_dir: str, dataset: Any) -> float:
    """Mean KL(p_T‖p_S) over the eval split's predicted tokens, full vocabulary, float32."""
    import torch

    from workers.engine.config import ModelConfig
    from workers.engine.evaluate import shift_for_lm
    from workers.engine.models import load_model
    from workers.engine.runtime import make_batcher

    teacher = load_model(ModelConfig(source="run", path=teacher_dir), dataset=dataset, role="teacher")
    student = load_model(ModelConfig(source="run", path=student_dir), dataset=dataset, role="student")
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in make_batcher("eval", dataset, student).iter_batches(32):
            t_logits, labels = shift_for_lm(teacher.model(**batch.inputs).logits, batch.labels)
            s_logits, _ = shift_for_lm(student.model(**batch.inputs).logits, batch.labels)
            t, s = t_logits.float().log_softmax(-1), s_logits.float().log_softmax(-1)
            kl = (t.exp() * (t - s)).sum(-1)
            mask = labels != -100
            total += float(kl[mask].double().sum())
            count += int(mask.sum())
    return total / count


def read_rate(entry: Any, rows: int, width: int, seconds: float) -> float:
    """Positions per second ``gather_topk`` serves from ``entry`` in batches of ``BATCH`` random rows."""
    import torch

    from workers.engine.cache import gather_topk

    generator = torch.Generator().manual_seed(0)
    served, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = torch.randint(0, rows, (BATCH,), generator=generator)
        top = gather_topk(entry, batch, width, torch.device("cpu"))
        served += top.logprobs.shape[0] * top.logprobs.shape[1]
    return served / (time.perf_counter() - started)


def write_seconds(tensors: dict) -> dict[str, float]:
    """Seconds to write ``tensors`` (a whole train entry) as format 1 with float32 values and as format 2
    (encode, shards, sha256, index), each the best of 3."""
    from safetensors.torch import save_file

    from workers.engine import topk_store

    out: dict[str, float] = {}
    for name in ("float32", "compact"):
        best = float("inf")
        for _ in range(3):
            folder = Path(tempfile.mkdtemp(prefix="distillweb-store-write-"))
            started = time.perf_counter()
            if name == "compact":
                topk_store.write_store(folder, tensors, vocab_size=TEACHER["vocab_size"])
            else:
                save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "outputs.safetensors")
            best = min(best, time.perf_counter() - started)
        out[name] = best
    return out


def stored_kl(reference: dict, compact: dict) -> list[float]:
    """Per-position KL(reference ‖ compact) over the top-k and the tail, both renormalised."""
    import torch

    a = torch.cat([reference["logprobs"].double(), reference["tail_logmass"].double()[:, None]], 1)
    b = torch.cat([compact["logprobs"].double(), compact["tail_logmass"].double()[:, None]], 1)
    a, b = a.log_softmax(-1), b.log_softmax(-1)
    return (a.exp() * (a - b)).sum(-1).tolist()


def smollm2_codec(folder: str, positions: int) -> dict[str, float]:
    """The codec alone on SmolLM2-135M's float32 top-64 over fortunes text."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.engine import data, topk_store
    from workers.engine.cache import topk_of

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    text = "\n".join(f.read_text(errors="replace") for f in data.fortune_files(data.fortunes_dir())[:4])
    ids = tokenizer(text, return_tensors="pt").input_ids[0, : positions // 256 * 256].view(-1, 256)
    tops = []
    with torch.no_grad():
        for rows in ids.split(4):
            tops.append(topk_of(model(rows).logits.float().reshape(-1, model.config.vocab_size), K))
    values = torch.cat([t.logprobs for t in tops]).numpy()
    indices = torch.cat([t.indices for t in tops]).numpy()
    tail = torch.cat([t.tail_logmass for t in tops]).numpy()
    codec = topk_store.Codec(K, topk_store.id_bits(model.config.vocab_size))
    started = time.perf_counter()
    records = codec.encode(values, indices, tail)
    encode = time.perf_counter() - started
    started = time.perf_counter()
    read, read_ids, read_tail = codec.decode(records)
    decode = time.perf_counter() - started
    assert np.array_equal(read_ids, indices)
    ref = {"logprobs": torch.from_numpy(values), "tail_logmass": torch.from_numpy(tail)}
    kl = stored_kl(ref, {"logprobs": torch.from_numpy(read), "tail_logmass": torch.from_numpy(read_tail)})
    half = {k: v.half().float() for k, v in ref.items()}
    folder_out = Path(tempfile.mkdtemp(prefix="distillweb-smollm2-store-"))
    tensors = {"offsets": torch.arange(0, len(values) + 1, 256), "logprobs": ref["logprobs"],
               "indices": torch.from_numpy(indices).int(), "tail_logmass": ref["tail_logmass"],
               "target_logprob": torch.from_numpy(values[:, 0].copy())}
    fields = topk_store.write_store(folder_out, tensors, vocab_size=model.config.vocab_size)
    return {
        "positions": len(values),
        "record_bytes": codec.record_bytes,
        "bytes_per_token": fields["bytes_per_token"],
        "encode_per_s": len(values) / encode,
        "decode_per_s": len(values) / decode,
        "kl_mean": statistics.fmean(kl),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "kl_max": max(kl),
        "kl_float16": statistics.fmean(stored_kl(ref, half)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1000, help="fortunes in the corpus")
    parser.add_argument("--steps", type=int, default=80, help="distillation steps per run")
    parser.add_argument("--teacher-steps", type=int, default=120)
    parser.add_argument("--smollm2", help="a prepared SmolLM2-135M-Instruct folder: the codec on its outputs")
    parser.add_argument("--smollm2-positions", type=int, default=4096)
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from workers.engine import topk_store, trainer
    from workers.engine.cache import TeacherCache, entry_tensors
    from workers.engine.config import RunConfig
    from workers.engine.data import load_dataset

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="distillweb-store-bench-"))
    print(f"work folder: {work}", flush=True)
    write_corpus(work, args.rows)
    started = time.perf_counter()
    teacher_cfg = RunConfig.from_dict(run_config(work, "teacher", "unused", seed=0, steps=args.teacher_steps,
                                                 teacher=None))
    teacher_dir = trainer.train(teacher_cfg).final_dir
    print(f"teacher trained in {time.perf_counter() - started:.1f} s (not timed)", flush=True)
    dataset = load_dataset(teacher_cfg.dataset, task="causal_lm")

    arms: dict[str, dict[str, Any]] = {}
    for store in ("float32", "compact"):
        os.environ[topk_store.STORE_ENV] = store
        arm: dict[str, Any] = {"kl": [], "run_kl": [], "train_tokens_per_s": []}
        for seed in range(args.seeds):
            cfg = RunConfig.from_dict(run_config(work, f"{store}-{seed}", f"cache-{store}", seed=seed,
                                                 steps=args.steps, teacher=teacher_dir))
            t0 = time.perf_counter()
            result = trainer.train(cfg)
            (use,) = [u for u in result.teacher_cache if u["split"] == "train"]
            if seed == 0:
                arm["fill_seconds"], arm["entry"] = use["seconds"], use
            arm["kl"].append(dense_eval_kl(teacher_dir, result.final_dir, dataset))
            arm["run_kl"].append(result.student.get("kl_to_teacher", float("nan")))
            print(f"{store} seed {seed}: {time.perf_counter() - t0:.1f} s, eval KL {arm['kl'][-1]:.4f}",
                  flush=True)
            arm["train_seconds"] = result.train_seconds
        entry = TeacherCache(work / f"cache-{store}").lookup(arm["entry"]["key"])
        offsets = entry.tensors["offsets"]
        positions = int(offsets[-1])
        rows = len(offsets) - 1
        width = int((offsets[1:] - offsets[:-1]).max())
        arm["bytes_per_token"] = arm["entry"]["bytes"] / positions
        arm["topk_bytes"] = entry.manifest.get("bytes_per_token_topk")
        arm["read"] = (entry, rows, width)
        # positions the training steps consumed: steps × batch × the mean positions of a row, per second
        arm["train_per_s"] = args.steps * BATCH * positions / rows / arm["train_seconds"]
        arm["tensors"] = entry_tensors(entry.path)
        arm["positions"] = positions
        arms[store] = arm
    os.environ.pop(topk_store.STORE_ENV, None)
    rates: dict[str, list[float]] = {store: [] for store in arms}
    for _ in range(3):  # the two entries read in turns, 2 s each; the median of 3
        for store, arm in arms.items():
            rates[store].append(read_rate(*arm["read"], seconds=2.0))
    for store, arm in arms.items():
        arm["read_per_s"] = statistics.median(rates[store])

    kl = stored_kl(arms["float32"]["tensors"], arms["compact"]["tensors"])
    writes = write_seconds(arms["float32"]["tensors"])
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), Python {platform.python_version()}, load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"teacher: Llama 2×64, V = 2,000, {args.rows:,} fortunes, max length {MAX_LENGTH}; student 1×32; "
          f"k = {K}; {args.steps} steps × batch {BATCH}; {arms['compact']['positions']:,} train positions\n")
    print("| store | bytes/token (entry) | records B/token | fill s | entry write s | "
          "gather_topk positions/s | training positions/s | eval KL mean ± std (dense) | "
          "runs' own kl_to_teacher |")
    print("|---|---|---|---|---|---|---|---|---|")
    for store, arm in arms.items():
        print(f"| {store} | {arm['bytes_per_token']:.1f} | {arm['topk_bytes'] or '-'} | "
              f"{arm['fill_seconds']:.2f} | {writes[store]:.2f} | {arm['read_per_s']:,.0f} | "
              f"{arm['train_per_s']:,.0f} | "
              f"{statistics.fmean(arm['kl']):.4f} ± {statistics.stdev(arm['kl']):.4f} | "
              f"{', '.join(f'{v:.4f}' for v in arm['run_kl'])} |")
    diff = statistics.fmean(arms["compact"]["kl"]) - statistics.fmean(arms["float32"]["kl"])
    spread = max(statistics.stdev(arms[s]["kl"]) for s in arms)
    print(f"\nper-seed eval KL: float32 {[round(v, 4) for v in arms['float32']['kl']]}, "
          f"compact {[round(v, 4) for v in arms['compact']['kl']]}")
    print(f"difference of the means {diff:+.4f} nats against a seed spread (largest std) of {spread:.4f}: "
          f"{'within' if abs(diff) <= spread else 'OUTSIDE'} the spread")
    print(f"stored distributions, KL(float32 ‖ compact) per position: mean {statistics.fmean(kl):.2e}, "
          f"max {max(kl):.2e}")
    if args.smollm2:
        s = smollm2_codec(args.smollm2, args.smollm2_positions)
        print(f"\nSmolLM2-135M-Instruct top-{K} on {s['positions']:,} fortune-text positions (V = 49,152): "
              f"{s['record_bytes']} B/token of records, {s['bytes_per_token']:.1f} B/token written with "
              f"target_logprob; encode {s['encode_per_s']:,.0f} positions/s, "
              f"decode {s['decode_per_s']:,.0f}/s; "
              f"KL to float32 mean {s['kl_mean']:.2e}, p99 {s['kl_p99']:.2e}, max {s['kl_max']:.2e} "
              f"(float16 values alone: {s['kl_float16']:.2e})")
    return 0 if abs(diff) <= spread else 1


if __name__ == "__main__":
    sys.exit(main())
