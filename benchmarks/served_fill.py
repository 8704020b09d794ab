"""The served teacher's top-k against the local forward's, on a real model (issue 14).

Starts vLLM's OpenAI-compatible server (its own venv: ``make vllm``, or ``--vllm-python``) on a prepared model
folder (default SmolLM2-135M-Instruct from ``make models``), then computes the top-k of every position of the
same token rows twice: through :class:`workers.engine.served_teacher.ServedTeacher` (``prompt_logprobs``,
concurrent requests) and with the local float32 forward that fills the cache today
(``workers.engine.cache.topk_of``). Reports tokens/s of each, the fraction of positions whose top-k ids agree
exactly (in order, and as sets), the largest stored (float16) log-probability difference where they do, and
the largest difference between the server's value of any id it names and the local log-probability of that
id (an order that differs is then a near-tie).

    python benchmarks/served_fill.py [--model DIR] [--rows 64] [--length 128] [--k 64] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def serve(python: Path, model: Path, port: int, log: Path, *, max_len: int, dtype: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return subprocess.Popen(
        [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--served-model-name", "teacher", "--host", "127.0.0.1", "--port", str(port),
         "--max-model-len", str(max_len), "--max-logprobs", "64", "--dtype", dtype, "--seed", "0"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )


def wait_ready(url: str, server: subprocess.Popen, log: Path, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as answer:
                if json.loads(answer.read()).get("data"):
                    return time.monotonic() - started
        except (OSError, ValueError):
            pass
        if server.poll() is not None:
            break
        time.sleep(2)
    raise SystemExit(f"vLLM did not serve the model; its log ends:\n{log.read_text()[-3000:]}")


def main() -> int:
    from benchmarks.demo_time import free_port
    from workers.engine.pretrained import models_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=models_dir() / "SmolLM2-135M-Instruct")
    venv = Path(os.environ.get("DISTILLWEB_VLLM_VENV", REPO / "var" / "vllm-venv"))
    parser.add_argument("--vllm-python", type=Path, default=venv / "bin" / "python")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("served_fill.json"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.engine.cache import topk_of
    from workers.engine.config import DatasetConfig
    from workers.engine.data import load_dataset
    from workers.engine.served_teacher import ServedTeacher

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = load_dataset(DatasetConfig(source="builtin", name="fortunes"), task="causal_lm").train.inputs
    rows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text)["input_ids"][: args.length]
        if len(ids) >= 8:
            rows.append(ids)
        if len(rows) == args.rows:
            break
    tokens = sum(len(r) for r in rows)

    port, log = free_port(), Path(args.out).with_suffix(".vllm.log")
    server = serve(args.vllm_python, args.model, port, log, max_len=max(256, args.length), dtype="float32")
    try:
        startup = wait_ready(f"http://127.0.0.1:{port}", server, log, timeout=900)
        client = ServedTeacher("bench", f"http://127.0.0.1:{port}", "teacher", concurrency=args.concurrency)
        client.check(tokenizer, max_length=args.length)
        client.topk(rows[:2], args.k)  # warm-up
        started = time.perf_counter()
        served = client.topk(rows, args.k)
        served_s = time.perf_counter() - started
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=120)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    local, full = [], []
    started = time.perf_counter()
    with torch.no_grad():
        for row in rows:  # one row at a time: no padding in the comparison
            logits = model(input_ids=torch.tensor([row])).logits[0, :-1]
            local.append(topk_of(logits, args.k))
            full.append(torch.log_softmax(logits.float(), -1))
    local_s = time.perf_counter() - started

    same, same_set, positions, worst, value_gap = 0, 0, 0, 0.0, 0.0
    for rec, top, lp in zip(served, local, full, strict=True):
        ids = rec["indices"].long()
        equal = (ids == top.indices).all(-1)
        same += int(equal.sum())
        same_set += int((ids.sort(-1).values == top.indices.sort(-1).values).all(-1).sum())
        positions += len(equal)
        if equal.any():
            diff = (rec["logprobs"].float()[equal] - top.logprobs.half().float()[equal]).abs().max()
            worst = max(worst, float(diff))
        # The server's value of each id it names against the local float32 log-probability of that id.
        gap = (rec["logprobs"].float() - lp.gather(-1, ids).half().float()).abs().max()
        value_gap = max(value_gap, float(gap))
    result = {
        "model": args.model.name, "rows": len(rows), "tokens": tokens, "k": args.k,
        "concurrency": args.concurrency, "vllm_startup_s": round(startup, 1),
        "served_s": round(served_s, 2), "served_tokens_per_s": round(tokens / served_s, 1),
        "local_s": round(local_s, 2), "local_tokens_per_s": round(tokens / local_s, 1),
        "positions": positions, "same_topk_ids": same / positions, "same_topk_sets": same_set / positions,
        "max_logprob_diff_float16": worst, "max_logprob_diff_any_id_float16": value_gap,
        "cores": os.cpu_count(), "load": os.getloadavg(),
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
