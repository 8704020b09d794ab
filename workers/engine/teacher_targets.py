"""The teacher's part of each training batch, as the loss terms read it (:class:`TeacherTargets`).

Per batch, the teacher's fields of :class:`.methods.TermInputs`: logits, top-k log-probabilities, features or
embeddings, looked up by row in the train split's teacher-output cache entry or computed online by the loaded
teachers (several mixed by their weights). Across tokenizers the teacher's positions are paired with the
student's where both have read the same text (:mod:`.align`): from the cached character offsets, online, or
for ``on_policy`` on the student's own samples, re-read by the teacher. A served teacher
(:mod:`.served_teacher`) gives its top-k of each batch's rows online, from its server.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .align import align_positions, decoded_prefix_ends, gather_aligned, prefix_ends
from .batching import Batch, LMBatcher
from .cache import (
    EVAL_TOPK,
    CacheEntry,
    gather_topk,
    pack_positions,
)
from .errors import ConfigError
from .evaluate import (
    autocast,
    forward_outputs,
)
from .models import LoadedModel
from .runtime import (
    lm_max_length,
    make_batcher,
)
from .teachers import Teachers, _lm_topk_batch
from .terms import LOSS_TERMS

if TYPE_CHECKING:
    from .cache_fill import TrainFill
    from .planning import RunPlan


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
        fill: TrainFill | None = None,
    ) -> None:
        self.teachers, self.entry, self.task, self.same_tokens = teachers, entry, task, same_tokens
        self.fill = fill  # the entry being filled by the first epoch (:mod:`.cache_fill`): read like one
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

    def _filling(self, batch: Batch) -> dict[str, Any]:
        """The batch's rows from the entry being filled (each computed by the teacher when first used), in the
        precision the entry stores them."""
        device, records = self.teachers.device, self.fill.rows(batch.indices.cpu().numpy())
        if self.task == "causal_lm":
            width = batch.inputs["input_ids"].shape[1] - 1
            part = CacheEntry(self.fill.key, self.fill.folder, {}, pack_positions(records))
            return {"teacher_topk": gather_topk(part, torch.arange(len(records)), width, device)}
        if self.task == "embedding":
            return {"teacher_embedding": torch.stack([r["embeddings"] for r in records]).to(device)}
        fields = {"teacher_logits": torch.stack([r["logits"] for r in records]).to(device)}
        if "teacher_logits" in records[0]:  # multi_teacher: each teacher's logits, (K, B, C)
            fields |= {
                "teacher_mixture": torch.stack([r["teacher_logits"] for r in records], 1).to(device),
                "teacher_weights": tuple(self.teachers.weights),
            }
        return fields

    def _served(self, batch: Batch, plan: RunPlan) -> dict[str, Any]:
        """The batch's top-k from the served teacher (its tokens are the student's), k the largest a topk
        term asks for (else EVAL_TOPK, which uld reads whole)."""
        ks = [t.params["k"] for t in plan.terms if LOSS_TERMS[t.name].kind == "topk"]
        records = _lm_topk_batch(self.teachers, batch, k=max(ks or [EVAL_TOPK]), ends=None)
        part = CacheEntry("served", Path(self.teachers.cfg.output_dir), {}, pack_positions(records))
        width = batch.inputs["input_ids"].shape[1] - 1
        return {"teacher_topk": gather_topk(part, torch.arange(len(records)), width, self.teachers.device)}

    @torch.no_grad()
    def fields(self, batch: Batch, rows: np.ndarray | None, *, plan: RunPlan) -> dict[str, Any]:
        device = self.teachers.device
        if self.fill is not None and self.fill.entry is not None:  # the first epoch is over: read the entry
            self.entry, self.fill = self.fill.entry, None
        if self.fill is not None:
            return self._filling(batch)
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
        if self.teachers.is_served:
            return self._served(batch, plan)
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
