"""Engine configuration: frozen dataclasses with a JSON round-trip.

This is the only thing the Django side hands the engine. ``RunConfig.from_dict(cfg.to_dict()) == cfg``
holds for every valid config, so a Run's frozen JSON snapshot rebuilds exactly the config that ran.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MODEL_SOURCES = ("builtin", "config", "hf", "run", "derived", "server")
DATASET_SOURCES = ("builtin", "hf")
SCHEMES = ("offline", "online", "hard_labels", "multi_teacher", "seq_kd", "on_policy")
# classification: sequence / tabular classification; causal_lm: next-token prediction;
# embedding: sentence embeddings (the student learns the teacher's pooled embedding).
TASKS = ("classification", "causal_lm", "embedding")


@dataclass(frozen=True)
class ModelConfig:
    """Where a teacher or student comes from.

    - ``builtin``: ``name`` is a builtin torch net (``mlp``); ``params`` e.g. ``{"hidden_sizes": [256,
      256]}``.
    - ``config``: random init from a transformers config; ``params`` is the config dict (``model_type`` etc.).
    - ``hf``: ``name`` is a hub id, or ``path`` a local folder; ``revision`` optional.
    - ``run``: ``path`` is the ``final`` folder a run of this system wrote (builtin or transformers format).
    - ``derived``: built from ``parent`` (another model config): ``params`` says which layers to keep and
      optionally narrower widths; weights are copied from the parent where shapes allow.
    - ``server`` (teachers of causal LMs only): ``name`` is the model an inference server serves (vLLM,
      sglang: its ``/v1/models`` id), ``params["server"]`` the name of a server the admin configured
      (:mod:`.served_teacher`); its tokenizer must be the student's.
    """

    source: str
    name: str = ""
    path: str = ""
    revision: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    num_labels: int = 0
    trust_remote_code: bool = False
    parent: ModelConfig | None = None

    def describe(self) -> str:
        """How messages name the model: its hub id or name; a local folder by its name (``run 5`` for a run's
        model), never by an absolute path of the machine."""
        if self.name:
            return self.name
        if self.path:
            from .sources import describe_path

            return describe_path(self.path)
        return self.source


@dataclass(frozen=True)
class DatasetConfig:
    """A labelled classification dataset and how it is split.

    - ``builtin``: ``name`` is ``digits`` or ``bbc-news`` (packaged real data).
    - ``hf``: ``path`` is a local CSV / JSONL file, or ``name`` a hub dataset name.
    The eval split is a fixed, stratified fraction of the rows, drawn with ``split_seed``; or, when
    ``eval_path`` names a second local file (same columns), every row of ``path`` trains and every row of
    ``eval_path`` evaluates (``eval_fraction`` is then not used).
    """

    source: str
    name: str = ""
    path: str = ""
    text_column: str = "text"
    label_column: str = "label"
    eval_fraction: float = 0.2
    split_seed: int = 0
    max_length: int = 128
    labelled_fraction: float = 1.0
    # Which train rows keep their labels (``labelled_fraction`` < 1): drawn with ``split_seed`` alone (None:
    # the
    # same subset for every run), or also with this number (the run's seed, so each seed has its own subset).
    labelled_seed: int | None = None
    eval_path: str = ""
    # Causal LM: concatenate the texts (each ended by EOS) and cut the stream into max_length blocks, instead
    # of one row per text cut at max_length (nothing is thrown away and no position is padding).
    pack: bool = False


@dataclass(frozen=True)
class LossTermConfig:
    """One weighted term of a recipe, e.g. ``LossTermConfig("kd", 0.9, {"temperature": 4.0})``."""

    name: str
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    # Optional schedules over training progress for the weight or a numeric parameter, e.g.
    # {"weight": {"kind": "linear", "start": 0.0, "end": 1.0}, "temperature": {"kind": "cosine", ...}}.
    schedule: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 0
    lr_schedule: str = "linear"  # constant | linear | cosine (decay after warm-up)
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 100
    grad_accum_steps: int = 1
    # Early stopping on an eval metric (e.g. "accuracy"); off when empty or patience is 0. The metric is
    # measured on the validation slice (logged as ``val/<metric>``), never on the eval split the result
    # reports.
    early_stopping_metric: str = ""
    early_stopping_mode: str = "max"  # max | min
    early_stopping_patience: int = 0
    # With early stopping on: the saved and evaluated student is the best evaluated one, not the last.
    early_stopping_restore_best: bool = True
    # With early stopping on: this fraction of the train split's labelled rows (stratified by class, drawn
    # with the dataset's split_seed) is held out of training and used for every decision; the eval split is
    # only evaluated at the end, for the result. Unused (nothing held out) when early stopping is off.
    validation_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Resources: one run may span several ranks (torchrun). On CUDA a run has one rank per GPU (``gpus``);
    # a run without a GPU may still ask for several CPU ranks (``processes``, gloo), so the distributed path
    # runs anywhere. ``strategy``: auto (fsdp with several ranks) | ddp | fsdp (FSDP2 ``fully_shard`` per
    # block + root). ``precision``: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32.
    gpus: int = 1
    processes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    activation_checkpointing: bool = False
    # LoRA (workers.engine.adapters, through peft): ``lora_r`` 0 trains every weight (full fine-tuning), else
    # the rank of the adapters on ``lora_targets`` (comma-separated module names; empty: the attention
    # projections of the student's architecture). Transformers students only. ``lora_4bit``: QLoRA, the
    # frozen weights in 4 bits (bitsandbytes, CUDA only). The final model is the merged one.
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ""
    lora_4bit: bool = False


@dataclass(frozen=True)
class AllowedPaths:
    """The local files a run may read, set by the worker from its own settings (never from the stored config).

    ``model_roots``: folders local models and tokenizers may lie under; ``dataset_roots``: folders local
    dataset files may lie under; ``run_outputs``: the model folders of the ``run`` sources the worker resolved
    (runs of the same team); ``artifact_root``: the worker's artifact root, of which nothing else is read
    (whatever the roots say), and which messages call ``ARTIFACT_ROOT``; ``uploads``: the run's team upload
    folder inside it, where uploaded dataset files are read from. See :mod:`.sources`.
    ``teacher_servers``: the inference servers a ``server`` teacher may name, as ``name=base_url`` (their
    tokens stay in the worker's environment; :mod:`.served_teacher`).
    """

    model_roots: tuple[str, ...] = ()
    dataset_roots: tuple[str, ...] = ()
    run_outputs: tuple[str, ...] = ()
    artifact_root: str = ""
    uploads: str = ""
    teacher_servers: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AllowedPaths:
        data = _build(cls, data).__dict__
        return cls(
            **{
                k: tuple(str(p) for p in v) if isinstance(v, list | tuple) else str(v)
                for k, v in data.items()
            }
        )


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs. ``output_dir`` is generated by the caller, never taken from user input."""

    student: ModelConfig
    dataset: DatasetConfig
    terms: tuple[LossTermConfig, ...]
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: ModelConfig | None = None
    scheme: str = "offline"
    # Parameters of the scheme (see workers.engine.schemes), e.g. {"lmbda": 0.5} for on_policy.
    scheme_params: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"
    output_dir: str = ""
    evaluate_teacher: bool = True
    # Shared teacher-output cache root (several runs reuse one entry); empty: a folder inside output_dir.
    cache_dir: str = ""
    # multi_teacher: further teachers whose distributions are averaged with ``teacher``'s, and their weights
    # (``teacher`` first). Empty for the other schemes.
    extra_teachers: tuple[ModelConfig, ...] = ()
    teacher_weights: tuple[float, ...] = ()
    # Set by the worker from its own settings: where local files may be read from (see .sources). None: the
    # engine used as a library or from the CLI, where local paths are the caller's choice (hub ids are checked
    # always).
    allowed_paths: AllowedPaths | None = None
    # Set by the worker that owns the run (never taken from users). ``attempt``: the run's lease token; 0
    # outside the web app (the CLI), where a run resumes from the newest checkpoint on disk. With an attempt,
    # checkpoint and final-model folders carry it in their names, and the run resumes only from
    # ``resume_from``, the checkpoint its owner registered while it held the lease (empty: from the start).
    # ``keep_checkpoints``: how many of its newest checkpoints a run keeps on disk.
    attempt: int = 0
    resume_from: str = ""
    keep_checkpoints: int = 2

    # --- JSON round-trip -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["terms"] = [asdict(t) for t in self.terms]
        data["extra_teachers"] = [asdict(t) for t in self.extra_teachers]
        data["teacher_weights"] = list(self.teacher_weights)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = dict(data)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown run config keys: {', '.join(sorted(unknown))}")
        teacher = data.pop("teacher", None)
        allowed = data.pop("allowed_paths", None)
        return cls(
            student=_build_model(data.pop("student")),
            dataset=_build(DatasetConfig, data.pop("dataset")),
            terms=tuple(_build(LossTermConfig, t) for t in data.pop("terms", ())),
            train=_build(TrainConfig, data.pop("train", {})),
            teacher=_build_model(teacher) if teacher else None,
            extra_teachers=tuple(_build_model(t) for t in data.pop("extra_teachers", ())),
            teacher_weights=tuple(float(w) for w in data.pop("teacher_weights", ())),
            allowed_paths=AllowedPaths.from_dict(allowed) if allowed is not None else None,
            **data,
        )

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))

    @property
    def needs_teacher(self) -> bool:
        # seq_kd needs the teacher to write the continuations even when the recipe is ce alone.
        return self.scheme == "seq_kd" or (
            self.scheme != "hard_labels" and any(t.name != "ce" for t in self.terms)
        )


def _build_model(data: dict[str, Any] | ModelConfig) -> ModelConfig:
    if isinstance(data, ModelConfig):
        return data
    data = dict(data)
    parent = data.pop("parent", None)
    return _build(ModelConfig, {**data, "parent": _build_model(parent) if parent else None})


def _build(kind, data: dict[str, Any]):
    if isinstance(data, kind):
        return data
    allowed = {f.name for f in fields(kind)}
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"unknown {kind.__name__} keys: {', '.join(sorted(unknown))}")
    return kind(**data)
