"""Downloads: a finished student as a zipped Hugging Face folder with a generated model card, and leaderboards
as CSV.

A model export reads only the folder the run's ``model`` Artifact record names, resolved under ARTIFACT_ROOT
after following symlinks; a folder (or any file in it) that resolves outside the root is refused. The zip is
built while it streams (``zipfile`` writing into the response), so nothing of the model's size is buffered or
written to disk.

Builtin nets (the MLPs for tabular data) are exported too: they are not transformers models, so the zip holds
their ``model.safetensors``, the ``distillweb_model.json`` that describes the architecture, the
``preprocessing.json`` the engine wrote beside them (feature order, the scaling statistics, label order), and
a card that states that preprocessing and shows how to rebuild the net and prepare raw rows in plain PyTorch.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.utils.text import slugify

from experiments.models import Evaluation, ModelSpec, Run
from experiments.selectors import footprint, leaderboard, records
from experiments.selectors import teacher_stores as store_reads

logger = logging.getLogger(__name__)

# Written next to the student by the engine (workers.engine.models / trainer); not imported from there so this
# module does not pull torch into the web process.
ENGINE_METADATA_FILE = "distillweb_model.json"
# How raw tabular rows become a builtin net's inputs (workers.engine.data.write_preprocessing).
PREPROCESSING_FILE = "preprocessing.json"
# Projection heads some loss terms train beside the student: training state, not part of the model.
TRAINING_ONLY_FILES = frozenset({"term_modules.safetensors"})
CHUNK_BYTES = 1 << 20
# Compressing weights costs CPU for almost nothing; text files (configs, vocabularies, the card) shrink well.
STORED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx")


class ExportRefused(Exception):
    """The run's model cannot be exported; the message says why and is shown to the user."""


@dataclass(frozen=True)
class ModelExport:
    """A checked export: the files to zip (absolute path, name inside the zip) and the model card."""

    run: Run
    root_name: str
    files: list[tuple[Path, str]]
    card: str
    format: str

    @property
    def filename(self) -> str:
        return f"{self.root_name}.zip"


def _artifact_root() -> Path:
    return Path(settings.ARTIFACT_ROOT).resolve()


def resolve_artifact_folder(relative: str) -> Path:
    """The folder an Artifact record names, resolved (symlinks followed) and required to lie under
    ARTIFACT_ROOT."""
    root = _artifact_root()
    folder = (root / relative).resolve()
    if not folder.is_relative_to(root) or folder == root:
        logger.warning("refused to export %r: it resolves outside ARTIFACT_ROOT (%s)", relative, folder)
        raise ExportRefused(
            "The model's recorded location is outside the artifact storage, so it is not served."
        )
    if not folder.is_dir():
        raise ExportRefused(
            "The model's folder is no longer in the artifact storage (it was moved or deleted)."
        )
    return folder


def _model_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (links followed only when their target stays under ARTIFACT_ROOT)."""
    root = _artifact_root()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in sorted(dirnames):
            if (Path(dirpath) / name).is_symlink():
                raise ExportRefused("The model's folder contains a linked folder; it is not exported.")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not path.resolve().is_relative_to(root):
                logger.warning("refused to export %s: it links outside ARTIFACT_ROOT", path)
                raise ExportRefused("The model's folder links to a file outside the artifact storage; it is "
                                    "not exported.")
            if path.relative_to(folder).as_posix() not in TRAINING_ONLY_FILES:
                files.append(path)
    return sorted(files)


def _read_json_dict(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_engine_metadata(folder: Path) -> dict[str, Any]:
    return _read_json_dict(folder / ENGINE_METADATA_FILE)


def read_preprocessing(folder: Path) -> dict[str, Any] | None:
    """The ``preprocessing.json`` of a builtin net's folder, or None when there is none or it is not a
    well-formed record (a feature name, mean and std for every feature)."""
    record = _read_json_dict(folder / PREPROCESSING_FILE)
    features, mean, std = record.get("features"), record.get("mean"), record.get("std")
    lists = all(isinstance(v, list) for v in (features, mean, std))
    if not lists or not features or not len(features) == len(mean) == len(std):
        return None
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (*mean, *std))
    return record if numbers else None


def model_export(*, run: Run) -> ModelExport:
    """Check that ``run`` has a finished student to export and describe the zip.

    Raises:
        ExportRefused: the run has not succeeded, recorded no final model, or its folder is missing, outside
            ARTIFACT_ROOT or holds no weights.
    """
    if run.status != Run.Status.SUCCEEDED:
        raise ExportRefused(f"Run #{run.pk} is {run.status}: only the student of a succeeded run can be "
                            f"downloaded.")
    artifact = records.run_model_artifact(run=run)
    if artifact is None:
        raise ExportRefused(f"Run #{run.pk} recorded no final model, so there is nothing to download.")
    folder = resolve_artifact_folder(artifact.path)
    paths = _model_files(folder)
    if not any(p.suffix == ".safetensors" for p in paths):
        raise ExportRefused(f"Run #{run.pk}'s model folder holds no safetensors weights.")
    meta = _read_engine_metadata(folder)
    fmt = "builtin" if meta.get("format") == "builtin" else "transformers"
    preprocessing = read_preprocessing(folder) if fmt == "builtin" else None
    root_name = f"{slugify(run.student.name)[:60] or 'student'}-run{run.pk}"
    evaluations = records.run_evaluations(run=run)
    student = next((e for e in evaluations if e.role == Evaluation.Role.STUDENT), None)
    teacher = next((e for e in evaluations if e.role == Evaluation.Role.TEACHER), None)
    baseline = None if run.is_baseline else records.run_baseline_evaluation(run=run)
    card = model_card(run=run, fmt=fmt, meta=meta, folder_name=root_name, student=student, teacher=teacher,
                      baseline=baseline, preprocessing=preprocessing)
    files = [(p, f"{root_name}/{p.relative_to(folder).as_posix()}") for p in paths
             if p.relative_to(folder).as_posix() != "README.md"]
    return ModelExport(run=run, root_name=root_name, files=files, card=card, format=fmt)


class _Sink:
    """A write-only stream: zipfile writes into it, the generator takes the bytes out after each write.

    It has no ``tell``/``seek``, so zipfile writes sizes after each member (data descriptors) instead of
    seeking back, which is what lets the archive stream.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered beyond what ``take`` returns."""

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


def model_export_stream(export: ModelExport) -> Iterator[bytes]:
    """The zip of ``export``, produced chunk by chunk: the model files, then ``README.md`` (the card)."""
    root = _artifact_root()
    sink = _Sink()
    with zipfile.ZipFile(sink, mode="w", allowZip64=True) as archive:  # type: ignore[arg-type]
        for path, name in export.files:
            resolved = path.resolve()
            if not resolved.is_relative_to(root):  # changed since the export was checked
                raise ExportRefused(f"{name} now points outside the artifact storage.")
            info = zipfile.ZipInfo.from_file(resolved, name)
            info.compress_type = (
                zipfile.ZIP_STORED if name.endswith(STORED_SUFFIXES) else zipfile.ZIP_DEFLATED
            )
            with resolved.open("rb") as source, archive.open(info, mode="w", force_zip64=True) as target:
                while chunk := source.read(CHUNK_BYTES):
                    target.write(chunk)
                    if data := sink.take():
                        yield data
            if data := sink.take():  # the member's data descriptor
                yield data
        archive.writestr(f"{export.root_name}/README.md", export.card, compress_type=zipfile.ZIP_DEFLATED)
    yield sink.take()  # the card and the central directory


# --- the model card -------------------------------------------------------------------------------------
PIPELINE_TAGS = {"classification": "text-classification", "causal_lm": "text-generation",
                 "embedding": "sentence-similarity"}


def _md(value: Any) -> str:
    """Text for a Markdown table cell or line: one line, pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _number(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _md(json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _describe_model(spec: ModelSpec | None, config: dict[str, Any] | None) -> str:
    if spec is None:
        return "none"
    source = {
        ModelSpec.Source.HF: f"Hugging Face `{spec.hub_id}`"
        if spec.hub_id
        else "a local transformers folder",
        ModelSpec.Source.CONFIG: f"a randomly initialised `{(spec.config or {}).get('model_type', '?')}` "
                                 "config",
        ModelSpec.Source.DERIVED: f"derived from {spec.parent}" if spec.parent_id else "derived",
        ModelSpec.Source.BUILTIN: f"builtin `{spec.builtin_arch}` net",
        ModelSpec.Source.RUN: f"trained by distillweb run #{spec.source_run_id}",
    }.get(spec.source, spec.source)
    revision = (
        f" (revision `{spec.revision}`)" if spec.source == ModelSpec.Source.HF and spec.revision else ""
    )
    params = f", {spec.param_count:,} parameters" if spec.param_count else ""
    detail = ""
    if config and config.get("params"):
        detail = f"; settings `{_md(json.dumps(config['params'], sort_keys=True))}`"
    return f"**{_md(spec.name)}** — {source}{revision}{params}{detail}"


def _terms_table(terms: Iterable[dict[str, Any]]) -> list[str]:
    lines = ["| term | weight | parameters | schedule |", "|---|---|---|---|"]
    for term in terms:
        params = ", ".join(f"{k}={_number(v)}" for k, v in sorted((term.get("params") or {}).items())) or "—"
        schedule = _md(json.dumps(term["schedule"], sort_keys=True)) if term.get("schedule") else "—"
        lines.append(f"| `{_md(term.get('name', '?'))}` | {_number(term.get('weight', 1.0))} | {params} | "
                     f"{schedule} |")
    return lines


def _metrics_table(student: Evaluation | None, teacher: Evaluation | None) -> list[str]:
    s_metrics = dict(student.metrics or {}) if student else {}
    t_metrics = dict(teacher.metrics or {}) if teacher else {}
    names = [n for n in leaderboard.QUALITY_METRICS if n in s_metrics or n in t_metrics]
    names += sorted(n for n in {*s_metrics, *t_metrics} if n not in leaderboard.QUALITY_METRICS)
    if not names:
        return ["No evaluation was recorded."]
    lines = ["| metric | student | teacher |", "|---|---|---|"]
    for name in names:
        cells = [_number(m[name]) if name in m else "—" for m in (s_metrics, t_metrics)]
        lines.append(f"| {_md(name)} | {cells[0]} | {cells[1]} |")
    return lines


def _comparison_lines(run: Run, metric: leaderboard.PrimaryMetric, student: Evaluation | None,
                      teacher: Evaluation | None, baseline: Evaluation | None) -> list[str]:
    value = leaderboard.metric_value(student, metric) if student else None
    lines = []
    if value is None:
        return lines
    teacher_value = leaderboard.metric_value(teacher, metric) if teacher else None
    if value and teacher_value:
        retention = value / teacher_value if metric.higher_is_better else teacher_value / value
        lines.append(f"- **Retention**: {100 * retention:.1f}% of the teacher's {metric.label.lower()} "
                     f"({_number(value)} vs {_number(teacher_value)}).")
    base_value = leaderboard.metric_value(baseline, metric) if baseline else None
    if base_value is not None:
        gain = (value - base_value) * (1 if metric.higher_is_better else -1)
        shown = f"{100 * gain:+.2f} percentage points" if metric.percent else f"{gain:+.4g}"
        lines.append(
            f"- **KD gain**: {shown} of {metric.label.lower()} over the same student trained on hard "
            f"labels with the same seed (run #{baseline.run_id}: {_number(base_value)})."
        )
    elif not run.is_baseline:
        lines.append("- **KD gain**: unknown (no finished hard-label baseline of this student and seed).")
    return lines


def _exact(value: Any) -> str:
    """A number as the shortest text that reads back as the same float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _md(value)
    return repr(float(value))


def _preprocessing_lines(record: dict[str, Any] | None, meta: dict[str, Any]) -> list[str]:
    """The card's statement of how raw rows become a builtin net's inputs, from the engine's record."""
    if record is None:
        return [
            "This model was saved without a record of its input preprocessing, so the exact scaling "
            "statistics are not known; retrain it to get a `preprocessing.json`.",
        ]
    features, mean, std = record["features"], record["mean"], record["std"]
    if record.get("method") == "scale":
        divisor = f"{_exact(std[0])} for every feature" if len(set(std)) == 1 else "the std column below"
        how = f"every feature is divided by a fixed number, not by data statistics: {divisor}, with mean 0"
    else:
        how = ("features are standardised with the mean and standard deviation (population, ddof 0) of "
               f"the {_md(record.get('fitted_on', 'train split'))}; a constant feature's std is 1")
    lines = [
        f"The net reads {len(features)} features, in exactly the order below; {how}. Each raw value `x` "
        "becomes `float32((x - mean) / std)`, computed in float64 and then cast to float32. The same numbers "
        f"are in `{PREPROCESSING_FILE}` (keys `features`, `mean`, `std`, `label_names`)."
        + (f" Raw rows as read from {_md(record['raw_source'])}." if record.get("raw_source") else ""),
        "",
        "| # | feature | mean | std |",
        "|---|---|---|---|",
        *(f"| {i} | {_md(f)} | {_exact(m)} | {_exact(d)} |" for i, (f, m, d) in
          enumerate(zip(features, mean, std, strict=True))),
    ]
    labels = record.get("label_names") or meta.get("label_names") or []
    if labels:
        order = ", ".join(f"{i} = {_md(n)}" for i, n in enumerate(labels))
        lines += ["", f"The output is one logit per label, in this order: {order}."]
    return lines


def _builtin_usage(path: str, preprocessing: dict[str, Any] | None) -> list[str]:
    prepare = [
        "",
        f'prep = json.load(open(f"{{folder}}/{PREPROCESSING_FILE}"))',
        'mean = torch.tensor(prep["mean"], dtype=torch.float64)',
        'std = torch.tensor(prep["std"], dtype=torch.float64)',
        "",
        "",
        "def prepare(rows):",
        '    """Raw feature rows, each in the order of prep["features"] -> the float32 inputs of the net."""',
        "    return ((torch.as_tensor(rows, dtype=torch.float64) - mean) / std).float()",
        "",
        "",
        "# with torch.no_grad():",
        "#     predicted = [prep[\"label_names\"][i] for i in net(prepare(rows)).argmax(-1).tolist()]",
    ] if preprocessing else [
        "# logits = net(features)  "
        "# features: (batch, input_dim) float32, prepared as distillweb prepares them",
    ]
    return [
        "This is a builtin distillweb net (an MLP over numeric features), not a transformers model. "
        "Rebuild it in PyTorch from `distillweb_model.json`, load the weights"
        + (", and prepare raw rows with `preprocessing.json`:" if preprocessing else ":"),
        "",
        "```python",
        "import json",
        "",
        "import torch",
        "from safetensors.torch import load_file",
        "",
        f'folder = "{path}"',
        'meta = json.load(open(f"{folder}/distillweb_model.json"))',
        'layers, width = [], meta["input_dim"]',
        'for size in meta["params"]["hidden_sizes"]:',
        "    layers += [torch.nn.Linear(width, size), torch.nn.ReLU(), "
        'torch.nn.Dropout(meta["params"].get("dropout", 0.0))]',
        "    width = size",
        'layers.append(torch.nn.Linear(width, meta["num_labels"]))',
        "net = torch.nn.Sequential(*layers)",
        'weights = load_file(f"{folder}/model.safetensors")',
        'net.load_state_dict({k.removeprefix("net."): v for k, v in weights.items()})',
        "net.eval()",
        *prepare,
        "```",
    ]


def _usage(fmt: str, task: str, folder_name: str, meta: dict[str, Any], max_length: int | None,
           preprocessing: dict[str, Any] | None = None) -> list[str]:
    path = f"./{folder_name}"
    if fmt == "builtin":
        return _builtin_usage(path, preprocessing)
    limit = f", truncation=True, max_length={max_length}" if max_length else ""
    if task == "causal_lm":
        body = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{path}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{path}")',
            'inputs = tokenizer("Once upon a time", return_tensors="pt")',
            "output = model.generate(**inputs, max_new_tokens=40)",
            "print(tokenizer.decode(output[0], skip_special_tokens=True))",
        ]
    elif task == "embedding":
        normalize = bool(meta.get("normalize"))
        body = [
            "import torch",
            "from transformers import AutoModel, AutoTokenizer",
            "",
            f'model = AutoModel.from_pretrained("{path}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{path}")',
            f'batch = tokenizer(["a sentence", "another one"], padding=True, return_tensors="pt"{limit})',
            "with torch.no_grad():",
            "    hidden = model(**batch).last_hidden_state",
            'mask = batch["attention_mask"].unsqueeze(-1).float()',
            "embeddings = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)  # mean pooling, as trained",
        ] + (["embeddings = torch.nn.functional.normalize(embeddings, dim=-1)"] if normalize else [])
    else:
        body = [
            "import torch",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            "",
            f'model = AutoModelForSequenceClassification.from_pretrained("{path}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{path}")',
            f'batch = tokenizer(["some text to classify"], padding=True, return_tensors="pt"{limit})',
            "with torch.no_grad():",
            "    predicted = model(**batch).logits.argmax(-1).item()",
            "print(model.config.id2label.get(predicted, predicted))",
        ]
    return ["Load it with transformers:", "", "```python", *body, "```"]


def _store_lines(run: Run) -> list[str]:
    """The teacher-output stores the run read: what they hold and whether the run filled or reused them."""
    return [f"- Teacher outputs ({_md(use.split)} split): {_md(store_reads.use_label(use))}, "
            f"{'computed by this run' if use.filled else 'reused from an earlier run'} (store "
            f"`{use.key[:12]}`)" for use in store_reads.run_store_uses(run=run)]


def model_card(*, run: Run, fmt: str, meta: dict[str, Any], folder_name: str, student: Evaluation | None,
               teacher: Evaluation | None, baseline: Evaluation | None,
               preprocessing: dict[str, Any] | None = None) -> str:
    """The README.md of an exported student: where it comes from (teacher, data, recipe, training settings),
    how well it does next to its teacher, how a builtin net's inputs are prepared, and how to load it."""
    config = run.config or {}
    experiment, dataset = run.experiment, run.experiment.dataset
    task = config.get("task") or dataset.task
    metric = leaderboard.primary_metric(dataset)
    data_cfg = config.get("dataset") or {}
    train = config.get("train") or {}
    recipe = run.recipe
    tags = ["distillweb", "knowledge-distillation"] + ([] if fmt == "builtin" else [task])
    front = ["---"]
    if fmt != "builtin":
        front.append("library_name: transformers")
        if task in PIPELINE_TAGS:
            front.append(f"pipeline_tag: {PIPELINE_TAGS[task]}")
    front += ["tags:", *(f"- {t}" for t in tags), "---", ""]
    what = "Hard-label baseline" if run.is_baseline else "Distilled student"
    title = f"# {_md(run.student.name)} — {what.lower()} on {_md(dataset.name)}"
    if run.teacher_id and not run.is_baseline:
        title = f"# {_md(run.student.name)} distilled from {_md(run.teacher.name)} on {_md(dataset.name)}"
    finished = run.finished_at.strftime("%Y-%m-%d %H:%M UTC") if run.finished_at else "—"
    lines = [
        *front, title, "",
        f"{what} produced by distillweb run #{run.pk} (experiment \"{_md(experiment.name)}\", team "
        f"{_md(run.team.name)}, seed {run.seed}{', stage ' + _md(run.stage) if run.stage else ''}), finished "
        f"{finished}.", "",
        "## Models", "",
        f"- Student: {_describe_model(run.student, config.get('student'))}",
        f"- Teacher: {_describe_model(run.teacher, config.get('teacher'))}",
    ]
    if adapter := footprint.adapter_text(train):
        lines.insert(-1, f"- Adapter: {adapter} into these weights (a plain transformers model; the "
                         "adapter alone, when the run saved it, is under `adapter/`)")
    if config.get("extra_teachers"):
        weights = ", ".join(_number(w) for w in config.get("teacher_weights") or [])
        lines.append(f"- Extra teachers: {len(config['extra_teachers'])} (weights {weights or 'equal'})")
    lines += _store_lines(run)
    source_name = f": `{_md(data_cfg['name'])}`" if data_cfg.get("name") else ""
    eval_fraction = float(data_cfg.get("eval_fraction", dataset.eval_fraction))
    labelled = data_cfg.get("labelled_fraction")
    lines += [
        "", "## Data", "",
        f"- Dataset: **{_md(dataset.name)}** ({_md(dataset.get_source_display())}{source_name}), task {task}",
        f"- Eval split: {100 * eval_fraction:g}% of the rows, split seed "
        f"{data_cfg.get('split_seed', dataset.split_seed)}, max length "
        f"{data_cfg.get('max_length', dataset.max_length)}"
        + (f", labelled fraction {_number(labelled)}" if labelled is not None else ""),
    ]
    if dataset.label_names:
        lines.append(f"- Labels: {_md(', '.join(str(n) for n in dataset.label_names[:50]))}"
                     + (" …" if len(dataset.label_names) > 50 else ""))
    lines += [
        "",
        "## Recipe",
        "",
        f"- **{_md(recipe)}**: `{_md(recipe.formula)}`"
        + (f" — {_md(recipe.description)}" if recipe.description else ""),
        f"- Scheme: `{_md(config.get('scheme', recipe.scheme))}`"
        + (
            f" (recipe scheme `{recipe.scheme}`)"
            if recipe.scheme != config.get("scheme", recipe.scheme)
            else ""
        )
        + (
            f", scheme parameters `{_md(json.dumps(config['scheme_params'], sort_keys=True))}`"
            if config.get("scheme_params")
            else ""
        ),
        "",
        "Loss terms, exactly as trained:",
        "",
        *_terms_table(config.get("terms") or recipe.terms),
        "",
        "## Training settings",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {_md(k)} | {_number(v)} |" for k, v in sorted(train.items())),
    ]
    result = run.result or {}
    if result.get("steps") is not None:
        lines += [
            "",
            f"Trained {result['steps']:,} steps"
            + (
                f" in {result['train_seconds']:.0f} s"
                if isinstance(result.get("train_seconds"), int | float)
                else ""
            )
            + (" (stopped early)" if result.get("stopped_early") else "")
            + (
                f"; the saved weights are those of step {result['best_step']}"
                if result.get("restored_best")
                else ""
            )
            + ".",
        ]
    if train.get("early_stopping_metric") and train.get("early_stopping_patience"):
        lines += ["", f"Early stopping watched {_md(train['early_stopping_metric'])} on a validation slice "
                      f"({100 * float(train.get('validation_fraction', 0.1)):g}% of the labelled train rows, "
                      "held out of training); the eval split below was used for no decision."]
    lines += ["", "## Results on the eval split", "", *_metrics_table(student, teacher), ""]
    lines += _comparison_lines(run, metric, student, teacher, baseline)
    if fmt == "builtin":
        lines += ["", "## Input preprocessing", "", *_preprocessing_lines(preprocessing, meta)]
    usage = _usage(fmt, task, folder_name, meta, data_cfg.get("max_length"), preprocessing)
    lines += ["", "## How to use", "", *usage, ""]
    return "\n".join(lines)


# --- leaderboard CSV ------------------------------------------------------------------------------------
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A CSV cell that a spreadsheet will not run as a formula: text starting with = + - @ (or a tab /
    carriage return) gets a leading apostrophe. Numbers are written as numbers (a negative KD gain stays
    numeric)."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


LEADERBOARD_CSV_HEADER = [
    "rank",
    "student",
    "family",
    "recipe",
    "baseline",
    "stage",
    "sweep",
    "adapter",
    "experiment",
    "team",
    "teacher",
    "metric",
    "higher_is_better",
    "mean",
    "std",
    "seeds",
    "teacher_score",
    "retention",
    "kd_gain",
    "kd_gain_std",
    "params",
    "compression",
    "latency_ms",
    "speedup",
    "pareto",
    "run_ids",
    "config_urls",
]


def leaderboard_csv_lines(rows: Iterable[leaderboard.LeaderboardRow], *, metric: leaderboard.PrimaryMetric,
                          config_url: Callable[[int], str]) -> Iterator[list[Any]]:
    """The header, then one list of cells per leaderboard row (escaped with :func:`csv_safe`); ``config_url``
    turns a run id into the address of its frozen config. ``adapter`` is the row's LoRA label as the page
    shows it ("LoRA r=8, merged", "LoRA r=16, 4-bit, merged"; empty for full fine-tuning)."""
    yield LEADERBOARD_CSV_HEADER
    for r in rows:
        yield [
            csv_safe(v)
            for v in (
                r.rank,
                r.student.name,
                r.family,
                str(r.recipe),
                r.is_baseline,
                r.stage,
                r.sweep,
                r.adapter,
                r.experiment.name,
                r.experiment.team.name,
                r.teacher.name if r.teacher else "",
                metric.name,
                metric.higher_is_better,
                r.mean,
                r.std,
                r.seeds,
                r.teacher_accuracy,
                r.retention,
                r.kd_gain,
                r.kd_gain_std,
                r.params,
                r.compression,
                r.latency_ms,
                r.speedup,
                r.pareto,
                " ".join(str(i) for i in r.run_ids),
                " ".join(config_url(i) for i in r.run_ids),
            )
        ]
