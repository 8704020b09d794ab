"""Efficiency measured in a fixed, recorded setting: latency as a median with its spread after warm-up and
repeats, a speedup only with its interval, and the model's memory (weights + activations), not the
process's."""

from __future__ import annotations

import torch

from experiments.domain.compare import latency_of, speedup
from workers.engine.batching import Batcher
from workers.engine.config import ModelConfig
from workers.engine.evaluate import (
    CPU_TIMING_THREADS,
    THROUGHPUT_BATCH,
    efficiency_metrics,
)
from workers.engine.models import count_parameters, load_model
from workers.engine.runtime import make_batcher

from .conftest import TINY_BERT


def _mlp(digits, hidden: list[int]):
    torch.manual_seed(0)
    config = ModelConfig(source="builtin", name="mlp", params={"hidden_sizes": hidden})
    return load_model(config, dataset=digits, role="student").model


def test_identical_students_measured_twice_give_speedups_whose_interval_contains_one(digits):
    batcher = Batcher(digits.eval)
    a, b = _mlp(digits, [64]), _mlp(digits, [64])

    def measure_all():
        measured = [efficiency_metrics(m, batcher, device=torch.device("cpu")) for m in (a, b, a, b)]
        latencies = [latency_of(m) for m in measured]
        pairs = [(x, y) for i, x in enumerate(latencies) for y in latencies[i + 1:]]
        return measured, latencies, pairs

    # A burst of load on a shared host between two measurements can shift one of them by more than its own
    # range (seen once in CI: 1.21x [1.07-1.29] for identical students); such a burst does not repeat in
    # every attempt, a systematic bias would. At most three attempts.
    for _ in range(3):
        measured, latencies, pairs = measure_all()
        if all(speedup(x, y) is not None and speedup(x, y).contains(1.0) for x, y in pairs):
            break
    assert all(lat is not None and lat.has_spread for lat in latencies)
    for first, second in pairs:
        ratio = speedup(first, second)
        assert ratio is not None and ratio.contains(1.0), (ratio, first, second)
        assert ratio.low <= ratio.value <= ratio.high
        assert ratio.mark == "CPU, shared host" and ratio.comparable
    for m in measured:
        assert m["latency_ms_min"] <= m["latency_ms_p25"] <= m["latency_ms_p50"] <= m["latency_ms_p75"]
        assert m["latency_ms_p75"] <= m["latency_ms_p95"] <= m["latency_ms_max"]
        assert m["latency_repeats"] >= 5


def test_the_setting_is_recorded_and_the_thread_count_restored(digits):
    threads = torch.get_num_threads()
    m = efficiency_metrics(_mlp(digits, [16]), Batcher(digits.eval), device=torch.device("cpu"))
    assert torch.get_num_threads() == threads
    assert m["efficiency_setting"] == {
        "device": "cpu",
        "threads": CPU_TIMING_THREADS,
        "batch": 1,
        "throughput_batch": THROUGHPUT_BATCH,
        "seq_len": None,
        "throughput_seq_len": None,
        "shared_host": True,
    }
    assert m["memory_batch"] == THROUGHPUT_BATCH
    lat = latency_of(m)
    assert lat is not None and lat.mark == "CPU, shared host"
    assert lat.setting == "cpu · 1 thread · batch 1 · shared host"


def test_model_memory_is_weights_plus_activations_not_the_process(digits):
    batcher = Batcher(digits.eval)
    student, teacher = _mlp(digits, [64]), _mlp(digits, [1024, 1024])
    assert 4_700 < count_parameters(student) < 4_900  # the 4.8k-parameter student of the report
    small = efficiency_metrics(student, batcher, device=torch.device("cpu"))
    big = efficiency_metrics(teacher, batcher, device=torch.device("cpu"))
    for m, model in ((small, student), (big, teacher)):
        assert m["weights_bytes"] == 4 * count_parameters(model)
        assert m["model_memory_bytes"] == m["weights_bytes"] + m["activation_bytes"] == m["peak_memory_bytes"]
    # Activations at batch 32: the hidden layers' outputs and the logits (at least, in float32).
    assert small["activation_bytes"] >= 4 * THROUGHPUT_BATCH * (64 + 10)
    assert big["activation_bytes"] >= 4 * THROUGHPUT_BATCH * (1024 + 1024 + 10)
    assert small["model_memory_bytes"] < 100_000  # far below any process's resident set
    assert small["model_memory_bytes"] * 50 < big["model_memory_bytes"]


def test_a_text_model_records_its_fixed_sequence_length(topics):
    loaded = load_model(ModelConfig(source="config", params=TINY_BERT), dataset=topics, role="student")
    batcher = make_batcher("eval", topics, loaded)
    m = efficiency_metrics(loaded.model, batcher, device=torch.device("cpu"))
    setting = m["efficiency_setting"]
    assert setting["seq_len"] == batcher.batch([0]).inputs["input_ids"].shape[1]
    assert setting["throughput_seq_len"] >= setting["seq_len"] and m["tokens_per_s"] > 0
    assert m["activation_bytes"] > 0 and latency_of(m).setting.startswith("cpu · 1 thread · batch 1 · ")
