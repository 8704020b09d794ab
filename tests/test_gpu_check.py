"""The GPU check's dry mode: every section of ``benchmarks/gpu_check.py`` runs on the CPU with tiny models, so
the script a lent GPU host runs first cannot rot between GPU sessions."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from tests import waiting

REPO = Path(__file__).resolve().parents[1]


def test_the_dry_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry", "--out", str(tmp_path), "--budget-s", "600"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=waiting.scaled(900),
    )
    results = json.loads((tmp_path / "results.json").read_text())
    failed = {
        name: row.get("error")
        for name, row in results.items()
        if row["status"] != "ok" and not row.get("optional")  # optional: trl where it is not installed
    }
    assert failed == {}, done.stderr[-3000:]
    assert done.returncode == 0
    assert set(results) == {"inventory", "engine", "distributed", "trl", "memory", "served", "worker"}
    assert results["served"]["status"] == "skipped" and "test_served_teacher" in results["served"]["why"]
    assert results["distributed"]["ranks"] == 2 and results["distributed"]["student"]["perplexity"] > 1
    assert results["inventory"]["cuda_available"] is False and results["inventory"]["nvml_gpus"] == []
    for scheme in ("online", "offline"):
        row = results["engine"][scheme]
        assert row["tokens_per_s"] > 0 and row["student"]["perplexity"] > 1
    assert results["memory"]["full"]["estimate_bytes"] > 0
    assert results["worker"]["statuses"] == ["succeeded"]
    assert results["worker"]["workers"], "the demo's worker registered itself"
    assert "engine: ok" in done.stdout
    trl = results["trl"]
    if importlib.util.find_spec("trl") is None:  # not a project dependency: the section says why it skipped
        assert trl["status"] == "skipped" and "trl" in trl["why"]
    else:  # TRL's GKDTrainer on the engine's pair, steps and batch; same tokens per step as the engine's run
        assert trl["status"] == "ok" and trl["tokens_per_s"] > 0 and trl["steps"] == 3
        assert 0.5 * trl["engine_tokens_per_step"] <= trl["tokens_per_step"] <= trl["engine_tokens_per_step"]
        assert trl["engine_vs_trl"] > 0
