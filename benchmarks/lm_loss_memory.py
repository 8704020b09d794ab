"""Peak memory of a token-level LM distillation loss, forward + backward: full softmax vs chunked.

For vocab V × T positions × batch B, student logits (bf16 or fp32, requiring grad) and teacher logits of the
same dtype, it runs ``losses.kd`` (τ = 2, 10% of positions masked) once the naive way (float32 log-softmaxes
of all positions at once) and once with ``chunk_size`` positions per block (``losses.chunked_token_loss``),
and reports the peak memory above what the inputs already hold:

- on CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's exact high-water mark);
- on CPU: the peak of the allocator's own allocation / free events recorded by ``torch.profiler`` with
  ``profile_memory=True`` (every tensor allocation, deterministic; ``tracemalloc`` cannot see torch and RSS is
  blurred by malloc's caching), cross-checked with the peak RSS growth (VmHWM − VmRSS, after resetting the
  mark through /proc/self/clear_refs) of a fresh subprocess per case, run with glibc's mmap threshold fixed
  at 1 MiB so freed blocks leave the RSS.

It also checks that both ways give the same loss and gradient.

    .venv/bin/python benchmarks/lm_loss_memory.py                      # V 49152, T 512, B 1 and 4, bf16 +
    fp32 .venv/bin/python benchmarks/lm_loss_memory.py --batch 1 --dtype bf16 --chunk-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.engine import losses  # noqa: E402
from workers.engine.methods import auto_chunk_size  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MiB = 2**20


def make_inputs(batch: int, positions: int, vocab: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    student = (torch.randn(batch, positions, vocab, generator=g, device=device) * 2).to(dtype)
    teacher = (torch.randn(batch, positions, vocab, generator=g, device=device) * 2).to(dtype)
    mask = torch.rand(batch, positions, generator=g, device=device) > 0.1
    return student.requires_grad_(), teacher, mask


def step(student, teacher, mask, chunk_size):
    loss = losses.kd(student, teacher, mask, temperature=2.0, chunk_size=chunk_size)
    loss.backward()
    return loss.detach()


def cpu_allocator_peak(fn) -> int:
    """Peak bytes held by torch's CPU allocator while ``fn`` runs, above what was held before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    baseline = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - baseline


def measure(batch, positions, vocab, dtype_name, chunk_size, device) -> dict:
    """One case in this process: peak extra bytes and seconds of forward + backward."""
    student, teacher, mask = make_inputs(batch, positions, vocab, DTYPES[dtype_name], device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        started = time.perf_counter()
        loss = step(student, teacher, mask, chunk_size)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() - before
    else:
        result = {}
        started = time.perf_counter()
        peak = cpu_allocator_peak(lambda: result.setdefault("loss", step(student, teacher, mask, chunk_size)))
        seconds = time.perf_counter() - started
        loss = result["loss"]
    return {"peak": peak, "seconds": seconds, "loss": loss.item(), "grad": student.grad}


def rss_peak(batch, positions, vocab, dtype_name, chunk_size) -> int:
    """Peak RSS growth of forward + backward in a fresh subprocess (bytes), after the inputs exist."""
    cmd = [sys.executable, __file__, "--rss-child", str(batch), str(positions), str(vocab), dtype_name,
           str(chunk_size or 0)]
    # A fixed mmap threshold makes glibc return every large block to the OS when it is freed; with its default
    # (dynamic) threshold, freed blocks stay in the heap and RSS overstates what is live.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MiB)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_child(batch: str, positions: str, vocab: str, dtype_name: str, chunk_size: str) -> int:
    student, teacher, mask = make_inputs(int(batch), int(positions), int(vocab), DTYPES[dtype_name], "cpu")
    # Reset the peak-RSS mark (VmHWM) so the temporaries of building the inputs do not count (Linux only).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    step(student, teacher, mask, int(chunk_size) or None)
    print((_status_kib("VmHWM") - before) * 1024)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rss-child"]:
        return rss_child(*argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--positions", type=int, default=512)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--chunk-size", type=int, default=0,
                        help="positions per block; 0 = what methods.combine picks (auto_chunk_size)")
    parser.add_argument("--no-rss", action="store_true", help="skip the subprocess RSS cross-check (CPU)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{platform.machine()}, {os.cpu_count()} cores, no GPU"
    print(f"# {machine}; Python {platform.python_version()}, torch {torch.__version__}; device {device}")
    print(
        f"# kd (τ=2), V={args.vocab}, T={args.positions}, 10% of positions masked; peak memory of forward + "
        "backward above the inputs"
    )
    header = (
        "| batch | logits dtype | logits | naive peak | chunked peak (chunk) | ratio | naive s | chunked s |"
    )
    if device == "cpu" and not args.no_rss:
        header += " RSS naive | RSS chunked |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    worst = 0.0
    for batch in args.batch:
        for dtype_name in args.dtype:
            shape_logits = torch.empty(batch, args.positions, args.vocab, device="meta")
            chunk = args.chunk_size or auto_chunk_size(shape_logits) or args.positions
            naive = measure(batch, args.positions, args.vocab, dtype_name, None, device)
            chunked = measure(batch, args.positions, args.vocab, dtype_name, chunk, device)
            tol = 2e-2 if dtype_name == "bf16" else 1e-4
            assert abs(naive["loss"] - chunked["loss"]) <= 1e-4 * abs(naive["loss"]), (
                naive["loss"],
                chunked["loss"],
            )
            assert torch.allclose(naive["grad"].float(), chunked["grad"].float(), rtol=tol, atol=1e-6)
            logits_bytes = batch * args.positions * args.vocab * DTYPES[dtype_name].itemsize
            ratio = chunked["peak"] / naive["peak"]
            worst = max(worst, ratio)
            row = (
                f"| {batch} | {dtype_name} | {logits_bytes / MiB:.0f} MiB | {naive['peak'] / MiB:.0f} MiB | "
                f"{chunked['peak'] / MiB:.0f} MiB ({chunk}) | {ratio:.2f} | {naive['seconds']:.2f} | "
                f"{chunked['seconds']:.2f} |"
            )
            if device == "cpu" and not args.no_rss:
                rss_naive = rss_peak(batch, args.positions, args.vocab, dtype_name, None)
                rss_chunked = rss_peak(batch, args.positions, args.vocab, dtype_name, chunk)
                row += f" {rss_naive / MiB:.0f} MiB | {rss_chunked / MiB:.0f} MiB |"
            print(row, flush=True)
    print(f"# worst chunked/naive ratio: {worst:.2f} (target <= 0.6); losses and gradients agree")
    return 0 if worst <= 0.6 else 1


if __name__ == "__main__":
    sys.exit(main())
