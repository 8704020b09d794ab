"""A multi-teacher ensemble's efficiency keeps the spread and the setting its speedup interval needs."""

from __future__ import annotations

from workers.engine.teachers import _sum_efficiency


def _one(p50: float, scale: float) -> dict:
    return {
        "params": int(1000 * scale), "params_non_embedding": int(900 * scale),
        "size_bytes": int(4000 * scale),
        "latency_ms_p50": p50, "latency_ms_p25": p50 - 1, "latency_ms_p75": p50 + 1,
        "latency_ms_p95": p50 + 2, "latency_ms_min": p50 - 2, "latency_ms_max": p50 + 3,
        "latency_repeats": 20, "throughput_per_s": 100.0 / scale, "model_memory_bytes": int(8000 * scale),
        "peak_memory_bytes": int(8000 * scale), "efficiency_setting": {"device": "cpu", "threads": 1},
    }


def test_latencies_and_their_spread_add_up_and_the_setting_is_kept():
    out = _sum_efficiency(_one(10.0, 1), _one(30.0, 2))
    assert out["latency_ms_p50"] == 40.0
    assert (out["latency_ms_p25"], out["latency_ms_p75"]) == (38.0, 42.0)
    assert (out["latency_ms_min"], out["latency_ms_max"]) == (36.0, 46.0)
    assert out["params"] == 3000 and out["model_memory_bytes"] == 16000  # one model runs at a time
    assert out["throughput_per_s"] == 1.0 / (1 / 100.0 + 1 / 50.0)
    assert out["efficiency_setting"] == {"device": "cpu", "threads": 1} and out["latency_repeats"] == 20
