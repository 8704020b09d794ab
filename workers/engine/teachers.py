"""The teacher side of a run: loading the teacher(s) (:class:`Teachers`), their part of each batch's
:class:`TermInputs` (:class:`TeacherTargets`), and the teacher-output cache entries a run reads
(:class:`TeacherOutputs`): the train split's outputs (offline, multi_teacher), seq_kd's generated rows, and
the eval split's and validation slice's outputs that evaluation compares the student with.

Teachers are loaded only when something needs them: a run whose entries are all in the cache loads none.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .align import align_positions, decoded_prefix_ends, gather_aligned, prefix_ends
from .cache import (
    EVAL_TOPK,
    CacheEntry,
    TeacherCache,
    cache_key,
    dataset_description,
    gather_rows,
    gather_topk,
    model_files_fingerprint,
    pack_positions,
    row_tokens,
    state_dict_digest,
    topk_of,
    vocab_digest,
)
from .config import LossTermConfig, RunConfig
from .data import Batch, Batcher, LMBatcher, LoadedDataset
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
from .losses import mix_teachers
from .models import LoadedModel, load_model, model_dims
from .runtime import (
    generate_continuations,
    lm_max_length,
    make_batcher,
    out_of_memory_as_training_error,
    prepare_attention,
    prompt_length,
    step_seed,
)
from .terms import LOSS_TERMS

if TYPE_CHECKING:
    from .trainer import RunPlan


def mix_teacher_logits(logits: list[Tensor], weights: list[float], *, temperature: float = 1.0) -> Tensor:
    """Teacher logits for ``multi_teacher``: ``τ · log Σ_i w_i softmax(z_i / τ)`` (see
    :func:`losses.mix_teachers`).

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


# --- loading and targets ------------------------------------------------------------------------------------


class Teachers:
    """The run's teacher (or teachers, for multi_teacher), loaded only when something needs them.

    Loading runs inside a forked RNG seeded with the run's seed, so whether and when the teacher is loaded
    never changes the student's random numbers. Every forward of a loaded teacher is counted.
    """

    def __init__(
        self, cfg: RunConfig, plan: RunPlan, dataset: LoadedDataset, device: torch.device, *, max_length: int
    ) -> None:
        self.cfg, self.plan, self.dataset, self.device = cfg, plan, dataset, device
        self.max_length = max_length
        self.weights = list(plan.teacher_weights)
        self._loaded: list[LoadedModel] | None = None
        self._fingerprint: str | None = None
        self.forwards = 0

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    def models(self) -> list[LoadedModel]:
        if self._loaded is None:
            loaded = []
            devices = [self.device] if self.device.type == "cuda" else []
            for i, teacher_cfg in enumerate(self.plan.teachers):
                with (
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
                    model.model.to(self.device).eval().requires_grad_(False)
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
        return self._loaded

    def _count(self, *_args: Any) -> None:
        self.forwards += 1

    @property
    def first(self) -> LoadedModel:
        return self.models()[0]

    def fingerprint(self) -> str:
        """What identifies the teachers' outputs: file digests where possible, else state-dict digests."""
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
        first = self.first
        return {
            "teacher_dims": model_dims(first),
            "vocab_digest": vocab_digest(first.tokenizer),
            "teachers": [c.describe() for c in self.plan.teachers],
        }

    # -- dense outputs on a batch --
    def logits(self, batch_for: Callable[[LoadedModel], Batch]) -> Tensor:
        """The teachers' (mixed) logits on one batch; ``batch_for`` builds each teacher's view of it."""
        outs = []
        for loaded in self.models():
            batch = batch_for(loaded)
            with autocast(self.device):
                outs.append(forward_outputs(loaded.model, batch.inputs).logits.float())
        return outs[0] if len(outs) == 1 else mix_teacher_logits(outs, self.weights)


class TeacherTargets:
    """The teacher's part of each training batch's :class:`TermInputs`.

    ``cached``: looked up by row in a teacher-output cache entry (no teacher forward). ``online``: the teacher
    runs on the batch, returning what the terms need (logits, hidden states, attentions, values, embeddings).

    Causal LMs across tokenizers (``same_tokens`` False) pair each student position with the teacher position
    that has read the same text (:mod:`.align`) and add ``teacher_paired``: from the cache, the entry's rows
    (the teacher's tokens of the same texts) are gathered at the paired positions; online, the teacher reads
    the batch's texts with its own tokenizer; on student samples (``on_policy``, no dataset rows), it reads
    their decoded text.
    """

    def __init__(
        self,
        teachers: Teachers,
        *,
        entry: CacheEntry | None,
        task: str,
        same_tokens: bool,
        student: LoadedModel | None = None,
        student_rows: LMBatcher | None = None,
    ) -> None:
        self.teachers, self.entry, self.task, self.same_tokens = teachers, entry, task, same_tokens
        self.student, self.student_rows = student, student_rows
        self._own: dict[int, Any] = {}
        self._ends: dict[str, list[list[int]] | None] = {}

    def _prefix_ends(self, key: str, rows: LMBatcher, tokenizer: Any) -> list[list[int]] | None:
        if key not in self._ends:
            self._ends[key] = prefix_ends(
                self.teachers.dataset.train.inputs, rows.token_rows, tokenizer=tokenizer
            )
        return self._ends[key]

    def _alignment(
        self, loaded: LoadedModel, rows: np.ndarray | None, student_width: int, teacher_width: int
    ) -> Tensor | None:
        """Cross-tokenizer pairs of positions that have read the same text (:mod:`.align`); None when either
        tokenizer gives no character offsets (positions are then paired by index)."""
        if rows is None or self.student is None or self.student_rows is None:
            return None
        s_ends = self._prefix_ends("student", self.student_rows, self.student.tokenizer)
        t_ends = self._prefix_ends(f"teacher-{id(loaded)}", self._own[id(loaded)], loaded.tokenizer)
        if s_ends is None or t_ends is None:
            return None
        ids = rows.tolist()
        return align_positions(
            [s_ends[i] for i in ids],
            [t_ends[i] for i in ids],
            student_width=student_width,
            teacher_width=teacher_width,
        )

    def _teacher_batch(self, loaded: LoadedModel, batch: Batch, rows: np.ndarray) -> Batch:
        """The teacher's view of a batch: the same tensors when it shares the student's inputs, else the same
        rows tokenised with its own tokenizer."""
        if self.same_tokens:
            return batch
        key = id(loaded)
        if key not in self._own:
            self._own[key] = make_batcher("train", self.teachers.dataset, loaded)
        return self._own[key].batch(rows).to(self.teachers.device)

    def _cached_teacher_ends(self) -> list[list[int]]:
        """Prefix ends of the cache entry's predicting positions, one list per train row: stored in the entry,
        or (an entry written before they were stored) from the teacher's tokenizer, which loads the
        teacher."""
        if "cached" not in self._ends:
            t = self.entry.tensors
            offsets = t["offsets"].tolist()
            if "prefix_end" in t:
                flat = t["prefix_end"].tolist()
                ends: list[list[int]] | None = [
                    flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)
                ]
            else:
                loaded = self.teachers.first
                rows = make_batcher(
                    "train", self.teachers.dataset, loaded, max_length=self.teachers.max_length
                )
                full = prefix_ends(
                    self.teachers.dataset.train.inputs, rows.token_rows, tokenizer=loaded.tokenizer
                )
                ends = (
                    None
                    if full is None
                    else [row[: offsets[i + 1] - offsets[i]] for i, row in enumerate(full)]
                )
            if ends is None:
                raise ConfigError(
                    "Cross-tokenizer uld from the teacher cache pairs positions by the characters each "
                    "token covers, which needs a fast (Rust) tokenizer, and the teacher's is a slow "
                    "one."
                )
            self._ends["cached"] = ends
        return self._ends["cached"]

    def _cached_across_tokenizers(self, rows: Tensor, width: int) -> dict[str, Any]:
        """The cached top-k of the teacher positions paired with each of the student's ``width`` predicting
        positions, and the ``teacher_paired`` mask."""
        s_ends = self._prefix_ends("student", self.student_rows, self.student.tokenizer)
        if s_ends is None:
            raise ConfigError(
                "Cross-tokenizer uld from the teacher cache pairs positions by the characters each "
                "token covers, which needs a fast (Rust) tokenizer, and the student's is a slow one."
            )
        t_ends = self._cached_teacher_ends()
        ids = rows.tolist()
        t_width = max(1, max(len(t_ends[i]) for i in ids))
        top = gather_topk(self.entry, rows, t_width, self.teachers.device)  # (B, T_t, k)
        index = align_positions(
            [s_ends[i] for i in ids],
            [t_ends[i] for i in ids],
            student_width=width,
            teacher_width=t_width,
            teacher_predicting_only=True,
        )  # (B, width)
        picked, paired = gather_aligned(top, index)
        return {"teacher_topk": picked, "teacher_paired": paired}

    def _sampled_view(self, loaded: LoadedModel, batch: Batch) -> tuple[Batch, Tensor]:
        """Student-sampled rows (``on_policy``) for a teacher with another tokenizer: their decoded text read
        by the teacher, and the (B, T_s − 1) pairs of positions that have read the same text."""
        ids, lengths = batch.inputs["input_ids"].cpu(), batch.inputs["attention_mask"].sum(1).tolist()
        student_rows = [ids[b, : int(n)].tolist() for b, n in enumerate(lengths)]
        texts, s_ends = decoded_prefix_ends(student_rows, tokenizer=self.student.tokenizer)
        own = LMBatcher.from_texts(
            texts, tokenizer=loaded.tokenizer, max_length=lm_max_length(self.teachers.dataset, loaded)
        )
        t_ends = prefix_ends(texts, own.token_rows, tokenizer=loaded.tokenizer)
        if t_ends is None:
            raise ConfigError(
                "Cross-tokenizer on_policy pairs the student's samples with the teacher's reading of "
                "their text by the characters each token covers, which needs a fast (Rust) "
                "tokenizer, and the teacher's is a slow one."
            )
        teacher_batch = own.batch(np.arange(len(texts))).to(self.teachers.device)
        index = align_positions(
            s_ends,
            t_ends,
            student_width=ids.shape[1] - 1,
            teacher_width=teacher_batch.inputs["input_ids"].shape[1] - 1,
        )
        return teacher_batch, index

    @torch.no_grad()
    def fields(self, batch: Batch, rows: np.ndarray | None, *, plan: RunPlan) -> dict[str, Any]:
        device = self.teachers.device
        if self.entry is not None:
            t = self.entry.tensors
            if self.task == "classification":
                fields = {"teacher_logits": t["logits"].to(device)[batch.indices]}
                if "teacher_logits" in t:  # multi_teacher: each teacher's logits, (K, B, C)
                    fields |= {
                        "teacher_mixture": t["teacher_logits"].to(device)[:, batch.indices],
                        "teacher_weights": tuple(self.teachers.weights),
                    }
                return fields
            if self.task == "embedding":
                return {"teacher_embedding": t["embeddings"].to(device)[batch.indices]}
            width = batch.inputs["input_ids"].shape[1] - 1
            if self.same_tokens:
                return {"teacher_topk": gather_topk(self.entry, batch.indices.cpu(), width, device)}
            return self._cached_across_tokenizers(batch.indices.cpu(), width)
        needs = plan.needs
        loaded = self.teachers.first
        index: Tensor | None = None
        if self.task == "causal_lm" and not self.same_tokens and rows is None:
            teacher_batch, index = self._sampled_view(loaded, batch)
        else:
            teacher_batch = self._teacher_batch(loaded, batch, rows)
        with autocast(device):
            out = forward_outputs(
                loaded.model,
                teacher_batch.inputs,
                hidden="hidden_states" in needs,
                attentions="attentions" in needs,
                values="values" in needs,
                embedding=self.task == "embedding",
                scores="attention_scores" in needs,
            )
        fields: dict[str, Any] = {
            "teacher_hidden": out.hidden,
            "teacher_attentions": out.attentions,
            "teacher_values": out.values,
            "teacher_embedding": out.embedding,
            "teacher_attention_scores": out.scores,
        }
        if self.task == "causal_lm":
            logits = out.logits.float()[:, :-1]
            student_width = batch.inputs["input_ids"].shape[1] - 1
            if index is None and not self.same_tokens:
                index = self._alignment(loaded, rows, student_width, logits.shape[1])
            if index is None:
                fields["teacher_logits"] = _fit_width(logits, student_width)
            else:
                fields["teacher_logits"], fields["teacher_paired"] = gather_aligned(logits, index)
        elif self.task == "classification":
            fields["teacher_logits"] = out.logits.float()
        return fields


def _fit_width(logits: Tensor, width: int) -> Tensor:
    """Crop or pad (B, T, V) teacher logits to ``width`` positions (cross-tokenizer rows differ in length; the
    padding is a uniform distribution, and positions the student masks never count)."""
    if logits.shape[1] >= width:
        return logits[:, :width]
    pad = logits.new_zeros(logits.shape[0], width - logits.shape[1], logits.shape[2])
    return torch.cat([logits, pad], dim=1)


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
        prefix_ends(texts, batcher.token_rows, tokenizer=teachers.first.tokenizer)
        if texts is not None
        else None
    )
    per_row: list[dict[str, Tensor]] = []
    with contextlib.ExitStack() as stack:
        for loaded in teachers.models():
            stack.enter_context(eval_mode(loaded.model))
        for batch in batcher.iter_batches(batch_size):
            batch = batch.to(teachers.device)
            logits, labels = shift_for_lm(
                teachers.logits(lambda _loaded, b=batch: b), batch.inputs["input_ids"]
            )
            top = topk_of(logits, k)
            target = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            lengths = batch.inputs["attention_mask"].sum(1).tolist()
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
    return pack_positions(per_row)


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
                lambda: (compute(), self.teachers.describe()),
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


def _rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:32]


# --- seq_kd's generated rows and the teacher's own metrics --------------------------------------------------


def _seq_kd_rows(
    cfg: RunConfig,
    plan: RunPlan,
    student: LoadedModel,
    teachers: Teachers,
    text_rows: LMBatcher,
    max_length: int,
    entry_for: Callable[[str, dict[str, Any], Callable[[], dict[str, Tensor]]], CacheEntry],
) -> tuple[LMBatcher, bool]:
    """seq_kd's train rows: each train row's prompt (its first half) continued by the teacher, loss on the
    continuation. Generated once and kept in the teacher-output cache. Also returns whether the teacher's
    tokenizer is the student's (else the rows were re-tokenised for the student)."""
    p = plan.scheme_params
    stored = {
        "kind": "generations",
        "max_new_tokens": p["max_new_tokens"],
        "temperature": p["temperature"],
        "prompt": "first-half",
        "batch_size": cfg.train.batch_size,
        "seed": cfg.train.seed if p["temperature"] > 0 else None,
    }

    def compute() -> dict[str, Tensor]:
        teacher = teachers.first
        # Prompts in the teacher's own tokens (the student's, unless the two tokenizers differ).
        source = (
            text_rows
            if vocab_digest(teacher.tokenizer) == vocab_digest(student.tokenizer)
            else make_batcher("train", teachers.dataset, teacher, max_length=max_length)
        )
        t_eos = teacher.tokenizer.eos_token_id
        prompts = [
            r[: prompt_length(r, max_new_tokens=p["max_new_tokens"], max_length=max_length, eos_id=t_eos)]
            for r in source.token_rows
        ]
        rows, lengths = [], []
        size = cfg.train.batch_size
        for start in range(0, len(prompts), size):
            chunk = prompts[start : start + size]
            new = generate_continuations(
                teacher.model,
                chunk,
                max_new_tokens=p["max_new_tokens"],
                temperature=p["temperature"],
                pad_id=source.pad_id,
                eos_id=t_eos,
                device=teachers.device,
                seed=step_seed(cfg.train.seed, start, 2),
            )
            rows += [a + b for a, b in zip(chunk, new, strict=True)]
            lengths += [len(a) for a in chunk]
        flat = [{"tokens": torch.as_tensor(r, dtype=torch.int32)} for r in rows]
        return pack_positions(flat) | {"prompt_lengths": torch.as_tensor(lengths, dtype=torch.int64)}

    entry = entry_for("train", stored, compute)
    rows, lengths = row_tokens(entry)
    same = entry.manifest["vocab_digest"] == vocab_digest(student.tokenizer)
    if not same:
        rows, lengths = retokenize_rows(
            rows, lengths, source=teachers.first.tokenizer, target=student.tokenizer, max_length=max_length
        )
    return LMBatcher(rows, pad_id=text_rows.pad_id, prompt_lengths=lengths), same


def retokenize_rows(
    rows: list[list[int]], prompt_lengths: list[int], *, source: Any, target: Any, max_length: int
) -> tuple[list[list[int]], list[int]]:
    """Token rows of one tokenizer as rows of another: each row is decoded to text and tokenised again, the
    prompt/continuation boundary moved to the nearest token of the new tokenization. A row that ended with
    the source's EOS ends with the target's; one cut short does not get one."""
    s_eos, t_eos = source.eos_token_id, target.eos_token_id
    out_rows, out_lengths = [], []
    for row, prompt in zip(rows, prompt_lengths, strict=True):
        ended = s_eos is not None and bool(row) and row[-1] == s_eos
        ids = list(target(source.decode(row, skip_special_tokens=True))["input_ids"])
        if t_eos is not None and ids and ids[-1] == t_eos:
            ids.pop()  # the tokenizer's own end marker; decided below
        ids = ids[: max_length - 1 if ended and t_eos is not None else max_length]
        if ended and t_eos is not None:
            ids.append(t_eos)
        prompt_ids = list(target(source.decode(row[:prompt], skip_special_tokens=True))["input_ids"])
        n_prompt = len(prompt_ids) - (
            1 if t_eos is not None and prompt_ids and prompt_ids[-1] == t_eos else 0
        )
        out_rows.append(ids)
        out_lengths.append(max(1, min(n_prompt, len(ids) - 1)))
    return out_rows, out_lengths


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
    device and kept beside the entry (so a cache hit needs no teacher at all)."""
    if task == "classification":
        from .evaluate import classification_metrics

        metrics = classification_metrics(entry.tensors["logits"], torch.as_tensor(dataset.eval.labels))
    elif task == "causal_lm":
        total, count = 0.0, 0
        for batch in eval_batches.iter_batches(batch_size):
            _, labels = shift_for_lm(batch.inputs["input_ids"], batch.labels)
            target = gather_rows(entry, "target_logprob", batch.indices, labels.shape[1])
            mask = labels != -100
            total -= float(target[mask].double().sum())
            count += int(mask.sum())
        metrics = lm_metrics_from_sums(total, count)
    else:
        metrics = {}
    device = teachers.device
    label = f"{device.type}:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"
    efficiency = (entry.extra("efficiency") or {}).get(label)
    if efficiency is None:
        efficiency = {}
        for loaded in teachers.models():
            one = efficiency_metrics(loaded.model, make_batcher("eval", dataset, loaded), device=device)
            efficiency = one if not efficiency else _sum_efficiency(efficiency, one)
        cache.write_extra(entry, "efficiency", {**(entry.extra("efficiency") or {}), label: efficiency})
    return metrics | efficiency


def _sum_efficiency(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Efficiency of running two models one after the other (a multi-teacher ensemble)."""
    out = {
        k: a[k] + b[k]
        for k in ("params", "params_non_embedding", "size_bytes", "latency_ms_p50", "latency_ms_p95")
    }
    for k in ("throughput_per_s", "tokens_per_s"):
        if k in a and k in b:
            out[k] = 1.0 / (1.0 / a[k] + 1.0 / b[k])
    out["peak_memory_bytes"] = max(a["peak_memory_bytes"], b["peak_memory_bytes"])
    return out
