"""Worker warm-up (workers/warmup.py): a pool process imports what a run needs when it starts, so the first
run a fresh worker takes does not pay for the imports before its first step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import waiting
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
PROBE = """
import json, sys
before = {name: name in sys.modules for name in ("torch", "torch._dynamo", "sklearn.datasets")}
from workers import warmup
state = warmup.warm()
after = {name: name in sys.modules for name in warmup.MODULES}
print(json.dumps({"before": before, "after": after, "state": state, "waited": warmup.wait(0)}))
"""


def test_warm_imports_every_module_a_first_run_would_and_reports_it():
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=waiting.scaled(300), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert not any(out["before"].values())  # a fresh interpreter: nothing of it was loaded before
    assert all(out["after"].values()) and out["state"]["failed"] == {}
    assert out["state"]["seconds"] > 0 and out["waited"] is True


def test_switched_off_by_the_environment(monkeypatch):
    from workers import warmup

    monkeypatch.setenv("WORKER_WARMUP", "0")
    assert not warmup.enabled()
    monkeypatch.setenv("WORKER_WARMUP", "1")
    assert warmup.enabled()


@pytest.mark.worker_warmup
def test_a_real_worker_s_pool_process_warms_up_when_it_starts(celery_worker_process):
    wait_until(lambda: "Warm-up of process" in celery_worker_process.tail(200_000), timeout=120,
               what="the pool process to finish its warm-up", every=0.5,
               check=celery_worker_process.check_alive, describe=celery_worker_process.tail)
    line = next(x for x in celery_worker_process.tail(200_000).splitlines() if "Warm-up of process" in x)
    pid = int(line.split("Warm-up of process ")[1].split()[0])
    assert "modules imported" in line
    assert pid != celery_worker_process.process.pid  # in the pool process: the parent imports no torch
