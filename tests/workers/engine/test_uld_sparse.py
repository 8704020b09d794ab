"""uld from the sparse top-k teacher cache: the loss's properties against the dense uld, pairing cached and
sampled positions across tokenizers, and offline, cross-tokenizer offline and cross-tokenizer on_policy
runs."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from tests.workers.engine.test_align import TEXTS, _bpe
from tests.workers.engine.test_lm import _SENTENCES, STUDENT, TINY_LLAMA, Log, _lm_run
from workers.engine import methods, sparse_losses, teacher_targets, teachers
from workers.engine.align import UNPAIRABLE, align_positions, decoded_prefix_ends, gather_aligned, prefix_ends
from workers.engine.batching import tokenize_for_lm
from workers.engine.cache import entry_tensors, topk_of
from workers.engine.config import LossTermConfig
from workers.engine.errors import ConfigError
from workers.engine.loss_primitives import TopK
from workers.engine.methods import TermInputs, TermState
from workers.engine.terms import ModelDims, validate_terms
from workers.engine.trainer import train

# A teacher with its own, smaller fitted vocabulary: it cuts the corpus into other tokens than STUDENT.
OTHER_TOKENIZER = {"source": "config", "params": {**TINY_LLAMA, "vocab_size": 120}}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _probs_as_logits(probs: list[float], order: list[int]) -> torch.Tensor:
    """Logits whose softmax is ``probs`` placed at the token ids ``order`` (so sorting has work to do)."""
    logits = torch.empty(len(probs))
    logits[torch.tensor(order)] = torch.tensor(probs).log()
    return logits.reshape(1, -1)


# --- the loss -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("student_vocab", [6, 9, 13])
def test_sparse_uld_equals_the_dense_uld_when_the_cache_holds_the_whole_vocabulary(student_vocab):
    g = _gen(0)
    s = (torch.randn(2, 4, student_vocab, generator=g) * 2).requires_grad_()
    t = torch.randn(2, 4, 9, generator=g) * 2
    mask = torch.tensor([[True, False, True, True], [True, True, False, True]])
    dense = sparse_losses.uld(s, t, mask)
    (dense_grad,) = torch.autograd.grad(dense, s)
    full = topk_of(t, 9)  # k = V_T: the tail is empty
    for teacher, tol in (
        (full, 1e-6),
        (TopK(full.logprobs, full.indices, None), 1e-6),
        (TopK(full.logprobs.half(), full.indices.int(), full.tail_logmass.half()), 2e-3),
    ):
        sparse = sparse_losses.uld(s, teacher, mask)
        (grad,) = torch.autograd.grad(sparse, s)
        assert sparse.item() == pytest.approx(dense.item(), rel=tol, abs=tol)
        if tol < 1e-3:
            assert torch.allclose(grad, dense_grad, atol=1e-6)


def test_sparse_uld_is_a_lower_bound_of_the_dense_uld_that_grows_with_k():
    g = _gen(1)
    s, t = torch.randn(3, 5, 11, generator=g) * 2, torch.randn(3, 5, 8, generator=g) * 2
    mask = torch.rand(3, 5, generator=g) > 0.3
    dense = sparse_losses.uld(s, t, mask).item()
    values = [sparse_losses.uld(s, topk_of(t, k), mask).item() for k in range(1, 9)]
    assert all(v <= dense + 1e-6 for v in values)
    assert all(a <= b + 1e-6 for a, b in zip(values, values[1:], strict=False))  # more known, never less
    assert values[0] < dense - 1e-3 and values[-1] == pytest.approx(dense, abs=1e-6)
    # per position too (no averaging can hide a position above its dense value)
    per_position_dense = sparse_losses._uld_tokens(s, t)
    for k in (1, 3, 5):
        assert (sparse_losses._uld_tokens(s, topk_of(t, k)) <= per_position_dense + 1e-6).all()


def test_sparse_uld_reaches_the_dense_uld_when_the_teachers_tail_is_a_scaled_copy_of_the_students():
    p_s = [0.3, 0.25, 0.15, 0.1, 0.08, 0.06, 0.04, 0.02]
    tail = [0.2 * p / 0.3 for p in p_s[3:]]  # the teacher's 0.2 tail, shaped like the student's
    p_t = [0.5, 0.2, 0.1, *tail]
    student = _probs_as_logits(p_s, [3, 0, 7, 1, 6, 2, 5, 4])
    teacher = _probs_as_logits(p_t, [5, 1, 4, 0, 2, 7, 6, 3])
    dense = sparse_losses.uld(student, teacher).item()
    # top 3: |.3-.5| + |.25-.2| + |.15-.1| = .3; tail: Σ|p - 2p/3| = .3/3 = .1 (dense) = |.3 - .2| (sparse)
    assert dense == pytest.approx(0.4, abs=1e-6)
    assert sparse_losses.uld(student, topk_of(teacher, 3)).item() == pytest.approx(dense, abs=1e-6)
    # A teacher tail that is above the student's at one rank and below at others loses what cancels.
    crossing = _probs_as_logits([0.35, 0.3, 0.2, 0.06, 0.04, 0.02, 0.02, 0.01], [7, 6, 5, 4, 3, 2, 1, 0])
    # dense: .05 + .05 + |.15-.2| + .04 + .04 + .04 + .02 + .01 = .30; k = 2: .05 + .05 + |.45-.35| = .20
    assert sparse_losses.uld(student, crossing).item() == pytest.approx(0.30, abs=1e-6)
    assert sparse_losses.uld(student, topk_of(crossing, 2)).item() == pytest.approx(0.20, abs=1e-6)


def test_sparse_uld_hand_computed_values():
    # student .5/.3/.2, teacher top-2 .6/.3 with tail .1: |.5-.6| + |.3-.3| + |.2-.1| = .2
    student = _probs_as_logits([0.5, 0.3, 0.2], [2, 0, 1])
    teacher = TopK(torch.tensor([[0.6, 0.3]]).log(), torch.tensor([[4, 1]]), torch.tensor([0.1]).log())
    assert sparse_losses.uld(student, teacher).item() == pytest.approx(0.2, abs=1e-6)
    # a student vocabulary smaller than k is zero-padded: |.5-.7| + |.3-.3| + |.1-0| + |.1-0| = .4
    small = _probs_as_logits([0.7, 0.3], [1, 0])
    teacher = TopK(
        torch.tensor([[0.5, 0.3, 0.1]]).log(), torch.tensor([[9, 3, 4]]), torch.tensor([0.1]).log()
    )
    assert sparse_losses.uld(small, teacher).item() == pytest.approx(0.4, abs=1e-6)
    # without a stored tail it is 1 − Σ top-k
    no_tail = TopK(teacher.logprobs, teacher.indices, None)
    assert sparse_losses.uld(small, no_tail).item() == pytest.approx(0.4, abs=1e-6)


def test_sparse_uld_is_zero_for_the_teachers_own_cache():
    logits = torch.randn(2, 3, 10, generator=_gen(2)) * 3
    for k in (1, 4, 10):
        assert sparse_losses.uld(logits, topk_of(logits, k)).item() == pytest.approx(0.0, abs=1e-6)


def test_sparse_uld_masked_positions_change_nothing_and_gradients_are_finite():
    g = _gen(3)
    student, teacher = torch.randn(2, 5, 9, generator=g), torch.randn(2, 5, 12, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    noisy_student, noisy_teacher = student.clone(), teacher.clone()
    noisy_student[~mask] = torch.randn(int((~mask).sum()), 9, generator=g) * 100
    noisy_teacher[~mask] = torch.randn(int((~mask).sum()), 12, generator=g) * 100
    a, b = student.clone().requires_grad_(), noisy_student.clone().requires_grad_()
    loss_a = sparse_losses.uld(a, topk_of(teacher, 4), mask)
    loss_b = sparse_losses.uld(b, topk_of(noisy_teacher, 4), mask)
    loss_a.backward()
    loss_b.backward()
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-6)
    assert torch.allclose(a.grad[mask], b.grad[mask], atol=1e-7) and torch.all(b.grad[~mask] == 0)
    assert torch.isfinite(b.grad).all()
    # every position masked: exactly 0 with a zero gradient
    c = student.clone().requires_grad_()
    nothing = sparse_losses.uld(c, topk_of(teacher, 4), torch.zeros(2, 5, dtype=torch.bool))
    nothing.backward()
    assert nothing.item() == 0.0 and torch.all(c.grad == 0)
    # extreme and tied logits (a one-hot student, a uniform teacher, a half-precision cache) stay finite
    d = torch.cat([torch.full((1, 1, 9), -1e4), torch.zeros(1, 1, 9)], dim=1)
    d[0, 0, 3] = 1e4
    d.requires_grad_()
    flat = topk_of(torch.zeros(1, 2, 12), 4)
    cached = TopK(flat.logprobs.half(), flat.indices.int(), flat.tail_logmass.half())
    value = sparse_losses.uld(d, cached)
    value.backward()
    assert math.isfinite(value.item()) and torch.isfinite(d.grad).all()


def test_sparse_uld_in_blocks_matches_all_at_once():
    g = _gen(4)
    s, t = torch.randn(2, 7, 10, generator=g), torch.randn(2, 7, 6, generator=g)
    mask = torch.rand(2, 7, generator=g) > 0.2
    whole, blocks = s.clone().requires_grad_(), s.clone().requires_grad_()
    a = sparse_losses.uld(whole, topk_of(t, 3), mask)
    b = sparse_losses.uld(blocks, topk_of(t, 3), mask, chunk_size=2)
    a.backward()
    b.backward()
    assert a.item() == pytest.approx(b.item(), rel=1e-6) and torch.allclose(
        whole.grad, blocks.grad, atol=1e-7
    )


def test_sparse_uld_rejects_unaligned_positions():
    with pytest.raises(ConfigError, match="aligned positions"):
        sparse_losses.uld(torch.randn(1, 4, 5), topk_of(torch.randn(1, 3, 6), 2))


def test_combine_feeds_uld_from_the_sparse_cache_on_paired_positions_only():
    g = _gen(5)
    student = torch.randn(2, 4, 7, generator=g).requires_grad_()
    top = topk_of(torch.randn(2, 4, 9, generator=g), 5)
    labels = torch.tensor([[1, 2, -100, 3], [-100, 0, 1, 2]])
    paired = torch.tensor([[True, False, True, True], [True, True, False, True]])
    inputs = TermInputs(student, labels, teacher_topk=top, teacher_paired=paired)
    out = methods.combine(
        validate_terms([LossTermConfig("uld")]), inputs, modules=torch.nn.ModuleDict(), state=TermState()
    )
    assert out.total.item() == pytest.approx(
        sparse_losses.uld(student, top, (labels != -100) & paired).item()
    )


def test_dense_terms_still_refuse_a_sparse_teacher_but_uld_takes_it():
    sparse = ModelDims(student_vocab_size=160, teacher_vocab_size=120, sparse_teacher=True)
    assert validate_terms([LossTermConfig("uld")], dims=sparse)
    for name in ("kd", "jsd", "taid", "tvd"):
        with pytest.raises(ConfigError, match=f"'{name}' needs dense teacher logits.*top-k cache"):
            validate_terms([LossTermConfig(name)], dims=sparse)


# --- pairing cached and sampled positions -------------------------------------------------------------------


def test_cached_teacher_positions_pair_like_the_teachers_whole_rows():
    coarse, fine = _bpe(400), _bpe(270)
    s_rows = tokenize_for_lm(TEXTS, tokenizer=coarse, max_length=64)
    t_rows = tokenize_for_lm(TEXTS, tokenizer=fine, max_length=64)
    s_ends, t_ends = prefix_ends(TEXTS, s_rows, tokenizer=coarse), prefix_ends(TEXTS, t_rows, tokenizer=fine)
    s_width, t_width = max(map(len, s_rows)) - 1, max(map(len, t_rows)) - 1
    whole = align_positions(s_ends, t_ends, student_width=s_width, teacher_width=t_width)
    # what the cache stores: the ends of the predicting positions only (a row's last token left out)
    predicting = [e[: len(r) - 1] for e, r in zip(t_ends, t_rows, strict=True)]
    cached = align_positions(
        s_ends, predicting, student_width=s_width, teacher_width=t_width, teacher_predicting_only=True
    )
    assert torch.equal(whole, cached) and (cached >= 0).any()
    # gathering a top-k at the pairs picks each paired teacher position, tail included
    top = topk_of(torch.randn(len(TEXTS), t_width, 30, generator=_gen(6)), 4)
    picked, paired = gather_aligned(top, cached)
    assert picked.logprobs.shape == (len(TEXTS), s_width, 4) and picked.tail_logmass.shape == (
        len(TEXTS),
        s_width,
    )
    assert torch.equal(paired, cached >= 0)
    b, i = (cached >= 0).nonzero()[0].tolist()
    j = int(cached[b, i])
    assert (
        torch.equal(picked.indices[b, i], top.indices[b, j])
        and picked.tail_logmass[b, i] == top.tail_logmass[b, j]
    )


def test_decoded_rows_give_the_text_and_the_prefix_ends_of_their_offsets():
    coarse = _bpe(400)
    rows = tokenize_for_lm(TEXTS, tokenizer=coarse, max_length=64)
    texts, ends = decoded_prefix_ends(rows, tokenizer=coarse)
    assert texts == TEXTS
    by_offsets = prefix_ends(TEXTS, rows, tokenizer=coarse)
    for row_ends, offsets_ends, row in zip(ends, by_offsets, rows, strict=True):
        assert row_ends[-1] == offsets_ends[-1]  # the end-of-text token
        for k in range(len(row) - 1):
            if row_ends[k] != UNPAIRABLE:
                assert row_ends[k] == offsets_ends[k]
    # a prefix that stops inside a multi-byte character ("ï", "é", "è" are two bytes each) pairs with nothing
    for row, row_ends in zip(rows, ends, strict=True):
        for k in range(len(row) - 1):
            half = "\ufffd" in coarse.decode(row[: k + 1], skip_special_tokens=True)
            assert (row_ends[k] == UNPAIRABLE) == half
    assert UNPAIRABLE not in ends[0]
    index = align_positions([[UNPAIRABLE, 2, 3]], [[0, 2, 3]], student_width=2, teacher_width=2)
    assert index.tolist() == [[-1, 1]]


# --- runs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("uld") / "corpus.txt"
    path.write_text("\n".join(f"{s} {i % 9}" for i in range(12) for s in _SENTENCES) + "\n")
    return path


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A 2-layer Llama with the student's tokenizer, trained briefly on the corpus (a ``run`` teacher)."""
    out = tmp_path_factory.mktemp("uld-teacher") / "run"
    result = train(
        _lm_run(
            out,
            corpus,
            student={"source": "config", "params": TINY_LLAMA},
            train={"max_steps": 30, "lr": 1e-2},
        )
    )
    return Path(result.final_dir)


def _count_teacher_loads(monkeypatch) -> dict[str, int]:
    loads = {"teacher": 0}
    real = teachers.load_model

    def counting(cfg, *, dataset, role):
        loads["teacher"] += role == "teacher"
        return real(cfg, dataset=dataset, role=role)

    monkeypatch.setattr(teachers, "load_model", counting)
    return loads


def test_offline_uld_trains_from_the_topk_cache_and_reuses_it(tmp_path, corpus, trained_teacher, monkeypatch):
    loads = _count_teacher_loads(monkeypatch)

    def run(name):
        log = Log()
        result = train(
            _lm_run(
                tmp_path / name,
                corpus,
                teacher={"source": "run", "path": str(trained_teacher)},
                terms=[{"name": "uld"}],
                scheme="offline",
                train={"max_steps": 24, "lr": 1e-2, "log_every": 4},
            ),
            log.callbacks(),
        )
        return result, [m["uld"] for m in log.train()]

    first, curve = run("a")
    assert first.steps == 24 and first.teacher_forwards > 0 and loads["teacher"] == 1
    assert first.teacher_cache[0]["stored"] == {"kind": "topk", "k": 64, "tail": True, "dtype": "float16"}
    assert all(math.isfinite(v) and 0 < v <= 2 for v in curve)
    assert sum(curve[-2:]) < sum(curve[:2])  # the student moves towards the teacher

    second, again = run("b")
    assert second.teacher_forwards == 0 and loads["teacher"] == 1  # no teacher forward, not even a load
    assert [c["hit"] for c in second.teacher_cache] == [True, True]
    assert again == curve

    # The entry also serves a student with another tokenizer: it holds where each teacher position's text
    # ends.
    log = Log()
    other = train(
        _lm_run(
            tmp_path / "c",
            corpus,
            student=OTHER_TOKENIZER,
            terms=[{"name": "uld"}],
            teacher={"source": "run", "path": str(trained_teacher)},
            scheme="offline",
        ),
        log.callbacks(),
    )
    assert other.teacher_cache[0]["key"] == first.teacher_cache[0]["key"] and other.teacher_cache[0]["hit"]
    assert other.teacher_forwards == 0 and all(math.isfinite(m["uld"]) and m["uld"] > 0 for m in log.train())


def test_offline_uld_across_tokenizers_pairs_cached_teacher_positions(tmp_path, corpus, monkeypatch):
    calls: list[tuple] = []
    original = teacher_targets.TeacherTargets._cached_across_tokenizers

    def spy(self, rows, width):
        out = original(self, rows, width)
        calls.append((self, rows, out))
        return out

    monkeypatch.setattr(teacher_targets.TeacherTargets, "_cached_across_tokenizers", spy)

    def run(name):
        log = Log()
        result = train(
            _lm_run(
                tmp_path / name,
                corpus,
                teacher=OTHER_TOKENIZER,
                scheme="offline",
                terms=[{"name": "ce", "weight": 0.5}, {"name": "uld", "weight": 0.5}],
                train={"max_steps": 6, "log_every": 2},
            ),
            log.callbacks(),
        )
        return result, log.train()

    first, logged = run("a")
    assert first.steps == 6 and len(calls) == 6
    assert all(math.isfinite(m["uld"]) and m["uld"] > 0 and math.isfinite(m["ce"]) for m in logged)
    assert all(0 < int(out["teacher_paired"].sum()) < out["teacher_paired"].numel() for _, _, out in calls)
    assert first.teacher_cache[0]["stored"]["kind"] == "topk" and not first.teacher_cache[0]["hit"]

    # The cached targets are what the teacher gives online at the paired positions.
    targets, rows, cached = calls[0]
    online = teacher_targets.TeacherTargets(
        targets.teachers,
        entry=None,
        task="causal_lm",
        same_tokens=False,
        student=targets.student,
        student_rows=targets.student_rows,
    )
    batch = targets.student_rows.batch(rows.numpy())
    dense = online.fields(batch, rows.numpy(), plan=SimpleNamespace(needs=frozenset({"teacher_topk"})))
    assert torch.equal(dense["teacher_paired"], cached["teacher_paired"])
    k = cached["teacher_topk"].logprobs.shape[-1]
    expected = topk_of(dense["teacher_logits"], k)
    where = cached["teacher_paired"]
    assert torch.allclose(cached["teacher_topk"].logprobs[where].float(), expected.logprobs[where], atol=2e-2)
    assert torch.equal(cached["teacher_topk"].indices[where][:, 0], expected.indices[where][:, 0])

    second, _ = run("b")
    assert second.teacher_forwards == 0 and second.teacher_cache[0]["hit"]

    # An entry written without the prefix ends (a format-1 entry from before they were stored) pairs the same
    # positions, from the teacher's tokenizer.
    folder = tmp_path / "cache" / first.teacher_cache[0]["key"]
    tensors = entry_tensors(folder)
    del tensors["prefix_end"]
    for file in folder.iterdir():
        if file.name != "manifest.json":
            file.unlink()
    save_file(tensors, folder / "outputs.safetensors")
    calls.clear()
    third, _ = run("c")
    assert third.teacher_forwards == 0 and third.teacher_cache[0]["hit"] and len(calls) == 6
    _, rows_again, again = calls[0]
    assert torch.equal(rows_again, rows) and torch.equal(again["teacher_paired"], cached["teacher_paired"])
    assert torch.equal(again["teacher_topk"].logprobs, cached["teacher_topk"].logprobs)


def test_on_policy_uld_across_tokenizers_scores_decoded_student_samples(tmp_path, corpus, monkeypatch):
    views: list[tuple[list[str], list[str], int, int]] = []
    original = teacher_targets.TeacherTargets._sampled_view

    def spy(self, loaded, batch):
        teacher_batch, index = original(self, loaded, batch)
        s_tok, t_tok = self.student.tokenizer, loaded.tokenizer
        lengths = batch.inputs["attention_mask"].sum(1).tolist()
        t_lengths = teacher_batch.inputs["attention_mask"].sum(1).tolist()
        student_text = [
            s_tok.decode(batch.inputs["input_ids"][b, :n], skip_special_tokens=True)
            for b, n in enumerate(lengths)
        ]
        teacher_text = [
            t_tok.decode(teacher_batch.inputs["input_ids"][b, :n], skip_special_tokens=True)
            for b, n in enumerate(t_lengths)
        ]
        views.append((student_text, teacher_text, int((index >= 0).sum()), index.numel()))
        return teacher_batch, index

    monkeypatch.setattr(teacher_targets.TeacherTargets, "_sampled_view", spy)
    log = Log()
    result = train(
        _lm_run(
            tmp_path / "run",
            corpus,
            teacher=OTHER_TOKENIZER,
            terms=[{"name": "uld"}],
            scheme="on_policy",
            scheme_params={"lmbda": 0.5, "max_new_tokens": 4},
            train={"max_steps": 8, "log_every": 8},
        ),
        log.callbacks(),
    )
    logged = log.train()[0]
    assert result.steps == 8 and math.isfinite(logged["uld"]) and logged["uld"] > 0
    assert 0 < logged["student_generated"] < 1 and len(views) == round(8 * logged["student_generated"])
    for student_text, teacher_text, n_paired, total in views:
        # the teacher read the student's sampled text (all of it, unless its finer tokens hit the max length)
        for s_text, t_text in zip(student_text, teacher_text, strict=True):
            assert t_text and " ".join(s_text.split()).startswith(" ".join(t_text.split()))
        assert 0 < n_paired < total


def test_cross_tokenizer_runs_refuse_terms_that_compare_positions_one_to_one(tmp_path, corpus):
    teacher = OTHER_TOKENIZER
    with pytest.raises(
        ConfigError, match="only the uld term can compare them.*topk compares token positions"
    ):
        train(
            _lm_run(
                tmp_path / "a",
                corpus,
                teacher=teacher,
                scheme="offline",
                terms=[{"name": "uld"}, {"name": "topk", "params": {"k": 8}}],
            )
        )
    with pytest.raises(ConfigError, match="only the uld term can compare them.*hidden_cosine compares"):
        train(
            _lm_run(
                tmp_path / "b",
                corpus,
                teacher=teacher,
                scheme="on_policy",
                terms=[{"name": "uld"}, {"name": "hidden_cosine"}],
            )
        )
    with pytest.raises(ConfigError, match="different tokenizers.*use the uld \\(cross-tokenizer\\) term"):
        train(
            _lm_run(
                tmp_path / "c",
                corpus,
                teacher=teacher,
                scheme="offline",
                terms=[{"name": "topk", "params": {"k": 8}}],
            )
        )
    # dense terms across vocabularies are refused by the vocabulary check first
    with pytest.raises(ConfigError, match="mismatch without a cross-tokenizer method"):
        train(_lm_run(tmp_path / "d", corpus, teacher=teacher, scheme="on_policy", terms=[{"name": "jsd"}]))
    assert STUDENT["params"]["vocab_size"] != teacher["params"]["vocab_size"]
