"""One prepared check of the CUDA paths on a GPU host, in order of value. ``--dry`` runs the same sections on
the CPU with tiny models and a few steps; the test suite runs it so the script cannot rot.

    python benchmarks/gpu_check.py [--dry] [--out DIR] [--budget-s 420]
    python benchmarks/gpu_check.py --fetch-wheels .whl    # here: the wheels a GPU host lacks (Python 3.12)

Sections (each timed; a failure is recorded with its error and the next section still runs; a section that
would start after ``--budget-s`` is skipped):

1. ``inventory`` — the GPUs as a worker registers them (NVML via ``workers.gpus``), torch and CUDA versions,
   bf16 support.
2. ``engine`` — online and offline distillation on the device: teacher SmolLM2-135M when prepared (``make
   models``), else a randomly initialised Llama of the same shape; student derived from it (every other
   layer). Seconds per step after warm-up, tokens/s, model FLOP utilisation (6·N per trained token plus 2·N
   per teacher token for the online teacher, against the card's dense bf16 peak) and peak memory.
3. ``distributed`` — the same online distillation through torchrun with FSDP2 and bf16 parameters: world size
   1 on nccl on a GPU (every GPU of a larger host with ``--ranks``), 2 CPU ranks on gloo in ``--dry``.
4. ``trl`` — TRL's ``GKDTrainer`` on the same pair (the same teacher, the same derived student, built by the
   engine's loaders) on the same device in the same call: the same steps, batch, sequence length, learning
   rate, schedule and precision as the engine's online run (``lmbda=0, beta=0``: forward KL on the training
   text, a teacher forward every step). Tokens per step are counted by a forward pre-hook on the student
   (TRL pads each batch), and tokens/s and MFU are reported beside the engine's. Needs ``trl`` (the GPU host
   gets it from ``--fetch-wheels``); in ``--dry`` a missing trl marks the section skipped, not failed.
5. ``memory`` — the engine's memory estimate (what routing and pre-flight use) against
   ``torch.cuda.max_memory_allocated`` for full training and with activation checkpointing.
6. ``served`` — the teacher served by vLLM (issue 14) on the GPU: vLLM's OpenAI-compatible server started
   here on the prepared SmolLM2-135M folder (a third of the GPU's memory), then the offline run of ``engine``
   with that teacher as source ``server``: its cache filled from the server's ``prompt_logprobs`` during the
   first epoch. Seconds per step, and the server's tokens/s from the entry's manifest. Needs ``vllm``
   importable here and the prepared model; otherwise skipped, saying which is missing. ``--dry`` skips it:
   tests/workers/engine/test_served_teacher.py runs the served path against vLLM's CPU build.
7. ``worker`` — a real run through a Celery worker on the embedded default (``manage.py demo``: SQLite and a
   filesystem broker, no Postgres or Redis needed): the seeded teacher experiment, and the GPUs the worker
   registered.

Writes ``results.json`` under ``--out`` and prints a markdown summary. The GPU host reaches no package
registry: ``--fetch-wheels`` downloads, here, the wheels of what its image lacks (Django, Celery, trl, …), at
the versions installed here (trl, which the project does not install, at ``TRL_VERSION``), for CPython 3.12 on
x86-64; carry that folder and install it there first:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site-packages .whl/*.whl
    export PYTHONPATH=/tmp/site-packages

(The folder's name must contain ``site-packages``: ``datasets`` hashes the functions it maps with dill, which
pickles by reference only modules under the interpreter's prefix or a ``site-packages`` folder; pyarrow
elsewhere makes every ``Dataset.map`` in TRL fail with "Can't pickle <class 'MonthDayNano'>".) The pyarrow
wheel is slimmed on the way (``PYARROW_UNUSED``) so that the wheels and the working tree stay under 64 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Dense bf16 peak (TFLOP/s, no sparsity) by a word of the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
# What the GPU image lacks of the project's dependencies (its image has torch, transformers, numpy, pandas,
# scikit-learn, scipy, pyyaml, nvidia-ml-py, tokenizers, safetensors, peft, accelerate and their needs).
GPU_HOST_WHEELS = (
    "Django",
    "asgiref",
    "sqlparse",
    "django-environ",
    "celery",
    "kombu",
    "billiard",
    "vine",
    "amqp",
    "click-didyoumean",
    "click-repl",
    "click-plugins",
    "prompt_toolkit",
    "wcwidth",
    "tzdata",
    "redis",
    "whitenoise",
    "plotly",
    "datasets",
    "dill",
    "multiprocess",
    "djangorestframework",
    "drf-spectacular",
    "drf-spectacular-sidecar",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "uritemplate",
    "inflection",
    "django-csp",
    "django-axes",
)  # not psycopg: the GPU check keeps its records in SQLite (the GPU host has no Postgres)
# TRL's GKDTrainer for the ``trl`` section, and what it needs beyond the image (``datasets`` needs pyarrow and
# xxhash). trl is not a dependency of the project: when it is not installed here, this version is fetched.
TRL_WHEELS = ("trl", "pyarrow", "xxhash")
TRL_VERSION = "1.16.0"
# TRL's chat template for the ``trl`` section: the messages concatenated, so prompt + completion = the text.
PLAIN_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
ONLINE_TERMS = ({"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9})
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 256,
    "max_position_embeddings": 64,
}
# SmolLM2-135M's shape, randomly initialised when the prepared model is not there.
SMOL_SHAPE = {
    "model_type": "llama",
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


class Skipped(Exception):
    """A section that cannot run here and is not expected to (e.g. trl absent in ``--dry``): recorded as
    skipped, and the check still succeeds."""


@dataclass
class Check:
    dry: bool
    work: Path
    deadline: float
    ranks: int = 1
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"


def section_inventory(check: Check) -> dict[str, Any]:
    import torch

    from workers import gpus

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "nvml_gpus": [dict(g) for g in gpus.read_gpus()],
        "cuda_versions": gpus.cuda_versions(),
    }


def corpus(work: Path, lines: int) -> Path:
    """Deterministic text with enough variety for a tokenizer and a language model to learn something."""
    words = (
        "the cat dog bird fish tree river stone cloud light sat ran flew swam grew fell on under over near "
        "a small large quiet loud red green blue old new"
    ).split()
    path = work / "corpus.txt"
    path.write_text(
        "\n".join(
            " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12 + i % 9)) for i in range(lines)
        )
    )
    return path


def teacher_config(check: Check) -> dict[str, Any]:
    from workers.engine.pretrained import models_dir

    smol = models_dir() / "SmolLM2-135M-Instruct"
    if check.dry:
        return {"source": "config", "params": TINY_LLAMA}
    if smol.is_dir():
        return {"source": "hf", "path": str(smol)}
    return {"source": "config", "params": SMOL_SHAPE}


def run_config(check: Check, *, slug: str, scheme: str, terms: list[dict], steps: int, **train: Any) -> dict:
    teacher = teacher_config(check)
    batch, length = (4, 16) if check.dry else (16, 256)
    return {
        "task": "causal_lm",
        "scheme": scheme,
        "teacher": teacher,
        "student": {"source": "derived", "parent": teacher, "params": {"layers": "every_other"}},
        "dataset": {
            "source": "hf",
            "path": str(corpus(check.work, 200 if check.dry else 4000)),
            "max_length": length,
            "pack": True,
        },
        "terms": terms,
        "output_dir": str(check.work / slug),
        "cache_dir": str(check.work / "cache"),
        "evaluate_teacher": False,
        "train": {
            "max_steps": steps,
            "batch_size": batch,
            "lr": 2e-4,
            "log_every": steps,
            "eval_every": steps * 10,
            "save_every": steps * 10,
            "device": check.device,
            **train,
        },
    }


def timed_train(config: dict[str, Any], *, warmup: int) -> dict[str, Any]:
    """Train ``config``; seconds per step after ``warmup`` steps, peak CUDA memory, the student's metrics."""
    import torch

    from workers.engine.config import RunConfig
    from workers.engine.trainer import Callbacks, train

    marks: list[float] = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(
        RunConfig.from_dict(config), Callbacks(on_progress=lambda *_: marks.append(time.perf_counter()))
    )
    seconds = time.perf_counter() - started
    timed = marks[warmup:] if len(marks) > warmup + 1 else marks
    step_s = (timed[-1] - timed[0]) / (len(timed) - 1) if len(timed) > 1 else None
    return {
        "seconds": round(seconds, 2),
        "s_per_step": step_s,
        "peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "student": result.to_dict().get("student", {}),
    }


def model_params(model: dict[str, Any]) -> int:
    from workers.engine.memory import ModelShapeReader

    shape = ModelShapeReader().shape(model, task="causal_lm")
    return shape.params if shape else 0


def peak_flops(name: str) -> float | None:
    return next((tf * 1e12 for word, tf in PEAK_BF16_TFLOPS.items() if word in name), None)


def engine_steps(check: Check) -> tuple[int, int]:
    """Steps of the engine's timed runs and of the TRL run, and how many of them are warm-up (not timed)."""
    return (3, 1) if check.dry else (60, 10)


def mfu(student_params: int, teacher_params: int, tokens_per_s: float, device_name: str) -> float | None:
    """Model FLOP utilisation: 6·N per trained token, 2·N per token of a teacher forward, against the peak."""
    peak = peak_flops(device_name)
    return (6 * student_params + 2 * teacher_params) * tokens_per_s / peak if peak else None


def section_engine(check: Check) -> dict[str, Any]:
    import torch

    steps, warmup = engine_steps(check)
    device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    out: dict[str, Any] = {"device": device_name}
    for slug, scheme, terms in (
        ("online", "online", list(ONLINE_TERMS)),
        (
            "offline",
            "offline",
            [
                {"name": "ce", "weight": 0.1},
                {"name": "topk", "weight": 0.9, "params": {"k": 64, "tail": True}},
            ],
        ),
    ):
        config = run_config(check, slug=slug, scheme=scheme, terms=terms, steps=steps)
        row = timed_train(config, warmup=warmup)
        batch, length = config["train"]["batch_size"], config["dataset"]["max_length"]
        student_params = row["student"].get("params") or 0
        if row["s_per_step"]:
            row["tokens_per_s"] = batch * length / row["s_per_step"]
            teacher_params = 0 if scheme == "offline" else model_params(config["teacher"])
            row["mfu"] = mfu(student_params, teacher_params, row["tokens_per_s"], device_name)
        out[slug] = row
    return out


def trl_rows(tokenizer: Any, texts: list[str], *, tokens: int, count: int) -> list[dict[str, Any]]:
    """``count`` conversations for TRL cut from the corpus read as one stream: each about ``tokens`` tokens,
    the first word as the prompt, the rest the completion (trained on)."""
    ids = tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"]
    windows = [ids[i : i + tokens] for i in range(0, len(ids) - tokens + 1, tokens)]
    if not windows:
        raise RuntimeError(f"the corpus has fewer than {tokens} tokens")
    rows = []
    for i in range(count):
        head, _, rest = tokenizer.decode(windows[i % len(windows)]).strip().partition(" ")
        messages = [{"role": "user", "content": head}, {"role": "assistant", "content": " " + rest}]
        rows.append({"messages": messages})
    return rows


def trl_version() -> str:
    import trl

    return str(getattr(trl, "__version__", "") or metadata.version("trl"))


def section_trl(check: Check) -> dict[str, Any]:
    """TRL's GKDTrainer on the engine section's pair, steps, batch, sequence length and precision."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as exc:
        if check.dry:
            raise Skipped(f"trl is not installed here ({exc}); install trl to run this section") from None
        raise
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from workers.engine.config import RunConfig
    from workers.engine.data import load_dataset
    from workers.engine.derive import derive_from_loaded
    from workers.engine.models import load_model

    steps, warmup = engine_steps(check)
    cfg = RunConfig.from_dict(
        run_config(check, slug="trl", scheme="online", terms=list(ONLINE_TERMS), steps=steps)
    )
    batch, length = cfg.train.batch_size, cfg.dataset.max_length
    torch.manual_seed(0)
    dataset = load_dataset(cfg.dataset, task="causal_lm")  # a config teacher fits its tokenizer on it
    teacher = load_model(cfg.teacher, dataset=dataset, role="teacher", task="causal_lm")
    student = derive_from_loaded(teacher, dict(cfg.student.params))  # the engine's student, same weights
    tokenizer = teacher.tokenizer
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    texts = Path(cfg.dataset.path).read_text().splitlines()
    # A few tokens of room: the collator keeps the last max_length tokens, which must include the prompt.
    rows = trl_rows(tokenizer, texts, tokens=length - 4, count=batch * steps)
    seen: list[int] = []
    marks: list[float] = []

    def count_tokens(_module: Any, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(int(mask.sum()) if mask is not None else int(ids.numel()))

    class Marks(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks.append(time.perf_counter())

    hook = student.model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    config = GKDConfig(
        output_dir=str(check.work / "trl"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        lr_scheduler_type=cfg.train.lr_schedule,
        warmup_steps=0,
        max_grad_norm=cfg.train.grad_clip,
        lmbda=0.0,  # never the student's own samples: the training text, like the engine's run
        beta=0.0,  # forward KL(teacher ‖ student)
        temperature=1.0,
        max_length=length,
        use_cpu=check.dry,
        bf16=not check.dry,  # the engine's precision "auto": bf16 autocast on CUDA, fp32 on the CPU
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=steps,
        seed=0,
        dataloader_num_workers=0,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = GKDTrainer(
        model=student.model,
        teacher_model=teacher.model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Marks()],
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    hook.remove()
    timed = marks[warmup:] if len(marks) > warmup + 1 else marks
    s_per_step = (timed[-1] - timed[0]) / (len(timed) - 1) if len(timed) > 1 else None
    tokens_per_step = sum(seen) / len(seen) if seen else 0.0
    out: dict[str, Any] = {
        "trl": trl_version(),
        "steps": len(marks),
        "batch": batch,
        "max_length": length,
        "tokens_per_step": tokens_per_step,
        "engine_tokens_per_step": batch * length,
        "seconds": round(seconds, 2),
        "s_per_step": s_per_step,
        "peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }
    if s_per_step:
        device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        out["tokens_per_s"] = tokens_per_step / s_per_step
        student_params = sum(p.numel() for p in student.model.parameters())
        teacher_params = sum(p.numel() for p in teacher.model.parameters())
        out["mfu"] = mfu(student_params, teacher_params, out["tokens_per_s"], device_name)
        engine = check.results.get("engine", {}).get("online", {})
        if engine.get("tokens_per_s"):
            out["engine_online_tokens_per_s"] = engine["tokens_per_s"]
            out["engine_vs_trl"] = engine["tokens_per_s"] / out["tokens_per_s"]
    return out


def section_distributed(check: Check) -> dict[str, Any]:
    """Online distillation under torchrun, FSDP2 with bf16 parameters; the result rank 0 writes."""
    ranks = 2 if check.dry else check.ranks
    steps = 3 if check.dry else 30
    resources = {"strategy": "fsdp", "precision": "bf16", "processes" if check.dry else "gpus": ranks}
    config = run_config(
        check,
        slug="distributed",
        scheme="online",
        steps=steps,
        terms=[{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}],
        **resources,
    )
    config["train"]["device"] = "cpu" if check.dry else "auto"
    path, result = check.work / "distributed.json", check.work / "distributed-result.json"
    path.write_text(json.dumps(config))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        "-m",
        "workers.engine",
        "run",
        str(path),
        "--result-json",
        str(result),
    ]
    started = time.perf_counter()
    done = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=max(60.0, check.deadline - time.monotonic()),
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0 or not result.exists():
        raise RuntimeError(f"torchrun exited {done.returncode}: {done.stderr[-2000:]}")
    outcome = json.loads(result.read_text())
    if "error" in outcome:
        raise RuntimeError(outcome["error"])
    batch, length = config["train"]["batch_size"], config["dataset"]["max_length"]
    return {
        "ranks": ranks,
        "seconds": round(seconds, 1),
        "tokens_per_s_whole_run": batch * length * steps / seconds,
        "student": outcome.get("student", {}),
    }


def section_memory(check: Check) -> dict[str, Any]:
    from workers.engine.memory import estimate_run_memory

    steps = 2 if check.dry else 5
    rows = {}
    for slug, extra in (("full", {}), ("activation_checkpointing", {"activation_checkpointing": True})):
        config = run_config(
            check,
            slug=f"memory-{slug}",
            scheme="online",
            steps=steps,
            terms=[{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}],
            **extra,
        )
        estimate = estimate_run_memory(config)
        measured = timed_train(config, warmup=0)["peak_bytes"]
        rows[slug] = {
            "estimate_bytes": estimate.total_bytes,
            "measured_bytes": measured,
            "ratio": measured / estimate.total_bytes if measured and estimate.total_bytes else None,
        }
    return rows


def section_worker(check: Check) -> dict[str, Any]:
    """The seeded teacher experiment of ``manage.py demo`` through its Celery worker, on this host's
    device."""
    from benchmarks.demo_time import TERMINAL, experiment_states, free_port

    var = check.work / "demo"
    var.mkdir()
    env = {
        k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "ARTIFACT_ROOT"}
    }
    env.update({"DEBUG": "true", "DISTILLWEB_VAR_DIR": str(var), "DEMO_ADMIN_PASSWORD": "gpu-check-pass"})
    demo = subprocess.Popen(
        [sys.executable, "manage.py", "demo", "--port", str(free_port())],
        cwd=REPO,
        env=env,
        stdout=(var / "demo.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    db, first = var / "distillweb.sqlite3", None
    try:
        while time.monotonic() < check.deadline and demo.poll() is None:
            states = experiment_states(db)
            first = next(iter(states.items()), None)
            if first and first[1] and set(first[1]) <= TERMINAL:
                break
            time.sleep(1)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGINT)
        demo.wait(timeout=60)
    if not first or not set(first[1]) <= TERMINAL:
        tail = (var / "demo.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the seeded experiment did not finish in time; demo log ends:\n{tail}")
    import sqlite3

    with sqlite3.connect(db) as conn:
        workers = conn.execute("select name, gpus from experiments_worker").fetchall()
    return {
        "experiment": first[0],
        "statuses": first[1],
        "workers": [{"name": name, "gpus": json.loads(gpus or "[]")} for name, gpus in workers],
    }


def section_served(check: Check) -> dict[str, Any]:
    """The offline run of ``engine`` with its teacher served by vLLM on this GPU (see the module's help)."""
    import importlib.util
    import urllib.request

    from benchmarks.demo_time import free_port
    from workers.engine.served_teacher import SERVERS_ENV

    if check.dry:
        raise Skipped("--dry: tests/workers/engine/test_served_teacher.py runs it against vLLM's CPU build")
    if importlib.util.find_spec("vllm") is None:
        raise Skipped("vllm is not installed on this host (its wheels are GBs; --fetch-wheels carries none)")
    teacher = teacher_config(check)
    if teacher["source"] != "hf":
        raise Skipped("vLLM serves a model folder with its tokenizer: prepare SmolLM2-135M (make models)")
    port, log = free_port(), check.work / "vllm.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", teacher["path"],
         "--served-model-name", "teacher", "--host", "127.0.0.1", "--port", str(port),
         "--max-model-len", "512", "--max-logprobs", "64", "--gpu-memory-utilization", "0.3"],
        cwd=check.work, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url, previous = f"http://127.0.0.1:{port}", os.environ.get(SERVERS_ENV)
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=5) as answer:
                    if json.loads(answer.read()).get("data"):
                        break
            except (OSError, ValueError):
                pass
            if server.poll() is not None or time.monotonic() > check.deadline:
                raise RuntimeError(f"vLLM did not serve the model; its log ends:\n{log.read_text()[-2000:]}")
            time.sleep(2)
        os.environ[SERVERS_ENV] = f"gpu-check={url}"
        steps, warmup = engine_steps(check)
        terms = [{"name": "ce", "weight": 0.1}, {"name": "topk", "weight": 0.9, "params": {"k": 64}}]
        config = run_config(check, slug="served", scheme="offline", terms=terms, steps=steps)
        config["teacher"] = {"source": "server", "name": "teacher", "params": {"server": "gpu-check"}}
        row = timed_train(config, warmup=warmup)
        manifests = [json.loads(m.read_text()) for m in (check.work / "cache").glob("*/manifest.json")]
        served = [m["served"] for m in manifests if "served" in m and m.get("split") == "train"]
        row["served"] = served[0] if served else None
        return {"offline": row}
    finally:
        if previous is None:
            os.environ.pop(SERVERS_ENV, None)
        else:
            os.environ[SERVERS_ENV] = previous
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


SECTIONS: tuple[tuple[str, Callable[[Check], dict[str, Any]]], ...] = (
    ("inventory", section_inventory),
    ("engine", section_engine),
    ("distributed", section_distributed),
    ("trl", section_trl),
    ("memory", section_memory),
    ("served", section_served),
    ("worker", section_worker),
)


def run_sections(check: Check, names: list[str]) -> None:
    for name, section in SECTIONS:
        if names and name not in names:
            continue
        if time.monotonic() > check.deadline:
            check.results[name] = {"status": "skipped", "why": "over the time budget"}
            continue
        started = time.monotonic()
        print(f"[gpu_check] {name} …", file=sys.stderr, flush=True)
        try:
            check.results[name] = {"status": "ok", **section(check)}
        except Skipped as why:
            check.results[name] = {"status": "skipped", "why": str(why), "optional": True}
        except Exception as exc:  # recorded: the next section still runs on the lent machine
            check.results[name] = {
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-3000:],
            }
        check.results[name]["seconds"] = round(time.monotonic() - started, 1)
        print(
            f"[gpu_check] {name}: {check.results[name]['status']} in {check.results[name]['seconds']} s",
            file=sys.stderr,
            flush=True,
        )


def summary(check: Check) -> str:
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{'dry (CPU)' if check.dry else 'GPU'}"
    ]
    for name, row in check.results.items():
        lines.append(
            f"- {name}: {row['status']} ({row.get('seconds', 0)} s)"
            + (f" — {row['error']}" if row.get("error") else "")
            + (f" — {row['why']}" if row.get("why") else "")
        )
    engine = check.results.get("engine", {})
    for slug in ("online", "offline"):
        if isinstance(engine.get(slug), dict) and engine[slug].get("tokens_per_s"):
            r = engine[slug]
            util = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
            lines.append(f"  - {slug}: {r['s_per_step']:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s{util}")
    served = check.results.get("served", {}).get("offline") or {}
    if served.get("s_per_step") and served.get("served"):
        lines.append(f"  - offline from vLLM: {served['s_per_step']:.3f} s/step, the server scored "
                     f"{served['served']['tokens_per_s']:,.0f} tokens/s while the first epoch filled it")
    trl = check.results.get("trl", {})
    if trl.get("tokens_per_s"):
        util = f", MFU {100 * trl['mfu']:.1f}%" if trl.get("mfu") else ""
        ratio = f"; engine online / TRL: {trl['engine_vs_trl']:.2f}×" if trl.get("engine_vs_trl") else ""
        lines.append(
            f"  - TRL GKDTrainer {trl['trl']}: {trl['s_per_step']:.3f} s/step, {trl['tokens_per_s']:,.0f} "
            f"tokens/s ({trl['tokens_per_step']:.0f} tokens/step){util}{ratio}"
        )
    return "\n".join(lines)


# Parts of the pyarrow wheel (52 MiB for CPython 3.12) that neither ``datasets`` nor TRL load: Arrow
# Flight, the S3 filesystem (``pyarrow.fs`` imports it only if present), C++ tests, headers, Cython sources
# and the extra names of libraries that are loaded by their SONAME (``lib….so.NNNN``).
PYARROW_UNUSED = re.compile(
    r"^pyarrow/(include/|tests/|src/"
    r"|.*\.(pyx|pxd|pxi|h|hpp|cc|cpp)$"
    r"|_flight\.|libarrow_flight\.|libarrow_python_flight\.|_s3fs\.|libarrow_s3\.|_pyarrow_cpp_tests\."
    r"|lib[a-z_]+\.so$|lib[a-z_]+\.so\.\d+\.\d+\.\d+$)"
)


def slim_wheel(wheel: Path, unused: re.Pattern[str]) -> tuple[int, int]:
    """Rewrite ``wheel`` without the members ``unused`` matches (and their RECORD lines); (bytes before,
    after)."""
    import zipfile

    before = wheel.stat().st_size
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if unused.match(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                kept = [line for line in data.decode().splitlines() if not unused.match(line.split(",")[0])]
                data = ("\n".join(kept) + "\n").encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    slim.replace(wheel)
    return before, wheel.stat().st_size


def fetch_wheels(folder: Path) -> int:
    """Download, here, the wheels the GPU image lacks, at the versions installed here, for CPython 3.12."""
    folder.mkdir(parents=True, exist_ok=True)
    pins = []
    for name in (*GPU_HOST_WHEELS, *TRL_WHEELS):
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            if name == "trl":  # not a project dependency: the version the TRL section was written against
                pins.append(f"trl=={TRL_VERSION}")
            else:
                print(f"{name} is not installed here; skipped", file=sys.stderr)
    platforms = [arg for n in (28, 27, 17) for arg in ("--platform", f"manylinux_2_{n}_x86_64")]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *platforms,
        "--platform",
        "manylinux2014_x86_64",
        "--platform",
        "any",
        "-d",
        str(folder),
        *pins,
    ]
    done = subprocess.run(command)
    for wheel in folder.glob("pyarrow-*.whl"):
        before, after = slim_wheel(wheel, PYARROW_UNUSED)
        print(f"{wheel.name}: {before / 2**20:.1f} MiB, {after / 2**20:.1f} MiB without what datasets and "
              "trl never load")
    size = sum(p.stat().st_size for p in folder.glob("*.whl"))
    print(f"{len(list(folder.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {folder}")
    return done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="the CPU, tiny models, a few steps")
    parser.add_argument("--out", default="", help="folder for results.json (default: a temporary folder)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no section after this")
    parser.add_argument("--only", nargs="*", default=[], help="run only these sections")
    parser.add_argument("--ranks", type=int, default=1, help="GPUs for the distributed section (default 1)")
    parser.add_argument("--fetch-wheels", default="", help="download the GPU host's missing wheels here")
    args = parser.parse_args()
    if args.fetch_wheels:
        return fetch_wheels(Path(args.fetch_wheels))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distillweb.settings.base")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="distillweb-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    check = Check(
        dry=args.dry,
        work=Path(tempfile.mkdtemp(prefix="work-", dir=out)),
        deadline=time.monotonic() + args.budget_s,
        ranks=args.ranks,
    )
    run_sections(check, args.only)
    (out / "results.json").write_text(json.dumps(check.results, indent=2, default=str))
    print(summary(check))
    return 0 if all(r["status"] == "ok" or r.get("optional") for r in check.results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
