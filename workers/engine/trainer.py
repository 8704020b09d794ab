"""The training loop: one readable function, progress reported through callbacks only.

Tasks (``RunConfig.task``): ``classification``, ``causal_lm`` (next-token prediction on text rows; the logits
at position t are trained against token t+1, padding and prompts masked with -100) and ``embedding`` (the
student learns the teacher's mean-pooled sentence embedding).

Schemes:
- ``hard_labels``: the student alone, ``ce`` on the labelled rows (the baseline of every experiment);
- ``offline``: the teacher's outputs on the train split come from the teacher-output cache (:mod:`.cache`):
  computed once, by whichever run needs them first, then reused by every run with the same key; a cache hit
  runs no teacher forward and loads no teacher weights. Classification caches full logits, causal LMs the
  top-k log-probabilities (so only the terms that read a sparse teacher, ``topk`` and ``uld``, train offline),
  embeddings the embeddings;
- ``online``: the teacher runs on every batch (needed for feature terms: hidden states, attentions, values);
- ``multi_teacher``: like ``offline``, with the weighted average of several teachers' distributions, each
  softened at the term's own temperature, as target (:func:`loss_primitives.mix_teachers`);
- ``seq_kd`` (causal LM): the teacher writes continuations of the train rows' prompts once (cached); the
  student is trained on prompt + continuation with the loss on the continuation only;
- ``on_policy`` (causal LM): with probability λ a step's continuations are sampled from the student and scored
  by the online teacher with the recipe's divergences; otherwise the step trains on the dataset's text.

Causal LMs whose teacher uses another tokenizer train with ``uld`` (plus ``ce`` on the data) in the offline,
online and on_policy schemes, on the positions where both models have read the same text (:mod:`.align`); the
other terms compare token positions one to one and are refused. ``seq_kd`` re-tokenises the teacher's text.
``self_distillation`` and ``teacher_assistant`` are chains of ``offline`` runs built by the caller.

Several ranks (``torchrun --nproc_per_node N``, :mod:`.distributed`): every rank trains on its block of the
same global batch (the student replicated with DDP or sharded with FSDP2), rank 0 alone reports, and the run
follows the one-process curve at the same global batch.

A run is repeatable bit for bit on CPU: everything is seeded from ``train.seed``, the batch at step ``s`` is a
pure function of (seed, s), and the term state, early-stopping state and RNG states are checkpointed, so a run
resumed from a checkpoint continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import adapters, distributed, methods, phases
from .batching import rows_for_step
from .checkpoint import (
    MODULES_FILE,
    Checkpoints,
    owned_name,
)
from .config import ModelConfig, RunConfig, TrainConfig
from .data import write_preprocessing
from .distributed import Ranks
from .evaluate import autocast
from .methods import TermState
from .models import load_model, save_model
from .planning import check_with_models, plan_run
from .run_evaluation import EarlyStopping, Evaluation
from .run_setup import Loaded, load_data_and_models, select_train_rows, teacher_targets
from .runtime import (
    make_batcher,
    out_of_memory_as_training_error,
)
from .step_inputs import NonFiniteWatch, StepInputs
from .teachers import _teacher_metrics


@dataclass
class Callbacks:
    """How a caller follows and steers a run. Every field is optional.

    - ``on_metrics(step, metrics)``: training metrics every ``log_every`` steps (``loss``, one entry per term,
      ``weight/<term>`` and ``<param>/<term>`` for scheduled terms, ``lr``, ``samples_per_s``, for causal LMs
      ``tokens_per_s`` (non-padding tokens), on CUDA ``gpu_memory_bytes`` (peak allocated in the interval),
      and for ``on_policy`` ``student_generated``: the fraction of micro-batches sampled from the student) and
      eval metrics every ``eval_every`` steps: ``eval/loss``, ``eval/accuracy``, ... on the eval split, or,
      with early stopping, ``val/loss``, ``val/accuracy``, ... on the validation slice (the eval split is then
      evaluated only at the end); and the eval split's ``eval/...`` of the reported student at the last step.
    - ``on_progress(step, total)``: after every step; throttle on the caller's side.
    - ``on_checkpoint(step, path)``: registers a complete checkpoint folder; returning False refuses it (the
      caller lost the run): the folder is deleted and the run stops at once, writing nothing more.
    - ``should_stop()``: polled every ``log_every`` steps; True ends the run early, with a checkpoint of the
      step while the caller still owns the run.
    - ``owns_run()``: False once the caller lost the run (another worker took it over); checked before any
      weights are written (checkpoints, best weights, the final model), so a run that lost its owner saves
      nothing.
    - ``on_phase(phase, done, total)``: progress of the long phases besides the steps (``loading``,
      ``teacher_cache``, ``seq_kd``, ``evaluation``, ``saving``; ``total`` 0 when unknown), a few times a
      second at most per phase (:mod:`.phases`).
    """

    on_metrics: Callable[[int, dict[str, float]], None] | None = None
    on_progress: Callable[[int, int], None] | None = None
    on_checkpoint: Callable[[int, str], bool | None] | None = None
    should_stop: Callable[[], bool] | None = None
    owns_run: Callable[[], bool] | None = None
    on_phase: Callable[[str, int, int], None] | None = None

    def owned(self) -> bool:
        return self.owns_run is None or self.owns_run()


@dataclass
class TrainResult:
    """What a run produced. ``student``/``teacher`` are :func:`evaluate` metrics on the eval split.

    ``stopped``: ``should_stop`` ended the run, or its caller lost it (nothing saved or evaluated).
    ``stopped_early``: early stopping ended it (saved and evaluated as usual); ``best_step`` /
    ``best_metric``: the best evaluation of the monitored metric on the validation slice (None without early
    stopping); ``restored_best``: the saved, evaluated student is the one of ``best_step``
    (``train.early_stopping_restore_best``), not the last weights. ``teacher_cache``: one entry per
    teacher-output cache entry the run used (``key``, ``split``, ``stored``, ``hit``, ``seconds``, ``path``,
    ``bytes``, ``waited``). ``teacher_forwards``: teacher forward passes this run executed (0 when everything
    came from the cache).
    """

    steps: int
    stopped: bool
    final_dir: str | None
    student: dict[str, float]
    teacher: dict[str, float] | None
    train_seconds: float
    last_checkpoint: str | None
    task: str = "classification"
    scheme: str = "offline"
    stopped_early: bool = False
    best_step: int | None = None
    best_metric: float | None = None
    restored_best: bool = False
    teacher_cache: list[dict[str, Any]] = field(default_factory=list)
    teacher_forwards: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the learning rate and the out-of-memory net ------------------------------------------------------------


def lr_at(step: int, train: TrainConfig) -> float:
    """Learning rate for 0-based ``step``: linear warm-up, then constant, linear or cosine decay to 0."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return train.lr
    progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    if train.lr_schedule == "linear":
        return train.lr * (1.0 - progress)
    return train.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _reports_out_of_memory(function: Callable[..., TrainResult]) -> Callable[..., TrainResult]:
    """``train``'s last net: out of memory in a phase without a wrap of its own still reads as out of
    memory."""

    @functools.wraps(function)
    def wrapper(cfg: RunConfig, *args: Any, **kwargs: Any) -> TrainResult:
        with out_of_memory_as_training_error(cfg, "during the run"):
            return function(cfg, *args, **kwargs)

    return wrapper


# --- the loop -----------------------------------------------------------------------------------------------


@_reports_out_of_memory
def train(cfg: RunConfig, callbacks: Callbacks | None = None) -> TrainResult:
    """Train ``cfg.student`` (distilling from ``cfg.teacher`` if the recipe asks), save it and evaluate it.

    Resumes from the newest checkpoint in ``cfg.output_dir`` when there is one.

    Args:
        cfg: the run config; ``output_dir`` must be set.
        callbacks: progress, metrics, checkpoint and stop hooks.
    Returns:
        TrainResult; when ``should_stop`` ended the run, ``stopped`` is True, the final model is not saved
        and nothing is evaluated.
    Raises:
        ConfigError, DataError, ModelLoadError: before training starts.
        TrainingError: NaN/inf loss, or out of memory (GPU or RAM, in any phase), with the run's estimate.
    """
    with distributed.session(cfg) as ranks, contextlib.ExitStack() as cleanup:
        cb = ranks.callbacks(callbacks or Callbacks())
        with phases.reporting(cb.on_phase):  # rank 0's reports only: the other ranks' on_phase is None
            return _train(cfg, cb, ranks, cleanup)


def _train(cfg: RunConfig, cb: Callbacks, ranks: Ranks, cleanup: contextlib.ExitStack) -> TrainResult:
    """:func:`train` on this process's ranks (one, without torchrun): rank 0 reports through ``cb``, the
    others get callbacks that only follow rank 0's decisions."""
    tc, task = cfg.train, cfg.task
    plan = plan_run(cfg)
    run = load_data_and_models(cfg, plan, ranks)
    cleanup.callback(run.outputs.close)  # a teacher-cache fill left unfinished keeps its rows, frees its lock
    device, student = run.device, run.student
    terms, dims, same_vocab = check_with_models(cfg, plan, run)
    run.outputs.terms = terms  # the train entry keeps the largest k the validated topk terms ask for
    rows = select_train_rows(cfg, plan, run, same_vocab=same_vocab)
    accum = tc.grad_accum_steps
    batch_size = ranks.check_batch(min(tc.batch_size, len(rows.rows)))
    modules = methods.build_term_modules(terms, dims).to(device)
    forward = ranks.wrap(student.model, tc)  # the student's forward: through DDP, or sharded in place (FSDP)
    term_state = TermState()
    params = adapters.trainable(list(student.model.parameters())) + list(modules.parameters())
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    stopper = EarlyStopping(tc)
    term_names = [t.name for t in terms]
    watch = NonFiniteWatch(term_names, device)
    saves = Checkpoints(cfg, cb, student, modules, optimizer, term_state, stopper, watch, device, ranks=ranks)
    step, last_checkpoint = saves.resume()

    started = time.perf_counter()
    targets = teacher_targets(cfg, plan, run, rows, step=step, ranks=ranks)
    inputs_of = StepInputs(cfg, plan, run, rows.batches, targets, forward=forward)
    eval_batches = make_batcher("eval", run.dataset, student, max_length=run.max_length)
    evaluation = Evaluation(
        cfg,
        cb,
        run,
        rows,
        modules,
        eval_batches=eval_batches,
        final_dir=run.output_dir / owned_name("final", cfg.attempt),
    )
    restore_best = stopper.enabled and tc.early_stopping_restore_best
    scheduled = [t for t in terms if t.schedule]
    sums = torch.zeros(1 + len(term_names), device=device)  # running totals for the log interval, no sync
    tokens = torch.zeros((), dtype=torch.long, device=device)  # causal LM: real tokens in the interval
    interval_steps, interval_start, generated = 0, time.perf_counter(), 0
    stopped = stopped_early = False
    while step < tc.max_steps:
        run.outputs.at_step(step)  # the first epoch is over: a teacher-cache entry it filled is completed
        step_rows = rows_for_step(step, rows.rows, batch_size=batch_size * accum, seed=tc.seed)
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with out_of_memory_as_training_error(cfg, f"at step {step + 1}"):
            for index, micro_rows in enumerate(np.array_split(step_rows, accum)):  # gradient accumulation
                batch, batch_rows, sampled = inputs_of.micro_batch(ranks.rows(micro_rows), step, index)
                with autocast(device):
                    inputs = inputs_of.term_inputs(batch, batch_rows, step)
                parts = methods.combine(terms, inputs, modules=modules, state=term_state)
                share = ranks.share(batch.labels, task)  # this rank's part of the global mean (None: 1 rank)
                (ranks.weigh(parts.total, share) / accum).backward()
                watch.update(step + 1, parts)
                values = torch.stack([parts.total.detach()] + [parts.parts[n] for n in term_names])
                sums += ranks.weigh(values, share) / accum
                if task == "causal_lm":
                    tokens += batch.inputs["attention_mask"].sum()
                generated += sampled
            ranks.sync_grads(modules)
            if tc.grad_clip > 0:
                ranks.clip_grad_norm(params, tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        interval_steps += 1
        if cb.on_progress:
            cb.on_progress(step, tc.max_steps)

        if step % tc.log_every == 0 or step == tc.max_steps:
            watch.check()
            means = (ranks.mean(sums) / interval_steps).tolist()  # the one sync of the interval
            elapsed = time.perf_counter() - interval_start
            logged = {
                "loss": means[0],
                **dict(zip(term_names, means[1:], strict=True)),
                "lr": lr,
                "samples_per_s": interval_steps * batch_size * accum / max(elapsed, 1e-9),
            }
            if task == "causal_lm":
                logged["tokens_per_s"] = float(ranks.sum(tokens).item()) / max(elapsed, 1e-9)
                tokens.zero_()
            if device.type == "cuda":
                logged["gpu_memory_bytes"] = float(torch.cuda.max_memory_allocated(device))
                torch.cuda.reset_peak_memory_stats(device)
            for term in scheduled:
                weight, values = methods.current_params(term, step - 1, tc.max_steps)
                logged |= {
                    (f"weight/{term.name}" if target == "weight" else f"{target}/{term.name}"): float(
                        weight if target == "weight" else values[target]
                    )
                    for target in term.schedule
                }
            for name, values in term_state.terms.items():
                if "t" in values:  # taid's interpolation
                    logged[f"t/{name}"] = float(values["t"])
            if cfg.scheme == "on_policy":
                logged["student_generated"] = generated / (interval_steps * accum)
            if cb.on_metrics:
                cb.on_metrics(step, logged)
            sums.zero_()
            interval_steps, interval_start, generated = 0, time.perf_counter(), 0
        if step % tc.eval_every == 0 and step < tc.max_steps:
            watch.check()
            # Early stopping decides on the validation slice; without it the eval split's curve is only a
            # curve.
            metrics = evaluation.student(final=False, validation=stopper.enabled)
            evaluation.emit(step, metrics, "val" if stopper.enabled else "eval")
            stopped_early = stopper.update(step, metrics)
            if restore_best and stopper.best_step == step:
                saves.save_best(step)
        saved_now = False
        if step % tc.save_every == 0:
            saved = saves.checkpoint(step)
            if saved is None:  # another worker owns the run now: stop, writing nothing more
                stopped = True
                break
            last_checkpoint, saved_now = saved, True
        if stopped_early:
            break
        if step % tc.log_every == 0 and step < tc.max_steps and cb.should_stop and cb.should_stop():
            if not saved_now:
                last_checkpoint = saves.checkpoint(step) or last_checkpoint
            stopped = True
            break
    watch.check()
    return finish(
        cfg,
        cb,
        run,
        evaluation,
        saves,
        step=step,
        stopped=stopped,
        stopped_early=stopped_early,
        restore_best=restore_best,
        train_seconds=time.perf_counter() - started,
        last_checkpoint=last_checkpoint,
        ranks=ranks,
    )


# --- the finish ---------------------------------------------------------------------------------------------


def save_final(run: Loaded, modules: torch.nn.ModuleDict, final_dir: Path, ranks: Ranks) -> None:
    """The final model (and the terms' learned projections); with several ranks, the full (unsharded)
    student gathered from every rank and written by rank 0, in the one-process format."""
    adapters.finalize(run.student, final_dir if ranks.is_main else None)  # LoRA: adapter/ saved, then merged
    state = ranks.full_state_dict(run.student.model)
    if ranks.is_main:
        with phases.part(phases.SAVING):
            save_model(run.student, final_dir, state_dict=state)
            write_preprocessing(run.dataset, final_dir)  # tabular: how raw rows become the model's inputs
            if len(modules.state_dict()):
                from safetensors.torch import save_model as save_weights_of

                save_weights_of(modules, str(final_dir / MODULES_FILE))
    ranks.barrier()


def unsharded(evaluation: Evaluation, ranks: Ranks, optimizer: torch.optim.Optimizer) -> Evaluation:
    """The evaluation rank 0 runs alone after a multi-rank run: on the saved final model, loaded as a plain
    model (a sharded student would wait for the other ranks at every forward). No step follows: the
    optimizer's state is freed first, so the full model and the evaluation take its room."""
    if not ranks.enabled:
        return evaluation
    optimizer.state.clear()
    distributed.release_free_memory()
    run = evaluation.run
    source = ModelConfig(source="run", path=str(evaluation.final_dir))
    with phases.part(phases.LOADING):
        student = load_model(source, dataset=run.dataset, role="student")
        student.model.to(run.device)
    return dataclasses.replace(evaluation, run=dataclasses.replace(run, student=student))


def _cache_uses(run: Loaded) -> list[dict[str, Any]]:
    """The cache entries the run used, train split first (a train entry filled during training is written
    after the eval split's)."""
    order = {"train": 0, "validation": 1, "eval": 2}
    return [u.to_dict() for u in sorted(run.cache.uses, key=lambda u: order.get(u.split, 3))]


def finish(
    cfg: RunConfig,
    cb: Callbacks,
    run: Loaded,
    evaluation: Evaluation,
    saves: Checkpoints,
    *,
    step: int,
    stopped: bool,
    stopped_early: bool,
    restore_best: bool,
    train_seconds: float,
    last_checkpoint: Path | None,
    ranks: Ranks | None = None,
) -> TrainResult:
    """After the loop: restore the best weights (early stopping), save the final model, evaluate the student
    (and the teacher) on the eval split. A run that was stopped or lost its owner saves and evaluates
    nothing. With several ranks, rank 0 saves the full student and evaluates it alone (the others return
    once it is saved)."""
    ranks = ranks or Ranks()
    teachers, stopper, modules = run.teachers, saves.stopper, saves.modules
    common = {"task": cfg.task, "scheme": cfg.scheme, "teacher_cache": _cache_uses(run)}
    if stopped or not cb.owned():
        return TrainResult(
            steps=step,
            stopped=True,
            final_dir=None,
            student={},
            teacher=None,
            train_seconds=train_seconds,
            last_checkpoint=str(last_checkpoint) if last_checkpoint else None,
            teacher_forwards=teachers.forwards if teachers else 0,
            **common,
        )
    run.outputs.complete_fill()  # a run shorter than an epoch: the rows it did not use, so the entry is whole
    restored = False
    if restore_best:
        if not stopped_early:  # the last weights are a candidate too, judged on the validation slice
            last_metrics = evaluation.student(final=False, validation=True)
            evaluation.emit(step, last_metrics, "val")
            stopper.update(step, last_metrics)
        if stopper.best_step not in (None, step) and saves.has_best():
            saves.load_best()
            restored = True
    if not cb.owned():
        return TrainResult(
            steps=step,
            stopped=True,
            final_dir=None,
            student={},
            teacher=None,
            train_seconds=train_seconds,
            last_checkpoint=None,
            **common,
        )
    final_dir = evaluation.final_dir
    if teachers is not None:
        teachers.gather()  # a sharded teacher whole on every rank: rank 0 evaluates alone after the save
    save_final(run, modules, final_dir, ranks)
    if not ranks.is_main:
        return TrainResult(
            steps=step,
            stopped=False,
            final_dir=str(final_dir),
            student={},
            teacher=None,
            train_seconds=train_seconds,
            last_checkpoint=str(last_checkpoint) if last_checkpoint else None,
            **common,
        )
    evaluation = unsharded(evaluation, ranks, saves.optimizer)
    student_metrics = evaluation.student(final=True)
    # The eval split's point of the reported student (with early stopping, the eval split's only point: every
    # decision was taken on the validation slice).
    evaluation.emit(step, student_metrics)
    if (
        not stopped_early and not restore_best and stopper.enabled
    ):  # the last weights' val point, for best_step
        last_metrics = evaluation.student(final=False, validation=True)
        evaluation.emit(step, last_metrics, "val")
        stopper.update(step, last_metrics)
    teacher_metrics = None
    if teachers is not None and cfg.evaluate_teacher:
        teacher_rows = (
            evaluation.eval_batches
            if evaluation.rows.same_vocab
            else make_batcher("eval", run.dataset, teachers.first, max_length=run.max_length)
        )
        teacher_metrics = _teacher_metrics(
            teachers,
            evaluation.teacher_entry(),
            run.cache,
            run.dataset,
            teacher_rows,
            task=cfg.task,
            batch_size=cfg.train.batch_size,
        )
    common["teacher_cache"] = _cache_uses(run)
    return TrainResult(
        steps=step,
        stopped=False,
        final_dir=str(final_dir),
        student=student_metrics | adapters.counts(run.student),  # LoRA: trainable vs total parameters
        teacher=teacher_metrics,
        train_seconds=train_seconds,
        last_checkpoint=str(last_checkpoint) if last_checkpoint else None,
        stopped_early=stopped_early,
        best_step=stopper.best_step if stopper.enabled else None,
        best_metric=stopper.best if stopper.enabled else None,
        restored_best=restored,
        teacher_forwards=teachers.forwards if teachers else 0,
        **common,
    )
