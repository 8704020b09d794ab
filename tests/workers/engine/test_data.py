"""Datasets: builtin data, local files, splits, label hiding and batching."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import numpy as np
import pytest

from workers.engine.config import DatasetConfig
from workers.engine.data import Batcher, load_dataset, rows_for_step, stratified_split
from workers.engine.errors import DataError


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
        load_dataset(DatasetConfig(source="hf", path=str(topics_csv), text_column="xyz", label_column="topic"))
    assert str(exc.value) == "Dataset has no column 'xyz'. Available columns: id, body, topic."


def test_unknown_builtin_and_missing_file_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="Unknown builtin dataset 'mnist'"):
        load_dataset(DatasetConfig(source="builtin", name="mnist"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DatasetConfig(source="hf", path=str(tmp_path / "nope.csv")))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="the datasets package is installed")
def test_hub_dataset_without_the_datasets_package_explains_what_is_missing():
    with pytest.raises(DataError, match="could not be loaded: the `datasets` package is needed"):
        load_dataset(DatasetConfig(source="hf", name="imdb"))


def test_labelled_fraction_hides_labels_of_a_stratified_seeded_subset():
    full = load_dataset(DatasetConfig(source="builtin", name="digits"))
    part = load_dataset(DatasetConfig(source="builtin", name="digits", labelled_fraction=0.1))
    again = load_dataset(DatasetConfig(source="builtin", name="digits", labelled_fraction=0.1))

    kept = part.train.labels != -100
    assert kept.sum() == pytest.approx(0.1 * len(full.train), abs=10)
    assert np.array_equal(part.train.labels[kept], full.train.labels[kept])    # visible labels are the true ones
    assert set(Counter(part.train.labels[kept].tolist()).values()) <= {14, 15}  # ~10% of each class
    assert np.array_equal(part.train.labels, again.train.labels)
    assert np.array_equal(part.eval.labels, full.eval.labels)                  # eval keeps every label
    assert np.array_equal(part.train.inputs, full.train.inputs)                # the split does not move


def test_rows_for_step_is_a_pure_function_covering_each_row_once_per_epoch():
    rows = np.arange(10, 110)
    epoch = np.concatenate([rows_for_step(s, rows, batch_size=32, seed=1) for s in range(3)])
    assert len(set(epoch.tolist())) == 96                                      # 3 full batches, no repeats
    assert set(epoch.tolist()) <= set(rows.tolist())
    assert np.array_equal(rows_for_step(5, rows, batch_size=32, seed=1), rows_for_step(5, rows, batch_size=32, seed=1))
    assert not np.array_equal(rows_for_step(0, rows, batch_size=32, seed=1), rows_for_step(3, rows, batch_size=32, seed=1))


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
