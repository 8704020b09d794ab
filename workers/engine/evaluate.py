"""Evaluation: task quality, fidelity to the teacher, and efficiency on the current device."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import IGNORE_INDEX, Batcher
from .models import count_non_embedding_parameters, count_parameters, forward_logits

ECE_BINS = 15
LATENCY_WARMUP = 3
LATENCY_ITERS = 30
THROUGHPUT_BATCH = 32
THROUGHPUT_ITERS = 5
# Efficiency timing stops early after this long, so a large model on a CPU does not stall a run's end.
TIMING_BUDGET_S = 3.0


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch ``model`` to eval() and back to its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing elsewhere (CPU runs stay float32 and bit-for-bit repeatable)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_logits(model: nn.Module, batcher: Batcher, *, device: torch.device, batch_size: int = 64) -> Tensor:
    """Logits for every row of ``batcher``'s split, in row order, in eval mode.

    Returns:
        (N, num_labels) float32 tensor on ``device``.
    """
    chunks = []
    with eval_mode(model):
        for batch in batcher.iter_batches(batch_size):
            batch = batch.to(device)
            with autocast(device):
                chunks.append(forward_logits(model, batch.inputs).float())
    return torch.cat(chunks)


def classification_metrics(logits: Tensor, labels: Tensor, *, teacher_logits: Tensor | None = None
                           ) -> dict[str, float]:
    """Task and fidelity metrics from logits.

    Args:
        logits: (N, C) student (or any model's) logits.
        labels: (N,) class ids; rows labelled -100 are left out of the task metrics.
        teacher_logits: (N, C) or None.
    Returns:
        ``accuracy``, ``macro_f1``, ``nll`` (mean cross-entropy), ``ece`` (15 equal-width confidence bins);
        with teacher logits also ``agreement`` (top-1) and ``kl_to_teacher`` (mean KL(p_T‖p_S)).
    """
    logits = logits.detach().float().cpu()
    labels = labels.detach().cpu()
    metrics: dict[str, float] = {}
    labelled = labels != IGNORE_INDEX
    if labelled.any():
        z, y = logits[labelled], labels[labelled]
        log_probs = F.log_softmax(z, dim=-1)
        pred = log_probs.argmax(dim=-1)
        metrics["accuracy"] = (pred == y).float().mean().item()
        metrics["macro_f1"] = macro_f1(pred.numpy(), y.numpy())
        metrics["nll"] = F.nll_loss(log_probs, y).item()
        metrics["ece"] = expected_calibration_error(log_probs.exp(), y)
    if teacher_logits is not None:
        teacher_logits = teacher_logits.detach().float().cpu()
        s_log, t_log = F.log_softmax(logits, dim=-1), F.log_softmax(teacher_logits, dim=-1)
        metrics["agreement"] = (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()
        metrics["kl_to_teacher"] = F.kl_div(s_log, t_log, log_target=True, reduction="batchmean").item()
    return metrics


def macro_f1(pred: np.ndarray, true: np.ndarray) -> float:
    """Unweighted mean F1 over the classes that occur in ``true`` or ``pred`` (as scikit-learn does)."""
    scores = []
    for label in np.union1d(pred, true):
        tp = np.sum((pred == label) & (true == label))
        fp = np.sum((pred == label) & (true != label))
        fn = np.sum((pred != label) & (true == label))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def expected_calibration_error(probs: Tensor, labels: Tensor, *, bins: int = ECE_BINS) -> float:
    """ECE: Σ_b |B_b|/N · |accuracy(B_b) − mean confidence(B_b)| over equal-width bins (lo, hi] of confidence.

    Args:
        probs: (N, C) probabilities; labels: (N,).
    """
    confidence, pred = probs.max(dim=-1)                                   # (N,), (N,)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    bin_of = torch.bucketize(confidence, edges[1:-1])                      # (N,) in [0, bins)
    ece = torch.zeros(())
    for b in range(bins):
        members = bin_of == b
        if members.any():
            ece += members.float().mean() * (correct[members].mean() - confidence[members].mean()).abs()
    return ece.item()


@torch.no_grad()
def efficiency_metrics(model: nn.Module, batcher: Batcher, *, device: torch.device,
                       saved_dir: str | Path | None = None) -> dict[str, float]:
    """Size and speed of ``model`` on ``device``.

    Returns:
        ``params``, ``params_non_embedding``, ``size_bytes`` (the saved ``*.safetensors`` in ``saved_dir``, or
        the in-memory weights when not saved), ``latency_ms_p50`` / ``latency_ms_p95`` (batch 1) and
        ``throughput_per_s`` (examples per second at batch 32).
    """
    metrics: dict[str, float] = {
        "params": count_parameters(model),
        "params_non_embedding": count_non_embedding_parameters(model),
        "size_bytes": _size_bytes(model, saved_dir),
    }
    with eval_mode(model):
        single = [batcher.batch([i % len(batcher)]).to(device) for i in range(LATENCY_WARMUP + LATENCY_ITERS)]
        times = _time_forwards(model, single, warmup=LATENCY_WARMUP, device=device)
        metrics["latency_ms_p50"] = 1000 * statistics.median(times)
        metrics["latency_ms_p95"] = 1000 * float(np.percentile(times, 95))
        rows = np.arange(THROUGHPUT_BATCH) % len(batcher)
        big = [batcher.batch(rows).to(device)] * (1 + THROUGHPUT_ITERS)
        times = _time_forwards(model, big, warmup=1, device=device)
        metrics["throughput_per_s"] = THROUGHPUT_BATCH * len(times) / sum(times)
    return metrics


def _time_forwards(model: nn.Module, batches: list, *, warmup: int, device: torch.device) -> list[float]:
    """Seconds per forward for ``batches[warmup:]``; stops after TIMING_BUDGET_S (keeping at least 3)."""
    times: list[float] = []
    started = time.perf_counter()
    for i, batch in enumerate(batches):
        _sync(device)
        t0 = time.perf_counter()
        with autocast(device):
            forward_logits(model, batch.inputs)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            if len(times) >= 3 and time.perf_counter() - started > TIMING_BUDGET_S:
                break
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _size_bytes(model: nn.Module, saved_dir: str | Path | None) -> int:
    if saved_dir is not None:
        files = list(Path(saved_dir).glob("*.safetensors"))
        if files:
            return sum(f.stat().st_size for f in files)
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.no_grad()
def evaluate(model: nn.Module, batcher: Batcher, *, device: torch.device | str = "cpu",
             teacher_logits: Tensor | None = None, batch_size: int = 64, efficiency: bool = True,
             saved_dir: str | Path | None = None) -> dict[str, float]:
    """Evaluate a classifier on the split behind ``batcher`` (model switched to eval() and back).

    Args:
        model: the classifier (builtin net or transformers model).
        batcher: batches of the eval split, tokenised for this model.
        device: where to run.
        teacher_logits: (N, C) teacher logits for the same rows, for ``agreement`` and ``kl_to_teacher``.
        batch_size: batch size for the quality pass.
        efficiency: also measure size and speed (slower; skip for evaluations during training).
        saved_dir: folder the model was saved to, for ``size_bytes``.
    Returns:
        the metrics of :func:`classification_metrics`, plus those of :func:`efficiency_metrics` when asked.
    """
    device = torch.device(device)
    logits = predict_logits(model, batcher, device=device, batch_size=batch_size)
    metrics = classification_metrics(logits, batcher.labels, teacher_logits=teacher_logits)
    if efficiency:
        metrics |= efficiency_metrics(model, batcher, device=device, saved_dir=saved_dir)
    return metrics
