"""The format-2 LM top-k store (:mod:`workers.engine.topk_store`): codec, shards, memory-mapped reads,
conversion of format-1 entries, and a run that trains from one."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from tests.workers.engine import test_lm
from tests.workers.engine.test_lm import Log, _lm_run
from workers.engine import topk_store
from workers.engine.cache import (
    MANIFEST_FILE,
    OUTPUTS_FILE,
    TeacherCache,
    cache_key,
    entry_tensors,
    gather_rows,
    gather_topk,
    pack_positions,
    topk_of,
)
from workers.engine.topk_store import Codec, StoreError, TopkStore, id_bits, write_store
from workers.engine.trainer import train

corpus, lm_teacher = test_lm.corpus, test_lm.lm_teacher  # the LM tests' fixtures
CPU = torch.device("cpu")


def _kl(values: np.ndarray, tail: np.ndarray, read: np.ndarray, read_tail: np.ndarray) -> np.ndarray:
    """Per-position KL(true ‖ read) over the top-k and the tail (the read one renormalised)."""
    a = np.concatenate([values, tail[:, None]], 1).astype(np.float64)
    b = np.concatenate([read, read_tail[:, None]], 1).astype(np.float64)
    a -= np.log(np.exp(a).sum(1, keepdims=True))
    b -= np.log(np.exp(b).sum(1, keepdims=True))
    return (np.exp(a) * (a - b)).sum(1)


def _random_topk(positions: int, k: int, vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    logits = torch.randn(positions, vocab) * torch.rand(positions, 1) * 6  # flat to peaked rows
    top = topk_of(logits, k)
    return top.logprobs.numpy(), top.indices.numpy(), top.tail_logmass.numpy()


@pytest.mark.parametrize(
    ("k", "vocab", "tail"), [(64, 49_152, True), (8, 50, True), (20, 152_064, False), (1, 7, True)]
)
def test_the_codec_round_trips_ids_exactly_and_values_within_a_small_kl(k, vocab, tail):
    values, ids, tails = _random_topk(600, k, vocab)
    codec = Codec(k, id_bits(vocab), tail=tail)
    read, read_ids, read_tail = codec.decode(codec.encode(values, ids, tails if tail else None))
    assert np.array_equal(read_ids, ids)
    assert np.array_equal(read[:, 0], values[:, 0].astype(np.float16).astype(np.float32))  # l₀ as float16
    assert (np.diff(read, axis=1) <= 0).all()  # still sorted
    if tail:
        assert np.allclose(read_tail, tails, atol=1e-2)
        kl = _kl(values, tails, read, read_tail)
        assert kl.mean() < 5e-4 and kl.max() < 2e-2, (kl.mean(), kl.max())
    else:
        assert read_tail is None


def test_unsorted_input_is_stored_sorted_with_its_ids():
    values, ids, tails = _random_topk(50, 8, 100)
    shuffle = np.random.default_rng(0).permutation(8)
    codec = Codec(8, id_bits(100))
    read, read_ids, _ = codec.decode(codec.encode(values[:, shuffle], ids[:, shuffle], tails))
    assert np.array_equal(read_ids, ids)
    assert np.allclose(read[:, 0], values[:, 0], atol=1e-2)


def test_bytes_per_token_at_k_64_and_a_49k_vocabulary_stay_under_150(tmp_path):
    codec = Codec(64, id_bits(49_152))
    assert codec.id_bits == 16 and codec.record_bytes == 149  # 128 B of ids + 21 B of values and tail
    assert Codec(64, id_bits(152_064)).record_bytes == 165  # 18-bit ids: 144 B + 21 B
    values, ids, tails = _random_topk(3000, 64, 49_152)
    offsets = torch.arange(0, 3001, 100)
    tensors = {
        "offsets": offsets,
        "logprobs": torch.from_numpy(values).half(),
        "indices": torch.from_numpy(ids).int(),
        "tail_logmass": torch.from_numpy(tails).half(),
        "target_logprob": torch.from_numpy(values[:, 3].copy()),
    }
    fields = write_store(tmp_path, tensors, vocab_size=49_152)
    on_disk = sum(f.stat().st_size for f in tmp_path.iterdir() if f.is_file())
    listing = sorted(p.name for p in tmp_path.iterdir())
    assert fields["bytes"] == on_disk and fields["positions"] == 3000, listing
    assert fields["bytes_per_token_topk"] == 149
    # with target_logprob (4 B) and the offsets and index shared out: still ≤ 155 B a position
    assert 149 + 4 < fields["bytes_per_token"] < 155
    assert fields["format"] == 2 and fields["k"] == 64 and fields["vocab_size"] == 49_152


def test_fidelity_on_a_trained_tiny_llamas_outputs(lm_teacher, corpus):
    """Real teacher outputs (a 2-layer Llama trained on the corpus): the decoded top-64 distribution is
    within a tiny KL of the float32 one, two orders below float16's rounding of the ids' values matters."""
    model = AutoModelForCausalLM.from_pretrained(lm_teacher).eval()
    ids = torch.randint(3, 160, (8, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top = topk_of(model(ids).logits.reshape(-1, 160), 64)
    values, tail = top.logprobs.numpy(), top.tail_logmass.numpy()
    codec = Codec(64, id_bits(160))
    read, read_ids, read_tail = codec.decode(codec.encode(values, top.indices.numpy(), tail))
    assert np.array_equal(read_ids, top.indices.numpy())
    kl = _kl(values, tail, read, read_tail)
    assert kl.mean() < 5e-4 and np.quantile(kl, 0.99) < 3e-3, (kl.mean(), np.quantile(kl, 0.99))
    assert np.exp(values[:, 0]).mean() > 0.2  # a trained teacher: peaked, not uniform, distributions


def _entry(tmp_path: Path, rows: int = 40, seed: int = 0, **shards):
    """A format-2 store of ``rows`` rows of 3..17 positions, and the float tensors it was written from."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 18, rows)
    values, ids, tails = _random_topk(int(lengths.sum()), 16, 300, seed)
    tensors = {
        "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)])),
        "logprobs": torch.from_numpy(values).half(),
        "indices": torch.from_numpy(ids).int(),
        "tail_logmass": torch.from_numpy(tails).half(),
        "target_logprob": torch.from_numpy(values[:, 2].copy()),
        "prefix_end": torch.arange(int(lengths.sum())),
    }
    folder = tmp_path / "store"
    folder.mkdir()
    write_store(folder, tensors, vocab_size=300, **shards)
    return folder, tensors


def test_a_batch_reads_only_the_shards_that_hold_its_rows(tmp_path):
    folder, tensors = _entry(tmp_path, shard_positions=60)
    index = json.loads((folder / topk_store.INDEX_FILE).read_text())
    assert len(index["shards"]) > 3
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in index["shards"])
    first = index["shards"][0]["rows"]
    store = TopkStore(folder)
    assert store.opened == set()  # opening maps nothing
    rows = torch.arange(first[0], first[1])
    position = [range(int(tensors["offsets"][r]), int(tensors["offsets"][r + 1])) for r in rows]
    read, read_ids, _ = store.read(np.concatenate([list(p) for p in position]))
    assert store.opened == {0}
    assert np.array_equal(read_ids, tensors["indices"][: int(tensors["offsets"][first[1]])].numpy())
    last = index["shards"][-1]["rows"]
    store.read_side("target_logprob", np.asarray([int(tensors["offsets"][last[1] - 1])]))
    assert store.opened == {0, len(index["shards"]) - 1}


def test_gather_from_a_format_2_entry_equals_gather_from_its_decoded_tensors(tmp_path):
    from workers.engine.cache import CacheEntry

    folder, tensors = _entry(tmp_path, shard_positions=50)
    store = TopkStore(folder)
    stored = CacheEntry("k", folder, {}, store.tensors, store)
    decoded = CacheEntry("k", folder, {}, store.read_all())
    rows = torch.tensor([7, 0, 39, 12, 7])
    for width in (4, 17, 25):
        a, b = gather_topk(stored, rows, width, CPU), gather_topk(decoded, rows, width, CPU)
        assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.indices, b.indices)
        assert torch.equal(a.tail_logmass, b.tail_logmass)
        for name, fill in (("target_logprob", -1.0), ("prefix_end", 0.0)):
            got = gather_rows(stored, name, rows, width, fill=fill)
            assert torch.equal(got, gather_rows(decoded, name, rows, width, fill=fill))
    assert torch.equal(stored.tensors["prefix_end"], tensors["prefix_end"])
    assert sorted(stored.tensors) == ["offsets", "prefix_end", "target_logprob"]


def test_a_changed_shard_fails_with_a_clear_message(tmp_path):
    folder, _ = _entry(tmp_path, shard_positions=60)
    shard = folder / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = TopkStore(folder)
    store.read(np.asarray([0]))  # shard 0 is intact
    rows = json.loads((folder / topk_store.INDEX_FILE).read_text())["shards"][1]["positions"]
    with pytest.raises(StoreError, match="shard-00001.bin does not match its checksum") as raised:
        store.read(np.asarray([rows[0]]))
    assert str(tmp_path) not in str(raised.value)  # no server path in the message


def _read_rows(folder: str, rows: list[int], queue) -> None:
    store = TopkStore(Path(folder))
    top = gather_topk_rows(store, rows)
    queue.put((rows, sorted(store.opened), top))


def gather_topk_rows(store: TopkStore, rows: list[int]) -> list[list[int]]:
    offsets = store.offsets.tolist()
    return [store.read(np.arange(offsets[r], offsets[r + 1]))[1].tolist() for r in rows]


def test_two_ranks_read_their_own_rows_and_only_their_shards(tmp_path):
    folder, tensors = _entry(tmp_path, rows=40, shard_positions=100)
    index = json.loads((folder / topk_store.INDEX_FILE).read_text())
    half = index["shards"][len(index["shards"]) // 2]["rows"][0]  # rank 0: the first shards' rows
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    ranks = [list(range(half)), list(range(half, 40))]
    procs = [context.Process(target=_read_rows, args=(str(folder), rows, queue)) for rows in ranks]
    for p in procs:
        p.start()
    got = sorted((queue.get(timeout=300) for _ in procs), key=lambda r: r[0][0])
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    (rows0, opened0, ids0), (rows1, opened1, ids1) = got
    assert set(opened0).isdisjoint(opened1) and set(opened0) | set(opened1) == set(
        range(len(index["shards"]))
    )
    offsets = tensors["offsets"].tolist()
    whole = tensors["indices"].tolist()
    assert ids0 + ids1 == [whole[offsets[r] : offsets[r + 1]] for r in range(40)]


def _format_1_entry(root: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """An entry as the format-1 writer left it: outputs.safetensors (float16 values, int32 ids)."""
    values, ids, tails = _random_topk(120, 8, 64, seed=3)
    tensors = {
        "offsets": torch.tensor([0, 50, 70, 120]),
        "logprobs": torch.from_numpy(values).half(),
        "indices": torch.from_numpy(ids).int(),
        "tail_logmass": torch.from_numpy(tails).half(),
        "target_logprob": torch.from_numpy(values[:, 1].copy()),
    }
    key = cache_key({"format-1": True})
    (root / key).mkdir(parents=True)
    save_file(tensors, root / key / OUTPUTS_FILE)
    manifest = {"key": key, "format": 1, "split": "train", "stored": {"kind": "topk", "k": 8}}
    (root / key / MANIFEST_FILE).write_text(json.dumps({**manifest, "teacher_dims": {"vocab_size": 64}}))
    (root / key / "extra-efficiency.json").write_text("{}")
    return key, tensors


def test_format_1_entries_still_read_and_upgrade_in_place(tmp_path):
    key, tensors = _format_1_entry(tmp_path)
    cache = TeacherCache(tmp_path)
    old = cache.lookup(key)
    assert old.store is None
    rows = torch.tensor([2, 0])
    before = gather_topk(old, rows, 60, CPU)
    assert torch.equal(before.logprobs[0, :50], tensors["logprobs"][70:120].float())

    lines: list[str] = []
    assert cache.upgrade(dry_run=True, log=lines.append)["to_convert"] == 1
    assert (tmp_path / key / OUTPUTS_FILE).is_file() and "would convert" in lines[0]

    counts = cache.upgrade(log=lines.append)
    assert counts["converted"] == 1 and counts["bytes_after"] < counts["bytes_before"]
    assert "B/token" in lines[-1]
    new = cache.lookup(key)
    assert new.store is not None and not (tmp_path / key / OUTPUTS_FILE).exists()
    assert new.manifest["format"] == 2 and new.manifest["converted_from_format"] == 1
    assert (
        new.manifest["stored"] == {"kind": "topk", "k": 8}
        and (tmp_path / key / "extra-efficiency.json").exists()
    )
    after = gather_topk(new, rows, 60, CPU)
    assert torch.equal(after.indices, before.indices)
    full = torch.cat([before.logprobs, before.tail_logmass[..., None]], -1)
    read = torch.cat([after.logprobs, after.tail_logmass[..., None]], -1).log_softmax(-1)
    assert float((full.exp() * (full - read)).sum(-1).max()) < 2e-2
    assert torch.equal(
        gather_rows(new, "target_logprob", rows, 60), gather_rows(old, "target_logprob", rows, 60)
    )
    assert cache.upgrade(log=lines.append)["to_convert"] == 0  # nothing left to do


def test_the_float32_reference_store_writes_format_1_under_keys_of_its_own(tmp_path, monkeypatch):
    description = {"stored": {"kind": "topk", "k": 8}}
    compact_key = cache_key(description)
    monkeypatch.setenv(topk_store.STORE_ENV, "float32")
    assert cache_key(description) != compact_key
    assert cache_key({"stored": {"kind": "logits"}}) == cache_key({"stored": {"kind": "logits"}})
    values, ids, tails = _random_topk(10, 8, 64)
    rows = [
        {
            "logprobs": torch.from_numpy(values).half(),
            "indices": torch.from_numpy(ids).int(),
            "tail_logmass": torch.from_numpy(tails).half(),
        }
    ]
    cache = TeacherCache(tmp_path)
    entry = cache.get_or_compute(
        cache_key(description), lambda: (pack_positions(rows), {}), split="train", stored={}, description={}
    )
    assert entry.store is None and entry_tensors(entry.path)["logprobs"].dtype == torch.float32
    monkeypatch.setenv(topk_store.STORE_ENV, "bogus")
    with pytest.raises(Exception, match="DISTILLWEB_TOPK_STORE must be 'compact' or 'float32'"):
        topk_store.store_mode()


def test_an_offline_run_fills_and_then_trains_from_a_format_2_entry(tmp_path, corpus, lm_teacher):
    def run(name: str):
        log = Log()
        result = train(
            _lm_run(
                tmp_path / name,
                corpus,
                teacher={"source": "run", "path": str(lm_teacher)},
                terms=[{"name": "ce", "weight": 0.5}, {"name": "topk", "weight": 0.5, "params": {"k": 16}}],
                scheme="offline",
                cache_dir=str(tmp_path / "cache"),
                evaluate_teacher=False,
                train={"max_steps": 12},
            ),
            log.callbacks(),
        )
        return result, [m["loss"] for m in log.train()]

    (first, first_losses), (second, second_losses) = run("first"), run("second")
    (fill,) = [u for u in first.teacher_cache if u["split"] == "train"]
    (hit,) = [u for u in second.teacher_cache if u["split"] == "train"]
    assert (fill["hit"], hit["hit"]) == (False, True) and fill["key"] == hit["key"]
    assert fill["format"] == hit["format"] == 2 and hit["bytes_per_token"] < 60  # 16 ids of 8 bits + values
    manifest = json.loads((Path(hit["path"]) / MANIFEST_FILE).read_text())
    assert manifest["k"] == 16 and manifest["vocab_size"] == 160 and manifest["format"] == 2
    assert not (Path(hit["path"]) / OUTPUTS_FILE).exists()
    # The first run trained on the values its entry gives back: the same curve as the run that read them.
    assert len(first_losses) == 6 and second_losses == pytest.approx(first_losses, rel=1e-4)


def test_an_entry_of_an_unknown_codec_is_refused_clearly(tmp_path):
    folder, _ = _entry(tmp_path)
    index = json.loads((folder / topk_store.INDEX_FILE).read_text())
    (folder / topk_store.INDEX_FILE).write_text(json.dumps({**index, "codec": "gap-dpcm-9"}))
    with pytest.raises(StoreError, match="uses the codec 'gap-dpcm-9', which this version cannot read"):
        TopkStore(folder)
