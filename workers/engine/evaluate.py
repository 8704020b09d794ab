"""Evaluation: task quality, fidelity to the teacher, and efficiency on the current device.

Metrics by task (all on the eval split):

- classification: ``accuracy``, ``macro_f1``, ``nll``, ``ece``; with a teacher ``agreement`` (top-1) and
  ``kl_to_teacher`` (mean KL(p_T‖p_S));
- causal_lm: ``nll`` (per predicted token), ``perplexity``, ``bits_per_token``, ``tokens``; with a teacher
  ``agreement`` (student argmax = teacher top-1, per token) and ``kl_to_teacher`` (per token, over the
  teacher's top-k plus a tail bucket, see :func:`lm_topk_fidelity`);
- embedding: ``cosine_to_teacher`` (mean cosine similarity of student and teacher sentence embeddings);
- efficiency (final evaluation): ``params``, ``params_non_embedding``, ``size_bytes``, ``latency_ms_p50`` /
  ``latency_ms_p25`` / ``latency_ms_p75`` / ``latency_ms_p95`` (batch 1: median and spread of repeated
  forwards after warm-up), ``throughput_per_s`` (rows per second at batch 32; ``tokens_per_s`` for text),
  ``model_memory_bytes`` (weights + activations at batch 32; also ``peak_memory_bytes``), and the setting they
  were measured in, ``efficiency_setting`` (device, threads, batch, sequence length, shared host): see
  :func:`efficiency_metrics`.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import phases
from .attention import capture_scores
from .batching import Batch, Batcher
from .data import IGNORE_INDEX
from .embedder import SentenceEmbedder, mean_pool
from .errors import ConfigError
from .loss_primitives import TopK
from .models import MLP, count_non_embedding_parameters, count_parameters, forward_logits

ECE_BINS = 15
LATENCY_WARMUP = 10
LATENCY_REPEATS = 50
THROUGHPUT_BATCH = 32
THROUGHPUT_REPEATS = 10
# Each timing stops early after this long (keeping at least MIN_REPEATS), so a large model on a CPU does not
# stall a run's end.
TIMING_BUDGET_S = 3.0
MIN_REPEATS = 5
# Intra-op threads while timing on a CPU: one fixed setting whatever the worker's cores (recorded with it).
CPU_TIMING_THREADS = 1


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
def predict_logits(
    model: nn.Module, batcher: Batcher, *, device: torch.device, batch_size: int = 64
) -> Tensor:
    """Logits for every row of ``batcher``'s split, in row order, in eval mode.

    Returns:
        (N, num_labels) float32 tensor on ``device``.
    """
    chunks = []
    with eval_mode(model):
        for batch in phases.track(batcher.iter_batches(batch_size), len(batcher)):
            batch = batch.to(device)
            with autocast(device):
                chunks.append(forward_logits(model, batch.inputs).float())
    return torch.cat(chunks)


def classification_metrics(
    logits: Tensor, labels: Tensor, *, teacher_logits: Tensor | None = None
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
    confidence, pred = probs.max(dim=-1)  # (N,), (N,)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    bin_of = torch.bucketize(confidence, edges[1:-1])  # (N,) in [0, bins)
    ece = torch.zeros(())
    for b in range(bins):
        members = bin_of == b
        if members.any():
            ece += members.float().mean() * (correct[members].mean() - confidence[members].mean()).abs()
    return ece.item()


@torch.no_grad()
def efficiency_metrics(
    model: nn.Module, batcher: Batcher, *, device: torch.device, saved_dir: str | Path | None = None
) -> dict[str, Any]:
    """Size, speed and memory of ``model`` on ``device``, in a fixed setting recorded with the numbers.

    Latency: the same row (batch 1, so one fixed sequence length) after :data:`LATENCY_WARMUP` untimed
    passes, then up to :data:`LATENCY_REPEATS` timed forwards (at least :data:`MIN_REPEATS`); the median and
    its spread. Throughput: the first :data:`THROUGHPUT_BATCH` rows, one warm-up pass, then repeats; rows per
    second at the median time. On a CPU the timing runs with :data:`CPU_TIMING_THREADS` intra-op threads
    (so workers with different core counts or loads measure alike) and is marked ``shared_host``: other
    processes share the cores, compare such figures only with their spread.

    Returns:
        ``params``, ``params_non_embedding``, ``size_bytes`` (the saved ``*.safetensors`` in ``saved_dir``, or
        the in-memory weights when not saved); ``latency_ms_p50`` (median, batch 1) with ``latency_ms_p25`` /
        ``latency_ms_p75`` / ``latency_ms_p95`` / ``latency_ms_min`` / ``latency_ms_max`` and
        ``latency_repeats``; ``throughput_per_s`` (rows per second at batch :data:`THROUGHPUT_BATCH`),
        ``tokens_per_s`` (text models); ``model_memory_bytes`` = ``weights_bytes`` (parameters and buffers)
        + ``activation_bytes`` at the throughput batch (CUDA: the allocator's peak during one forward above
        what was allocated before it, bf16 autocast's weight copies included; CPU: the bytes of every distinct
        tensor the model's modules output in one forward, an upper bound of what is live at once), also as
        ``peak_memory_bytes`` (older readers);
        and ``efficiency_setting``: ``device``, ``threads``, ``batch`` (latency), ``throughput_batch``,
        ``seq_len`` (latency batch; None for tabular inputs), ``throughput_seq_len``, ``shared_host``.
    """
    metrics: dict[str, Any] = {
        "params": count_parameters(model),
        "params_non_embedding": count_non_embedding_parameters(model),
        "size_bytes": _size_bytes(model, saved_dir),
    }
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(CPU_TIMING_THREADS)
    try:
        with eval_mode(model):
            single = batcher.batch([0]).to(device)
            times = _time_forwards(
                model, single, warmup=LATENCY_WARMUP, repeats=LATENCY_REPEATS, device=device
            )
            metrics |= latency_summary(times)
            rows = np.arange(THROUGHPUT_BATCH) % len(batcher)
            big = batcher.batch(rows).to(device)
            times = _time_forwards(model, big, warmup=1, repeats=THROUGHPUT_REPEATS, device=device)
            metrics["throughput_per_s"] = THROUGHPUT_BATCH / statistics.median(times)
            if "attention_mask" in big.inputs:
                tokens = int(big.inputs["attention_mask"].sum())
                metrics["tokens_per_s"] = tokens / statistics.median(times)
            memory = model_memory(model, big, device=device)
        metrics |= memory
        metrics["efficiency_setting"] = {
            "device": device_label(device),
            "threads": torch.get_num_threads(),
            "batch": 1,
            "throughput_batch": THROUGHPUT_BATCH,
            "seq_len": _seq_len(single),
            "throughput_seq_len": _seq_len(big),
            "shared_host": device.type == "cpu",
        }
    finally:
        torch.set_num_threads(threads)
    return metrics


def device_label(device: torch.device) -> str:
    """``"cpu"``, or ``"cuda:<device name>"`` (as the teacher's efficiency is keyed per device)."""
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def latency_summary(seconds: list[float]) -> dict[str, float]:
    """Median and spread of per-forward times, in milliseconds (``latency_ms_p50`` etc.)."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    p25, p50, p75, p95 = (float(v) for v in np.percentile(ms, [25, 50, 75, 95]))
    return {
        "latency_ms_p50": p50,
        "latency_ms_p25": p25,
        "latency_ms_p75": p75,
        "latency_ms_p95": p95,
        "latency_ms_min": float(ms.min()),
        "latency_ms_max": float(ms.max()),
        "latency_repeats": len(seconds),
    }


def model_memory(model: nn.Module, batch: Batch, *, device: torch.device) -> dict[str, int]:
    """``weights_bytes`` + ``activation_bytes`` of one forward of ``batch`` = ``model_memory_bytes`` (also
    ``peak_memory_bytes``), and ``memory_batch``; see :func:`efficiency_metrics`. Not the process's
    memory."""
    weights = _weights_bytes(model)
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with autocast(device):
            out = forward_logits(model, batch.inputs)
        _sync(device)
        activations = max(0, int(torch.cuda.max_memory_allocated(device)) - before)
        del out
    else:
        activations = _output_bytes(model, batch)
    rows = _batch_rows(batch)
    return {
        "weights_bytes": weights,
        "activation_bytes": activations,
        "model_memory_bytes": weights + activations,
        "peak_memory_bytes": weights + activations,
        "memory_batch": rows,
    }


def _weights_bytes(model: nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _output_bytes(model: nn.Module, batch: Batch) -> int:
    """Bytes of the distinct storages output by any module of ``model`` during one forward (views counted
    once; each kept alive until the end so a freed address is not mistaken for a seen one)."""
    seen: dict[int, Any] = {}

    def collect(value: Any) -> None:
        if isinstance(value, Tensor):
            storage = value.untyped_storage()
            seen.setdefault(storage.data_ptr(), storage)
        elif isinstance(value, list | tuple):
            for item in value:
                collect(item)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif hasattr(value, "to_tuple"):  # transformers' ModelOutput
            collect(value.to_tuple())

    handles = [m.register_forward_hook(lambda _m, _i, out: collect(out)) for m in model.modules()]
    try:
        forward_logits(model, batch.inputs)
    finally:
        for handle in handles:
            handle.remove()
    return sum(storage.nbytes() for storage in seen.values())


def _batch_rows(batch: Batch) -> int:
    first = next(iter(batch.inputs.values()))
    return int(first.shape[0])


def _seq_len(batch: Batch) -> int | None:
    ids = batch.inputs.get("input_ids")
    return int(ids.shape[1]) if ids is not None and ids.dim() > 1 else None


def _time_forwards(
    model: nn.Module, batch: Batch, *, warmup: int, repeats: int, device: torch.device
) -> list[float]:
    """Seconds per forward of ``batch``, after ``warmup`` untimed forwards: ``repeats`` of them, or fewer
    (never under MIN_REPEATS) once the timing has taken TIMING_BUDGET_S."""
    for _ in range(warmup):
        with autocast(device):
            forward_logits(model, batch.inputs)
    _sync(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        with autocast(device):
            forward_logits(model, batch.inputs)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= MIN_REPEATS and time.perf_counter() - started > TIMING_BUDGET_S:
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
def evaluate(
    model: nn.Module,
    batcher: Any,
    *,
    device: torch.device | str = "cpu",
    teacher_logits: Tensor | None = None,
    batch_size: int = 64,
    efficiency: bool = True,
    saved_dir: str | Path | None = None,
    task: str = "classification",
    teacher_topk: Callable[[Batch, int], TopK] | None = None,
    teacher_embeddings: Tensor | None = None,
    projection: nn.Module | None = None,
) -> dict[str, float]:
    """Evaluate a model on the split behind ``batcher`` (model switched to eval() and back).

    Args:
        model: the classifier, causal LM or sentence embedder.
        batcher: batches of the eval split, tokenised for this model (an ``LMBatcher`` for causal LMs).
        device: where to run.
        teacher_logits: classification: (N, C) teacher logits for the same rows (``agreement``,
            ``kl_to_teacher``).
        batch_size: batch size for the quality pass.
        efficiency: also measure size and speed (slower; skip for evaluations during training).
        saved_dir: folder the model was saved to, for ``size_bytes``.
        task: ``classification``, ``causal_lm`` or ``embedding``.
        teacher_topk: causal LM: the teacher's top-k for a batch (see :func:`lm_metrics`).
        teacher_embeddings: embedding: (N, D_T) teacher embeddings of the same rows.
        projection: embedding: maps student embeddings to the teacher's width when they differ (the
            embedding term's learned projection).
    Returns:
        the task's metrics (see the module docstring), plus :func:`efficiency_metrics` when asked.
    """
    device = torch.device(device)
    if task == "causal_lm":
        metrics = lm_metrics(model, batcher, device=device, batch_size=batch_size, teacher_topk=teacher_topk)
    elif task == "embedding":
        student = predict_logits(model, batcher, device=device, batch_size=batch_size)  # (N, D_S)
        if projection is not None:
            with eval_mode(projection):
                student = projection(student)
        if teacher_embeddings is not None and student.shape[-1] != teacher_embeddings.shape[-1]:
            raise ConfigError(
                f"Student embeddings have width {student.shape[-1]} but the teacher's have "
                f"{teacher_embeddings.shape[-1]}; use the embedding_mse term (it learns a projection)."
            )
        metrics = embedding_metrics(student, teacher_embeddings)
    else:
        logits = predict_logits(model, batcher, device=device, batch_size=batch_size)
        metrics = classification_metrics(logits, batcher.labels, teacher_logits=teacher_logits)
    if efficiency:
        metrics |= efficiency_metrics(model, batcher, device=device, saved_dir=saved_dir)
    return metrics


# --- model outputs ------------------------------------------------------------------------------------------


@dataclass
class ModelOutputs:
    """What one forward produced. ``logits``: (B, C) classification, (B, T, V) causal LM (not shifted), or the
    (B, D) sentence embedding of an embedding model; the rest only when asked for."""

    logits: Tensor
    hidden: tuple[Tensor, ...] | None = None  # (B, T, H) per layer, [0] = embeddings
    attentions: tuple[Tensor, ...] | None = None  # (B, heads, T, T) per layer
    values: tuple[Tensor, ...] | None = None  # (B, heads, T, d) of the last layer
    embedding: Tensor | None = None  # (B, D) mean-pooled over real tokens
    scores: tuple[Tensor, ...] | None = None  # (B, heads, T, T) pre-softmax attention scores per layer


def forward_outputs(
    model: nn.Module,
    inputs: dict[str, Tensor],
    *,
    hidden: bool = False,
    attentions: bool = False,
    values: bool = False,
    embedding: bool = False,
    scores: bool = False,
) -> ModelOutputs:
    """Run ``model(**inputs)`` once and collect what the loss terms need.

    Builtin nets expose their hidden activations (after each ReLU) as a one-token sequence, (B, 1, H) per
    layer, so feature terms also work on tabular data. ``values`` hooks the last attention layer's value
    projection. ``embedding`` for a non-embedding model mean-pools the last hidden state over
    ``attention_mask``. ``scores`` collects the pre-softmax attention scores of a model switched to
    :data:`attention.SCORES_ATTENTION` (none otherwise).
    """
    if isinstance(model, MLP):
        return _mlp_outputs(model, inputs, hidden=hidden or embedding, embedding=embedding)
    if scores:
        with capture_scores() as recorded:
            out = forward_outputs(
                model, inputs, hidden=hidden, attentions=attentions, values=values, embedding=embedding
            )
        return replace(out, scores=tuple(recorded) or None)
    captured: list[Tensor] = []
    handle = None
    if values:
        module, split = _value_projection(model)
        handle = module.register_forward_hook(lambda _m, _i, out: captured.append(split(out)))
    want_hidden = hidden or (embedding and not isinstance(model, SentenceEmbedder))
    kwargs: dict[str, Any] = {}
    if want_hidden:
        kwargs["output_hidden_states"] = True
    if attentions:
        kwargs["output_attentions"] = True
    try:
        out = model(**inputs, **kwargs)
    finally:
        if handle is not None:
            handle.remove()
    if isinstance(out, Tensor):
        return ModelOutputs(out, embedding=out if isinstance(model, SentenceEmbedder) else None)
    hidden_states = getattr(out, "hidden_states", None)
    pooled = None
    if isinstance(model, SentenceEmbedder):
        pooled = out.embeddings
    elif embedding and hidden_states is not None:
        pooled = mean_pool(hidden_states[-1], inputs.get("attention_mask"))
    heads = _attention_heads(model)
    vals = tuple(_to_heads(v, heads) for v in captured) if values else None
    return ModelOutputs(
        out.logits,
        hidden_states if hidden else None,
        getattr(out, "attentions", None) if attentions else None,
        vals,
        pooled,
    )


def _mlp_outputs(model: MLP, inputs: dict[str, Tensor], *, hidden: bool, embedding: bool) -> ModelOutputs:
    if not hidden:
        return ModelOutputs(model(**inputs))
    states = [inputs["features"]]
    x = inputs["features"]
    for layer in model.net:
        x = layer(x)
        if isinstance(layer, nn.ReLU):
            states.append(x)
    seq = tuple(s.unsqueeze(1) for s in states)  # (B, 1, H) per layer
    return ModelOutputs(x, seq, embedding=states[-1] if embedding else None)


def _value_projection(model: nn.Module) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    """The last attention layer's value projection and how to read the values from its output."""
    found: tuple[nn.Module, Callable[[Tensor], Tensor]] | None = None
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("v_proj", "value", "v_lin"):
            found = (module, lambda out: out)
        elif leaf == "c_attn":  # GPT-2: one fused q, k, v projection
            found = (module, lambda out: out.chunk(3, dim=-1)[2])
    if found is None:
        raise ConfigError(
            f"Model {type(model).__name__} has no recognisable value projection (v_proj, value, "
            "v_lin or c_attn), so value-relation terms cannot be used with it."
        )
    return found


def _attention_heads(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    # Grouped-query attention projects values for the key/value heads only.
    return int(getattr(text, "num_key_value_heads", None) or getattr(text, "num_attention_heads", 1) or 1)


def _to_heads(values: Tensor, heads: int) -> Tensor:
    """(B, T, heads·d) → (B, heads, T, d)."""
    b, t, width = values.shape
    return values.view(b, t, heads, width // heads).transpose(1, 2)


def shift_for_lm(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align a causal LM's outputs with its targets: the logits at position t predict token t+1.

    Args:
        logits: (B, T, V); labels: (B, T) input ids with -100 where nothing is predicted.
    Returns:
        (B, T−1, V) logits and (B, T−1) labels.
    """
    return logits[:, :-1], labels[:, 1:]


# --- causal LM ----------------------------------------------------------------------------------------------


def lm_topk_fidelity(student_logits: Tensor, teacher: TopK, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-position top-1 agreement and KL(p_T‖p_S) from the teacher's top-k (+ tail bucket).

    The KL is taken over the teacher's top-k tokens plus one bucket for the rest of the vocabulary (with
    tail_logmass; without it, the top-k renormalised): a lower bound of the full KL that needs no dense
    teacher. The same formula is used whether the teacher runs or comes from the cache, so results never
    depend on it.

    Args:
        student_logits: (B, T, V) shifted; teacher: TopK (B, T, k); mask: (B, T) bool.
    Returns:
        (sum of agreements, sum of KLs) over the masked positions, float32 scalars.
    """
    log_s = torch.log_softmax(student_logits.float(), dim=-1)  # (B, T, V)
    s_top = log_s.gather(-1, teacher.indices)  # (B, T, k)
    t_top = teacher.logprobs.float()  # (B, T, k)
    if teacher.tail_logmass is None:
        t_top = t_top - torch.logsumexp(t_top, dim=-1, keepdim=True)
        kl = (t_top.exp() * (t_top - s_top)).sum(-1)
    else:
        t_tail = teacher.tail_logmass.float()  # (B, T)
        s_tail = torch.log((-torch.expm1(torch.logsumexp(s_top, dim=-1))).clamp_min(1e-12))
        kl = (t_top.exp() * (t_top - s_top)).sum(-1) + t_tail.exp() * (t_tail - s_tail)
    agree = (log_s.argmax(-1) == teacher.indices[..., 0]).float()
    zero = torch.zeros((), device=kl.device)
    return torch.where(mask, agree, zero).sum(), torch.where(mask, kl.clamp_min(0), zero).sum()


@torch.no_grad()
def lm_metrics(
    model: nn.Module,
    batcher: Any,
    *,
    device: torch.device,
    batch_size: int = 16,
    teacher_topk: Callable[[Batch, int], TopK] | None = None,
) -> dict[str, float]:
    """Perplexity and bits per token of a causal LM (and fidelity to a teacher) on ``batcher``'s rows.

    Args:
        batcher: an ``LMBatcher``.
        teacher_topk: gives the teacher's TopK (B, T−1, k) for a batch and width T−1, for ``agreement`` and
            ``kl_to_teacher`` (see :func:`lm_topk_fidelity`).
    Returns:
        ``nll`` (mean per predicted token, nats), ``perplexity`` = exp(nll), ``bits_per_token`` = nll / ln 2,
        ``tokens``; with a teacher also ``agreement`` and ``kl_to_teacher``.
    """
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    agree_sum = torch.zeros((), dtype=torch.float64, device=device)
    kl_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with eval_mode(model):
        for batch in phases.track(batcher.iter_batches(batch_size), len(batcher)):
            batch = batch.to(device)
            with autocast(device):
                logits = forward_logits(model, batch.inputs)
            logits, labels = shift_for_lm(logits.float(), batch.labels)
            mask = labels != IGNORE_INDEX
            n = int(mask.sum())
            if n == 0:
                continue
            nll_sum += F.cross_entropy(
                logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum"
            ).double()
            if teacher_topk is not None:
                agree, kl = lm_topk_fidelity(logits, teacher_topk(batch, logits.shape[1]), mask)
                agree_sum += agree.double()
                kl_sum += kl.double()
            count += n
    return lm_metrics_from_sums(
        nll_sum.item(),
        count,
        agree=agree_sum.item() if teacher_topk else None,
        kl=kl_sum.item() if teacher_topk else None,
    )


def lm_metrics_from_sums(
    nll_sum: float, count: int, *, agree: float | None = None, kl: float | None = None
) -> dict[str, float]:
    """The LM metrics from summed per-token values over ``count`` predicted tokens."""
    nll = nll_sum / max(count, 1)
    metrics = {
        "nll": nll,
        "perplexity": math.exp(min(nll, 700.0)),
        "bits_per_token": nll / math.log(2),
        "tokens": float(count),
    }
    if agree is not None and kl is not None:
        metrics |= {"agreement": agree / max(count, 1), "kl_to_teacher": kl / max(count, 1)}
    return metrics


# --- embeddings ---------------------------------------------------------------------------------------------


def embedding_metrics(student: Tensor, teacher: Tensor | None) -> dict[str, float]:
    """``cosine_to_teacher``: the mean cosine similarity of each row's student and teacher embeddings.

    Args:
        student: (N, D) (already projected to the teacher's width when the widths differ); teacher: (N, D).
    """
    if teacher is None:
        return {}
    cos = F.cosine_similarity(student.float().cpu(), teacher.float().cpu(), dim=-1)
    return {"cosine_to_teacher": cos.mean().item()}
