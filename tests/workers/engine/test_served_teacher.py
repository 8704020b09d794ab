"""A teacher served by vLLM: PyPI's CPU build, a real server in its own venv and process (vllm_server.py).

The contract: the teacher-output cache filled from the server equals the one a local forward fills (same
top-k ids at every position; float16 log-probabilities within one float16 step, float32 target log-probs
within 1e-4). Also: the online scheme with the server's top-k, seq_kd's continuations written by the server,
the pre-flight refusals, a fill killed mid-way continued by the next run. The parser and configuration tests
at the top read recorded real responses (served_responses/) and need no server.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.vllm_server import REPO, vllm_python, vllm_server
from tests.workers.engine.test_lm import _SENTENCES, TINY_LLAMA, _lm_run
from workers.engine.cache import CacheEntry, TeacherCache, gather_rows, gather_topk
from workers.engine.config import AllowedPaths, ModelConfig, RunConfig
from workers.engine.errors import ConfigError, ModelLoadError
from workers.engine.served_teacher import (
    SERVERS_ENV,
    ServedStats,
    ServedTeacher,
    completion_tokens,
    parse_prompt_logprobs,
    parse_servers,
    servers_allowed,
    token_env,
)
from workers.engine.sources import check_run_sources
from workers.engine.topk_store import STORE_ENV
from workers.engine.trainer import train

RESPONSES = Path(__file__).parent / "served_responses"
# head_dim 64: vLLM's CPU attention has no kernel for TINY_LLAMA's 16.
SERVED_LLAMA = {**TINY_LLAMA, "hidden_size": 128, "intermediate_size": 128, "max_position_embeddings": 128}
TEACHER = {"source": "server", "name": "teacher", "params": {"server": "test"}}


def recorded(name: str) -> dict[str, Any]:
    return json.loads((RESPONSES / name).read_text())


# --- parsing recorded responses and the configuration (no server) -------------------------------------------


def test_prompt_logprobs_become_the_records_a_local_forward_stores():
    record = recorded("completions_prompt_logprobs.json")
    prompts = record["request"]["prompt"]
    for choice in record["response"]["choices"]:
        prompt, positions = prompts[choice["index"]], choice["prompt_logprobs"]
        out = parse_prompt_logprobs(positions, prompt, 5)
        n = len(prompt) - 1
        assert out["indices"].shape == (n, 5) and out["indices"].dtype == torch.int32
        assert out["logprobs"].dtype == torch.float16 and out["tail_logmass"].shape == (n,)
        for j in range(n):
            entry = positions[j + 1]
            best = sorted(entry.items(), key=lambda kv: kv[1]["rank"])[:5]
            assert out["indices"][j].tolist() == [int(t) for t, _ in best]
            wanted = [v["logprob"] for _, v in best]
            assert out["logprobs"][j].float().tolist() == pytest.approx(wanted, abs=4e-3)
            assert out["target_logprob"][j].item() == pytest.approx(entry[str(prompt[j + 1])]["logprob"])
            mass = sum(math.exp(v["logprob"]) for _, v in best)
            assert out["tail_logmass"][j].item() == pytest.approx(math.log(1 - mass), abs=4e-3)
        assert (out["logprobs"][:, :-1] >= out["logprobs"][:, 1:]).all()  # highest first, as torch.topk


def test_a_position_outside_the_top_k_still_gives_the_target_and_k_entries():
    record = recorded("completions_prompt_logprobs.json")
    prompt = record["request"]["prompt"][0]
    positions = record["response"]["choices"][0]["prompt_logprobs"]
    outside = [j for j in range(1, len(prompt)) if len(positions[j]) == 6]  # the target beyond rank 5
    assert outside, "the recording holds a position whose own token is not in the top 5"
    out = parse_prompt_logprobs(positions, prompt, 5)
    j = outside[0]
    assert prompt[j] not in out["indices"][j - 1].tolist()
    assert out["target_logprob"][j - 1] < out["logprobs"][j - 1].float().min()


def test_a_short_or_broken_answer_is_refused():
    record = recorded("completions_prompt_logprobs.json")
    prompt = record["request"]["prompt"][1]
    positions = record["response"]["choices"][1]["prompt_logprobs"]
    k = max(len(p) for p in positions[1:]) + 1
    with pytest.raises(ValueError, match=f"fewer than k={k}"):
        parse_prompt_logprobs(positions, prompt, k)
    with pytest.raises(ValueError, match="entries for a prompt"):
        parse_prompt_logprobs(positions[:-1], prompt, 5)
    assert parse_prompt_logprobs([None], [7], 5)["indices"].shape == (0, 5)


def test_generated_token_ids_are_read_from_the_completion():
    record = recorded("completions_generate.json")
    choice = record["response"]["choices"][0]
    assert completion_tokens(choice, "x") == choice["token_ids"]
    with pytest.raises(ModelLoadError, match="return_token_ids"):
        completion_tokens({"text": "no ids"}, "Teacher server 'x'")


def test_concurrent_requests_count_their_time_once():
    stats = ServedStats()
    started = time.perf_counter()
    with stats.request(3), stats.request(4) as counted:
        counted.append(5)  # generated tokens
    elapsed = time.perf_counter() - started
    assert (stats.requests, stats.tokens) == (2, 12)
    assert 0 < stats.seconds <= elapsed and stats.tokens_per_s >= 12 / elapsed


def test_servers_are_configured_by_name_and_a_bad_entry_is_named():
    assert parse_servers(" a=http://h:8000/ , b-2=https://x.example/v ") == {
        "a": "http://h:8000",
        "b-2": "https://x.example/v",
    }
    assert parse_servers("") == {}
    for bad, match in (("A=http://h", "not a server name"), ("a=ftp://h", "not an http"),
                       ("a=http://h,a=http://g", "named twice"), ("noequals", "not a server name")):
        with pytest.raises(ValueError, match=match):
            parse_servers(bad)
    assert token_env("big-one") == "DISTILLWEB_TEACHER_SERVER_TOKEN_BIG_ONE"
    allowed = AllowedPaths(teacher_servers=("a=http://h:1",))
    assert servers_allowed(allowed) == {"a": "http://h:1"}


def test_a_server_teacher_must_name_a_configured_server_and_a_student_is_never_served(tmp_path, monkeypatch):
    monkeypatch.delenv(SERVERS_ENV, raising=False)
    base = _lm_run(tmp_path / "r", tmp_path / "c.txt", teacher=TEACHER, scheme="online",
                   terms=[{"name": "topk", "params": {"k": 4}}])
    allowed = AllowedPaths(dataset_roots=(str(tmp_path),), teacher_servers=("test=http://127.0.0.1:9",))
    check_run_sources(RunConfig.from_dict({**base.to_dict(), "allowed_paths": allowed.__dict__}))
    with pytest.raises(ModelLoadError, match=r"'test' is not a configured teacher server \(none is"):
        check_run_sources(base)
    other = RunConfig.from_dict({**base.to_dict(), "allowed_paths": {
        "dataset_roots": [str(tmp_path)], "teacher_servers": ["prod=http://h:1"]}})
    with pytest.raises(ModelLoadError, match=r"not a configured teacher server \(prod\)"):
        check_run_sources(other)
    student = RunConfig.from_dict({**base.to_dict(), "student": TEACHER, "allowed_paths": allowed.__dict__})
    with pytest.raises(ModelLoadError, match="only a teacher can be served"):
        check_run_sources(student)
    nameless = RunConfig.from_dict({**base.to_dict(), "teacher": {**TEACHER, "name": ""},
                                    "allowed_paths": allowed.__dict__})
    with pytest.raises(ModelLoadError, match="served model name"):
        check_run_sources(nameless)


def test_an_unreachable_server_fails_after_its_retries_without_its_address(monkeypatch):
    monkeypatch.setenv(token_env("gone"), "secret-token")
    client = ServedTeacher.for_model(
        ModelConfig(source="server", name="m", params={"server": "gone"}),
        AllowedPaths(teacher_servers=("gone=http://127.0.0.1:9",)),
    )
    client.retries, client.backoff = 2, 0.01
    with pytest.raises(ModelLoadError, match=r"'gone' failed after 3 tries: it cannot be reached") as exc:
        client.model_info()
    assert "127.0.0.1" not in str(exc.value) and "secret-token" not in str(exc.value)
    assert "secret-token" not in repr(client)


# --- against a real vLLM server -----------------------------------------------------------------------------


@dataclass
class Served:
    model_dir: Path
    url: str

    @property
    def local(self) -> dict[str, Any]:
        """The same teacher as a local model (a ``run`` source: its folder)."""
        return {"source": "run", "path": str(self.model_dir)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("served-lm") / "corpus.txt"
    path.write_text("\n".join(f"{s} {i % 9}" for i in range(12) for s in _SENTENCES) + "\n")
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, corpus: Path):
    """A 2-layer Llama trained briefly on the corpus, saved, and served by vLLM as ``teacher`` on server
    ``test`` (DISTILLWEB_TEACHER_SERVERS, as a worker's environment would name it)."""
    vllm_python()  # skip (or fail, where services are required) before any work
    root = tmp_path_factory.mktemp("served")
    result = train(_lm_run(root / "teacher", corpus, student={"source": "config", "params": SERVED_LLAMA},
                           train={"max_steps": 30, "lr": 1e-2}))
    model_dir = Path(result.final_dir)
    with (
        vllm_server(model_dir, root / "vllm.log", max_model_len=128) as url,
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setenv(SERVERS_ENV, f"test={url}")
        yield Served(model_dir, url)


def _lookup(use: dict[str, Any]) -> CacheEntry:
    return TeacherCache(Path(use["path"]).parent).lookup(use["key"])


def _entry(result, kind: str, split: str = "train") -> tuple[CacheEntry, dict[str, Any]]:
    use = next(u for u in result.teacher_cache if u["split"] == split and u["stored"]["kind"] == kind)
    entry = _lookup(use)
    return entry, entry.manifest


def _read_all(entry: CacheEntry) -> dict[str, torch.Tensor]:
    """Every row of a top-k entry as the loss reads it (either store format): (N, width, k) and (N, width)."""
    offsets = entry.tensors["offsets"]
    rows, width = torch.arange(len(offsets) - 1), int(offsets.diff().max())
    top = gather_topk(entry, rows, width, torch.device("cpu"))
    target = gather_rows(entry, "target_logprob", rows, width)
    return {"offsets": offsets, "indices": top.indices, "logprobs": top.logprobs,
            "tail_logmass": top.tail_logmass, "target_logprob": target}


def _same_topk(a: CacheEntry, b: CacheEntry) -> None:
    """The contract's tolerance: identical offsets and top-k ids at every position; the stored (float16)
    log-probabilities and tails within one float16 step (2^-10 relative); target log-probs within 1e-4."""
    a, b = _read_all(a), _read_all(b)
    assert torch.equal(a["offsets"], b["offsets"])
    assert torch.equal(a["indices"], b["indices"])
    for name in ("logprobs", "tail_logmass"):
        assert torch.allclose(a[name], b[name], rtol=2**-10, atol=1e-4), name
    assert torch.allclose(a["target_logprob"], b["target_logprob"], atol=1e-4)


def _offline(out: Path, corpus: Path, teacher: dict[str, Any], **train_args: Any) -> RunConfig:
    return _lm_run(out, corpus, teacher=teacher, scheme="offline",
                   terms=[{"name": "topk", "params": {"k": 20}}], train={"max_steps": 12, **train_args})


def test_the_cache_filled_from_the_server_is_the_local_forwards(tmp_path, corpus, served, monkeypatch):
    # Entries as the teacher gave them (format 1, no quantisation): the compact store turns equal inputs into
    # equal records, and is measured on its own (topk_store).
    monkeypatch.setenv(STORE_ENV, "float32")
    local = train(_offline(tmp_path / "local", corpus, served.local))
    remote = train(_offline(tmp_path / "served", corpus, TEACHER))
    for split in ("train", "eval"):
        _same_topk(_entry(local, "topk", split)[0], _entry(remote, "topk", split)[0])
    _, manifest = _entry(remote, "topk", "train")
    assert manifest["served"]["server"] == "test" and manifest["served"]["tokens"] > 0
    assert manifest["served"]["tokens_per_s"] > 0
    assert remote.teacher["perplexity"] == pytest.approx(local.teacher["perplexity"], rel=1e-4)
    assert remote.student["perplexity"] == pytest.approx(local.student["perplexity"], rel=1e-3)


def test_the_online_scheme_trains_on_the_servers_top_k(tmp_path, corpus, served):
    losses: list[float] = []
    from workers.engine.trainer import Callbacks

    result = train(
        _lm_run(tmp_path / "online", corpus, teacher=TEACHER, scheme="online",
                terms=[{"name": "topk", "params": {"k": 16}}], train={"max_steps": 10, "log_every": 1}),
        Callbacks(on_metrics=lambda _s, m: losses.append(m["loss"]) if "loss" in m else None),
    )
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert min(losses[-3:]) < losses[0]
    assert result.teacher_forwards >= 10  # one request batch per step, besides the eval entry
    assert result.student["kl_to_teacher"] >= 0
    with pytest.raises(ConfigError, match="not its logits or features, so loss term .kd. cannot"):
        train(_lm_run(tmp_path / "dense", corpus, teacher=TEACHER, scheme="online", terms=[{"name": "kd"}]))


def test_seq_kd_continuations_written_by_the_server_are_the_local_teachers(tmp_path, corpus, served):
    def run(name: str, teacher: dict[str, Any]):
        return train(_lm_run(tmp_path / name, corpus, teacher=teacher, scheme="seq_kd",
                             terms=[{"name": "ce"}], scheme_params={"max_new_tokens": 4, "temperature": 0.0}))

    local = _entry(run("local", served.local), "generations")[0].tensors
    remote, manifest = _entry(run("served", TEACHER), "generations")
    remote = remote.tensors
    assert torch.equal(local["prompt_lengths"], remote["prompt_lengths"])
    assert torch.equal(local["offsets"], remote["offsets"]) and torch.equal(local["tokens"], remote["tokens"])
    assert manifest["served"]["tokens"] > 0


def test_preflight_refuses_a_model_the_server_does_not_serve_or_another_tokenizer(tmp_path, corpus, served):
    with pytest.raises(ModelLoadError, match="does not serve model 'nope'; it serves: teacher") as exc:
        train(_lm_run(tmp_path / "a", corpus, teacher={**TEACHER, "name": "nope"}, scheme="online",
                      terms=[{"name": "topk", "params": {"k": 4}}]))
    assert served.url not in str(exc.value)
    other_vocab = {"source": "config", "params": {**TINY_LLAMA, "num_hidden_layers": 1, "vocab_size": 120}}
    with pytest.raises(ConfigError, match="tokenises differently from the student"):
        train(_lm_run(tmp_path / "b", corpus, student=other_vocab, teacher=TEACHER, scheme="online",
                      terms=[{"name": "topk", "params": {"k": 4}}]))
    with pytest.raises(ConfigError, match="reads at most 128 tokens"):
        ServedTeacher("test", served.url, "teacher").check(None, max_length=200)
    with pytest.raises(ConfigError, match="top 65 log-probabilities.*max allowed: 64.*--max-logprobs 65"):
        ServedTeacher("test", served.url, "teacher").check(None, k=65)


KILLED_FILL = """
import os, signal, sys
from workers.engine import cache_fill
from workers.engine.config import RunConfig
from workers.engine.trainer import Callbacks, train

cache_fill.FLUSH_ROWS = 8  # a chunk every batch: the kill below finds some written


def progress(step, _total):
    if step >= 4:
        os.kill(os.getpid(), signal.SIGKILL)


train(RunConfig.from_json(sys.argv[1]), Callbacks(on_progress=progress))
"""


def test_a_fill_from_the_server_killed_mid_way_is_continued_by_the_next_run(tmp_path, corpus, served):
    cfg = _offline(tmp_path / "killed", corpus, TEACHER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.run([sys.executable, "-c", KILLED_FILL, cfg.to_json()], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
    chunks = list(Path(cfg.cache_dir).glob(".partial-*/chunk-*.safetensors"))
    assert chunks, "the killed run left the chunks it had written"

    resumed = train(cfg)
    filled, manifest = _entry(resumed, "topk")
    whole, _ = _entry(train(_offline(tmp_path / "other" / "whole", corpus, TEACHER)), "topk")  # another cache
    offsets = filled.tensors["offsets"]
    tokens = int(offsets[-1]) + len(offsets) - 1  # positions + the first token of every row
    assert 0 < manifest["served"]["tokens"] < tokens  # the rows of the chunks were not asked again
    _same_topk(filled, whole)
    assert not list(Path(cfg.cache_dir).glob(".partial-*"))
