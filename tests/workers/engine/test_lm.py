"""Causal-LM runs on CPU: tiny Llama configs with a tokenizer fitted on in-test text, the sparse teacher
cache, seq_kd and on_policy, evaluation, and the errors raised before any training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.engine import seq_kd, teachers
from workers.engine.batching import LMBatcher
from workers.engine.config import DatasetConfig, RunConfig
from workers.engine.data import IGNORE_INDEX, load_dataset
from workers.engine.errors import ConfigError, DataError
from workers.engine.evaluate import lm_metrics, shift_for_lm
from workers.engine.trainer import Callbacks, train

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 160,
    "max_position_embeddings": 64,
}
STUDENT = {"source": "config", "params": {**TINY_LLAMA, "num_hidden_layers": 1}}

_SENTENCES = [
    "the cat sat on the mat and looked at the bird",
    "a dog ran to the park to play with a red ball",
    "the sun was warm and the sky was blue today",
    "she read a short book about the sea and ships",
    "we ate bread and soup by the fire at night",
    "the old man told a story about the long war",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small plain-text corpus, one sentence per line."""
    path = tmp_path_factory.mktemp("lm") / "corpus.txt"
    path.write_text("\n".join(f"{s} {i % 9}" for i in range(12) for s in _SENTENCES) + "\n")
    return path


def _lm_run(output_dir: Path, corpus: Path, **overrides: Any) -> RunConfig:
    data: dict[str, Any] = {
        "student": STUDENT,
        "task": "causal_lm",
        "dataset": {"source": "hf", "path": str(corpus), "max_length": 20},
        "terms": [{"name": "ce"}],
        "scheme": "hard_labels",
        "train": {
            "max_steps": 6,
            "batch_size": 8,
            "lr": 3e-3,
            "log_every": 2,
            "eval_every": 100,
            "save_every": 100,
            "device": "cpu",
        },
        "output_dir": str(output_dir),
        "cache_dir": str(output_dir.parent / "cache"),
    }
    data["train"] |= overrides.pop("train", {})
    data |= overrides
    return RunConfig.from_dict(data)


class Log:
    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.progress: list[int] = []

    def callbacks(self) -> Callbacks:
        return Callbacks(
            on_metrics=lambda s, m: self.metrics.append((s, m)),
            on_progress=lambda s, _t: self.progress.append(s),
        )

    def train(self) -> list[dict[str, float]]:
        return [m for _, m in self.metrics if "loss" in m]


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """The final folder of a 2-layer Llama trained briefly on the corpus (a ``run`` teacher with files)."""
    out = tmp_path_factory.mktemp("lm-teacher") / "run"
    result = train(
        _lm_run(
            out,
            corpus,
            student={"source": "config", "params": TINY_LLAMA},
            train={"max_steps": 30, "lr": 1e-2},
        )
    )
    return Path(result.final_dir)


def test_lm_training_lowers_the_loss_and_reports_lm_metrics(tmp_path, corpus):
    log = Log()
    result = train(
        _lm_run(tmp_path / "run", corpus, train={"max_steps": 20, "lr": 1e-2, "eval_every": 10}),
        log.callbacks(),
    )
    losses = [m["loss"] for m in log.train()]
    assert losses[-1] < 0.7 * losses[0]
    # Rows hold 8-20 tokens: tokens/s lies between 8 and 20 × samples/s (× batch 8 per step).
    assert all(8 * m["samples_per_s"] <= m["tokens_per_s"] <= 20 * m["samples_per_s"] for m in log.train())
    assert result.task == "causal_lm" and result.teacher is None
    s = result.student
    assert s["perplexity"] == pytest.approx(math.exp(s["nll"])) and s["bits_per_token"] == pytest.approx(
        s["nll"] / math.log(2)
    )
    assert s["perplexity"] < TINY_LLAMA["vocab_size"]
    assert {
        "params",
        "latency_ms_p50",
        "latency_ms_p95",
        "throughput_per_s",
        "tokens_per_s",
        "peak_memory_bytes",
    } <= set(s)
    assert {"eval/loss", "eval/perplexity", "eval/bits_per_token"} <= set(log.metrics[-1][1])


def test_padding_positions_change_nothing(corpus):
    from workers.engine.models import load_model

    dataset = load_dataset(DatasetConfig(source="hf", path=str(corpus), max_length=20), task="causal_lm")
    torch.manual_seed(0)
    loaded = load_model(_lm_run(Path("unused"), corpus).student, dataset=dataset, role="student")
    model = loaded.model.eval()
    batcher = LMBatcher([[5, 6, 7], [5, 6, 7, 8, 9, 10, 11]], pad_id=0)
    alone, padded = batcher.batch([0]), batcher.batch([0, 1])
    assert padded.labels[0].tolist() == [5, 6, 7] + [IGNORE_INDEX] * 4  # padding is never a target

    def per_token(batch):
        logits, labels = shift_for_lm(model(**batch.inputs).logits, batch.labels)
        return torch.nn.functional.cross_entropy(
            logits[0], labels[0], ignore_index=IGNORE_INDEX, reduction="sum"
        )

    with torch.no_grad():
        assert per_token(alone).item() == pytest.approx(per_token(padded).item(), abs=1e-5)


class _Coin(torch.nn.Module):
    """A 'model' that gives each of two tokens probability 1/2 everywhere."""

    def forward(self, input_ids, attention_mask=None):
        return torch.zeros(*input_ids.shape, 2)


def test_perplexity_of_a_fair_coin_is_two():
    batcher = LMBatcher([[0, 1, 1, 0], [1, 0]], pad_id=0)  # 3 + 1 predicted tokens
    m = lm_metrics(_Coin(), batcher, device=torch.device("cpu"), batch_size=2)
    assert m["tokens"] == 4
    assert m["nll"] == pytest.approx(math.log(2)) and m["perplexity"] == pytest.approx(2.0)
    assert m["bits_per_token"] == pytest.approx(1.0)


def test_offline_topk_cache_is_reused_without_loading_the_teacher(tmp_path, corpus, lm_teacher, monkeypatch):
    loads = {"teacher": 0}
    real = teachers.load_model

    def counting(cfg, *, dataset, role):
        loads["teacher"] += role == "teacher"
        return real(cfg, dataset=dataset, role=role)

    monkeypatch.setattr(teachers, "load_model", counting)
    terms = [{"name": "ce", "weight": 0.5}, {"name": "topk", "weight": 0.5, "params": {"k": 8}}]

    def run(name):
        log = Log()
        result = train(
            _lm_run(
                tmp_path / name,
                corpus,
                teacher={"source": "run", "path": str(lm_teacher)},
                terms=terms,
                scheme="offline",
            ),
            log.callbacks(),
        )
        return result, log

    first, log = run("a")
    assert loads["teacher"] == 1 and first.teacher_forwards > 0
    assert [(c["split"], c["stored"], c["hit"]) for c in first.teacher_cache] == [
        ("train", {"kind": "topk", "k": 8, "tail": True, "dtype": "float16"}, False),
        ("eval", {"kind": "topk", "k": 64, "tail": True, "dtype": "float16"}, False),
    ]
    assert {"ce", "topk"} <= set(log.train()[0])
    assert 0 <= first.student["agreement"] <= 1 and first.student["kl_to_teacher"] >= 0
    assert first.teacher["perplexity"] < first.student["perplexity"]  # the trained teacher is better

    second, _ = run("b")
    assert loads["teacher"] == 1 and second.teacher_forwards == 0
    assert [c["hit"] for c in second.teacher_cache] == [True, True]
    assert all(
        second.student[k] == first.student[k] for k in ("nll", "perplexity", "agreement", "kl_to_teacher")
    )
    assert second.teacher == first.teacher


def test_dense_terms_are_refused_with_a_sparse_offline_teacher(tmp_path, corpus, lm_teacher):
    log = Log()
    with pytest.raises(
        ConfigError, match="needs dense teacher logits.*top-k cache.*topk or uld term, or the online"
    ):
        train(
            _lm_run(
                tmp_path / "run",
                corpus,
                teacher={"source": "run", "path": str(lm_teacher)},
                terms=[{"name": "kd"}],
                scheme="offline",
            ),
            log.callbacks(),
        )
    assert log.progress == [] and not (tmp_path / "cache").exists()


def test_online_kd_on_an_lm(tmp_path, corpus, lm_teacher):
    log = Log()
    result = train(
        _lm_run(
            tmp_path / "run",
            corpus,
            teacher={"source": "run", "path": str(lm_teacher)},
            terms=[{"name": "kd", "params": {"temperature": 1.0}}],
            scheme="online",
            train={"max_steps": 10, "lr": 1e-2},
        ),
        log.callbacks(),
    )
    kd = [m["kd"] for m in log.train()]
    assert kd[-1] < kd[0] and result.teacher_forwards >= 10


def test_seq_kd_trains_on_cached_teacher_continuations(tmp_path, corpus, lm_teacher):
    def run(name):
        log = Log()
        result = train(
            _lm_run(
                tmp_path / name,
                corpus,
                teacher={"source": "run", "path": str(lm_teacher)},
                scheme="seq_kd",
                scheme_params={"max_new_tokens": 4},
            ),
            log.callbacks(),
        )
        return result, log

    first, log = run("a")
    generations = first.teacher_cache[0]
    assert generations["stored"]["kind"] == "generations" and not generations["hit"]
    assert first.steps == 6 and all(math.isfinite(m["ce"]) for m in log.train())
    second, _ = run("b")
    assert second.teacher_cache[0]["hit"] and second.teacher_forwards == 0

    from workers.engine.cache import TeacherCache, row_tokens

    entry = TeacherCache(tmp_path / "cache").lookup(generations["key"])
    rows, prompt_lengths = row_tokens(entry)
    assert all(0 < p < len(r) for r, p in zip(rows, prompt_lengths, strict=True))  # prompt + continuation


def test_on_policy_mixes_student_samples_scored_by_the_teacher(tmp_path, corpus, lm_teacher):
    log = Log()
    result = train(
        _lm_run(
            tmp_path / "run",
            corpus,
            teacher={"source": "run", "path": str(lm_teacher)},
            terms=[{"name": "jsd", "params": {"beta": 0.5}}],
            scheme="on_policy",
            scheme_params={"lmbda": 0.5, "max_new_tokens": 4},
            train={"max_steps": 8, "log_every": 8},
        ),
        log.callbacks(),
    )
    logged = log.train()[0]
    assert result.steps == 8 and math.isfinite(logged["jsd"])
    assert 0 < logged["student_generated"] < 1  # λ = 0.5 over 8 steps: some of each
    with pytest.raises(ConfigError, match="on_policy scheme scores student samples"):
        train(
            _lm_run(
                tmp_path / "ce",
                corpus,
                teacher={"source": "run", "path": str(lm_teacher)},
                terms=[{"name": "ce"}, {"name": "jsd"}],
                scheme="on_policy",
            )
        )


def test_teacher_with_another_tokenizer_is_refused_before_training(tmp_path, corpus):
    log = Log()
    other = {"source": "config", "params": {**TINY_LLAMA, "vocab_size": 120}}  # a smaller fitted vocabulary
    with pytest.raises(ConfigError, match="mismatch without a cross-tokenizer method"):
        train(
            _lm_run(tmp_path / "run", corpus, teacher=other, terms=[{"name": "kd"}], scheme="online"),
            log.callbacks(),
        )
    assert log.progress == []


def test_bad_lm_data_is_refused(tmp_path):
    one_line = tmp_path / "one.txt"
    one_line.write_text("just one line\n\n   \n")
    with pytest.raises(DataError, match="has 1 non-empty text rows; at least 2 are needed"):
        train(_lm_run(tmp_path / "a", one_line))
    table = tmp_path / "table.csv"
    table.write_text("body,label\nhello there,0\ngeneral kenobi,1\n")
    with pytest.raises(DataError, match="Dataset has no column 'text'. Available columns: body, label."):
        train(_lm_run(tmp_path / "b", table))


def test_packing_fills_every_row_with_whole_texts(tmp_path, corpus):
    from workers.engine.batching import pack_for_lm, tokenize_for_lm
    from workers.engine.models import load_model

    cfg = _lm_run(
        tmp_path / "run",
        corpus,
        dataset={"source": "hf", "path": str(corpus), "max_length": 16, "pack": True},
    )
    dataset = load_dataset(cfg.dataset, task="causal_lm")
    assert dataset.pack
    student = load_model(cfg.student, dataset=dataset, role="student")
    texts = dataset.train.inputs
    rows = pack_for_lm(texts, tokenizer=student.tokenizer, max_length=16)
    whole = tokenize_for_lm(texts, tokenizer=student.tokenizer, max_length=10_000)  # each text + EOS
    assert [t for r in rows for t in r] == [t for r in whole for t in r][: sum(map(len, rows))]
    assert all(len(r) == 16 for r in rows[:-1]) and 2 <= len(rows[-1]) <= 16
    assert sum(map(len, rows)) >= sum(map(len, whole)) - 1  # nothing lost but a 1-token tail
    log = Log()
    result = train(cfg, log.callbacks())
    assert result.steps == 6 and math.isfinite(result.student["perplexity"])
    with pytest.raises(DataError, match="applies to causal_lm only"):
        load_dataset(DatasetConfig(source="hf", path=str(corpus), pack=True), task="embedding")


def test_a_separate_eval_file_is_the_eval_split(tmp_path, corpus):
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text('{"text": "a quiet evening by the river"}\n{"text": "the train left at dawn"}\n')
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(f'{{"text": "line {i} of the train file"}}\n' for i in range(10)))
    dataset = load_dataset(
        DatasetConfig(source="hf", path=str(train_file), eval_path=str(held_out)), task="causal_lm"
    )
    assert len(dataset.train.inputs) == 10 and dataset.eval.inputs == [
        "a quiet evening by the river",
        "the train left at dawn",
    ]
    with pytest.raises(DataError, match="needs a local train file"):
        load_dataset(
            DatasetConfig(source="builtin", name="fortunes", eval_path=str(held_out)), task="causal_lm"
        )


def test_seq_kd_across_tokenizers_trains_on_the_teachers_text(tmp_path, corpus):
    from workers.engine.cache import TeacherCache, row_tokens
    from workers.engine.models import load_model

    teacher_cfg = {
        "source": "config",
        "params": {**TINY_LLAMA, "vocab_size": 120},
    }  # its own, smaller vocabulary
    cfg = _lm_run(
        tmp_path / "run", corpus, teacher=teacher_cfg, scheme="seq_kd", scheme_params={"max_new_tokens": 4}
    )
    log = Log()
    result = train(cfg, log.callbacks())
    assert result.steps == 6 and all(math.isfinite(m["ce"]) for m in log.train())
    generations = result.teacher_cache[0]
    dataset = load_dataset(cfg.dataset, task="causal_lm")
    teacher = load_model(cfg.teacher, dataset=dataset, role="teacher")
    student = load_model(cfg.student, dataset=dataset, role="student")
    rows, prompts = row_tokens(TeacherCache(tmp_path / "cache").lookup(generations["key"]))
    assert teacher.tokenizer.vocab_size != student.tokenizer.vocab_size
    converted, converted_prompts = seq_kd.retokenize_rows(
        rows, prompts, source=teacher.tokenizer, target=student.tokenizer, max_length=20
    )

    def text(tokenizer, ids):
        return " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())

    for row, new, p, q in zip(rows, converted, prompts, converted_prompts, strict=True):
        assert (
            text(student.tokenizer, new) == text(teacher.tokenizer, row)[: len(text(student.tokenizer, new))]
        )
        assert 1 <= q < len(new)
        assert text(student.tokenizer, new[:q]) == text(teacher.tokenizer, row[:p])  # same prompt text
    with pytest.raises(ConfigError, match="seq_kd across tokenizers.*only ce"):
        train(
            _lm_run(
                tmp_path / "kd",
                corpus,
                teacher=teacher_cfg,
                scheme="seq_kd",
                terms=[{"name": "ce"}, {"name": "uld"}],
            )
        )
