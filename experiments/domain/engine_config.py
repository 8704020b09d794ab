"""Turn records into the engine's frozen config (a plain dict, stored on the Run and never edited).

Paths inside the frozen config are relative to ARTIFACT_ROOT where they point at this system's own outputs, so
a config stays valid when the artifact root moves; ``resolve_paths`` makes them absolute on the worker.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.conf import settings

from experiments.models import DatasetSpec, Experiment, ModelSpec, Recipe, Run

TRAIN_DEFAULTS: dict[str, Any] = {
    "max_steps": 500,
    "batch_size": 64,
    "lr": 1e-3,
    "weight_decay": 0.01,
    "warmup_steps": 0,
    "lr_schedule": "linear",
    "grad_clip": 1.0,
    "log_every": 10,
    "eval_every": 100,
    "save_every": 100,
    "labelled_fraction": 1.0,
    # Early stopping (off unless a metric and a patience are given) selects on a validation slice of this
    # fraction of the labelled train rows; the fraction is recorded in every frozen config.
    "early_stopping_patience": 0,
    "validation_fraction": 0.1,
    # Resources (workers.engine.config.TrainConfig): one rank per GPU on CUDA, ``processes`` gloo ranks on a
    # CPU; strategy auto = fsdp with several ranks; precision auto = bf16 on CUDA, fp32 on a CPU.
    "gpus": 1,
    "processes": 1,
    "strategy": "auto",
    "precision": "auto",
    "activation_checkpointing": False,
    # LoRA (workers.engine.adapters): lora_r 0 = full fine-tuning; empty targets = the attention projections.
    "lora_r": 0,
    "lora_alpha": 16.0,
    "lora_dropout": 0.0,
    "lora_targets": "",
    "lora_4bit": False,
}

HARD_LABELS_TERMS = [{"name": "ce", "weight": 1.0, "params": {}}]


TEACHER_CACHE_DIR = "teacher-cache"


# The logical path of a run's model in frozen configs (``run_output_config``); on disk it is the folder the
# run's model artifact names (``recorded_model_folder``).
RUN_OUTPUT_RE = re.compile(r"runs/(\d+)/final")


def run_output_dir(run_id: int) -> str:
    """Where a run writes (relative to ARTIFACT_ROOT). Generated from the id, never from input."""
    return f"runs/{run_id}"


def model_config(spec: ModelSpec) -> dict[str, Any]:
    base = {"source": spec.source, "num_labels": spec.num_labels}
    match spec.source:
        case ModelSpec.Source.BUILTIN:
            return {**base, "name": spec.builtin_arch, "params": dict(spec.config)}
        case ModelSpec.Source.CONFIG:
            return {**base, "params": dict(spec.config)}
        case ModelSpec.Source.HF:
            # Remote code runs only where the server allows it, whatever the record says.
            remote = bool(spec.config.get("trust_remote_code")) and settings.ALLOW_TRUST_REMOTE_CODE
            return {**base, "name": spec.hub_id, "path": spec.local_path, "revision": spec.revision,
                    **({"trust_remote_code": True} if remote else {})}
        case ModelSpec.Source.RUN:
            return {**base, "path": f"{run_output_dir(spec.source_run_id)}/final"}
        case ModelSpec.Source.DERIVED:
            return {**base, "parent": model_config(spec.parent), "params": dict(spec.config)}
        case ModelSpec.Source.SERVER:  # a configured server's name; its URL stays in the settings
            return {**base, "name": spec.hub_id, "params": {"server": spec.config.get("server", "")}}
    raise ValueError(f"model source {spec.source!r} cannot be trained yet")


def dataset_config(spec: DatasetSpec) -> dict[str, Any]:
    # An uploaded file is a local file to the engine: source "hf" with the stored path.
    uploaded = spec.source == DatasetSpec.Source.UPLOAD
    return {
        "source": "hf" if uploaded else spec.source,
        "name": spec.builtin_name or spec.hub_name,
        "path": spec.local_path,
        "text_column": spec.text_column,
        "label_column": spec.label_column,
        "eval_fraction": spec.eval_fraction,
        "split_seed": spec.split_seed,
        "max_length": spec.max_length,
        # Only when set, so the split keys of datasets without them (and their teacher evaluations) stay as
        # they were.
        **({"eval_path": spec.eval_local_path} if spec.eval_local_path else {}),
        **({"pack": True} if spec.pack else {}),
    }


def split_key(dataset_cfg: dict[str, Any]) -> str:
    """A stable hash of everything that decides which rows land in the eval split and how they are read.

    The labelled fraction (and the seed of a run's own labelled subset) only changes which train labels are
    used, so it does not change the key.
    """
    relevant = {k: v for k, v in dataset_cfg.items() if k not in ("labelled_fraction", "labelled_seed")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:32]


# Chained schemes are orchestrated as several runs; each of them trains with plain offline distillation.
_ENGINE_SCHEME = {Recipe.Scheme.SELF_DISTILLATION: "offline", Recipe.Scheme.TEACHER_ASSISTANT: "offline"}


def run_output_config(run: Run) -> dict[str, Any]:
    """The model a run produces, as a ``run``-sourced model config (usable before the run has finished)."""
    return {"source": ModelSpec.Source.RUN, "num_labels": run.student.num_labels,
            "path": f"{run_output_dir(run.id)}/final"}


def build_run_config(
    *,
    experiment: Experiment,
    student: ModelSpec,
    recipe: Recipe | None,
    seed: int,
    teacher: ModelSpec | None,
    teacher_run: Run | None = None,
    extra_teachers: Sequence[ModelSpec] = (),
    teacher_weights: Sequence[float] = (),
) -> dict[str, Any]:
    """The frozen config of one run. ``recipe=None`` means the automatic hard-label baseline; ``teacher_run``
    (chained recipes) makes that run's output the teacher instead of ``teacher``."""
    scheme = recipe.scheme if recipe else Recipe.Scheme.HARD_LABELS
    terms = recipe.terms if recipe else HARD_LABELS_TERMS
    uses_teacher = scheme != Recipe.Scheme.HARD_LABELS and any(t["name"] != "ce" for t in terms)
    train = {**TRAIN_DEFAULTS, **experiment.train, "seed": seed}
    # Every run of the experiment, the hard-label baseline included, sees the same labelled rows.
    dataset = {**dataset_config(experiment.dataset), "labelled_fraction": train.pop("labelled_fraction")}
    if train.pop("vary_labelled_subset", False) and dataset["labelled_fraction"] < 1:
        # Each seed draws its own labelled subset (its baseline shares it), so the spread over seeds includes
        # the choice of labelled rows.
        dataset["labelled_seed"] = seed
    if train.get("early_stopping_metric"):
        from experiments.domain.validation import EARLY_STOPPING_METRICS

        modes = EARLY_STOPPING_METRICS.get(experiment.dataset.task, {})
        train["early_stopping_mode"] = modes.get(train["early_stopping_metric"], "max")
    if not uses_teacher:
        teacher_cfg = None
    elif teacher_run is not None:
        teacher_cfg = run_output_config(teacher_run)
    else:
        teacher_cfg = model_config(teacher) if teacher else None
    config = {
        "student": model_config(student),
        "teacher": teacher_cfg,
        "dataset": dataset,
        "terms": [
            {"name": t["name"], "weight": float(t.get("weight", 1.0)), "params": dict(t.get("params", {})),
             **({"schedule": dict(t["schedule"])} if t.get("schedule") else {})}
            for t in terms
        ],
        "scheme": _ENGINE_SCHEME.get(scheme, scheme),
        "task": experiment.dataset.task,
        "train": train,
    }
    if recipe and recipe.scheme_params and scheme not in _ENGINE_SCHEME:
        config["scheme_params"] = dict(recipe.scheme_params)
    if scheme == Recipe.Scheme.MULTI_TEACHER and uses_teacher:
        config["extra_teachers"] = [model_config(t) for t in extra_teachers]
        config["teacher_weights"] = [float(w) for w in teacher_weights]
    return config


def run_resources(config: dict[str, Any], *, on_gpu: bool | None) -> dict[str, Any]:
    """A frozen config's resources as the run page shows them: world size (``gpus`` ranks on a GPU,
    ``processes`` on a CPU), strategy and precision with ``auto`` resolved as the engine resolves it, and
    activation checkpointing. ``on_gpu``: where the run trains, None when its queue does not say (then both
    world sizes are given). Configs frozen before the resources existed read as their defaults."""
    train = {**{k: TRAIN_DEFAULTS[k] for k in ("gpus", "processes", "strategy", "precision",
                                               "activation_checkpointing")}, **(config.get("train") or {})}
    if str(train.get("device") or "auto") == "cpu":
        on_gpu = False
    gpus, processes = int(train["gpus"]), int(train["processes"])
    ranks: int | None
    if on_gpu is None and gpus != processes:
        world = f"{gpus} on GPUs ({gpus} GPUs), {processes} on a CPU ({processes} CPU processes)"
        ranks = None
    elif on_gpu is None:
        world, ranks = str(gpus), gpus
    else:
        ranks = gpus if on_gpu else processes
        world = f"{ranks} ({ranks} GPU{'s' if ranks != 1 else ''})" if on_gpu else \
            f"{ranks} ({ranks} CPU process{'es' if ranks != 1 else ''})"
    strategy = train["strategy"]
    if ranks == 1:
        strategy_text = f"{strategy}: one rank, trained as a single process"
    elif strategy == "auto":
        strategy_text = "fsdp (auto)" if ranks else "auto (fsdp with several ranks)"
    else:
        strategy_text = str(strategy)
    precision = train["precision"]
    if precision != "auto":
        precision_text = str(precision)
    elif on_gpu is None:
        precision_text = "auto (bf16 on a GPU, fp32 on a CPU)"
    else:
        precision_text = "auto (bf16 on its GPU)" if on_gpu else "auto (fp32 on a CPU)"
    return {
        "world_size": world,
        "strategy": strategy_text,
        "precision": precision_text,
        "activation_checkpointing": "on" if train["activation_checkpointing"] else "off",
    }


def _run_models(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Every model config inside a run config, nested parents of derived models included."""
    found = []
    stack = [config.get("student"), config.get("teacher"), *config.get("extra_teachers", [])]
    while stack:
        model = stack.pop()
        if model:
            found.append(model)
            stack.append(model.get("parent"))
    return found


def recorded_model_folder(path: str) -> str:
    """The folder a ``run`` model's logical path (``runs/<id>/final``) names on disk: the final model its run
    recorded (written by the attempt that owned the run: ``runs/<id>/final-a<attempt>``), else the path
    itself."""
    from experiments.models import Artifact

    match = RUN_OUTPUT_RE.fullmatch(path)
    if match is None:
        return path
    recorded = (Artifact.objects.filter(run_id=int(match[1]), kind=Artifact.Kind.MODEL)
                .order_by("-created_at", "-id").values_list("path", flat=True).first())
    return recorded or path


def resolve_paths(config: dict[str, Any], *, run: Run, artifact_root: Path) -> dict[str, Any]:
    """Return a copy of the frozen config with this system's relative paths made absolute, and the run's
    ownership for the engine: the attempt (its lease token) and the checkpoint its owner registered last."""
    resolved = json.loads(json.dumps(config))
    run_models = [m for m in _run_models(resolved) if m.get("source") == ModelSpec.Source.RUN]
    on_disk = {str(m.get("path") or ""): recorded_model_folder(str(m.get("path") or "")) for m in run_models}
    allowed = allowed_paths(on_disk, run=run, artifact_root=artifact_root)
    for model in run_models:
        model["path"] = str(artifact_root / on_disk[str(model.get("path") or "")])
    resolved["output_dir"] = str(artifact_root / run_output_dir(run.id))
    resolved["cache_dir"] = str(artifact_root / TEACHER_CACHE_DIR)
    resolved["attempt"] = run.attempt
    resolved["resume_from"] = str(artifact_root / run.checkpoint_path) if run.checkpoint_path else ""
    resolved["keep_checkpoints"] = settings.RUN_KEEP_CHECKPOINTS
    resolved["allowed_paths"] = allowed
    return resolved


def allowed_paths(run_outputs: dict[str, str], *, run: Run, artifact_root: Path) -> dict[str, Any]:
    """What the engine may read for ``run`` (``workers.engine.config.AllowedPaths``), from this process's
    settings and never from the stored config: the model and dataset roots, the teacher servers
    (``name=base_url``), the run's team upload folder, and the model folders of the config's ``run`` sources
    (``run_outputs``: logical path → folder on disk) that are runs of the run's team (the engine refuses any
    other)."""
    from experiments.domain.uploads import upload_dir

    wanted = {
        int(m[1]): folder for path, folder in run_outputs.items() if (m := RUN_OUTPUT_RE.fullmatch(path))
    }
    same_team = set(Run.objects.filter(pk__in=wanted, team_id=run.team_id).values_list("pk", flat=True))
    uploads = Path(artifact_root) / upload_dir().relative_to(settings.ARTIFACT_ROOT) / str(run.team_id)
    return {
        "model_roots": [str(p) for p in settings.MODEL_ROOTS],
        "dataset_roots": [str(p) for p in settings.DATASET_ROOTS],
        "run_outputs": [str(artifact_root / wanted[pk]) for pk in sorted(same_team)],
        "artifact_root": str(artifact_root),
        "uploads": str(uploads),
        "teacher_servers": [f"{name}={url}" for name, url in settings.TEACHER_SERVERS.items()],
    }


def public_message(text: str) -> str:
    """``text`` as users may see it: the artifact, model and dataset roots by name (``ARTIFACT_ROOT/runs/5``),
    any other absolute path of the machine by its last part only (``workers.engine.sources.redact_paths``)."""
    from workers.engine.sources import redact_paths

    labels = [
        ("ARTIFACT_ROOT", settings.ARTIFACT_ROOT),
        *(("MODEL_ROOT", root) for root in settings.MODEL_ROOTS),
        *(("DATASET_ROOT", root) for root in settings.DATASET_ROOTS),
    ]
    return redact_paths(text, labels)
