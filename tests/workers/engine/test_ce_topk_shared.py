"""``ce`` and ``topk`` in one recipe share one student softmax (methods.combine → sparse_losses.ce_topk): each
term's reported value, the total and the gradient equal the two terms computed apart, to 1e-6."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.engine import methods, sparse_losses
from workers.engine.cache import topk_of
from workers.engine.config import LossTermConfig
from workers.engine.loss_primitives import TopK
from workers.engine.methods import TermInputs, TermState, build_term_modules, combine
from workers.engine.terms import validate_terms


def _cached(teacher_logits, k, *, tail=True):
    top = topk_of(teacher_logits, k)
    return TopK(top.logprobs.half(), top.indices, top.tail_logmass.half() if tail else None)


def _lm(seed=0, *, batch=3, length=9, vocab=50, cache_k=12, tail=True, dense=False):
    """Shifted (strided) student logits, labels with -100 (a prompt, padding, one fully masked row)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length + 1, vocab, generator=g) * 2
    teacher = torch.randn(batch, length, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, :2] = -100
    labels[1, 6:] = -100
    if batch > 2:
        labels[2] = -100
    source = {"teacher_logits": teacher} if dense else {"teacher_topk": _cached(teacher, cache_k, tail=tail)}
    return logits, labels, source


def _run(terms, logits, labels, source, *, shared: bool, monkeypatch=None, **kwargs):
    """(total, parts, gradient) of combine() on logits[:, :-1], with the shared path on or off."""
    x = logits.detach().clone().requires_grad_()
    terms = validate_terms(terms)
    inputs = TermInputs(x[:, :-1] if x.dim() == 3 else x, labels, **source)
    calls = []
    if shared:
        real = methods.ce_topk

        def counting(*args, **kw):
            calls.append(kw)
            return real(*args, **kw)

        monkeypatch.setattr(methods, "ce_topk", counting)
    else:
        monkeypatch.setattr(methods, "_shared_ce_topk", lambda current, inputs: None)
    out = combine(terms, inputs, modules=build_term_modules(terms), state=TermState(), **kwargs)
    monkeypatch.undo()
    (grad,) = torch.autograd.grad(out.total, x)
    return out, grad, bool(calls)


def _assert_same(got, want, atol=1e-6):
    (out, grad, _), (ref, ref_grad, _) = got, want
    assert list(out.parts) == list(ref.parts) and out.weights == ref.weights
    assert torch.isfinite(out.total) and torch.isfinite(grad).all()
    for name in ref.parts:
        value, ref_value = out.parts[name].item(), ref.parts[name].item()
        assert abs(value - ref_value) <= atol * max(1.0, abs(ref_value)), name
        assert not out.parts[name].requires_grad
    assert abs(out.total.item() - ref.total.item()) <= atol * max(1.0, abs(ref.total.item()))
    assert grad.dtype == ref_grad.dtype
    assert torch.allclose(grad.float(), ref_grad.float(), atol=atol, rtol=0), (grad - ref_grad).abs().max()


def _terms(*, w_ce=0.5, w_topk=0.5, **topk_params):
    return [
        LossTermConfig("ce", w_ce),
        LossTermConfig("topk", w_topk, {"k": 8, **topk_params}),
    ]


@pytest.mark.parametrize("divergence", ["kd", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("chunk", [0, 4, 100])
def test_shared_softmax_equals_the_two_terms_apart(monkeypatch, divergence, tail, chunk):
    """Masked labels (-100, one row with none), a cache of more than k tokens, with and without the stored
    tail, shifted logits, unchunked (0) and chunked (4 positions: blocks that cut rows; 100: one block per
    row)."""
    logits, labels, source = _lm(1, tail=tail)
    terms = _terms(w_ce=0.3, w_topk=0.7, divergence=divergence, tail=tail)
    got = _run(terms, logits, labels, source, shared=True, monkeypatch=monkeypatch, chunk_size=chunk)
    want = _run(terms, logits, labels, source, shared=False, monkeypatch=monkeypatch, chunk_size=chunk)
    assert got[2], "the shared path was not taken"
    _assert_same(got, want)
    assert got[1][:, -1].abs().sum() == 0  # the position past the shift gets nothing
    assert got[1][2].abs().sum() == 0  # a causal LM's unlabelled positions count in neither term


def test_shared_softmax_equals_the_reference_formulas(monkeypatch):
    """Independent of both terms' code: F.cross_entropy and the top-k KL with tail from a full log-softmax."""
    logits, labels, source = _lm(2)
    teacher = source["teacher_topk"]
    out, grad, used = _run(_terms(k=8), logits, labels, source, shared=True, monkeypatch=monkeypatch)
    assert used
    x = logits.detach().clone().requires_grad_()
    s = x[:, :-1]
    mask = labels != -100
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1), ignore_index=-100)
    log_p = F.log_softmax(s, -1)
    keep = teacher.logprobs.float().topk(8, dim=-1).indices
    idx = teacher.indices.gather(-1, keep)
    log_t = teacher.logprobs.float().gather(-1, keep)
    dropped = torch.logsumexp(teacher.logprobs.float().scatter(-1, keep, -1e30), -1)
    t_tail = torch.logaddexp(teacher.tail_logmass.float(), dropped)
    s_tail = torch.logsumexp(log_p.scatter(-1, idx, -1e30), -1)
    log_s = torch.cat([log_p.gather(-1, idx), s_tail.unsqueeze(-1)], -1)
    log_t = torch.cat([log_t, t_tail.unsqueeze(-1)], -1)
    log_t = log_t - torch.logsumexp(log_t, -1, keepdim=True)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    topk = (kl * mask).sum() / mask.sum()
    total = 0.5 * ce + 0.5 * topk
    (ref_grad,) = torch.autograd.grad(total, x)
    assert out.parts["ce"].item() == pytest.approx(ce.item(), abs=1e-6)
    assert out.parts["topk"].item() == pytest.approx(topk.item(), abs=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-6, rtol=0)


def test_dense_teacher_classification_and_other_terms(monkeypatch):
    """A dense teacher; classification logits (B, C) where ce skips unlabelled rows and topk counts every
    row; a third term (kd) alongside, reported apart; terms listed in another order."""
    g = torch.Generator().manual_seed(3)
    logits, teacher = torch.randn(6, 20, generator=g), torch.randn(6, 20, generator=g) * 2
    labels = torch.tensor([1, -100, 3, 19, -100, 0])
    terms = [
        LossTermConfig("topk", 0.4, {"k": 5, "tail": False, "divergence": "jsd"}),
        LossTermConfig("kd", 0.2, {"temperature": 2.0}),
        LossTermConfig("ce", 0.4),
    ]
    source = {"teacher_logits": teacher}
    got = _run(terms, logits, labels, source, shared=True, monkeypatch=monkeypatch)
    want = _run(terms, logits, labels, source, shared=False, monkeypatch=monkeypatch)
    assert got[2] and list(got[0].parts) == ["topk", "kd", "ce"]
    _assert_same(got, want)


def test_dense_lm_teacher_chunked(monkeypatch):
    logits, labels, source = _lm(4, dense=True)
    terms = _terms(k=6)
    got = _run(terms, logits, labels, source, shared=True, monkeypatch=monkeypatch, chunk_size=5)
    want = _run(terms, logits, labels, source, shared=False, monkeypatch=monkeypatch, chunk_size=5)
    assert got[2]
    _assert_same(got, want)


@pytest.mark.parametrize(
    "terms",
    [
        [LossTermConfig("ce", 0.5, {"label_smoothing": 0.1}), LossTermConfig("topk", 0.5, {"k": 8})],
        [LossTermConfig("ce", 0.5), LossTermConfig("topk", 0.5, {"k": 8, "tail": False, "temperature": 2.0})],
        [LossTermConfig("ce", 0.5), LossTermConfig("kd", 0.5)],
        [LossTermConfig("topk", 1.0, {"k": 8})],
    ],
    ids=["label-smoothing", "topk-temperature", "no-topk", "no-ce"],
)
def test_no_sharing_where_the_student_distributions_differ(monkeypatch, terms):
    logits, labels, source = _lm(5, dense=True)
    got = _run(terms, logits, labels, source, shared=True, monkeypatch=monkeypatch)
    want = _run(terms, logits, labels, source, shared=False, monkeypatch=monkeypatch)
    assert not got[2]
    _assert_same(got, want)


def test_a_cache_of_the_whole_vocabulary_keeps_the_dense_topk(monkeypatch):
    logits, labels, _ = _lm(6, vocab=12)
    teacher = torch.randn(3, 9, 12, generator=torch.Generator().manual_seed(0))
    source = {"teacher_topk": _cached(teacher, 12)}
    terms = _terms(k=12)
    got = _run(terms, logits, labels, source, shared=True, monkeypatch=monkeypatch)
    want = _run(terms, logits, labels, source, shared=False, monkeypatch=monkeypatch)
    assert not got[2]
    _assert_same(got, want)


def test_scheduled_weights_apply(monkeypatch):
    logits, labels, source = _lm(7)
    terms = [
        LossTermConfig("ce", 1.0, schedule={"weight": {"kind": "linear", "start": 1.0, "end": 0.0}}),
        LossTermConfig(
            "topk", 1.0, {"k": 8}, schedule={"weight": {"kind": "linear", "start": 0.0, "end": 1.0}}
        ),
    ]
    for step in (0, 3):
        source_step = {**source, "step": step, "total_steps": 4}
        got = _run(terms, logits, labels, source_step, shared=True, monkeypatch=monkeypatch)
        want = _run(terms, logits, labels, source_step, shared=False, monkeypatch=monkeypatch)
        assert got[2]
        _assert_same(got, want)


def test_vanishing_probabilities_stay_exact(monkeypatch):
    """A label with probability ~e^-120, a student whose tail is ~e^-95: the log-space rows."""
    logits, labels, source = _lm(8, batch=2, length=4, vocab=200)
    top = source["teacher_topk"]
    keep = top.logprobs.float().topk(8, dim=-1).indices
    kept = top.indices.gather(-1, keep)
    logits[0, 0].scatter_(0, kept[0, 0], 95.0)  # tail mass ~e^-95
    labels[0, 1] = 7
    logits[0, 1, 7] = -120.0  # the label's probability ~e^-120
    labels[1, 2] = int(kept[1, 2, 0])
    logits[1, 2, labels[1, 2]] = -120.0  # a kept token that is also the label
    for divergence in ("kd", "reverse_kl"):
        terms = _terms(divergence=divergence)
        got = _run(terms, logits, labels, source, shared=True, monkeypatch=monkeypatch)
        want = _run(terms, logits, labels, source, shared=False, monkeypatch=monkeypatch)
        assert got[2]
        _assert_same(got, want)


def test_no_labelled_position_gives_zero_ce_and_a_finite_gradient(monkeypatch):
    logits, labels, source = _lm(9)
    labels[:] = -100
    got = _run(_terms(), logits, labels, source, shared=True, monkeypatch=monkeypatch)
    want = _run(_terms(), logits, labels, source, shared=False, monkeypatch=monkeypatch)
    assert got[2] and got[0].parts["ce"].item() == 0.0 and got[0].parts["topk"].item() == 0.0
    _assert_same(got, want)
    assert got[1].abs().sum() == 0


def test_bfloat16_logits_get_a_bfloat16_gradient(monkeypatch):
    logits, labels, source = _lm(10)
    logits = logits.bfloat16()
    got = _run(_terms(), logits, labels, source, shared=True, monkeypatch=monkeypatch)
    want = _run(_terms(), logits, labels, source, shared=False, monkeypatch=monkeypatch)
    assert got[2]
    _assert_same(got, want, atol=1e-3)  # both gradients rounded to bfloat16


def test_without_gradients(monkeypatch):
    logits, labels, source = _lm(11)
    terms = validate_terms(_terms())
    with torch.no_grad():
        got = combine(
            terms,
            TermInputs(logits[:, :-1], labels, **source),
            modules=build_term_modules(terms),
            state=TermState(),
            chunk_size=4,
        )
        monkeypatch.setattr(methods, "_shared_ce_topk", lambda current, inputs: None)
        want = combine(
            terms,
            TermInputs(logits[:, :-1], labels, **source),
            modules=build_term_modules(terms),
            state=TermState(),
            chunk_size=4,
        )
    for name in ("ce", "topk"):
        assert got.parts[name].item() == pytest.approx(want.parts[name].item(), abs=1e-6)


def test_the_shared_function_alone_equals_the_terms():
    logits, labels, source = _lm(12)
    s = logits[:, :-1]
    mask = labels != -100
    total, ce, topk = sparse_losses.ce_topk(
        s, labels, source["teacher_topk"], mask, ce_weight=0.25, topk_weight=2.0, k=8
    )
    from workers.engine.logit_losses import ce as ce_term

    assert ce.item() == pytest.approx(ce_term(s, labels).item(), abs=1e-6)
    assert topk.item() == pytest.approx(
        sparse_losses.topk(s, source["teacher_topk"], mask, k=8).item(), abs=1e-6
    )
    assert total.item() == pytest.approx(0.25 * ce.item() + 2.0 * topk.item(), abs=1e-6)
