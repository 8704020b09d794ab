"""The LoRA memory benchmark's dry mode: a tiny random Llama parent, its derived student trained by the engine
with and without LoRA adapters, so ``benchmarks/lora_memory.py`` cannot rot and its counts stay exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests import waiting

REPO = Path(__file__).resolve().parents[1]


def test_the_dry_lora_benchmark_measures_the_engines_adamw_state(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    out = tmp_path / "lora.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/lora_memory.py", "--dry", "--cases", "full,lora-r8", "--work",
         str(tmp_path / "work"), "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=waiting.scaled(300),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    full, lora = summary["full"], summary["lora-r8"]
    # Full fine-tuning: AdamW holds every weight; LoRA: the adapters alone, which are a small share.
    assert full["trainable_params"] == full["total_params"] == full["optimizer_params"]
    assert lora["trainable_params"] == lora["optimizer_params"] < lora["total_params"] / 5
    assert lora["total_params"] > full["total_params"]  # the frozen base plus the adapters
    for row in (full, lora):
        # exp_avg and exp_avg_sq in float32 per trained weight, plus one float32 step count per tensor
        assert row["adamw_state_bytes"] == 8 * row["trainable_params"] + 4 * row["optimizer_tensors"]
        assert row["estimate_adamw_bytes"] > 0 and row["s_per_step"] > 0 and row["peak_rss"] > 0
    assert lora["adamw_state_bytes"] * 5 < full["adamw_state_bytes"]
    assert "| lora-r8 |" in done.stdout
