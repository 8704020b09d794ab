"""Cross-tokenizer alignment for uld: prefix ends from real fast tokenizers, position pairing, and an online
uld run between a teacher and a student that cut the text differently."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from workers.engine.align import align_positions, gather_aligned, prefix_ends
from workers.engine.batching import tokenize_for_lm

TEXTS = [
    "the cat sat on the mat and looked at the bird",
    "a dog ran to the park to play with a red ball",
    "naïve café owners serve crème brûlée at noon",  # multi-byte characters split into several byte tokens
]


def _bpe(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        TEXTS * 3,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<pad>", "<eos>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def coarse() -> PreTrainedTokenizerFast:
    return _bpe(400)


@pytest.fixture(scope="module")
def fine() -> PreTrainedTokenizerFast:
    return _bpe(270)


def test_prefix_ends_are_the_text_each_prefix_decodes_to(coarse):
    rows = tokenize_for_lm(TEXTS, tokenizer=coarse, max_length=64)
    ends = prefix_ends(TEXTS, rows, tokenizer=coarse)
    for text, row, row_ends in zip(TEXTS, rows, ends, strict=True):
        assert row[-1] == coarse.eos_token_id and row_ends[-1] == len(text) + 1  # appended EOS
        assert row_ends == sorted(row_ends)
        for k in range(len(row) - 1):
            decoded = coarse.decode(row[: k + 1], skip_special_tokens=True)
            if "\ufffd" not in decoded:  # not in the middle of a multi-byte character
                assert decoded == text[: row_ends[k]]


def test_cut_rows_keep_their_ends_and_get_no_end_of_text(coarse):
    rows = tokenize_for_lm(TEXTS, tokenizer=coarse, max_length=5)
    ends = prefix_ends(TEXTS, rows, tokenizer=coarse)
    assert all(len(r) == 5 and len(e) == 5 for r, e in zip(rows, ends, strict=True))
    assert all(e[-1] < len(t) for t, e in zip(TEXTS, ends, strict=True))


def test_positions_pair_only_where_both_models_read_the_same_text(coarse, fine):
    s_rows = tokenize_for_lm(TEXTS, tokenizer=coarse, max_length=64)
    t_rows = tokenize_for_lm(TEXTS, tokenizer=fine, max_length=64)
    assert any(len(a) != len(b) for a, b in zip(s_rows, t_rows, strict=True))  # really cut differently
    s_ends, t_ends = prefix_ends(TEXTS, s_rows, tokenizer=coarse), prefix_ends(TEXTS, t_rows, tokenizer=fine)
    s_width, t_width = max(map(len, s_rows)) - 1, max(map(len, t_rows)) - 1
    index = align_positions(s_ends, t_ends, student_width=s_width, teacher_width=t_width)
    assert index.shape == (len(TEXTS), s_width)
    for b in range(len(TEXTS)):
        shared = set(s_ends[b][: len(s_rows[b]) - 1]) & set(t_ends[b][: len(t_rows[b]) - 1])
        paired = {s_ends[b][i] for i in range(s_width) if index[b, i] >= 0}
        assert paired == shared  # every shared boundary, and only those
        for i in range(s_width):
            j = int(index[b, i])
            if j >= 0:
                assert s_ends[b][i] == t_ends[b][j]
        # The fine tokenizer has boundaries the coarse one lacks: those student positions stay unpaired.
        assert 0 < len(shared) < len(set(t_ends[b]))


def test_hand_made_alignment_and_gather():
    # Student read "ab|c|de|<eos>", teacher "a|bc|d|e|<eos>": shared prefix ends are 3 (abc), 5 (abcde), 6
    # (eos).
    s_ends, t_ends = [[2, 3, 5, 6]], [[1, 3, 4, 5, 6]]
    index = align_positions(s_ends, t_ends, student_width=3, teacher_width=4)
    assert index.tolist() == [[-1, 1, 3]]
    teacher = torch.arange(4 * 2, dtype=torch.float32).reshape(1, 4, 2)
    picked, paired = gather_aligned(teacher, index)
    assert paired.tolist() == [[False, True, True]]
    assert picked[0, 1].tolist() == teacher[0, 1].tolist() and picked[0, 2].tolist() == teacher[0, 3].tolist()


def test_slow_tokenizers_give_no_offsets():
    class Slow:
        is_fast = False

    assert prefix_ends(["x"], [[1]], tokenizer=Slow()) is None


def test_online_uld_between_different_tokenizers_trains_on_paired_positions(tmp_path, monkeypatch):
    from tests.workers.engine.test_lm import TINY_LLAMA, Log, _lm_run
    from workers.engine import teacher_targets, trainer

    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"{t} {i}" for i in range(8) for t in TEXTS) + "\n")
    pairs: list[tuple[int, int]] = []
    original = teacher_targets.TeacherTargets._alignment

    def spy(self, *args, **kwargs):
        index = original(self, *args, **kwargs)
        pairs.append((int((index >= 0).sum()), index.numel()))
        return index

    monkeypatch.setattr(teacher_targets.TeacherTargets, "_alignment", spy)
    teacher = {"source": "config", "params": {**TINY_LLAMA, "vocab_size": 120}}  # its own, smaller vocabulary
    log = Log()
    result = trainer.train(
        _lm_run(
            tmp_path / "run",
            path,
            teacher=teacher,
            terms=[{"name": "uld"}],
            scheme="online",
            train={"max_steps": 4, "log_every": 2},
        ),
        log.callbacks(),
    )
    assert result.steps == 4 and all(math.isfinite(m["uld"]) and m["uld"] > 0 for m in log.train())
    assert len(pairs) == 4 and all(0 < n < total for n, total in pairs)  # some, not all, positions pair


def test_cross_tokenizer_teacher_rows_are_cut_at_the_runs_max_length(tmp_path, monkeypatch):
    """Every teacher-output cache entry of a cross-tokenizer run (train and eval) holds rows cut at the run's
    max length, which its key records, not at whatever the teacher alone could read."""
    from tests.workers.engine.test_lm import TINY_LLAMA, _lm_run
    from workers.engine import teachers, trainer

    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"{t} {t} {i}" for i in range(8) for t in TEXTS) + "\n")
    widths: list[int] = []
    original = teachers._lm_topk_outputs

    def spy(teachers, rows, **kwargs):
        widths.append(max(len(r) for r in rows.token_rows))
        return original(teachers, rows, **kwargs)

    monkeypatch.setattr(teachers, "_lm_topk_outputs", spy)
    student = {
        "source": "config",
        "params": {**TINY_LLAMA, "num_hidden_layers": 1, "max_position_embeddings": 8},
    }
    teacher = {"source": "config", "params": {**TINY_LLAMA, "vocab_size": 120}}  # reads up to 64 positions
    result = trainer.train(
        _lm_run(
            tmp_path / "run",
            path,
            student=student,
            teacher=teacher,
            terms=[{"name": "uld"}],
            scheme="offline",
            train={"max_steps": 2},
        )
    )
    assert result.steps == 2 and result.teacher is not None
    assert len(widths) == 2 and max(widths) == 8  # the train and the eval entry, both at the student's 8
