"""The fast top-k path (one softmax over V, the gradient written in place) and the vectorised cache gathers
equal their straightforward references: values and gradients to 1e-6."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workers.engine import sparse_losses
from workers.engine.cache import CacheEntry, gather_rows, gather_topk, pack_positions, topk_of
from workers.engine.loss_primitives import (
    LOG_ZERO,
    TopK,
    _divergence,
    _log_probs,
    _masked_mean,
    _tau_squared,
)

# --- references: the top-k term as it was written first (full log-softmax, gathers, a masked logsumexp) -----


def _tail_logmass(log_probs, indices):
    return torch.logsumexp(log_probs.scatter(-1, indices, LOG_ZERO), dim=-1)


def _reference_log_probs(s, teacher, *, k, tail, temperature):
    t_tail = None
    if isinstance(teacher, TopK):
        log_t, indices = teacher.logprobs.float(), teacher.indices
        dropped = None
        if log_t.shape[-1] > k:
            keep = log_t.topk(k, dim=-1).indices
            dropped = _tail_logmass(log_t, keep)
            log_t, indices = log_t.gather(-1, keep), indices.gather(-1, keep)
        log_t = log_t / temperature
        if tail:
            if teacher.tail_logmass is not None:
                t_tail = teacher.tail_logmass.float()
                if dropped is not None:
                    t_tail = torch.logaddexp(t_tail, dropped)
            else:
                covered = torch.logsumexp(log_t, dim=-1).clamp(max=0.0)
                t_tail = torch.log((-torch.expm1(covered)).clamp_min(1e-30))
    else:
        full_t = _log_probs(teacher, temperature)
        indices = teacher.topk(k, dim=-1).indices
        log_t = full_t.gather(-1, indices)
        if tail:
            t_tail = _tail_logmass(full_t, indices)
    full_s = _log_probs(s, temperature)
    log_s = full_s.gather(-1, indices)
    if tail:
        log_s = torch.cat([log_s, _tail_logmass(full_s, indices).unsqueeze(-1)], dim=-1)
        log_t = torch.cat([log_t, t_tail.unsqueeze(-1)], dim=-1)
    return log_s - torch.logsumexp(log_s, -1, keepdim=True), log_t - torch.logsumexp(log_t, -1, keepdim=True)


def _reference_topk(s, teacher, mask, *, k, divergence="kd", tail=True, temperature=1.0, beta=0.5):
    log_s, log_t = _reference_log_probs(s, teacher, k=k, tail=tail, temperature=temperature)
    per_token = _divergence(divergence, log_s, log_t, beta=beta) * _tau_squared(divergence, temperature)
    return _masked_mean(per_token, mask)


def _value_and_grad(fn, logits, *args, **kwargs):
    x = logits.detach().clone().requires_grad_()
    value = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def _assert_same(got, want, atol=1e-6):
    (value, grad), (ref_value, ref_grad) = got, want
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert abs(value.item() - ref_value.item()) <= atol * max(1.0, abs(ref_value.item()))
    assert torch.allclose(grad.float(), ref_grad.float(), rtol=1e-5, atol=atol)


def _cached(teacher_logits, k, *, tail=True):
    top = topk_of(teacher_logits, k)
    return TopK(top.logprobs.half(), top.indices, top.tail_logmass.half() if tail else None)


# --- the loss ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ["kd", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("sparse", [True, False])
def test_topk_equals_the_reference_in_value_and_gradient(divergence, tail, sparse):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 17, 300, generator=g) * 3, torch.randn(3, 17, 300, generator=g) * 3
    mask = torch.rand(3, 17, generator=g) > 0.2
    teacher = _cached(t, 32) if sparse else t
    temperature = 1.0 if tail else 2.0
    params = {"k": 24, "divergence": divergence, "tail": tail, "temperature": temperature, "beta": 0.3}
    _assert_same(
        _value_and_grad(sparse_losses.topk, s, teacher, mask, **params),
        _value_and_grad(_reference_topk, s, teacher, mask, **params),
    )


@pytest.mark.parametrize("tail", [True, False])
def test_topk_on_shifted_logits_in_chunks_equals_the_reference(tail):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 9, 500, generator=g) * 4
    teacher = _cached(torch.randn(2, 8, 500, generator=g) * 4, 16, tail=tail)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False

    def shifted(fn, chunk):
        def run(x, *args, **kwargs):
            extra = {"chunk_size": chunk} if chunk else {}
            return fn(x[:, :-1], *args, **kwargs, **extra)

        return run

    want = _value_and_grad(shifted(_reference_topk, None), logits, teacher, mask, k=16, tail=tail)
    for chunk in (None, 3):
        got = _value_and_grad(shifted(sparse_losses.topk, chunk), logits, teacher, mask, k=16, tail=tail)
        _assert_same(got, want)
        assert got[1][:, -1].abs().sum() == 0 and got[1][1, 5:].abs().sum() == 0  # unused positions


def test_a_student_with_a_vanishing_tail_or_kept_token_stays_exact():
    """Rows where the student's tail mass (or a kept token) is far below float32's range of probabilities take
    the log-space path: same value and gradient as the reference, finite."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(4, 200, generator=g) * 2
    teacher = _cached(t, 8)
    s = torch.randn(4, 200, generator=g)
    top = teacher.indices
    s[0].scatter_(0, top[0], 95.0)  # tail mass ~e^-95: below any float32 probability
    s[1].scatter_(0, top[1], 40.0)  # tail ~e^-40 (~1e-17): still representable, summed directly
    s[2, top[2, 3]] = -120.0  # one kept token with probability ~e^-120
    for divergence in ("kd", "reverse_kl", "jsd"):
        _assert_same(
            _value_and_grad(sparse_losses.topk, s, teacher, None, k=8, divergence=divergence),
            _value_and_grad(_reference_topk, s, teacher, None, k=8, divergence=divergence),
        )


def test_half_precision_logits_get_a_gradient_of_their_dtype():
    g = torch.Generator().manual_seed(4)
    s = (torch.randn(2, 5, 64, generator=g) * 2).bfloat16()
    teacher = _cached(torch.randn(2, 5, 64, generator=g) * 2, 8)
    value, grad = _value_and_grad(sparse_losses.topk, s, teacher, None, k=8)
    ref_value, ref_grad = _value_and_grad(_reference_topk, s, teacher, None, k=8)
    assert grad.dtype == torch.bfloat16
    assert value.item() == pytest.approx(ref_value.item(), abs=1e-6)
    assert torch.allclose(grad.float(), ref_grad.float(), atol=1e-3)  # both rounded to bfloat16


def test_k_equal_to_the_vocabulary_with_a_dense_teacher_gives_an_empty_tail():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 12, generator=g), torch.randn(3, 12, generator=g)
    _assert_same(
        _value_and_grad(sparse_losses.topk, s, t, None, k=12, tail=True),
        _value_and_grad(_reference_topk, s, t, None, k=12, tail=True),
    )


def test_the_graph_supports_one_backward_pass():
    s = torch.randn(2, 30, requires_grad=True)
    value = sparse_losses.topk(s, _cached(torch.randn(2, 30), 4), k=4)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):  # the gradient reused the saved probabilities
        value.backward()


# --- the cache gathers ------------------------------------------------------------------------------------


def _loop_gather(entry, rows, width):
    """gather_topk as first written: one Python iteration per row."""
    t = entry.tensors
    k = t["logprobs"].shape[1]
    logprobs = torch.full((len(rows), width, k), math.log((1 - 1e-6) / k))
    indices = torch.arange(k, dtype=torch.long).expand(len(rows), width, k).clone()
    tail = torch.full((len(rows), width), math.log(1e-6))
    for b, row in enumerate(list(rows)):
        start, end = int(t["offsets"][row]), int(t["offsets"][row + 1])
        n = min(end - start, width)
        logprobs[b, :n] = t["logprobs"][start : start + n].float()
        indices[b, :n] = t["indices"][start : start + n].long()
        if "tail_logmass" in t:
            tail[b, :n] = t["tail_logmass"][start : start + n].float()
    return TopK(logprobs, indices, tail if "tail_logmass" in t else None)


def _entry(lengths, *, tail=True):
    g = torch.Generator().manual_seed(6)
    per_row = []
    for n in lengths:
        top = topk_of(torch.randn(n, 40, generator=g), 5)
        row = {
            "logprobs": top.logprobs.half(),
            "indices": top.indices.int(),
            "target_logprob": torch.randn(n),
        }
        if tail:
            row["tail_logmass"] = top.tail_logmass.half()
        per_row.append(row)
    return CacheEntry("k", None, {}, pack_positions(per_row))


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("width", [3, 7, 12])
def test_gather_topk_equals_the_row_loop(tail, width):
    entry = _entry([7, 2, 0, 9, 7], tail=tail)
    for rows in (torch.tensor([3, 0, 1, 2]), np.array([4, 4]), torch.tensor([0])):
        got = gather_topk(entry, rows, width, torch.device("cpu"))
        want = _loop_gather(entry, rows.tolist(), width)
        assert got.logprobs.dtype == torch.float32 and got.indices.dtype == torch.long
        assert torch.equal(got.logprobs, want.logprobs) and torch.equal(got.indices, want.indices)
        assert (got.tail_logmass is None) == (not tail)
        if tail:
            assert torch.equal(got.tail_logmass, want.tail_logmass)
        values = gather_rows(entry, "target_logprob", rows, width, fill=-1.0)
        t = entry.tensors
        for b, row in enumerate(rows.tolist()):
            start, end = int(t["offsets"][row]), int(t["offsets"][row + 1])
            n = min(end - start, width)
            assert torch.equal(values[b, :n], t["target_logprob"][start : start + n])
            assert (values[b, n:] == -1.0).all()


def test_gather_from_an_entry_without_positions_is_all_padding():
    entry = _entry([0, 0])
    got = gather_topk(entry, torch.tensor([1, 0]), 4, torch.device("cpu"))
    want = _loop_gather(entry, [1, 0], 4)
    assert torch.equal(got.logprobs, want.logprobs) and torch.equal(got.indices, want.indices)
    assert torch.equal(got.tail_logmass, want.tail_logmass)
    assert (gather_rows(entry, "target_logprob", torch.tensor([0]), 3) == 0).all()
