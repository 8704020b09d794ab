"""The tabular preprocessing the engine records with the data and writes beside a trained model: feature
order, the statistics (train split only) or the fixed divisor, and label order, exact enough to rebuild the
model's inputs from raw rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn import datasets as sk

from workers.engine.config import DatasetConfig, RunConfig
from workers.engine.data import (
    PREPROCESSING_FILE,
    PREPROCESSING_FORMAT,
    fit_tabular_preprocessing,
    load_dataset,
    write_preprocessing,
)
from workers.engine.splits import stratified_split


def _raw(name: str, *, eval_fraction: float = 0.2, split_seed: int = 0):
    """sklearn's raw rows of ``name`` and the engine's train / eval row indices into them."""
    bunch = getattr(sk, f"load_{name}")()
    train_rows, eval_rows = stratified_split(bunch.target.astype(np.int64), eval_fraction, seed=split_seed)
    return bunch, train_rows, eval_rows


def _apply_record(record: dict, raw_rows: np.ndarray) -> np.ndarray:
    """The record's formula, applied with nothing but numpy to raw rows."""
    x = np.asarray(raw_rows, dtype=np.float64)
    return ((x - np.asarray(record["mean"])) / np.asarray(record["std"])).astype(np.float32)


@pytest.mark.parametrize("name", ["iris", "wine", "breast_cancer"])
def test_standardised_sets_record_the_train_split_s_mean_and_std_in_feature_order(name):
    dataset = load_dataset(DatasetConfig(source="builtin", name=name, split_seed=3))
    bunch, train_rows, eval_rows = _raw(name, split_seed=3)
    prep = dataset.preprocessing

    assert prep.method == "standardise"
    assert prep.features == list(bunch.feature_names)
    assert prep.fitted_rows == len(train_rows) == len(dataset.train)
    train_raw = bunch.data[train_rows]
    np.testing.assert_array_equal(prep.mean, train_raw.mean(axis=0))
    np.testing.assert_array_equal(prep.std, train_raw.std(axis=0))
    # Every eval row is excluded from the statistics: the whole data set's mean differs.
    assert not np.allclose(prep.mean, bunch.data.mean(axis=0), rtol=0, atol=1e-12)
    assert np.array_equal(prep.apply(bunch.data[eval_rows]), dataset.eval.inputs)
    assert np.array_equal(prep.apply(train_raw), dataset.train.inputs)


def test_digits_records_the_fixed_divide_by_16_rule():
    dataset = load_dataset(DatasetConfig(source="builtin", name="digits"))
    bunch, train_rows, eval_rows = _raw("digits")
    prep = dataset.preprocessing

    assert prep.method == "scale" and prep.fitted_rows == 0
    assert prep.features == [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]
    assert prep.mean == [0.0] * 64 and prep.std == [16.0] * 64
    assert np.array_equal(prep.apply(bunch.data[eval_rows]), dataset.eval.inputs)
    assert np.array_equal(dataset.eval.inputs, (bunch.data[eval_rows] / 16).astype(np.float32))


def test_a_constant_feature_keeps_std_one_so_nothing_divides_by_zero():
    rows = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])
    prep = fit_tabular_preprocessing("wine", ["a", "b"], rows)
    assert prep.std[1] == 1.0 and prep.mean == [3.0, 5.0]
    assert np.isfinite(prep.apply(rows)).all()


def test_the_written_record_rebuilds_the_eval_inputs_bit_for_bit_from_raw_rows(tmp_path):
    dataset = load_dataset(DatasetConfig(source="builtin", name="wine", eval_fraction=0.3, split_seed=7))
    bunch, _, eval_rows = _raw("wine", eval_fraction=0.3, split_seed=7)

    path = write_preprocessing(dataset, tmp_path)

    assert path == tmp_path / PREPROCESSING_FILE
    record = json.loads(path.read_text())
    assert record["format"] == PREPROCESSING_FORMAT and record["dataset"] == "wine"
    assert record["method"] == "standardise" and record["dtype"] == "float32"
    assert record["raw_source"] == "scikit-learn: sklearn.datasets.load_wine().data"
    assert record["features"] == list(bunch.feature_names)
    assert record["label_names"] == [str(n) for n in bunch.target_names] == dataset.label_names
    assert np.array_equal(_apply_record(record, bunch.data[eval_rows]), dataset.eval.inputs)


def test_a_text_dataset_has_no_preprocessing_record(tmp_path, topics_csv):
    topics = load_dataset(DatasetConfig(source="hf", path=str(topics_csv), text_column="body",
                                        label_column="topic"))
    assert topics.preprocessing is None
    assert write_preprocessing(topics, tmp_path) is None
    assert not (tmp_path / PREPROCESSING_FILE).exists()


def test_a_trained_mlp_s_final_folder_holds_the_record_of_its_data(tmp_path):
    from workers.engine.trainer import train

    config = {
        "student": {"source": "builtin", "name": "mlp", "params": {"hidden_sizes": [8]}, "num_labels": 3},
        "teacher": None,
        "dataset": {"source": "builtin", "name": "iris", "split_seed": 2},
        "terms": [{"name": "ce", "weight": 1.0, "params": {}}],
        "scheme": "hard_labels",
        "task": "classification",
        "train": {"max_steps": 3, "batch_size": 16, "lr": 1e-2, "log_every": 1, "eval_every": 1000,
                  "save_every": 1000, "seed": 0, "device": "cpu"},
        "output_dir": str(tmp_path / "run"),
    }
    result = train(RunConfig.from_dict(config))

    record = json.loads((Path(result.final_dir) / PREPROCESSING_FILE).read_text())
    dataset = load_dataset(DatasetConfig(source="builtin", name="iris", split_seed=2))
    bunch, _, eval_rows = _raw("iris", split_seed=2)
    assert record["features"] == list(bunch.feature_names)
    assert record["label_names"] == ["setosa", "versicolor", "virginica"]
    assert np.array_equal(_apply_record(record, bunch.data[eval_rows]), dataset.eval.inputs)
