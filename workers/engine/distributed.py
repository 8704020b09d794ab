"""Multi-process runs: one process per rank, launched by torchrun, with torch.distributed.

A run started by ``torchrun --nproc_per_node N`` reads its place from the environment (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``), joins the process group (gloo on CPU, nccl on CUDA with ``cuda:LOCAL_RANK``)
with a collective timeout of ``DISTILLWEB_COLLECTIVE_TIMEOUT_S`` seconds (600 by default) and trains the
student replicated (``ddp``: DistributedDataParallel) or sharded (``fsdp``: FSDP2 ``fully_shard`` on each
transformer block, then the root; bf16 parameters with fp32 gradient reduction when ``precision`` is bf16).

Every rank computes on its own contiguous block of each global micro-batch (the rows the one-process run
uses, in the same order), so N ranks at a per-rank batch of B/N follow the one-process curve at batch B:
DDP/FSDP average the ranks' gradients, and a causal LM weighs each rank's token mean by its share of the
global batch's tokens. Rank 0 alone reports (:meth:`Ranks.callbacks`); the decisions a caller takes there
(stop, lost ownership, a refused checkpoint) are broadcast so every rank stops at the same step.

Memory: under FSDP a student built from the seed alone (``config``, ``builtin``) is built in full on rank 0
only; the other ranks build it on the meta device and receive their shards of rank 0's weights once it is
sharded. Every rank of a multi-rank run fixes glibc's mmap threshold (:func:`keep_heap_small`), so the freed
gathered layers and gradients go back to the system instead of growing the heap step after step.

Checkpoints: a multi-rank run writes DCP checkpoints (:func:`save_sharded`), which any number of ranks reads
back; a one-process checkpoint (full weights, an index-keyed optimizer state) resumes on sharded ranks too
(:func:`load_full_into_sharded`: every rank reads it whole and keeps its shards). The final model is gathered
on rank 0 with the one-process keys (a tied head is named once, as ``save_pretrained`` writes it alone).

Generation (``on_policy``) on a sharded student: every forward is a collective, so the ranks step in
lockstep until the last rank's rows are done (``generate``'s ``synced_gpus``); each rank samples its rows from
its own seed. An online teacher beside a sharded student is sharded too (:func:`shards_teacher`,
:func:`shard_frozen`: per block + root, frozen, resharded after each forward), unless
``DISTILLWEB_REPLICATE_TEACHER`` is set; a rank that must run it alone gathers it first, with every rank
(:func:`gathered`, :func:`gather_frozen`).

A process started without torchrun's environment is a world of one: :class:`Ranks` then changes nothing and
the run takes the single-process path.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import RunConfig, TrainConfig
from .errors import ConfigError
from .evaluate import ModelOutputs, forward_outputs

TIMEOUT_ENV = "DISTILLWEB_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
LEAVING_TIMEOUT = datetime.timedelta(days=1)
STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("auto", "bf16", "fp32")
BLOCK_LISTS = ("layers", "layer", "h", "blocks", "block")  # the ModuleList of an HF model's blocks
SEEDED_SOURCES = ("config", "builtin")  # students whose initial weights come from the seed alone
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024
ONLINE_SCHEMES = ("online", "on_policy")  # the teacher runs on every batch, on every rank


def env_world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) without it."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
    )


def is_main() -> bool:
    """True on rank 0 (and in a process that is no rank of anything)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return env_world()[0] == 0


def _libc() -> Any:
    """The C library (glibc on Linux), or None where there is none to call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def keep_heap_small() -> None:
    """Serve every allocation of 128 KiB or more from its own mapping, returned to the system when freed.

    glibc raises its mmap threshold each time such a block is freed (up to 32 MiB), after which the ranks'
    all-gathered layers, gradients and gloo buffers come from the heap, whose freed pages it keeps: a rank's
    resident set then grows step after step (2 FSDP ranks of a 34 M-parameter student: 1.2 GB vs 0.75 GB with
    the threshold fixed). Fixing it turns that off; the computation is unchanged."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``) after large frees."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def collective_timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of seconds, not '{raw}'.") from None
    return datetime.timedelta(seconds=seconds)


def _uses_cuda(tc: TrainConfig) -> bool:
    return tc.device.startswith("cuda") or (tc.device == "auto" and torch.cuda.is_available())


def check_resources(cfg: RunConfig, world: int) -> str:
    """Refuse a launch whose world size is not the run's, and settings several ranks cannot honour.

    Returns:
        the strategy for this world: ``none`` (one rank), ``ddp`` or ``fsdp``.
    Raises:
        ConfigError: with what to change.
    """
    tc = cfg.train
    if tc.strategy not in STRATEGIES:
        raise ConfigError(f"Unknown strategy '{tc.strategy}'. Use {', '.join(STRATEGIES)}.")
    if tc.precision not in PRECISIONS:
        raise ConfigError(f"Unknown precision '{tc.precision}'. Use {', '.join(PRECISIONS)}.")
    cuda = _uses_cuda(tc)
    field, wanted = ("gpus", tc.gpus) if cuda else ("processes", tc.processes)
    if wanted != world:
        raise ConfigError(
            f"This run asks for {wanted} rank(s) (train.{field} = {wanted}) but was started with "
            f"{world} process(es) (WORLD_SIZE={world}). Launch it with "
            f"`torchrun --standalone --nproc_per_node {wanted}`, or set train.{field} to {world}."
        )
    if world == 1:
        return "none"
    if cuda and ":" in tc.device:
        raise ConfigError(
            f"A run on {world} GPUs puts rank r on cuda:LOCAL_RANK; use device 'auto' or 'cuda', "
            f"not '{tc.device}'."
        )
    if tc.batch_size % world:
        below, above = tc.batch_size - tc.batch_size % world, tc.batch_size + world - tc.batch_size % world
        raise ConfigError(
            f"The batch size ({tc.batch_size}) must be divisible by the number of ranks ({world}): every "
            f"rank takes an equal share of each batch. Use a batch size of "
            f"{f'{below} or ' if below else ''}{above}."
        )
    return "fsdp" if tc.strategy == "auto" else tc.strategy


@dataclass
class Ranks:
    """This process's place in the run: rank, local rank, world size and how the student is spread.

    With a world of one every method is a no-op returning its input, so the single-process path is
    unchanged. ``empty_init`` (FSDP, a student built from the seed alone): rank 0 alone builds the full
    student, the other ranks build it on the meta device and receive their shards of rank 0's weights once it
    is sharded (:meth:`wrap`)."""

    rank: int = 0
    local_rank: int = 0
    world: int = 1
    strategy: str = "none"
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    empty_init: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- data ---------------------------------------------------------------------------------------------

    def check_batch(self, batch_size: int) -> int:
        """``batch_size`` (the global one), refused when the ranks cannot share it equally."""
        if batch_size % self.world:
            raise ConfigError(
                f"The batch size ({batch_size}, capped by the train rows) must be divisible by the number "
                f"of ranks ({self.world}): every rank takes an equal share of each batch."
            )
        return batch_size

    def rows(self, micro_rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous block of a global micro-batch's rows."""
        if not self.enabled:
            return micro_rows
        return np.array_split(micro_rows, self.world)[self.rank]

    def share(self, labels: torch.Tensor | None, task: str) -> torch.Tensor | None:
        """A causal LM's weight for this rank's token mean, ``n_rank · world / n_global`` (the loss terms
        average over the labelled next-token positions), so the averaged gradient is the global batch's
        token mean. None with one rank and for row-mean tasks (equal rows per rank)."""
        if not self.enabled or task != "causal_lm" or labels is None:
            return None
        local = (labels[..., 1:] != -100).sum().to(torch.float32)
        total = self.sum(local.clone())
        return local * self.world / total.clamp(min=1.0)

    @staticmethod
    def weigh(value: torch.Tensor, share: torch.Tensor | None) -> torch.Tensor:
        return value if share is None else value * share

    # --- collectives --------------------------------------------------------------------------------------

    def _on_device(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.device]:
        return tensor.to(self.device), tensor.device

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks (a new tensor); ``tensor`` itself with one rank."""
        if not self.enabled:
            return tensor
        moved, home = self._on_device(tensor.detach().clone())
        torch.distributed.all_reduce(moved, op=torch.distributed.ReduceOp.SUM)
        return moved.to(home)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if not self.enabled else self.sum(tensor) / self.world

    def flag(self, value: bool) -> bool:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        tensor = torch.tensor([1 if value else 0], dtype=torch.int32, device=self.device)
        torch.distributed.broadcast(tensor, src=0)
        return bool(tensor.item())

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    # --- gradients ----------------------------------------------------------------------------------------

    def sync_grads(self, module: nn.Module) -> None:
        """Average the gradients of parameters no DDP/FSDP wrapper owns (the terms' learned projections)."""
        if not self.enabled:
            return
        for param in module.parameters():
            if param.grad is not None:
                torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.SUM)
                param.grad.div_(self.world)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` over every rank's gradients: the total norm of sharded (DTensor) gradients is
        the global one (``full_tensor``), combined with the replicated gradients' norm."""
        if self.strategy != "fsdp":
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        from torch.distributed.tensor import DTensor

        with_grad = [p for p in params if p.grad is not None]
        sharded = [p.grad for p in with_grad if isinstance(p.grad, DTensor)]
        plain = [p.grad for p in with_grad if not isinstance(p.grad, DTensor)]
        squares = torch.zeros((), dtype=torch.float32, device=self.device)
        if sharded:
            norm = torch.nn.utils.get_total_norm(sharded)
            squares = squares + (norm.full_tensor() if isinstance(norm, DTensor) else norm).float() ** 2
        if plain:
            squares = squares + torch.nn.utils.get_total_norm(plain).float().to(self.device) ** 2
        total = squares.sqrt()
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, total)
        return total

    # --- the student --------------------------------------------------------------------------------------

    @property
    def builds_empty(self) -> bool:
        """True where this rank builds the student on the meta device (no memory): rank 0 builds it."""
        return self.empty_init and not self.is_main

    def building(self) -> contextlib.AbstractContextManager[Any]:
        """The context to build the student in: the meta device where :attr:`builds_empty`."""
        return torch.device("meta") if self.builds_empty else contextlib.nullcontext()

    def follow_rank0_rng(self) -> None:
        """Take rank 0's torch RNG state after it built the student (the other ranks drew nothing), so what
        draws next (the terms' modules, dropout) draws the one-process run's numbers on every rank."""
        if not self.empty_init:
            return
        state = torch.get_rng_state().to(self.device)
        torch.distributed.broadcast(state, src=0)
        torch.set_rng_state(state.cpu())

    def precision(self, tc: TrainConfig) -> torch.dtype:
        if tc.precision == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return torch.bfloat16 if tc.precision == "bf16" else torch.float32

    def wrap(self, model: nn.Module, tc: TrainConfig) -> Callable[..., ModelOutputs] | None:
        """The student's forward for the training steps: None (``forward_outputs`` on the student) with one
        rank or with the student sharded in place (FSDP2), else ``forward_outputs`` inside DDP. Activation
        checkpointing applies with any world."""
        if tc.activation_checkpointing:
            enable_activation_checkpointing(model)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.local_rank] if self.device.type == "cuda" else None
            return DistributedDataParallel(StudentForward(model), device_ids=ids)
        if self.strategy == "fsdp":
            full = model.state_dict() if self.empty_init and self.is_main else {}  # rank 0's weights
            shard(model, world=self.world, device=self.device, dtype=self.precision(tc))
            if self.empty_init:
                self._materialize(model, full)
        return None

    def _materialize(self, model: nn.Module, full: dict[str, torch.Tensor]) -> None:
        """Give the ranks that built the sharded student on the meta device their shards of rank 0's weights
        (``full`` on rank 0, empty elsewhere) and its buffers (the non-persistent ones, such as rotary
        frequencies, are no part of a state dict)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if self.builds_empty:
            model.to_empty(device=self.device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full, options=options)
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
        full.clear()
        release_free_memory()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The student's full (unsharded) weights on rank 0's CPU; every rank must call it. None with one
        rank (the model's own state dict is the full one)."""
        if not self.enabled:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        # Gathered, tied parameters (a head tied to the embedding) come back as separate copies; one tensor
        # under both names again, so that save_pretrained drops the tied name as it does in one process.
        for name, first in tied_names(model).items():
            if name in state and first in state:
                state[name] = state[first]
        return state

    def load_full_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load full (unsharded) weights into the student, sharded or not; every rank passes them."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    # --- callbacks ----------------------------------------------------------------------------------------

    def callbacks(self, cb: Any) -> Any:
        """Rank 0 keeps the caller's callbacks, the others get none; the decisions (``should_stop``,
        ``owns_run``, ``on_checkpoint``'s refusal) are taken on rank 0 and broadcast, so every rank calls
        them at the same points and follows rank 0."""
        if not self.enabled:
            return cb
        main = self.is_main

        def should_stop() -> bool:
            return self.flag(bool(main and cb.should_stop and cb.should_stop()))

        def owns_run() -> bool:
            return self.flag(not main or cb.owned())

        def on_checkpoint(step: int, path: str) -> bool:
            refused = main and cb.on_checkpoint is not None and cb.on_checkpoint(step, path) is False
            return not self.flag(refused)

        return dataclasses.replace(
            cb,
            on_metrics=cb.on_metrics if main else None,
            on_progress=cb.on_progress if main else None,
            on_phase=cb.on_phase if main else None,
            on_checkpoint=on_checkpoint,
            should_stop=should_stop,
            owns_run=owns_run,
        )


class StudentForward(nn.Module):
    """``forward_outputs`` on the student as one module, so that DDP wraps the whole forward the terms read
    (hidden states, attentions, an MLP's layers) while the student keeps its own class."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, torch.Tensor], **options: bool) -> ModelOutputs:
        return forward_outputs(self.model, inputs, **options)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of an HF model (the items of its ``layers`` / ``h`` / ``layer`` ModuleList); none for a
    builtin net."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS and len(module):
            return list(module)
    return []


def shard(
    model: nn.Module,
    *,
    world: int,
    device: torch.device,
    dtype: torch.dtype,
    reshard_after_forward: bool | None = None,
) -> None:
    """FSDP2: ``fully_shard`` each transformer block, then the root (bf16 parameters, fp32 reduction when
    ``dtype`` is bf16). ``reshard_after_forward`` None: FSDP2's default (the blocks reshard, the root keeps
    its parameters gathered until the backward); True: every module frees its gathered parameters after its
    forward (a frozen model that never runs a backward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if dtype == torch.bfloat16
        else MixedPrecisionPolicy()
    )
    options: dict[str, Any] = {"mesh": mesh, "mp_policy": policy}
    if reshard_after_forward is not None:
        options["reshard_after_forward"] = reshard_after_forward
    for block in transformer_blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)


# --- a frozen teacher, sharded -----------------------------------------------------------------------------


def shards_teacher(cfg: RunConfig, ranks: Ranks) -> bool:
    """Whether this run's teacher is sharded over the ranks (:func:`shard_frozen`) rather than replicated on
    each: with a sharded student (``fsdp``) on several ranks, for a teacher that runs on every batch
    (``online``, ``on_policy``: every rank runs it at the same points, in lockstep), unless
    ``DISTILLWEB_REPLICATE_TEACHER`` is set. The memory estimate follows the same rule
    (:func:`memory.teacher_shards`)."""
    from .memory import teacher_shards

    mode = "online" if cfg.scheme in ONLINE_SCHEMES else "other"
    return ranks.enabled and teacher_shards(ranks.strategy, ranks.world, mode) > 1


def shard_frozen(model: nn.Module, *, world: int, device: torch.device, dtype: torch.dtype) -> None:
    """FSDP2-shard a frozen model (an online teacher) per transformer block + root, like the student but
    with no gradients and no optimizer: every rank keeps 1/``world`` of its weights, and a forward gathers
    one block at a time and frees it afterwards (the root too: no backward follows). Every rank must run each
    forward at the same point (the training steps do), with the training precision (``dtype``) for the
    gathered weights. Run alone on one rank (rank 0's final evaluation, a cache entry one rank fills while
    the others wait on its lock), it must be :func:`gathered` first, by every rank."""
    model.eval().requires_grad_(False)
    shard(model, world=world, device=device, dtype=dtype, reshard_after_forward=True)


def place_teacher(model: nn.Module, cfg: RunConfig, ranks: Ranks) -> nn.Module:
    """The loaded teacher on this rank: sharded (:func:`shard_frozen`) where :func:`shards_teacher` says so,
    else moved to the rank's device whole; frozen either way (eval mode, no gradients). Idempotent."""
    if shards_teacher(cfg, ranks):
        if not is_sharded(model):
            shard_frozen(model, world=ranks.world, device=ranks.device, dtype=ranks.precision(cfg.train))
        return model
    return model.to(ranks.device).eval().requires_grad_(False)


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


GATHERED = "_distillweb_gathered"  # set on a sharded frozen model while its full weights are kept


def gather_frozen(model: nn.Module) -> None:
    """Gather a sharded frozen model's full weights on every rank and keep them there, so that any rank can
    then run it alone (no collective per forward); every rank must call it. A model that is not sharded, or
    already gathered, is left as it is. :func:`reshard_frozen` undoes it (no collective)."""
    fsdp = _fsdp_modules(model)
    if not fsdp or getattr(model, GATHERED, False):
        return
    for module in fsdp:
        module.set_reshard_after_forward(False, recurse=False)
    for module in fsdp:
        module.unshard()
    setattr(model, GATHERED, True)


def reshard_frozen(model: nn.Module) -> None:
    """Free the weights :func:`gather_frozen` gathered (local, no collective): the model is sharded again."""
    for module in _fsdp_modules(model):
        module.set_reshard_after_forward(True, recurse=False)
        module.reshard()
    if hasattr(model, GATHERED):
        setattr(model, GATHERED, False)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """:func:`gather_frozen` for the block, resharded on the way out; every rank must enter it. Inside a
    gather that is already in place (rank 0 alone after :func:`gather_frozen`) it does nothing at all."""
    if getattr(model, GATHERED, False) or not _fsdp_modules(model):
        yield model
        return
    gather_frozen(model)
    try:
        yield model
    finally:
        reshard_frozen(model)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward: the HF model's own switch, else ``torch.utils.checkpoint``
    around each block's forward; a builtin net without blocks is left as it is."""
    if getattr(model, "supports_gradient_checkpointing", False):
        options = {"use_reentrant": False}  # the reentrant variant breaks under DDP/FSDP
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        return
    from torch.utils.checkpoint import checkpoint

    for block in transformer_blocks(model):
        forward = block.forward

        def checkpointed(*args: Any, _forward: Callable[..., Any] = forward, **kwargs: Any) -> Any:
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


# --- sharded checkpoints (torch Distributed Checkpoint) -----------------------------------------------------


def _trained(model: nn.Module, modules: nn.Module | None) -> nn.Module:
    """The student and the terms' modules as one module: the optimizer's parameters, named."""
    return nn.ModuleDict({"student": model, "terms": modules if modules is not None else nn.ModuleDict()})


def save_sharded(
    folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, modules: nn.Module | None
) -> None:
    """Every rank writes its shards of the student, the terms' modules and the optimizer state to ``folder``
    (a DCP checkpoint, keyed by parameter name, so any number of ranks, one included, can read it back)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(_trained(model, modules), optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded(
    folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, modules: nn.Module | None
) -> None:
    """Read a DCP checkpoint written by :func:`save_sharded` with any world size into this rank's student
    (sharded or not), terms' modules and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    trained = _trained(model, modules)
    model_state, optimizer_state = get_state_dict(trained, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(trained, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def is_sharded(model: nn.Module) -> bool:
    """True where FSDP2 sharded ``model`` (``fully_shard`` applied: its parameters are DTensors, or gathered
    for a while by :func:`gather_frozen`)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    return isinstance(model, FSDPModule) or any(isinstance(p, DTensor) for p in model.parameters())


def load_full_into_sharded(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    modules: nn.Module | None,
    weights: dict[str, torch.Tensor],
    module_weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Load a one-process checkpoint (full weights, and ``optimizer.state_dict()`` keyed by parameter index)
    into a sharded (FSDP2) student, the terms' modules and the optimizer; every rank passes the full state and
    keeps its shards.

    The one-process optimizer's parameters are the current optimizer's in the same order (both are built from
    the student's parameters, then the terms' modules), so index i is the current optimizer's i-th parameter,
    named here by its place in the student or the terms' modules."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    trained = _trained(model, modules)
    names = {id(p): name for name, p in trained.named_parameters(remove_duplicate=False)}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in optimizer_state["param_groups"] for i in group["params"]]
    if len(saved_ids) != len(ordered):
        raise ConfigError(
            f"The checkpoint's optimizer holds {len(saved_ids)} parameters, this run's {len(ordered)}; "
            "it belongs to a different student."
        )
    fqn = dict(zip(saved_ids, ordered, strict=True))
    named = {
        "state": {fqn[i]: value for i, value in optimizer_state["state"].items()},
        "param_groups": [
            group | {"params": [fqn[i] for i in group["params"]]} for group in optimizer_state["param_groups"]
        ],
    }
    state = {f"student.{k}": v for k, v in weights.items()}
    state |= {f"terms.{k}": v for k, v in module_weights.items()}
    options = StateDictOptions(full_state_dict=True, strict=False)
    missing, unexpected = set_model_state_dict(trained, state, options=options)
    tied = {name for name in missing if _is_tied(trained, name)}
    if set(missing) - tied or unexpected:
        raise ConfigError(
            "The checkpoint's weights do not fit this run's student (missing: "
            f"{sorted(set(missing) - tied)[:5]}, unexpected: {sorted(unexpected)[:5]})."
        )
    set_optimizer_state_dict(trained, optimizer, named, options=StateDictOptions(full_state_dict=True))


def tied_names(model: nn.Module) -> dict[str, str]:
    """Each name of a parameter that is the same tensor as an earlier one (a tied head), mapped to that
    earlier name (in ``named_parameters`` order)."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def _is_tied(model: nn.Module, name: str) -> bool:
    """True where parameter ``name`` is the same tensor as another parameter (a tied head)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and any(p is target for n, p in params.items() if n != name)


@contextlib.contextmanager
def session(cfg: RunConfig) -> Iterator[Ranks]:
    """This process's :class:`Ranks` for ``cfg``, inside the process group when several ranks run; the group
    is left on the way out, whatever happened.

    Raises:
        ConfigError: the world size from the environment is not the run's, or the ranks cannot share the
            batch.
    """
    rank, local_rank, world = env_world()
    strategy = check_resources(cfg, world)
    if world == 1:
        yield Ranks()
        return
    cuda = _uses_cuda(cfg.train)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    keep_heap_small()
    if cuda:
        torch.cuda.set_device(device)
    started = not torch.distributed.is_initialized()
    if started:
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=collective_timeout(), rank=rank, world_size=world
        )
    # The ranks leave the group together (one leaving early can abort another's gloo threads); the others wait
    # there while rank 0 evaluates the final model, for as long as that takes.
    leaving = torch.distributed.new_group(backend="gloo", timeout=LEAVING_TIMEOUT)
    try:
        empty_init = strategy == "fsdp" and cfg.student.source in SEEDED_SOURCES and not cfg.train.lora_r
        yield Ranks(rank, local_rank, world, strategy, device, empty_init)
        torch.distributed.barrier(group=leaving)
    finally:
        if started and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
