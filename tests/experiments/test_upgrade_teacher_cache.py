"""``manage.py upgrade_teacher_cache``: the worker's cache root, format-1 LM top-k entries rewritten as format
2 in place (``--dry-run`` changes nothing), other entries left alone."""

from __future__ import annotations

import io
import json

import torch
from django.core.management import call_command
from safetensors.torch import save_file

from experiments.domain.engine_config import TEACHER_CACHE_DIR
from tests.workers.engine.test_topk_store import _format_1_entry
from workers.engine.cache import MANIFEST_FILE, OUTPUTS_FILE, TeacherCache, gather_topk


def test_the_command_upgrades_the_workers_cache_in_place(settings, tmp_path):
    settings.ARTIFACT_ROOT = tmp_path
    root = tmp_path / TEACHER_CACHE_DIR
    key, tensors = _format_1_entry(root)
    logits = root / ("b" * 64)  # a classification entry: not a top-k, stays format 1
    logits.mkdir()
    save_file({"logits": torch.zeros(3, 2)}, logits / OUTPUTS_FILE)
    (logits / MANIFEST_FILE).write_text(json.dumps({"key": "b" * 64, "format": 1}))

    out = io.StringIO()
    call_command("upgrade_teacher_cache", "--dry-run", stdout=out)
    assert f"[1/1] {key}: format 1" in out.getvalue()
    assert "1 of 2 entries would be converted." in out.getvalue()
    assert (root / key / OUTPUTS_FILE).is_file()

    out = io.StringIO()
    call_command("upgrade_teacher_cache", stdout=out)
    assert f"[1/1] {key}: " in out.getvalue() and "B/token" in out.getvalue()
    assert "Converted 1 of 2 entries" in out.getvalue()
    entry = TeacherCache(root).lookup(key)
    assert entry.store is not None and entry.manifest["format"] == 2
    top = gather_topk(entry, torch.tensor([1]), 20, torch.device("cpu"))
    assert torch.equal(top.indices[0], tensors["indices"][50:70].long())
    assert (logits / OUTPUTS_FILE).is_file() and TeacherCache(root).lookup("b" * 64).store is None

    out = io.StringIO()
    call_command("upgrade_teacher_cache", stdout=out)
    assert "Converted 0 of 2 entries" in out.getvalue()
