"""Seeded splits of a dataset's rows: train/eval, labelled subsets, and the slices cut from them.

Classification rows are split stratified by class (:func:`stratified_split`, :func:`stratified_subset`), text
rows at random (:func:`random_split`); the validation slice that early stopping holds out of the train split
(:func:`.run_setup.validation_rows`) is cut the same ways. Every split is a pure function of its seed, so a
run and its resumption, or two runs of one experiment, see the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_split(labels: np.ndarray, eval_fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of row ids.

    Each class contributes ``round(n_c · eval_fraction)`` rows to eval (at least one when the class has two or
    more rows), drawn with ``seed``.

    Args:
        labels: (N,) class ids.
    Returns:
        (train_rows, eval_rows): sorted int64 row ids.
    """
    rng = np.random.default_rng(seed)
    eval_rows = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        n_eval = round(len(rows) * eval_fraction)
        if len(rows) >= 2:
            n_eval = min(max(n_eval, 1), len(rows) - 1)
        eval_rows.append(rng.permutation(rows)[:n_eval])
    eval_sorted = np.sort(np.concatenate(eval_rows)).astype(np.int64)
    train_rows = np.setdiff1d(np.arange(len(labels)), eval_sorted).astype(np.int64)
    return train_rows, eval_sorted


def stratified_subset(labels: np.ndarray, fraction: float, *, seed: int | Sequence[int]) -> np.ndarray:
    """Sorted row ids of a stratified ``fraction`` of the rows (at least one row per class)."""
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        keep.append(rng.permutation(rows)[: max(1, round(len(rows) * fraction))])
    return np.sort(np.concatenate(keep)).astype(np.int64)


def random_split(num_rows: int, eval_fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic random split of ``num_rows`` row ids (no labels to stratify by).

    Returns:
        (train_rows, eval_rows): sorted int64 row ids; each side gets at least one row when ``num_rows >= 2``.
    """
    n_eval = min(max(round(num_rows * eval_fraction), 1), num_rows - 1)
    eval_rows = np.sort(np.random.default_rng(seed).permutation(num_rows)[:n_eval]).astype(np.int64)
    return np.setdiff1d(np.arange(num_rows), eval_rows).astype(np.int64), eval_rows
