"""Where a run may read models and data from. Pure Python: no torch, no Django.

Two kinds of names reach a run, and they never stand in for each other:

- **hub identifiers** (a model or tokenizer id, a dataset name, a dataset config name, a revision) follow the
  Hugging Face hub's id syntax and are handed to the hub loaders only. A value that fails the syntax (an
  absolute or relative path, ``~``, a URL such as ``file://``, a URL-encoded ``%2e%2e%2f``) is not a hub id;
  neither is one that names a file or folder that exists where the worker runs (transformers and datasets
  would read that instead).
- **local paths** come only through the ``local`` sources (a model folder, a dataset file) and must lie, after
  resolving symlinks, under a root the server is configured with. Nothing under the artifact root is read that
  way: a run's outputs are reachable only as the ``run`` source path the worker itself resolved, an uploaded
  dataset only from its team's upload folder.

The web side validates input with these functions; the engine checks every run config again with
:func:`check_run_sources`, against the roots of the worker that runs it (``RunConfig.allowed_paths``), before
it reads a file. :func:`redact_paths` keeps absolute paths of the machine out of messages shown to users.
:func:`pretrained_source` decides where an ``hf`` model's files are read from (its local folder, the hub, or
the local cache only when the hub cannot be reached), probing the hub once instead of hanging on retries.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataError, ModelLoadError

if TYPE_CHECKING:
    from .config import AllowedPaths, ModelConfig, RunConfig

REPO_ID_MAX = 96  # the hub's own limit for ORG/NAME
REVISION_MAX = 100
CONFIG_NAME_MAX = 100

# One part of a hub id: letters, digits, '-', '_', '.'; it neither starts nor ends with '-' or '.'.
_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_SAFE_CHARS = re.compile(r"[A-Za-z0-9_./-]*")
# Builder names of the `datasets` package: load_dataset("csv") and friends read local files, never the hub.
PACKAGED_BUILDERS = frozenset(
    {
        "arrow",
        "audiofolder",
        "cache",
        "conll",
        "csv",
        "eval",
        "fasta",
        "fastq",
        "folder_based_builder",
        "genbank",
        "generator",
        "harbor",
        "hdf5",
        "iceberg",
        "imagefolder",
        "json",
        "lance",
        "meshfolder",
        "mmcif",
        "niftifolder",
        "pandas",
        "parquet",
        "pdb",
        "pdffolder",
        "spark",
        "sql",
        "text",
        "tsfile",
        "videofolder",
        "vortex",
        "webdataset",
        "xml",
    }
)
HUB_ID_RULE = "NAME or ORG/NAME of letters, digits, '-', '_' and '.'"


def _shape_problem(value: Any, *, limit: int) -> str | None:
    """What makes ``value`` a path, a URL or an encoded string rather than an identifier, or None."""
    if not isinstance(value, str):
        return "it must be text"
    if not value:
        return "it is empty"
    if len(value) > limit:
        return f"it is longer than {limit} characters"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        return "it contains spaces or control characters"
    if "://" in value or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", value):
        return "a URL or scheme (such as file://) is not a hub id"
    if "%" in value:
        return "it is URL-encoded ('%'); write the id itself"
    if value.startswith(("/", "~", ".")) or "\\" in value or ".." in value:
        return "it is a file path; local files are read only through a local folder under the server's roots"
    if not _SAFE_CHARS.fullmatch(value):
        return "it may only hold letters, digits, '-', '_', '.' and '/'"
    return None


def repo_id_problem(value: Any) -> str | None:
    """Why ``value`` is not a hub repo id (a model, tokenizer or dataset id: ``gpt2``, ``org/name``), or None.

    The hub's rules: one or two parts (``NAME`` or ``ORG/NAME``), each of letters, digits, ``-``, ``_``,
    ``.``, not starting or ending with ``-`` or ``.``; no ``--`` or ``..``; not ending in ``.git``; at most 96
    characters.
    """
    problem = _shape_problem(value, limit=REPO_ID_MAX)
    if problem:
        return problem
    if value.endswith("/"):
        return "a hub id does not end with '/'"
    parts = value.split("/")
    if len(parts) > 2:
        return f"a hub id has at most one '/' ({HUB_ID_RULE})"
    if not all(_PART.fullmatch(p) for p in parts):
        return f"a hub id is {HUB_ID_RULE}, not starting or ending with '/', '.' or '-'"
    if "--" in value:
        return "'--' is not allowed in a hub id"
    if value.endswith(".git"):
        return "a hub id does not end in '.git'"
    return None


def dataset_name_problem(value: Any) -> str | None:
    """:func:`repo_id_problem` for a hub dataset name, which also may not be a builder of the ``datasets``
    package (``csv``, ``json``, ``text``, ``imagefolder``, ...: those read local files)."""
    problem = repo_id_problem(value)
    if problem is None and value.lower() in PACKAGED_BUILDERS:
        return f"'{value}' is a file reader of the datasets package, not a hub dataset"
    return problem


def revision_problem(value: Any) -> str | None:
    """Why ``value`` is not a hub revision (a branch or tag name such as ``main`` or ``v1.0``, ``refs/pr/1``,
    or a commit sha), or None."""
    problem = _shape_problem(value, limit=REVISION_MAX)
    if problem:
        return problem
    if not all(_PART.fullmatch(p) for p in value.split("/")):
        return (
            "a revision is a branch, a tag or a commit: parts of letters, digits, '-', '_' and '.' separated "
            "by single '/', none starting or ending with '.' or '-'"
        )
    if any(p.endswith(".lock") for p in value.split("/")):
        return "a revision part does not end in '.lock'"
    return None


def config_name_problem(value: Any) -> str | None:
    """Why ``value`` is not a hub dataset config name (``default``, ``wikitext-2-raw-v1``), or None."""
    problem = _shape_problem(value, limit=CONFIG_NAME_MAX)
    if problem:
        return problem
    if not _PART.fullmatch(value):
        return "a config name is letters, digits, '-', '_' and '.', not starting or ending with '.' or '-'"
    return None


def names_local_path(value: str) -> bool:
    """Whether ``value`` names a file or folder that exists here (relative to the working directory): the hub
    loaders would read it instead of asking the hub."""
    try:
        return Path(value).exists() or Path(value).expanduser().exists()
    except (OSError, ValueError):  # a name the OS cannot even look up is no local file
        return False


def is_within(path: str | Path, roots: Iterable[str | Path]) -> bool:
    """Whether ``path``, after resolving symlinks, lies under one of ``roots`` (also resolved)."""
    try:
        resolved = Path(path).resolve()
        return any(resolved.is_relative_to(Path(root).resolve()) for root in roots if str(root))
    except (OSError, ValueError):
        return False


# --- the engine's check of a whole run config ---------------------------------------------------------------


def _model_configs(cfg: RunConfig) -> Iterator[tuple[str, ModelConfig]]:
    """Every model of a run (role, config), the parents of derived models included."""
    tops = [("Student", cfg.student), ("Teacher", cfg.teacher)]
    tops += [(f"Teacher {i + 2}", t) for i, t in enumerate(cfg.extra_teachers)]
    for role, model in tops:
        while model is not None:
            yield role, model
            model = model.parent


def _hub_model_problem(name: str, revision: str) -> str | None:
    problem = repo_id_problem(name)
    if problem is None and revision:
        problem = revision_problem(revision)
        if problem:
            return f"its revision is not a hub revision ({problem})"
    if problem:
        return f"'{name}' is not a hub id ({problem})"
    if names_local_path(name):
        return (
            f"'{name}' is not a hub id here: a file or folder of that name exists on the worker, "
            "and a hub id is never read from local files"
        )
    return None


def check_hub_model(name: str, revision: str, what: str) -> None:
    """Refuse (``ModelLoadError``) a model or tokenizer hub id that fails the hub's syntax or names a local
    path."""
    problem = _hub_model_problem(name, revision)
    if problem:
        raise ModelLoadError(f"{what} could not be loaded: {problem}.")


def check_hub_dataset(name: str) -> None:
    """Refuse (``DataError``) a hub dataset name that fails the hub's syntax or names a local path."""
    problem = dataset_name_problem(name)
    if problem:
        raise DataError(f"Dataset could not be loaded: '{name}' is not a hub id ({problem}).")
    if names_local_path(name):
        raise DataError(
            f"Dataset could not be loaded: '{name}' is not a hub id here: a file or folder of that name "
            "exists on the worker, and a hub dataset is never read from local files."
        )


def is_local_tokenizer(value: str) -> bool:
    """A tokenizer named in a ``config`` model is a local folder when it is an absolute path, else a hub
    id."""
    return Path(value).is_absolute()


def check_run_sources(cfg: RunConfig) -> None:
    """Check where every model, tokenizer and dataset of ``cfg`` comes from, before anything is read.

    Hub ids must follow the hub's syntax and name no local file (always). With ``cfg.allowed_paths`` (set by
    the worker from its own settings), local paths must lie under its roots after resolving symlinks, paths
    under the artifact root are refused except the resolved ``run`` sources and the team's upload folder, and
    a ``run`` source must be one of the run outputs the worker resolved. Without it (the engine used as a
    library or from the CLI), local paths are the caller's to choose.

    Raises:
        ModelLoadError / DataError: naming what is refused, without reading it.
    """
    allowed = cfg.allowed_paths
    for role, model in _model_configs(cfg):
        what = f"{role} model '{model.describe()}'"
        if model.source == "hf" and not model.path:
            if model.name:
                check_hub_model(model.name, model.revision, what)
        elif model.source == "hf":
            if model.revision and (problem := revision_problem(model.revision)):
                raise ModelLoadError(
                    f"{what} could not be loaded: its revision is not a hub revision ({problem})."
                )
            _check_local(model.path, allowed, kind="model", what=what)
        elif model.source == "run":
            _check_run_output(model.path, allowed, what)
        elif model.source == "server":
            _check_served(model, role, allowed, what)
        elif model.source == "config":
            if model.path:  # the tokenizer folder when params name none
                _check_local(model.path, allowed, kind="model", what=f"{what}'s tokenizer")
            tokenizer = model.params.get("tokenizer") or ""
            if not isinstance(tokenizer, str):
                raise ModelLoadError(f"{what}: its tokenizer must be a hub id or a folder, as text.")
            if tokenizer and is_local_tokenizer(tokenizer):
                _check_local(tokenizer, allowed, kind="model", what=f"{what}'s tokenizer")
            elif tokenizer:
                check_hub_model(tokenizer, "", f"{what}'s tokenizer")
    data = cfg.dataset
    if data.source == "hf":
        if data.path:
            _check_local(data.path, allowed, kind="dataset", what="Dataset")
        elif data.name:
            check_hub_dataset(data.name)
        if data.eval_path:
            _check_local(data.eval_path, allowed, kind="dataset", what="The dataset's eval file")


def _check_served(model: ModelConfig, role: str, allowed: AllowedPaths | None, what: str) -> None:
    """A ``server`` teacher names a server the worker allows (:mod:`.served_teacher`); a student is never
    served."""
    from .served_teacher import server_problem, servers_allowed

    if role == "Student":
        raise ModelLoadError(f"{what}: only a teacher can be served; a student trains here.")
    if problem := server_problem(model, list(servers_allowed(allowed))):
        raise ModelLoadError(f"{what} cannot be served: {problem}.")


def _error(kind: str, message: str) -> Exception:
    return ModelLoadError(message) if kind == "model" else DataError(message)


def _check_local(path: str, allowed: AllowedPaths | None, *, kind: str, what: str) -> None:
    if allowed is None:
        return
    roots = allowed.model_roots if kind == "model" else allowed.dataset_roots
    if allowed.artifact_root and is_within(path, [allowed.artifact_root]):
        # Every team's runs and uploads: of these only the run's own team uploads are read as files, whatever
        # the roots say (run outputs come through ``run`` sources).
        permitted = kind == "dataset" and bool(allowed.uploads) and is_within(path, [allowed.uploads])
    else:
        permitted = is_within(path, roots)
    if not permitted:
        raise _error(
            kind,
            f"{what} could not be loaded: {display_path(path, allowed)} is outside the folders this "
            f"worker may read {kind}s from.",
        )


def _check_run_output(path: str, allowed: AllowedPaths | None, what: str) -> None:
    if allowed is None:
        return
    try:
        resolved = Path(path).resolve()
        ok = any(resolved == Path(p).resolve() for p in allowed.run_outputs)
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise ModelLoadError(
            f"{what} could not be loaded: {display_path(path, allowed)} is outside the folders this "
            "worker may read models from (a run's model is read only from a run of the same team)."
        )


# --- messages without the machine's paths -------------------------------------------------------------------

_RUN_OUTPUT = re.compile(r"final(?:-a\d+)?")


def run_id_of(path: str | Path) -> int | None:
    """The run whose model folder ``path`` is (``.../runs/<id>/final``, as the worker lays outputs out), or
    None."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-3] == "runs" and parts[-2].isdigit() and _RUN_OUTPUT.fullmatch(parts[-1]):
        return int(parts[-2])
    return None


def describe_path(path: str | Path) -> str:
    """A local path as a user may see it: ``run 5`` for a run's model folder, else the file or folder name."""
    run_id = run_id_of(path)
    if run_id is not None:
        return f"run {run_id}"
    return Path(path).name or str(path)


def display_path(path: str | Path, allowed: AllowedPaths | None = None) -> str:
    """``path`` for a message: under the artifact root as ``ARTIFACT_ROOT/...``, else its last part."""
    if allowed is not None and allowed.artifact_root:
        root = Path(allowed.artifact_root)
        for candidate in (Path(path), Path(path).resolve()):
            for base in (root, root.resolve()):
                if candidate.is_relative_to(base):
                    return f"ARTIFACT_ROOT/{candidate.relative_to(base).as_posix()}"
    return f"'{describe_path(path)}'"


# An absolute path in free text: '/' not preceded by a word character, '.', ':' or another '/' (URLs,
# fractions and hub ids stay), then at least one path segment.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"`/:,;()\[\]{}<>|]+/)*[^\s'\"`/:,;()\[\]{}<>|]+")


def redact_paths(text: str, labels: Sequence[tuple[str, str | Path]] = ()) -> str:
    """``text`` with no absolute path of the machine: the folders of ``labels`` (``("ARTIFACT_ROOT", root)``)
    by their label, any other absolute path by ``…/`` and its last part."""
    pairs: list[tuple[str, str]] = []
    for label, folder in labels:
        if not str(folder):
            continue
        for form in {str(folder), str(Path(folder).resolve())}:
            pairs.append((form.rstrip("/"), label))
    for form, label in sorted(pairs, key=lambda p: -len(p[0])):  # the longest (most specific) first
        if form:
            text = re.sub(re.escape(form) + r"(?=/|\b|$)", label, text)
    return _ABSOLUTE_PATH.sub(lambda m: "…/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


# --- where a model's pretrained files come from -------------------------------------------------------------

HUB_TIMEOUT_S = 10.0


def hub_is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@dataclass(frozen=True)
class ModelSource:
    """Where pretrained files come from: a local folder, the hub, or (hub unreachable) the local cache
    only."""

    name: str
    revision: str
    local_only: bool
    unreachable: bool


def pretrained_source(cfg: ModelConfig, what: str) -> ModelSource:
    """An ``hf`` model's files: its local folder (``path``), else its hub id (``name``), never one for the
    other."""
    if cfg.path:
        return local_source(cfg.path, cfg.revision, what)
    if cfg.name:
        return resolve_source(cfg.name, cfg.revision, what)
    raise ModelLoadError(f"{what} needs a hub id (name) or a local folder (path).")


def local_source(path: str, revision: str, what: str) -> ModelSource:
    """A local model folder (which folders a run may read is checked with the run config: ``sources``)."""
    if not Path(path).is_dir():
        raise ModelLoadError(
            f"{what} could not be loaded: its local folder {describe_path(path)!r} does not exist."
        )
    return ModelSource(path, revision, local_only=True, unreachable=False)


def resolve_source(name: str, revision: str, what: str) -> ModelSource:
    """Decide how to load the hub id ``name`` without ever hanging.

    ``name`` must be a hub id that names no local file or folder (transformers would read that instead): it is
    refused before anything is read. transformers retries an unreachable hub with back-off (about 30 s without
    network); one quick ``model_info`` probe tells "no such model" from "no network" first, and without
    network only the local cache is tried.
    """
    check_hub_model(name, revision, what)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if hub_is_offline():  # HF_HUB_OFFLINE: only the local cache
        return ModelSource(name, revision, local_only=True, unreachable=True)
    try:
        HfApi().model_info(name, revision=revision or None, timeout=HUB_TIMEOUT_S)
    except RevisionNotFoundError as exc:
        raise ModelLoadError(f"{what} could not be loaded: revision '{revision}' does not exist.") from exc
    except RepositoryNotFoundError as exc:  # also covers gated and private repositories
        raise ModelLoadError(
            f"{what} could not be loaded: no such model on the Hugging Face hub (or it is private or gated)."
        ) from exc
    except Exception:  # DNS, connection refused, timeout, proxy: the hub is unreachable from here
        return ModelSource(name, revision, local_only=True, unreachable=True)
    return ModelSource(name, revision, local_only=False, unreachable=False)
