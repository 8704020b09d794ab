"""`manage.py gpuworker`: one Celery worker per GPU, pinned with CUDA_VISIBLE_DEVICES (a fake NVML
inventory)."""

import io
import itertools
import os
import re
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from experiments.management.commands import gpuworker

MIB = 1024**2


def gpu(index, name, memory_mib):
    return {"index": index, "name": name, "uuid": f"GPU-{index:08d}", "memory_total_bytes": memory_mib * MIB,
            "memory_used_bytes": 0, "utilization_pct": 0, "temperature_c": 30}


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two GPUs of different sizes, as workers.gpus.read_gpus reports them (NVML indices)."""
    found = [gpu(0, "NVIDIA H100 80GB HBM3", 81559), gpu(1, "NVIDIA A10", 23028)]
    monkeypatch.setattr("workers.gpus.read_gpus", lambda: list(found))
    return found


def dry_run(*args):
    """The launches the command prints: (environment, argv) per worker."""
    out = io.StringIO()
    call_command("gpuworker", "--dry-run", *args, stdout=out)
    launches = []
    for line in out.getvalue().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        words = shlex.split(line)
        assignments = list(itertools.takewhile(lambda w: re.fullmatch(r"[A-Z_]+=.*", w), words))
        launches.append((dict(w.split("=", 1) for w in assignments), words[len(assignments):]))
    return launches


def option(argv, name):
    return argv[argv.index(name) + 1]


def test_one_pinned_worker_per_gpu_on_the_queue_its_memory_names(fake_gpus):
    launches = dry_run()
    assert len(launches) == 2
    (env0, argv0), (env1, argv1) = launches
    assert env0 == {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert env1 == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert argv0[:6] == [sys.executable, "-m", "celery", "-A", "distillweb", "worker"]
    assert (option(argv0, "-Q"), option(argv0, "-n"), option(argv0, "--concurrency")) == (
        "gpu-80g",
        "gpu0@%h",
        "1",
    )
    assert (option(argv1, "-Q"), option(argv1, "-n"), option(argv1, "--concurrency")) == (
        "gpu-24g",
        "gpu1@%h",
        "1",
    )
    assert option(argv0, "--prefetch-multiplier") == "1"


def test_queues_and_gpus_can_be_chosen(fake_gpus):
    [(env, argv)] = dry_run("--gpus", "1", "--queues", "gpu-24g, training")
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and option(argv, "-Q") == "gpu-24g,training"
    with pytest.raises(CommandError, match="No GPU 5 here; the GPUs are: 0, 1"):
        dry_run("--gpus", "5")
    with pytest.raises(CommandError, match="GPU indices"):
        dry_run("--gpus", "first")
    with pytest.raises(CommandError, match="queue name"):
        dry_run("--queues", "bad queue!")


def test_a_host_without_gpus_is_told_about_cpu(monkeypatch):
    monkeypatch.setattr("workers.gpus.read_gpus", lambda: [])
    with pytest.raises(CommandError, match="--cpu"):
        dry_run()


def test_cpu_starts_one_worker_with_the_gpus_hidden(fake_gpus):
    [(env, argv)] = dry_run("--cpu")
    assert env == {"CUDA_VISIBLE_DEVICES": ""}
    assert (option(argv, "-Q"), option(argv, "-n")) == ("cpu", "cpu@%h")


def fake_worker_command(folder: Path, exit_code: int = 0):
    """A stand-in for `celery worker`: records its GPU pin, then waits for a signal and records it."""
    script = (
        "import os, signal, sys, time, pathlib\n"
        f"folder = pathlib.Path({str(folder)!r})\n"
        "node = sys.argv[1].split('@')[0]\n"
        "def stop(signum, frame):\n"
        "    (folder / (node + '.signal')).write_text(str(signum))\n"
        f"    sys.exit({exit_code} if node == 'gpu1' else 0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "signal.signal(signal.SIGINT, stop)\n"
        "(folder / (node + '.env')).write_text(os.environ['CUDA_VISIBLE_DEVICES'])\n"
        "time.sleep(60)\n"
    )

    def command(*, queues, node, loglevel):
        return [sys.executable, "-c", script, node]

    return command


def signal_when_started(folder: Path, nodes: list[str], signum: int) -> threading.Thread:
    """Send ``signum`` to this process once every fake worker has started (at most 30 s)."""

    def run():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all((folder / f"{n}.env").exists() for n in nodes):
            time.sleep(0.05)
        os.kill(os.getpid(), signum)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded_to_every_worker_and_the_command_waits(
    fake_gpus, monkeypatch, tmp_path, signum
):
    monkeypatch.setattr(gpuworker, "celery_command", fake_worker_command(tmp_path))
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    thread = signal_when_started(tmp_path, ["gpu0", "gpu1"], signum)
    out = io.StringIO()
    call_command("gpuworker", stdout=out)
    thread.join()
    assert (tmp_path / "gpu0.env").read_text() == "0" and (tmp_path / "gpu1.env").read_text() == "1"
    # Each worker got the signal exactly once, and the command returned only after both had exited.
    assert (
        (tmp_path / "gpu0.signal").read_text() == (tmp_path / "gpu1.signal").read_text() == str(int(signum))
    )
    assert "gpu0@%h exited (0)." in out.getvalue() and "gpu1@%h exited (0)." in out.getvalue()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_worker_that_fails_makes_the_command_fail(fake_gpus, monkeypatch, tmp_path):
    monkeypatch.setattr(gpuworker, "celery_command", fake_worker_command(tmp_path, exit_code=3))
    thread = signal_when_started(tmp_path, ["gpu0", "gpu1"], signal.SIGTERM)
    with pytest.raises(CommandError, match=r"gpu1@%h \(3\)"):
        call_command("gpuworker", stdout=io.StringIO())
    thread.join()


@pytest.fixture
def eight_gpus(monkeypatch):
    """Eight 80 GB GPUs, the seventh a little smaller (an 80 GB card reporting less usable memory)."""
    found = [gpu(i, "NVIDIA H100 80GB HBM3", 81559 if i != 6 else 80000) for i in range(8)]
    monkeypatch.setattr("workers.gpus.read_gpus", lambda: list(found))
    return found


def test_gpus_per_worker_starts_one_worker_per_group_on_its_group_queue(eight_gpus):
    launches = dry_run("--gpus-per-worker", "4")
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in launches] == ["0,1,2,3", "4,5,6,7"]
    assert [option(argv, "-Q") for _, argv in launches] == ["gpu-4x80g", "gpu-4x80g"]
    assert [option(argv, "-n") for _, argv in launches] == ["gpus0-1-2-3@%h", "gpus4-5-6-7@%h"]
    assert all(option(argv, "--concurrency") == "1" for _, argv in launches)


def test_explicit_groups_and_their_errors(eight_gpus):
    launches = dry_run("--groups", "0,1", "2,3,4,5", "7")
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in launches] == ["0,1", "2,3,4,5", "7"]
    assert [option(argv, "-Q") for _, argv in launches] == ["gpu-2x80g", "gpu-4x80g", "gpu-80g"]
    assert option(launches[2][1], "-n") == "gpu7@%h"
    with pytest.raises(CommandError, match="GPU 1 is in two groups"):
        dry_run("--groups", "0,1", "1,2")
    with pytest.raises(CommandError, match="No GPU 8 here; the GPUs are: 0, 1, 2, 3, 4, 5, 6, 7"):
        dry_run("--groups", "6,7", "8,9")
    with pytest.raises(CommandError, match="8 GPUs do not split into groups of 3"):
        dry_run("--gpus-per-worker", "3")


def test_a_group_is_named_by_its_smallest_gpu(monkeypatch):
    found = [gpu(0, "NVIDIA H100 80GB HBM3", 81559), gpu(1, "NVIDIA A10", 23028)]
    monkeypatch.setattr("workers.gpus.read_gpus", lambda: list(found))
    [(env, argv)] = dry_run("--gpus-per-worker", "2")
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and option(argv, "-Q") == "gpu-2x24g"
