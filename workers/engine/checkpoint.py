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
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_weights_into
from safetensors.torch import save_model as save_weights_of
from torch import nn

from .errors import ConfigError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
MODULES_FILE = "term_modules.safetensors"
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
_RESUMABLE_TRAIN_CHANGES = {"log_every", "eval_every", "save_every", "device"}


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
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


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
    """Restore model, term modules, optimizer and RNG states from ``folder``.

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
