"""Real teacher-output cache entries for the store tests, written by the engine's TeacherCache under the
test's ARTIFACT_ROOT, and reported as a run's result reports them."""

from pathlib import Path

import torch
from django.conf import settings

from experiments.domain.engine_config import TEACHER_CACHE_DIR
from workers.engine.cache import TeacherCache, cache_key


def artifact_cache() -> TeacherCache:
    return TeacherCache(Path(settings.ARTIFACT_ROOT) / TEACHER_CACHE_DIR)


def topk_use(cache: TeacherCache, *, positions: int = 30, k: int = 8, teacher: str = "files:" + "a" * 64,
             max_length: int = 64) -> dict:
    """A top-k entry filled by the cache (a miss), as ``result["teacher_cache"]`` reports its use."""
    stored = {"kind": "topk", "k": k, "tail": True, "dtype": "float16"}
    description = {"teacher": teacher, "split": "train", "stored": stored,
                   "dataset": {"source": "builtin", "name": "fortunes", "max_length": max_length}}

    def compute():
        tensors = {"logprobs": torch.randn(positions, k).half(),
                   "indices": torch.randint(0, 100, (positions, k), dtype=torch.int32),
                   "tail_logmass": torch.zeros(positions).half(),
                   "offsets": torch.tensor([0, positions // 2, positions])}
        return tensors, {"teachers": ["tiny-llama"], "vocab_digest": "v" * 64}

    before = len(cache.uses)
    cache.get_or_compute(cache_key(description), compute, split="train", stored=stored,
                         description=description)
    return cache.uses[before].to_dict()
