"""Training checkpoints: ``<output_dir>/checkpoints/step-<N>[-a<attempt>]/``.

Each holds ``model.safetensors`` (student weights), ``term_modules.safetensors`` (the loss terms' learned
projections, when there are any), ``optimizer.pt`` (read back with ``weights_only=True``; its parameter groups
cover the student and the term modules), ``rng.safetensors`` (torch CPU/CUDA generator states) and
``trainer_state.json`` (step, Python and NumPy RNG states, the run config, and the trainer's ``extra`` state:
the terms' ``TermState``, early stopping, running counters). Nothing is unpickled on load. The data position
is the step itself: the batch at step ``s`` is a pure function of (seed, s). A checkpoint is written to a
temporary folder and renamed, so a crash mid-write never leaves a half checkpoint that looks complete.

Ownership. A run of the web app has an owner, its current attempt (the lease token). Its folders carry the
attempt in their names (``step-40-a2``), so two workers never write the same folder. A checkpoint counts only
once its owner registered it while holding the lease (the caller's ``on_checkpoint``); a run resumes only from
the checkpoint registered last, never from whatever is newest on disk. :func:`prune` deletes only what an
owner may: its own older folders and those of earlier attempts, never a later attempt's.
:func:`clean_for_resume` removes, when an attempt starts, everything but the checkpoint it resumes from
(temporary folders of killed workers, folders that were never registered). Without an attempt (the CLI), names
carry no suffix and a run resumes from the newest complete checkpoint.

:class:`Checkpoints` is a run's side of this: it resumes from the point :func:`resume_point` names, writes,
registers and prunes the run's checkpoints, and keeps the best eval's weights under ``best/`` while early
stopping watches a metric.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_weights_into
from safetensors.torch import save_model as save_weights_of
from torch import nn

from . import phases
from .config import RunConfig
from .distributed import Ranks, is_sharded, load_full_into_sharded, load_sharded, save_sharded
from .errors import ConfigError, TrainingError

if TYPE_CHECKING:
    from .methods import TermState
    from .models import LoadedModel
    from .run_evaluation import EarlyStopping
    from .step_inputs import NonFiniteWatch
    from .trainer import Callbacks

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
MODULES_FILE = "term_modules.safetensors"
BEST_DIR = "best"  # the best eval's weights while early stopping watches a metric
BEST_WEIGHTS_FILE = "model.safetensors"
SHARDED_DIR = "sharded"  # a multi-rank run's weights, term modules and optimizer state (torch DCP)
_STEP_DIR = re.compile(r"step-(\d+)(?:-a(\d+))?")
# Settings that may change between a run and its resumption without changing what it computes.
_RESUMABLE_CHANGES = {
    "output_dir",
    "evaluate_teacher",
    "cache_dir",
    "attempt",
    "resume_from",
    "keep_checkpoints",
    "allowed_paths",
}
# The ranks a run spans change how it computes, not what: a multi-rank checkpoint resumes with any number.
_RESUMABLE_TRAIN_CHANGES = {
    "log_every",
    "eval_every",
    "save_every",
    "device",
    "processes",
    "gpus",
    "strategy",
    "activation_checkpointing",
}


def owned_name(stem: str, attempt: int) -> str:
    """A folder name of ``attempt`` (``step-40-a2``); without an attempt, the stem alone."""
    return f"{stem}-a{attempt}" if attempt else stem


def attempt_of(name: str) -> int:
    """The attempt that wrote a folder named by :func:`owned_name` (0 for an unsuffixed name)."""
    stem, _, tag = name.rpartition("-a")
    return int(tag) if stem and tag.isdigit() else 0


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (by step, then attempt)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), int(m.group(2) or 0), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.fullmatch(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for *_, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def write_checkpoint(
    output_dir: str | Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    attempt: int = 0,
    modules: nn.Module | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint for ``step`` of ``attempt``: complete in a temporary folder, then renamed.

    Args:
        modules: the loss terms' learned modules (saved when they have parameters).
        extra: JSON-serialisable trainer state restored by :func:`load_checkpoint`.

    Returns:
        the checkpoint folder. It counts for a resume once the caller registered it (see the module's doc).
    """
    root = Path(output_dir) / CHECKPOINTS
    final = root / owned_name(f"step-{step}", attempt)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # save_model (not save_file) copes with tied weights, e.g. shared embeddings in language models.
    save_weights_of(model, str(tmp / "model.safetensors"))
    if modules is not None and len(modules.state_dict()):
        save_weights_of(modules, str(tmp / MODULES_FILE))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    _write_trainer_state(tmp, step=step, config=config, extra=extra)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def write_sharded_checkpoint(
    output_dir: str | Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    ranks: Ranks,
    attempt: int = 0,
    modules: nn.Module | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """:func:`write_checkpoint` for a multi-rank run; every rank calls it. The weights, the terms' modules
    and the optimizer state are a DCP checkpoint in ``sharded/`` (each rank writes its shards; any number of
    ranks reads them back); rank 0 writes the RNG and trainer state and renames the folder."""
    root = Path(output_dir) / CHECKPOINTS
    final = root / owned_name(f"step-{step}", attempt)
    tmp = root / f".{final.name}.tmp-ranks"
    if ranks.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / SHARDED_DIR).mkdir(parents=True)
    ranks.barrier()
    save_sharded(tmp / SHARDED_DIR, model=model, optimizer=optimizer, modules=modules)
    if ranks.is_main:
        _write_trainer_state(tmp, step=step, config=config, extra=extra)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    ranks.barrier()
    return final


def _write_trainer_state(
    tmp: Path, *, step: int, config: dict[str, Any], extra: dict[str, Any] | None
) -> None:
    """The RNG states and ``trainer_state.json``, written last: a folder holding it is complete."""
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_file(rng, tmp / "rng.safetensors")
    numpy_state = np.random.get_state()
    state = {
        "step": step,
        "python_rng": _jsonable(random.getstate()),
        "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "config": config,
        "extra": extra or {},
    }
    (tmp / STATE_FILE).write_text(json.dumps(state))


def prune(folder: str | Path, *, attempt: int, keep: int, protect: tuple[str, ...] = ()) -> None:
    """Delete what the owner ``attempt`` no longer needs in ``folder`` (checkpoints, or best weights): the
    entries of earlier attempts, and its own beyond the newest ``keep`` (by step). Never an entry of a later
    attempt (a worker that lost its lease and prunes late cannot touch its successor's files), nor
    ``protect``."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    own: list[tuple[int, Path]] = []
    for path in folder.iterdir():
        m = _STEP_DIR.fullmatch(path.name)
        if m is None or path.name in protect:
            continue
        written_by = int(m.group(2) or 0)
        if written_by < attempt:
            shutil.rmtree(path, ignore_errors=True)
        elif written_by == attempt:
            own.append((int(m.group(1)), path))
    for _, path in sorted(own)[:-keep] if keep > 0 else sorted(own):
        shutil.rmtree(path, ignore_errors=True)


def clean_for_resume(output_dir: str | Path, *, attempt: int, resume_from: Path | None) -> None:
    """Before an attempt trains: remove temporary checkpoint folders (a killed worker's), and, for an owned
    attempt, every checkpoint but ``resume_from`` (none of them was registered last, so none may ever count)
    and the final-model folders of earlier attempts (a run that has a recorded final model is never
    resumed)."""
    root = Path(output_dir) / CHECKPOINTS
    for path in root.iterdir() if root.is_dir() else ():
        temporary = path.name.startswith(".")
        if temporary or (attempt and (resume_from is None or path.resolve() != resume_from.resolve())):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    # Final models of earlier attempts that were never recorded (an attempt that lost its lease at the end).
    for path in Path(output_dir).glob("final-a*") if attempt else ():
        if attempt_of(path.name) < attempt:
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    output_dir: str | Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    keep: int = 2,
    modules: nn.Module | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint for ``step`` of a run without an owner and delete all but the newest ``keep``."""
    path = write_checkpoint(
        output_dir, step=step, model=model, optimizer=optimizer, config=config, modules=modules, extra=extra
    )
    prune(Path(output_dir) / CHECKPOINTS, attempt=0, keep=keep)
    return path


def load_checkpoint(
    folder: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    device: torch.device,
    modules: nn.Module | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restore model, term modules, optimizer and RNG states from ``folder``: a multi-rank run's DCP state
    with any number of ranks, a one-process checkpoint with one process or on several ranks (DDP: loaded as
    is; FSDP: every rank reads the full state and keeps its shards).

    Args:
        config: the current run's config dict; it must match the checkpoint's apart from logging, saving and
            device settings.
    Returns:
        (the step to continue from, the ``extra`` trainer state saved with it).
    Raises:
        ConfigError: the checkpoint belongs to a different run config.
    """
    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    changed = _config_changes(state.get("config", {}), config)
    if changed:
        raise ConfigError(
            f"The output folder holds a checkpoint of a different run (changed: {', '.join(changed)}). "
            "Use a new output folder."
        )
    if (folder / SHARDED_DIR).is_dir():  # a multi-rank run's: read with any number of ranks
        load_sharded(folder / SHARDED_DIR, model=model, optimizer=optimizer, modules=modules)
    elif is_sharded(model):  # a one-process checkpoint, read by every rank of a sharded (FSDP) student
        modules_file = folder / MODULES_FILE
        load_full_into_sharded(
            model=model,
            optimizer=optimizer,
            modules=modules,
            weights=load_file(folder / "model.safetensors"),
            module_weights=load_file(modules_file) if modules is not None and modules_file.is_file() else {},
            optimizer_state=torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True),
        )
    else:
        load_weights_into(model, str(folder / "model.safetensors"), device=str(device))
        if modules is not None and (folder / MODULES_FILE).is_file():
            load_weights_into(modules, str(folder / MODULES_FILE), device=str(device))
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
    rng = load_file(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in rng]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    random.setstate(_python_state(state["python_rng"]))
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    return int(state["step"]), state.get("extra", {})


def _config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    changed = [
        k
        for k in sorted(set(saved) | set(current))
        if k not in _RESUMABLE_CHANGES and k != "train" and saved.get(k) != current.get(k)
    ]
    saved_train, current_train = saved.get("train", {}), current.get("train", {})
    changed += [
        f"train.{k}"
        for k in sorted(set(saved_train) | set(current_train))
        if k not in _RESUMABLE_TRAIN_CHANGES and saved_train.get(k) != current_train.get(k)
    ]
    return changed


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _python_state(value: Any) -> Any:
    """JSON turned random.getstate()'s tuples into lists; turn them back."""
    return tuple(_python_state(v) for v in value) if isinstance(value, list) else value


# --- a run's checkpoints and best weights -------------------------------------------------------------------


def resume_point(cfg: RunConfig) -> Path | None:
    """The checkpoint a run continues from: for an owned attempt, the one its owner registered last (never
    merely the newest on disk); without an attempt, the newest complete one in ``output_dir``."""
    if not cfg.attempt:
        return latest_checkpoint(cfg.output_dir)
    if not cfg.resume_from:
        return None
    path = Path(cfg.resume_from)
    if not (path / STATE_FILE).is_file():
        raise TrainingError(
            f"The checkpoint this run resumes from ({path.name}) is missing or incomplete, so it "
            "cannot continue where it stopped. Requeueing it will not help; launch the run again."
        )
    return path


@dataclass
class Checkpoints:
    """The run's checkpoints and best weights, in folders of its attempt. Nothing is written once the caller
    lost the run (``Callbacks.owned()`` False), and a checkpoint that ``on_checkpoint`` refuses is deleted at
    once."""

    cfg: RunConfig
    cb: Callbacks
    student: LoadedModel
    modules: nn.ModuleDict
    optimizer: torch.optim.Optimizer
    term_state: TermState
    stopper: EarlyStopping
    watch: NonFiniteWatch
    device: torch.device
    best_name: str = ""  # the folder under best/ holding the best eval's weights (early stopping)
    ranks: Ranks = field(default_factory=Ranks)  # several: every rank calls every method, rank 0 writes

    def __post_init__(self) -> None:
        self.output_dir, self.attempt = Path(self.cfg.output_dir), self.cfg.attempt
        self.config_dict = self.cfg.to_dict()

    def resume(self) -> tuple[int, Path | None]:
        """Clear what no registered checkpoint owns, then load the one the run continues from (weights,
        optimizer, RNG, term and early-stopping state), if any.

        Returns:
            the step to start at, and that checkpoint (None when the run starts afresh).
        """
        step, ranks = 0, self.ranks
        last_checkpoint = resume_point(self.cfg)
        if ranks.is_main:
            clean_for_resume(self.output_dir, attempt=self.attempt, resume_from=last_checkpoint)
        ranks.barrier()
        if last_checkpoint is not None:
            with phases.part(phases.LOADING):
                step, extra = load_checkpoint(
                    last_checkpoint,
                    model=self.student.model,
                    optimizer=self.optimizer,
                    config=self.config_dict,
                    device=self.device,
                    modules=self.modules,
                )
            self.term_state.load_state_dict(extra.get("term_state", {}))
            self.stopper.load_state_dict(extra.get("early_stopping", {}))
            self.best_name = extra.get("best_weights", "")
        # Best weights that no registered checkpoint refers to (a lost worker's, a crash's) never count.
        if ranks.is_main:
            prune(self.output_dir / BEST_DIR, attempt=self.attempt + 1, keep=0, protect=(self.best_name,))
        ranks.barrier()
        return step, last_checkpoint

    def checkpoint(self, at_step: int) -> Path | None:
        """Write, register and prune; None when the caller lost the run (nothing of it stays on disk)."""
        if not self.cb.owned():
            return None
        self.watch.check()  # never persist weights that came from a NaN step
        extra = {
            "term_state": self.term_state.state_dict(),
            "early_stopping": self.stopper.state_dict(),
            "best_weights": self.best_name,
        }
        write = (
            functools.partial(write_sharded_checkpoint, ranks=self.ranks)
            if self.ranks.enabled
            else write_checkpoint
        )
        with phases.part(phases.SAVING):
            path = write(
                self.output_dir,
                step=at_step,
                model=self.student.model,
                optimizer=self.optimizer,
                config=self.config_dict,
                attempt=self.attempt,
                modules=self.modules,
                extra=extra,
            )
        registered = not (self.cb.on_checkpoint and self.cb.on_checkpoint(at_step, str(path)) is False)
        if not self.ranks.is_main:
            return path if registered else None
        if not registered:
            shutil.rmtree(path, ignore_errors=True)
            return None
        # Registered: older checkpoints and best weights no registered checkpoint refers to can go.
        prune(self.output_dir / CHECKPOINTS, attempt=self.attempt, keep=self.cfg.keep_checkpoints)
        prune(self.output_dir / BEST_DIR, attempt=self.attempt, keep=0, protect=(self.best_name,))
        return path

    def save_best(self, at_step: int) -> None:
        """The student (and the terms' learned projections) of the best eval so far, in a folder of its own
        that the next registered checkpoint refers to."""
        if not self.cb.owned():
            return
        name = owned_name(f"step-{at_step}", self.attempt)
        self.best_name = name
        full = self.ranks.full_state_dict(self.student.model)  # several ranks: gathered on rank 0
        if not self.ranks.is_main:
            return
        with phases.part(phases.SAVING):
            self._write_best(self.output_dir / BEST_DIR / name, full)

    def _write_best(self, best: Path, full: dict[str, torch.Tensor] | None) -> None:
        tmp = best.with_name(f".{best.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if full is not None:  # own copies: tied weights must not share memory in a safetensors file
            save_file({k: v.contiguous().clone() for k, v in full.items()}, tmp / BEST_WEIGHTS_FILE)
        else:
            save_weights_of(self.student.model, str(tmp / BEST_WEIGHTS_FILE))
        if len(self.modules.state_dict()):
            save_weights_of(self.modules, str(tmp / MODULES_FILE))
        shutil.rmtree(best, ignore_errors=True)
        tmp.replace(best)

    def has_best(self) -> bool:
        self.ranks.barrier()  # rank 0 wrote them
        best = self.output_dir / BEST_DIR / self.best_name
        return bool(self.best_name) and (best / BEST_WEIGHTS_FILE).exists()

    def load_best(self) -> None:
        best = self.output_dir / BEST_DIR / self.best_name
        if self.ranks.enabled:
            self.ranks.load_full_state_dict(self.student.model, load_file(best / BEST_WEIGHTS_FILE))
        else:
            load_weights_into(self.student.model, str(best / BEST_WEIGHTS_FILE), device=str(self.device))
        if len(self.modules.state_dict()) and (best / MODULES_FILE).exists():
            load_weights_into(self.modules, str(best / MODULES_FILE), device=str(self.device))
