"""The teacher-output cache: keys, atomic entries, one computation for concurrent runs, sparse LM outputs, and
runs that reuse an entry without running or even loading the teacher."""

from __future__ import annotations

import shutil
import threading
import time

import torch
from safetensors.torch import load_file

from workers.engine import teachers
from workers.engine.cache import (
    TeacherCache,
    cache_key,
    dataset_description,
    digest_path,
    gather_rows,
    gather_topk,
    model_files_fingerprint,
    pack_positions,
    topk_of,
)
from workers.engine.config import DatasetConfig, ModelConfig
from workers.engine.trainer import train

KD_TERMS = [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}}]


def _count_teacher_loads(monkeypatch) -> dict[str, int]:
    calls = {"loads": 0}
    real = teachers.load_model

    def counting(cfg, *, dataset, role):
        if role == "teacher":
            calls["loads"] += 1
        return real(cfg, dataset=dataset, role=role)

    monkeypatch.setattr(teachers, "load_model", counting)
    return calls


def test_second_run_reuses_the_cache_without_loading_or_running_the_teacher(
    tmp_path, digits_run, digits_teacher, monkeypatch
):
    calls = _count_teacher_loads(monkeypatch)

    def run(name):
        return train(
            digits_run(
                tmp_path / name,
                teacher={"source": "run", "path": str(digits_teacher)},
                terms=KD_TERMS,
                scheme="offline",
                cache_dir=str(tmp_path / "cache"),
                train={"max_steps": 20, "eval_every": 10},
            )
        )

    first = run("a")
    assert calls["loads"] == 1 and first.teacher_forwards > 0
    assert [(c["split"], c["hit"]) for c in first.teacher_cache] == [("train", False), ("eval", False)]
    assert first.teacher_cache[0]["stored"] == {"kind": "logits", "dtype": "float32"}

    second = run("b")
    assert calls["loads"] == 1  # the teacher's weights were never read again
    assert second.teacher_forwards == 0
    assert [(c["split"], c["hit"]) for c in second.teacher_cache] == [("train", True), ("eval", True)]
    assert [c["key"] for c in second.teacher_cache] == [c["key"] for c in first.teacher_cache]
    # Same numbers as when the teacher ran: quality from the cached eval logits, speed from the entry's side
    # file.
    assert second.teacher == first.teacher
    assert second.student["agreement"] == first.student["agreement"]
    a = load_file(f"{first.final_dir}/model.safetensors")
    b = load_file(f"{second.final_dir}/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    entry = tmp_path / "cache" / first.teacher_cache[0]["key"]
    assert (entry / "manifest.json").is_file() and (entry / "outputs.safetensors").is_file()


def test_runs_with_a_different_teacher_or_data_get_a_new_entry(tmp_path, digits_run, digits_teacher):
    def run(name, teacher, **dataset):
        cfg = digits_run(
            tmp_path / name,
            teacher={"source": "run", "path": str(teacher)},
            terms=KD_TERMS,
            scheme="offline",
            cache_dir=str(tmp_path / "cache"),
            evaluate_teacher=False,
            dataset={"source": "builtin", "name": "digits", **dataset},
            train={"max_steps": 2},
        )
        return train(cfg).teacher_cache

    first = run("a", digits_teacher)
    # labelled_fraction hides labels but changes no input: the same entry.
    assert [c["hit"] for c in run("b", digits_teacher, labelled_fraction=0.5)] == [True, True]
    assert [c["hit"] for c in run("c", digits_teacher, split_seed=1)] == [False, False]
    other = tmp_path / "other-teacher"
    shutil.copytree(digits_teacher, other)
    weights = load_file(other / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v + 0.01 for k, v in weights.items()}, other / "model.safetensors")
    changed = run("d", other)
    assert [c["hit"] for c in changed] == [False, False]
    assert {c["key"] for c in changed}.isdisjoint({c["key"] for c in first})


def test_key_parts_follow_file_contents(tmp_path, digits_teacher):
    data = tmp_path / "data.csv"
    data.write_text("text,label\na,0\nb,1\n")
    before = dataset_description(
        DatasetConfig(source="hf", path=str(data)), task="classification", max_length=32
    )
    data.write_text("text,label\na,0\nc,1\n")
    after = dataset_description(
        DatasetConfig(source="hf", path=str(data)), task="classification", max_length=32
    )
    assert before["content"] != after["content"] and cache_key(before) != cache_key(after)
    assert (
        dataset_description(
            DatasetConfig(source="hf", path=str(data), labelled_fraction=0.5),
            task="classification",
            max_length=32,
        )
        == after
    )

    copy = tmp_path / "copy"
    shutil.copytree(digits_teacher, copy)
    same = model_files_fingerprint(ModelConfig(source="run", path=str(copy)))
    assert same == model_files_fingerprint(ModelConfig(source="run", path=str(digits_teacher)))
    (copy / "model.safetensors").write_bytes(b"different")
    assert digest_path(copy) != digest_path(digits_teacher)
    assert model_files_fingerprint(ModelConfig(source="config", params={"model_type": "bert"})) is None


def test_concurrent_requests_for_one_key_compute_it_once(tmp_path):
    computed = []

    def compute():
        computed.append(threading.get_ident())
        time.sleep(0.3)
        return {"logits": torch.arange(6.0).view(3, 2)}, {"teacher_dims": {}}

    results = []

    def worker():
        cache = TeacherCache(tmp_path)
        entry = cache.get_or_compute(
            "k" * 64, compute, split="train", stored={"kind": "logits"}, description={}
        )
        results.append((entry.tensors["logits"], cache.uses[0]))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(computed) == 1
    assert sorted(use.hit for _, use in results) == [False, True]
    assert [use.waited for _, use in results if use.hit] == [True]
    assert all(torch.equal(t, torch.arange(6.0).view(3, 2)) for t, _ in results)
    assert not list(tmp_path.glob(".tmp-*"))


def test_topk_entries_round_trip_through_the_cache(tmp_path):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50) * 3  # (B, T, V), already shifted
    lengths = [5, 2, 4]
    top = topk_of(logits, 8)
    assert torch.allclose(
        torch.logsumexp(torch.cat([top.logprobs, top.tail_logmass.unsqueeze(-1)], -1), -1),
        torch.zeros(3, 5),
        atol=1e-5,
    )  # top-k mass + tail = 1
    target = torch.log_softmax(logits, -1)[..., 0]
    rows = [
        {
            "logprobs": top.logprobs[b, :n].half(),
            "indices": top.indices[b, :n].int(),
            "tail_logmass": top.tail_logmass[b, :n].half(),
            "target_logprob": target[b, :n],
        }
        for b, n in enumerate(lengths)
    ]
    cache = TeacherCache(tmp_path)
    key = cache_key({"test": 1})
    cache.get_or_compute(
        key,
        lambda: (pack_positions(rows), {}),
        split="train",
        stored={"kind": "topk", "k": 8},
        description={},
    )
    entry = TeacherCache(tmp_path).lookup(key)
    assert entry.store is not None and entry.manifest["format"] == 2 and entry.manifest["k"] == 8
    assert entry.tensors["offsets"].tolist() == [0, 5, 7, 11]
    assert sorted(entry.tensors) == ["offsets", "target_logprob"]  # the top-k is read by rows, never whole

    back = gather_topk(entry, torch.tensor([2, 0]), 5, torch.device("cpu"))  # rows in another order
    assert back.logprobs.shape == (2, 5, 8)
    assert torch.equal(back.indices[0, :4], top.indices[2, :4]) and torch.equal(
        back.indices[1], top.indices[0]
    )
    # format 2 keeps the top log-prob and the tail as float16, the rest within a small KL
    assert torch.allclose(back.logprobs[0, :4, 0], top.logprobs[2, :4, 0], atol=1e-2)
    full = torch.cat([top.logprobs[2, :4], top.tail_logmass[2, :4, None]], -1)
    read = torch.cat([back.logprobs[0, :4], back.tail_logmass[0, :4, None]], -1)
    kl = (full.exp() * (full - read.log_softmax(-1))).sum(-1)
    assert (kl < 2e-3).all(), kl
    assert torch.allclose(back.tail_logmass[1], top.tail_logmass[0], atol=1e-2)
    assert torch.isfinite(back.logprobs).all() and torch.isfinite(back.tail_logmass).all()  # padding is valid
    assert torch.allclose(gather_rows(entry, "target_logprob", torch.tensor([1]), 5)[0, :2], target[1, :2])
