"""The teacher side of a run: loading the teacher(s) (:class:`Teachers`) and the teacher-output cache
entries a run reads (:class:`TeacherOutputs`): the train split's outputs (offline, multi_teacher), seq_kd's
generated rows, and the eval split's and validation slice's outputs that evaluation compares the student with.
Each batch's part of the teacher is :mod:`.teacher_targets`'s; seq_kd's continuations are :mod:`.seq_kd`'s.

Teachers are loaded only when something needs them: a run whose entries are all in the cache loads none. A
teacher of source ``server`` is never loaded: an inference server (:mod:`.served_teacher`) gives its top-k
log-probabilities and its continuations, after a check that it serves the model with the student's tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from . import distributed, phases
from .align import prefix_ends
from .batching import Batch, Batcher, LMBatcher
from .cache import (
    EVAL_TOPK,
    CacheEntry,
    TeacherCache,
    cache_key,
    dataset_description,
    gather_rows,
    model_files_fingerprint,
    pack_positions,
    state_dict_digest,
    topk_of,
    vocab_digest,
)
from .cache_fill import TrainFill, fill_mode
from .config import LossTermConfig, RunConfig
from .data import LoadedDataset
from .errors import ConfigError
from .evaluate import (
    autocast,
    efficiency_metrics,
    eval_mode,
    forward_outputs,
    lm_metrics_from_sums,
    predict_logits,
    shift_for_lm,
)
from .loss_primitives import mix_teachers
from .models import LoadedModel, forward_logits, load_model, model_dims
from .runtime import (
    make_batcher,
    out_of_memory_as_training_error,
    prepare_attention,
)
from .served_teacher import ServedTeacher
from .terms import LOSS_TERMS

if TYPE_CHECKING:
    from .planning import RunPlan

logger = logging.getLogger(__name__)


def mix_teacher_logits(logits: list[Tensor], weights: list[float], *, temperature: float = 1.0) -> Tensor:
    """Teacher logits for ``multi_teacher``: ``τ · log Σ_i w_i softmax(z_i / τ)`` (see
    :func:`loss_primitives.mix_teachers`).

    At τ = 1 (what the caches store, for evaluation and the sparse LM top-k) these are the log-probabilities
    of the weighted average of the teachers' distributions. Training terms with their own τ mix the
    per-teacher logits again at that τ (``TermInputs.teacher_mixture``), so the target is the average of the
    softened teachers. Weights are normalised to sum to 1.

    Args:
        logits: one (..., V) tensor per teacher; weights: one number >= 0 per teacher.
    Returns:
        (..., V) float32.
    """
    return mix_teachers([z.float() for z in logits], weights, temperature=temperature)


# --- loading ------------------------------------------------------------------------------------------------


class Teachers:
    """The run's teacher (or teachers, for multi_teacher), loaded only when something needs them.

    Loading runs inside a forked RNG seeded with the run's seed, so whether and when the teacher is loaded
    never changes the student's random numbers. Every forward of a loaded teacher is counted.
    """

    def __init__(
        self,
        cfg: RunConfig,
        plan: RunPlan,
        dataset: LoadedDataset,
        device: torch.device,
        *,
        max_length: int,
        ranks: distributed.Ranks | None = None,
        student: LoadedModel | None = None,
    ) -> None:
        self.cfg, self.plan, self.dataset, self.device = cfg, plan, dataset, device
        self.max_length = max_length
        self.ranks = ranks or distributed.Ranks()
        self.weights = list(plan.teacher_weights)
        self.student = student
        self._loaded: list[LoadedModel] | None = None
        self._served: ServedTeacher | None = None
        self._fingerprint: str | None = None
        self.forwards = 0

    # -- a teacher served by an inference server --
    @property
    def is_served(self) -> bool:
        """The teacher is a ``server`` model: nothing of it is loaded here."""
        return any(t.source == "server" for t in self.plan.teachers)

    @property
    def served(self) -> ServedTeacher | None:
        """The served teacher's client, checked on first use (the server lists the model, reads rows this
        long, tokenises as the student does); None for a teacher that runs here.

        Raises:
            ConfigError / ModelLoadError: what the run cannot do with a served teacher, or what differs.
        """
        if not self.is_served:
            return None
        if self._served is None:
            teacher = self.plan.teachers[0]
            if len(self.plan.teachers) > 1 or teacher.source != "server":
                raise ConfigError("A served teacher is a run's only teacher: multi_teacher cannot mix it.")
            if self.dataset.task != "causal_lm" or self.student is None or self.student.tokenizer is None:
                raise ConfigError(
                    f"Teacher '{teacher.describe()}' is served by an inference server, which serves causal "
                    "language models only: use it for a causal_lm run."
                )
            dense = sorted({t.name for t in self.plan.terms if LOSS_TERMS[t.name].needs}
                           - {t.name for t in self.plan.terms if LOSS_TERMS[t.name].kind in ("topk", "uld")})
            if dense:
                raise ConfigError(
                    f"Teacher '{teacher.describe()}' is served: it gives top-k log-probabilities, not its "
                    f"logits or features, so loss term '{dense[0]}' cannot read it. Use the topk or uld "
                    "terms."
                )
            client = ServedTeacher.for_model(teacher, self.cfg.allowed_paths)
            inputs = self.dataset.train.inputs[:3]
            texts = [] if self.dataset.pack else [t for t in inputs if isinstance(t, str)]
            ks = [t.params["k"] for t in self.plan.terms if LOSS_TERMS[t.name].kind == "topk"]
            with phases.part(phases.LOADING):  # evaluation reads the top EVAL_TOPK
                client.check(self.student.tokenizer, texts=texts, max_length=self.max_length,
                             k=max(ks + [EVAL_TOPK]))
            self._served = client
        return self._served

    @property
    def tokenizer(self) -> Any:
        """The (first) teacher's tokenizer: a served teacher's is the student's (checked)."""
        return self.student.tokenizer if self.served is not None else self.first.tokenizer

    def dims(self) -> dict[str, Any]:
        """The first teacher's :func:`models.model_dims`; a served teacher's sizes are unknown here (None)."""
        if self.served is not None:
            return {"vocab_size": None, "num_layers": None, "hidden_size": None, "num_heads": None}
        return model_dims(self.first)

    def vocab(self) -> str | None:
        return vocab_digest(self.tokenizer)

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    def models(self) -> list[LoadedModel]:
        if self.is_served:
            raise ConfigError(
                f"Teacher '{self.plan.teachers[0].describe()}' is served by an inference server: there is no "
                "model to run here. It gives top-k log-probabilities (topk and uld terms) and continuations "
                "(seq_kd)."
            )
        if self._loaded is None:
            loaded = []
            devices = [self.device] if self.device.type == "cuda" else []
            # Beside a sharded student, an online teacher is sharded too: it goes from the host to its shards.
            sharded = distributed.shards_teacher(self.cfg, self.ranks)
            for i, teacher_cfg in enumerate(self.plan.teachers):
                with (
                    phases.part(phases.LOADING),
                    torch.random.fork_rng(devices=devices),
                    out_of_memory_as_training_error(self.cfg, "while loading the teacher"),
                ):
                    torch.manual_seed(self.cfg.train.seed)
                    model = load_model(teacher_cfg, dataset=self.dataset, role="teacher")
                prepare_attention(model, self.plan)
                if self.dataset.task == "causal_lm" and model.max_length(self.max_length) < self.max_length:
                    raise ConfigError(
                        f"Teacher '{teacher_cfg.describe()}' reads at most "
                        f"{model.max_length(self.max_length)} tokens, but the student's rows are "
                        f"{self.max_length} long. Lower the dataset's max_length."
                    )
                with out_of_memory_as_training_error(self.cfg, "while loading the teacher"):
                    (model.model if sharded else model.model.to(self.device)).eval().requires_grad_(False)
                model.model.register_forward_hook(self._count)
                if (
                    i
                    and self.dataset.task != "classification"
                    and vocab_digest(model.tokenizer) != vocab_digest(loaded[0].tokenizer)
                ):
                    raise ConfigError(
                        "multi_teacher needs teachers that share one tokenizer for a "
                        f"{self.dataset.task} run; teacher {i + 1} has a different vocabulary."
                    )
                loaded.append(model)
            self._loaded = loaded
            if sharded:
                self.fingerprint()  # from the whole weights, before they are spread over the ranks
                for model in loaded:
                    distributed.place_teacher(model.model, self.cfg, self.ranks)
        return self._loaded

    def gathered(self) -> contextlib.AbstractContextManager[Any]:
        """Every loaded teacher's whole weights on every rank for the block (a sharded teacher; nothing
        otherwise), so one rank may run it alone; every rank must enter it."""
        stack = contextlib.ExitStack()
        for model in self._loaded or []:
            stack.enter_context(distributed.gathered(model.model))
        return stack

    def gather(self) -> None:
        """Keep a sharded teacher's whole weights on every rank from now on (rank 0's final evaluation runs
        alone); every rank must call it."""
        for model in self._loaded or []:
            distributed.gather_frozen(model.model)

    def _count(self, *_args: Any) -> None:
        self.forwards += 1

    @property
    def first(self) -> LoadedModel:
        return self.models()[0]

    def fingerprint(self) -> str:
        """What identifies the teachers' outputs: file digests where possible, else state-dict digests."""
        if self._fingerprint is None and self.served is not None:
            served = self.served
            self._fingerprint = "served:" + cache_key(
                {"server": served.name, "model": served.model, "root": served.model_info().get("root"),
                 "vocab": self.vocab()}
            )
        if self._fingerprint is None:
            parts = []
            for i, teacher_cfg in enumerate(self.plan.teachers):
                files = model_files_fingerprint(teacher_cfg)
                if files is None:
                    loaded = self.models()[i]
                    files = f"state:{state_dict_digest(loaded.model)}:vocab:{vocab_digest(loaded.tokenizer)}"
                parts.append(files)
            self._fingerprint = (
                parts[0]
                if len(parts) == 1
                else cache_key({"teachers": parts, "weights": [w / sum(self.weights) for w in self.weights]})
            )
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """Manifest fields recorded with a computed entry, so a later hit needs no teacher to check the
        run."""
        described = {
            "teacher_dims": self.dims(),
            "vocab_digest": self.vocab(),
            "teachers": [c.describe() for c in self.plan.teachers],
        }
        if self.served is not None:
            stats = self.served.stats
            described["served"] = {
                "server": self.served.name,
                "model": self.served.model,
                "requests": stats.requests,
                "tokens": stats.tokens,
                "tokens_per_s": round(stats.tokens_per_s, 1),
            }
        return described

    # -- dense outputs on a batch --
    def logits(self, batch_for: Callable[[LoadedModel], Batch]) -> Tensor:
        """The teachers' (mixed) logits on one batch; ``batch_for`` builds each teacher's view of it."""
        outs = []
        for loaded in self.models():
            batch = batch_for(loaded)
            with autocast(self.device):
                outs.append(forward_outputs(loaded.model, batch.inputs).logits.float())
        return outs[0] if len(outs) == 1 else mix_teacher_logits(outs, self.weights)


# --- teacher outputs for the cache --------------------------------------------------------------------------


@torch.no_grad()
def _classification_outputs(
    teachers: Teachers, split: str, batch_size: int, *, dataset: LoadedDataset | None = None
) -> dict[str, Tensor]:
    """The teachers' logits on ``split`` of ``dataset`` (default: the run's dataset)."""
    per_teacher = []
    for loaded in teachers.models():
        batcher = make_batcher(split, dataset or teachers.dataset, loaded)
        per_teacher.append(
            predict_logits(loaded.model, batcher, device=teachers.device, batch_size=batch_size)
        )
    if len(per_teacher) == 1:
        return {"logits": per_teacher[0]}
    # The τ = 1 mixture (evaluation, agreement) and each teacher's logits, so every term can mix at its own τ.
    return {
        "logits": mix_teacher_logits(per_teacher, teachers.weights),
        "teacher_logits": torch.stack(per_teacher),
    }  # (K, N, C)


@torch.no_grad()
def _embedding_outputs(
    teachers: Teachers, split: str, batch_size: int, *, dataset: LoadedDataset | None = None
) -> dict[str, Tensor]:
    loaded = teachers.first
    batcher = make_batcher(split, dataset or teachers.dataset, loaded)
    return {
        "embeddings": predict_logits(loaded.model, batcher, device=teachers.device, batch_size=batch_size)
    }


@torch.no_grad()
def _lm_topk_outputs(
    teachers: Teachers, batcher: LMBatcher, *, k: int, batch_size: int, texts: list[str] | None = None
) -> dict[str, Tensor]:
    """Top-k log-probs (+ tail, + the target token's log-prob) at every predicted position of every row.

    With ``texts`` (the texts the rows were made from, one per row) and a fast teacher tokenizer, also the
    ``prefix_end`` of every predicted position (:func:`align.prefix_ends`), so a run whose student uses
    another tokenizer can pair its positions with the entry's without the teacher.
    """
    ends = (
        prefix_ends(texts, batcher.token_rows, tokenizer=teachers.tokenizer)
        if texts is not None
        else None
    )
    per_row: list[dict[str, Tensor]] = []
    if teachers.served is not None:  # the whole split, a batch of rows at a time, several requests at once
        rows = batcher.token_rows
        chunks = [list(range(i, min(i + batch_size, len(rows)))) for i in range(0, len(rows), batch_size)]
        started, tokens = time.perf_counter(), sum(len(r) for r in rows)
        for chunk in phases.track(chunks, len(rows)):
            per_row.extend(_served_rows(teachers, [rows[i] for i in chunk], chunk, k=k, ends=ends))
        seconds = time.perf_counter() - started
        logger.info("served teacher: %d rows, %d tokens in %.1f s (%.0f tokens/s)",
                    len(rows), tokens, seconds, tokens / max(seconds, 1e-9))
        return pack_positions(per_row)
    with contextlib.ExitStack() as stack:
        for loaded in teachers.models():
            stack.enter_context(eval_mode(loaded.model))
        for batch in phases.track(batcher.iter_batches(batch_size), len(batcher)):
            per_row.extend(_lm_topk_batch(teachers, batch, k=k, ends=ends))
    return pack_positions(per_row)


@torch.no_grad()
def _lm_topk_batch(
    teachers: Teachers, batch: Batch, *, k: int, ends: list[list[int]] | None
) -> list[dict[str, Tensor]]:
    """One batch's rows as :func:`_lm_topk_outputs` stores them: per row, its predicted positions' top-k
    log-probs (float16), ids (int32), tail (float16), the target token's log-prob, and ``prefix_end`` with
    ``ends``. A served teacher's come from its server."""
    if teachers.served is not None:
        ids, lengths = batch.inputs["input_ids"].cpu(), batch.inputs["attention_mask"].sum(1).tolist()
        rows = [ids[b, : int(n)].tolist() for b, n in enumerate(lengths)]
        return _served_rows(teachers, rows, batch.indices.tolist(), k=k, ends=ends)
    batch = batch.to(teachers.device)
    logits, labels = shift_for_lm(teachers.logits(lambda _loaded, b=batch: b), batch.inputs["input_ids"])
    top = topk_of(logits, k)
    target = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    lengths = batch.inputs["attention_mask"].sum(1).tolist()
    per_row = []
    for b, (length, row) in enumerate(zip(lengths, batch.indices.tolist(), strict=True)):
        n = max(int(length) - 1, 0)
        per_row.append(
            {
                "logprobs": top.logprobs[b, :n].half().cpu(),
                "indices": top.indices[b, :n].int().cpu(),
                "tail_logmass": top.tail_logmass[b, :n].half().cpu(),
                "target_logprob": target[b, :n].float().cpu(),
            }
        )
        if ends is not None:
            per_row[-1]["prefix_end"] = torch.as_tensor(ends[row][:n], dtype=torch.int64)
    return per_row


def _served_rows(
    teachers: Teachers, rows: list[list[int]], row_ids: list[int], *, k: int, ends: list[list[int]] | None
) -> list[dict[str, Tensor]]:
    """:func:`_lm_topk_batch`'s records of token ``rows`` (split rows ``row_ids``) from the served teacher."""
    records = teachers.served.topk(rows, k)
    teachers.forwards += 1
    if ends is not None:
        for record, row, tokens in zip(records, row_ids, rows, strict=True):
            n = max(len(tokens) - 1, 0)
            record["prefix_end"] = torch.as_tensor(ends[row][:n], dtype=torch.int64)
    return records


@torch.no_grad()
def _dense_rows(
    teachers: Teachers, rows: np.ndarray, batchers: dict[int, Batcher]
) -> list[dict[str, Tensor]]:
    """Classification logits (several teachers: their mixture and each one's) or embeddings of ``rows`` of
    the train split, one record per row, as :func:`_classification_outputs` / :func:`_embedding_outputs`
    store them."""
    per_teacher = []
    for loaded in teachers.models():
        if id(loaded) not in batchers:
            batchers[id(loaded)] = make_batcher("train", teachers.dataset, loaded)
        batch = batchers[id(loaded)].batch(rows).to(teachers.device)
        with eval_mode(loaded.model), autocast(teachers.device):
            per_teacher.append(forward_logits(loaded.model, batch.inputs).float().cpu())
    if teachers.dataset.task == "embedding":
        return [{"embeddings": e} for e in per_teacher[0]]
    if len(per_teacher) == 1:
        return [{"logits": z} for z in per_teacher[0]]
    mixed = mix_teacher_logits(per_teacher, teachers.weights)
    stacked = torch.stack(per_teacher, dim=1)  # (B, K, C)
    return [{"logits": mixed[b], "teacher_logits": stacked[b]} for b in range(len(rows))]


def _assemble_dense(records: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """A classification or embedding entry's tensors from its rows' records, in row order."""
    out = {name: torch.stack([r[name] for r in records]) for name in records[0]}
    if "teacher_logits" in out:
        out["teacher_logits"] = out["teacher_logits"].transpose(0, 1).contiguous()  # (K, N, C)
    return out


# --- the run's teacher-output cache entries -----------------------------------------------------------------


class TeacherOutputs:
    """The teacher-output cache entries a run reads: the train split's (offline, multi_teacher, seq_kd's
    generated rows), the eval split's and the validation slice's. Each is looked up by a key of everything
    it depends on and computed (loading the teacher) only on a miss; the eval and validation entries once per
    run.

    ``terms``: the run's terms; LM train entries keep the largest k their topk terms ask for.
    """

    def __init__(
        self,
        cfg: RunConfig,
        plan: RunPlan,
        teachers: Teachers | None,
        cache: TeacherCache,
        *,
        terms: list[LossTermConfig],
        max_length: int,
    ) -> None:
        self.cfg, self.plan, self.teachers, self.cache, self.terms = cfg, plan, teachers, cache, terms
        self.task, self.max_length = cfg.task, max_length
        self._eval: CacheEntry | None = None
        self._validation: CacheEntry | None = None
        self.fill: TrainFill | None = None

    def stored_for(self, split: str) -> dict[str, Any]:
        """What a cache entry of ``split`` holds (LM train entries keep the largest k the topk terms ask for,
        else EVAL_TOPK; uld reads whatever k the entry holds)."""
        if self.task == "classification":
            # Several teachers: each one's logits are stored beside their mixture (terms mix at their own τ).
            return {
                "kind": "logits",
                "dtype": "float32",
                **({"per_teacher": True} if split == "train" and len(self.plan.teachers) > 1 else {}),
            }
        if self.task == "embedding":
            return {"kind": "embeddings", "dtype": "float32"}
        ks = (
            [t.params["k"] for t in self.terms if LOSS_TERMS[t.name].kind == "topk"]
            if split == "train"
            else []
        )
        return {"kind": "topk", "k": max(ks) if ks else EVAL_TOPK, "tail": True, "dtype": "float16"}

    def describe(self, split: str, stored: dict[str, Any]) -> dict[str, Any]:
        """Everything the cache key of an entry depends on."""
        return {
            "teacher": self.teachers.fingerprint(),
            "split": split,
            "stored": stored,
            "dataset": dataset_description(self.cfg.dataset, task=self.task, max_length=self.max_length),
        }

    def entry_for(
        self, split: str, stored: dict[str, Any], compute: Callable[[], dict[str, Tensor]]
    ) -> CacheEntry:
        """A teacher-output cache entry for ``split``; ``compute`` runs (and loads the teacher) on a miss."""
        description = self.describe(split, stored)
        with out_of_memory_as_training_error(
            self.cfg, f"while the teacher computed its outputs on the {split} split"
        ):
            return self.cache.get_or_compute(
                cache_key(description),
                lambda: (_filling(compute), self.teachers.describe()),
                split=split,
                stored=stored,
                description=description,
            )

    def existing_train_entry(self) -> CacheEntry | None:
        """The train entry if the cache holds it already (looking costs no teacher forward)."""
        return self.cache.lookup(cache_key(self.describe("train", self.stored_for("train"))))

    def train_entry(self, train_batches: Batcher | LMBatcher, *, same_vocab: bool) -> CacheEntry:
        """The teachers' outputs on the train split, by row of ``train_batches``."""
        teachers, dataset, batch_size = self.teachers, self.teachers.dataset, self.cfg.train.batch_size

        def compute() -> dict[str, Tensor]:
            if self.task == "classification":
                return _classification_outputs(teachers, "train", batch_size)
            if self.task == "embedding":
                return _embedding_outputs(teachers, "train", batch_size)
            # The teacher's own tokens (they are the student's unless a cross-tokenizer run), cut at the same
            # max length either way, so the entry is the same whichever student asks for it first.
            rows = (
                train_batches
                if same_vocab
                else make_batcher("train", dataset, teachers.first, max_length=self.max_length)
            )
            return _lm_topk_outputs(
                teachers,
                rows,
                k=self.stored_for("train")["k"],
                batch_size=batch_size,
                texts=None if dataset.pack else dataset.train.inputs,
            )

        return self.entry_for("train", self.stored_for("train"), compute)

    def train_fill(
        self,
        train_batches: Batcher | LMBatcher,
        *,
        same_vocab: bool,
        until_step: int,
        ranks: distributed.Ranks,
    ) -> TrainFill | None:
        """The train entry filled while the first epoch trains (:mod:`.cache_fill`), or None where it is in
        the cache already or is filled up front: seq_kd (its rows are generated first), a teacher with
        another tokenizer (its rows are its own), or ``DISTILLWEB_TEACHER_CACHE_FILL=before``."""
        if (
            self.cfg.scheme == "seq_kd"
            or (self.task == "causal_lm" and not same_vocab)
            or fill_mode() == "before"
            or self.existing_train_entry() is not None
        ):
            return None
        teachers, batch_size, k = self.teachers, self.cfg.train.batch_size, None
        stored = self.stored_for("train")
        description = self.describe("train", stored)
        if self.task == "causal_lm":
            k = stored["k"]
            texts = None if teachers.dataset.pack else teachers.dataset.train.inputs
            ends = (
                prefix_ends(texts, train_batches.token_rows, tokenizer=teachers.tokenizer)
                if texts is not None
                else None
            )

            def outputs(rows: np.ndarray) -> list[dict[str, Tensor]]:
                return _lm_topk_batch(teachers, train_batches.batch(rows), k=k, ends=ends)

            assemble = pack_positions
        else:
            batchers: dict[int, Batcher] = {}

            def outputs(rows: np.ndarray) -> list[dict[str, Tensor]]:
                return _dense_rows(teachers, rows, batchers)

            assemble = _assemble_dense

        def compute(rows: np.ndarray) -> dict[int, dict[str, Tensor]]:
            with out_of_memory_as_training_error(
                self.cfg, "while the teacher computed its outputs on the train split"
            ):
                return dict(zip(rows.tolist(), outputs(rows), strict=True))
        fill = TrainFill(
            self.cache,
            cache_key(description),
            n_rows=len(train_batches),
            compute=compute,
            assemble=assemble,
            manifest=teachers.describe,
            split="train",
            stored=stored,
            description=description,
            until_step=until_step,
            batch_size=batch_size,
            ranks=ranks,
        )
        if not fill.owner and ranks.flag(self.existing_train_entry() is not None):  # finished meanwhile
            fill.close()
            return None
        self.fill = fill
        return fill

    def at_step(self, step: int) -> None:
        """Complete the train entry being filled once the first epoch is over (all ranks at the same step)."""
        if self.fill is not None and self.fill.due(step):
            self.complete_fill()

    def complete_fill(self) -> None:
        """Complete the train entry being filled, if any: at the end of the first epoch, or at the end of a
        run shorter than one epoch (so a finished run always leaves a whole entry for the next)."""
        if self.fill is not None and self.fill.entry is None:
            self.fill.complete()

    def close(self) -> None:
        """The run is over: an unfinished fill keeps its rows for the next run and frees the entry's lock."""
        if self.fill is not None:
            self.fill.close()

    def eval_entry(self, eval_batches: Batcher | LMBatcher, *, same_vocab: bool) -> CacheEntry | None:
        """The teachers' outputs on the eval split (None without a teacher), computed at most once per run."""
        teachers = self.teachers
        if teachers is not None and self._eval is None:
            batch_size = self.cfg.train.batch_size

            def compute() -> dict[str, Tensor]:
                if self.task == "classification":
                    return _classification_outputs(teachers, "eval", batch_size)
                if self.task == "embedding":
                    return _embedding_outputs(teachers, "eval", batch_size)
                # The teacher's own tokens (they are the student's unless a cross-tokenizer run), cut at the
                # run's max length like the train entry: the key holds that length.
                rows = (
                    eval_batches
                    if same_vocab
                    else make_batcher("eval", teachers.dataset, teachers.first, max_length=self.max_length)
                )
                return _lm_topk_outputs(teachers, rows, k=EVAL_TOPK, batch_size=batch_size)

            self._eval = self.entry_for("eval", self.stored_for("eval"), compute)
        return self._eval

    def validation_entry(
        self, val_dataset: LoadedDataset | None, val_batches: Batcher | LMBatcher | None, held_out: np.ndarray
    ) -> CacheEntry | None:
        """The teachers' outputs on the validation slice: an entry of its own, keyed by the slice's rows."""
        teachers = self.teachers
        if teachers is not None and self._validation is None:
            batch_size = self.cfg.train.batch_size

            def compute() -> dict[str, Tensor]:
                if self.task == "classification":
                    return _classification_outputs(teachers, "eval", batch_size, dataset=val_dataset)
                if self.task == "embedding":
                    return _embedding_outputs(teachers, "eval", batch_size, dataset=val_dataset)
                return _lm_topk_outputs(teachers, val_batches, k=EVAL_TOPK, batch_size=batch_size)

            stored = self.stored_for("eval") | {"validation_rows": _rows_digest(held_out)}
            self._validation = self.entry_for("validation", stored, compute)
        return self._validation


def _filling(compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """A cache entry's ``compute``, its rows reported as ``teacher_cache`` progress."""
    with phases.within(phases.TEACHER_CACHE):
        return compute()


def _rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:32]


# --- the teacher's own metrics ------------------------------------------------------------------------------


# The teacher's efficiency is measured once per device and kept beside its eval entry; figures measured by an
# earlier way of measuring (no spread, the process's memory) are measured again.
EFFICIENCY_VERSION = 2


def _teacher_metrics(
    teachers: Teachers,
    entry: CacheEntry,
    cache: TeacherCache,
    dataset: LoadedDataset,
    eval_batches: Batcher | LMBatcher,
    *,
    task: str,
    batch_size: int,
) -> dict[str, float]:
    """The teacher's own eval metrics: quality from its cached eval outputs, efficiency measured once per
    device and kept beside the entry (so a cache hit needs no teacher at all). Its rows are reported as
    ``evaluation`` progress."""
    rows = len(eval_batches)
    phases.report(phases.TEACHER_EVALUATION, 0, rows)
    if task == "classification":
        from .evaluate import classification_metrics

        metrics = classification_metrics(entry.tensors["logits"], torch.as_tensor(dataset.eval.labels))
    elif task == "causal_lm":
        total, count = 0.0, 0
        with phases.within(phases.TEACHER_EVALUATION):
            for batch in phases.track(eval_batches.iter_batches(batch_size), rows):
                _, labels = shift_for_lm(batch.inputs["input_ids"], batch.labels)
                target = gather_rows(entry, "target_logprob", batch.indices, labels.shape[1])
                mask = labels != -100
                total -= float(target[mask].double().sum())
                count += int(mask.sum())
        metrics = lm_metrics_from_sums(total, count)
    else:
        metrics = {}
    phases.report(phases.TEACHER_EVALUATION, rows, rows)
    device = teachers.device
    label = f"{device.type}:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"
    label = f"{label}@{EFFICIENCY_VERSION}"  # figures measured the way this version measures them
    efficiency = (entry.extra("efficiency") or {}).get(label)
    if teachers.is_served:  # measured on the server's hardware, not here
        efficiency = {}
    if efficiency is None:
        efficiency = {}
        for loaded in teachers.models():
            one = efficiency_metrics(loaded.model, make_batcher("eval", dataset, loaded), device=device)
            efficiency = one if not efficiency else _sum_efficiency(efficiency, one)
        cache.write_extra(entry, "efficiency", {**(entry.extra("efficiency") or {}), label: efficiency})
    return metrics | efficiency


def _sum_efficiency(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Efficiency of running two models one after the other (a multi-teacher ensemble): sizes and latencies
    (each quantile, a bound of the sum's) add up, throughputs combine harmonically, the memory is the larger
    model's (one runs at a time), and the setting is the first's (both are measured in the same one)."""
    summed = ("params", "params_non_embedding", "size_bytes") + tuple(
        k for k in a if k.startswith("latency_ms_") and k in b
    )
    out: dict[str, Any] = {k: a[k] + b[k] for k in summed if k in a and k in b}
    for k in ("throughput_per_s", "tokens_per_s"):
        if k in a and k in b:
            out[k] = 1.0 / (1.0 / a[k] + 1.0 / b[k])
    for k in ("peak_memory_bytes", "model_memory_bytes", "weights_bytes", "activation_bytes"):
        if k in a and k in b:
            out[k] = max(a[k], b[k])
    for k in ("efficiency_setting", "latency_repeats", "memory_batch"):
        if k in a:
            out[k] = a[k]
    return out
