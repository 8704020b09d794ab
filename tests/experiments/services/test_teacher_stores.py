"""Teacher-output stores: recorded from the entries a finished run's result names (real entries written by the
engine's TeacherCache), fenced like the rest of run_finish, deleted only when no queued or running run needs
them, per team."""

import io
import json
import shutil
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from experiments.domain.engine_config import TEACHER_CACHE_DIR
from experiments.models import Run, TeacherStore, TeacherStoreUse
from experiments.services import launch, lifecycle, teacher_stores
from tests.factories import RunFactory
from tests.teacher_store_entries import artifact_cache, topk_use
from workers.engine.cache import TeacherCache

DISPATCH = "workers.tasks.run_distillation.apply_async"

pytestmark = pytest.mark.django_db


@pytest.fixture
def experiment(digits_setup, team, user):
    with mock.patch(DISPATCH):
        return launch.experiment_create(
            team=team, created_by=user, name="kd", dataset=digits_setup["dataset"],
            teacher=digits_setup["teacher"], students=digits_setup["students"],
            recipes=[digits_setup["recipe"]], seeds=[0], train={"max_steps": 40},
        )


@pytest.fixture
def runs(experiment) -> list[Run]:
    return list(experiment.runs.filter(is_baseline=False).order_by("id"))


@pytest.fixture
def cache() -> TeacherCache:
    return artifact_cache()


def finish(run: Run, uses: list[dict], task_id: str = "t1") -> Run | None:
    lifecycle.run_claim(run_id=run.id, task_id=task_id, worker_name="w")
    return lifecycle.run_finish(run_id=run.id, task_id=task_id, result={"steps": 40, "teacher_cache": uses})


def test_a_finished_run_records_the_store_it_filled_and_the_next_run_its_reuse(runs, cache, monkeypatch):
    monkeypatch.setenv("DISTILLWEB_TOPK_STORE", "float32")  # a format-1 entry (outputs.safetensors)
    filled = topk_use(cache)
    assert finish(runs[0], [filled])
    store = TeacherStore.objects.get()
    folder = Path(filled["path"])
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert (store.team, store.key, store.kind, store.split) == (runs[0].team, filled["key"], "topk", "train")
    assert (store.k, store.positions, store.format, store.size_bytes) == (8, 30, 1, size)
    assert store.bytes_per_token == pytest.approx(size / 30)  # format 1: derived from the tensor header
    assert store.teacher == runs[0].teacher and store.teacher_label == "mlp-teacher"
    assert store.teacher_revision == "files " + "a" * 12 and store.max_length == 64
    assert store.dataset == runs[0].experiment.dataset and store.path == f"{TEACHER_CACHE_DIR}/{store.key}"
    reused = cache.lookup(filled["key"])
    hit = {**filled, "hit": True, "seconds": 0.01}
    assert reused is not None and finish(runs[1], [hit])
    uses = list(TeacherStoreUse.objects.order_by("id").values_list("run_id", "store_id", "filled"))
    assert uses == [(runs[0].id, store.id, True), (runs[1].id, store.id, False)]
    assert TeacherStore.objects.get().last_used_at >= store.last_used_at


def test_the_engines_default_entry_is_recorded_with_its_manifests_figures(runs, cache):
    use = topk_use(cache, positions=40, k=16)
    assert finish(runs[0], [use])
    manifest = json.loads((Path(use["path"]) / "manifest.json").read_text())
    store = TeacherStore.objects.get()
    assert (store.format, store.k, store.positions) == (manifest.get("format", 1), 16, 40)
    assert store.bytes_per_token == pytest.approx(manifest.get("bytes_per_token") or store.size_bytes / 40)
    assert store.size_bytes == manifest.get("bytes", store.size_bytes) > 0


def test_a_delivery_that_lost_the_run_records_no_store(runs, cache, settings):
    use = topk_use(cache)
    run = runs[0]
    lifecycle.run_claim(run_id=run.id, task_id="old", worker_name="w1")
    stale = timezone.now() - timedelta(seconds=settings.RUN_HEARTBEAT_TIMEOUT_S + 5)
    Run.objects.filter(id=run.id).update(heartbeat_at=stale)
    assert lifecycle.run_claim(run_id=run.id, task_id="new", worker_name="w2")  # took the run over
    result = {"steps": 40, "teacher_cache": [use]}
    assert lifecycle.run_finish(run_id=run.id, task_id="old", result=result) is None
    assert not TeacherStore.objects.exists() and not TeacherStoreUse.objects.exists()
    assert lifecycle.run_finish(run_id=run.id, task_id="new", result=result)
    assert TeacherStoreUse.objects.get().run_id == run.id


def test_format_2_manifest_fields_are_read_and_unreadable_entries_are_skipped(runs, cache, tmp_path):
    use = topk_use(cache, k=64)
    manifest_file = Path(use["path"]) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest.update({"format": 2, "k": 64, "vocab_size": 32000, "positions": 1000, "bytes": 140_000,
                     "bytes_per_token": 140.0})
    manifest_file.write_text(json.dumps(manifest))
    outside = tmp_path / "elsewhere" / ("b" * 64)
    outside.mkdir(parents=True)
    (outside / "manifest.json").write_text(json.dumps({**manifest, "key": "b" * 64}))
    gone = {**use, "key": "c" * 64, "path": str(Path(use["path"]).parent / ("c" * 64))}
    junk = [{**use, "key": "b" * 64, "path": str(outside)}, gone, {"key": 5}]
    assert finish(runs[0], [use, *junk])
    store = TeacherStore.objects.get()
    assert (store.format, store.k, store.positions, store.size_bytes, store.bytes_per_token) == (
        2, 64, 1000, 140_000, 140.0)


def test_a_result_without_teacher_outputs_records_nothing(runs):
    assert finish(runs[0], [])
    assert teacher_stores.store_facts({"teacher_cache": {"key": "a" * 64}}) == []
    assert teacher_stores.store_facts({}) == [] and not TeacherStore.objects.exists()


def test_delete_is_refused_while_a_queued_run_needs_it_and_allowed_after(runs, cache, experiment,
                                                                         django_capture_on_commit_callbacks):
    use = topk_use(cache)
    finish(runs[0], [use])
    store = TeacherStore.objects.get()
    queued = runs[1]  # same teacher, dataset and max length: its frozen config produces the same key
    assert queued.status == Run.Status.QUEUED
    with pytest.raises(ValidationError, match=rf"needed by queued or running run #{queued.id} \(queued\)"):
        teacher_stores.store_delete(store=store)
    assert TeacherStore.objects.filter(pk=store.pk).exists() and Path(use["path"]).is_dir()
    lifecycle.run_cancel(run=queued)
    baselines = experiment.runs.filter(is_baseline=True)  # no teacher: they need no store
    assert {run.status for run in baselines} == {Run.Status.QUEUED}
    with django_capture_on_commit_callbacks(execute=True):
        deletion = teacher_stores.store_delete(store=store)
    assert deletion.files_kept == "" and deletion.freed_bytes == store.size_bytes
    assert not TeacherStore.objects.exists() and not Path(use["path"]).exists()
    history = TeacherStoreUse.objects.get()  # the run keeps its history: a tombstone naming the store
    assert history.run_id == runs[0].id and history.store is None and history.store_deleted_at
    assert history.label == store.label


def test_a_queued_run_needs_a_store_by_its_recorded_use_or_its_config(runs, cache, team):
    finish(runs[0], [topk_use(cache, k=32)])
    store = TeacherStore.objects.get()
    lifecycle.run_cancel(run=runs[1])
    config = {**runs[0].config, "terms": [{"name": "topk", "weight": 1.0, "params": {"k": 32}}]}
    same_k = RunFactory(experiment=runs[0].experiment, team=team, config=config)
    other_k = RunFactory(experiment=runs[0].experiment, team=team,
                         config={**config, "terms": [{"name": "topk", "weight": 1.0, "params": {"k": 16}}]})
    other_data = RunFactory(experiment=runs[0].experiment, team=team,
                            config={**config, "dataset": {**config["dataset"], "max_length": 7}})
    assert teacher_stores.store_needed_by(store=store) == [same_k]
    Run.objects.filter(pk=same_k.pk).update(status=Run.Status.CANCELLED, finished_at=timezone.now())
    TeacherStoreUse.objects.create(run=other_data, key=store.key, label=store.label, split="train",
                                   filled=False)
    assert teacher_stores.store_needed_by(store=store) == [other_data]  # a requeued run that used it
    assert other_k not in teacher_stores.store_needed_by(store=store)


def test_stores_are_per_team_and_shared_files_outlive_one_teams_delete(
        runs, cache, other_team, django_capture_on_commit_callbacks):
    use = topk_use(cache)
    finish(runs[0], [use])
    theirs = RunFactory(team=other_team, experiment__team=other_team, config=runs[0].config,
                        status=Run.Status.RUNNING, started_at=timezone.now(), task_id="o1")
    assert lifecycle.run_finish(run_id=theirs.id, task_id="o1",
                                result={"teacher_cache": [{**use, "hit": True}]})
    mine, other = (TeacherStore.objects.get(team=t) for t in (runs[0].team, other_team))
    assert mine.key == other.key and mine.pk != other.pk
    assert list(other.uses.values_list("run_id", flat=True)) == [theirs.id]
    lifecycle.run_cancel(run=runs[1])
    with django_capture_on_commit_callbacks(execute=True):
        deletion = teacher_stores.store_delete(store=mine)
    assert deletion.files_kept and deletion.freed_bytes == 0
    assert Path(use["path"]).is_dir() and TeacherStore.objects.get() == other


def test_the_backfill_command_records_stores_of_earlier_runs_whose_entries_are_readable(runs, cache):
    from django.core.management import call_command

    kept, gone = topk_use(cache), topk_use(cache, k=4)
    finish(runs[0], [kept, gone])
    finish(runs[1], [{**kept, "hit": True}])
    TeacherStoreUse.objects.all().delete()  # as before stores were records: only the teacher_cache artifacts
    TeacherStore.objects.all().delete()
    shutil.rmtree(gone["path"])
    out = io.StringIO()
    call_command("teacher_stores_backfill", stdout=out)
    assert "from 2 runs; 1 entries no longer readable" in out.getvalue()
    store = TeacherStore.objects.get()
    assert store.key == kept["key"] and store.last_used_at == Run.objects.get(pk=runs[1].pk).finished_at
    assert list(store.uses.order_by("id").values_list("run_id", "filled")) == [(runs[0].id, True),
                                                                               (runs[1].id, False)]
    call_command("teacher_stores_backfill", stdout=io.StringIO())  # idempotent
    assert TeacherStoreUse.objects.count() == 2


def test_a_real_causal_lm_run_records_its_stores_and_a_later_run_of_the_same_config_needs_them(
        team, user, settings, tmp_path):
    """End to end: the task runs the engine in process, the engine fills the top-k cache, run_finish records
    the stores; a queued run of another experiment with the same teacher, data, k and seed is recognised as
    needing them (the other seed, whose random-init teacher differs, is not), and when it runs it reuses
    them."""
    from experiments.services import records
    from workers.tasks import run_distillation

    data = tmp_path / "corpus"
    data.mkdir()
    lines = [f"the {w} sat on the mat and the {w} ran to door {i}" for i, w in enumerate(["cat", "dog"] * 20)]
    (data / "lines.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    settings.DATASET_ROOTS = [data]
    dataset = records.dataset_spec_create(team=team, created_by=user, name="lines", source="hf",
                                          task="causal_lm", local_path=str(data / "lines.jsonl"),
                                          max_length=24)
    llama = {"model_type": "llama", "intermediate_size": 64, "num_attention_heads": 2,
             "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 64}
    teacher, student = (records.model_spec_create(team=team, created_by=user, name=name, source="config",
                                                  task="causal_lm", config={**llama, "hidden_size": hidden,
                                                                            "num_hidden_layers": layers})
                        for name, hidden, layers in (("lm-teacher", 32, 2), ("lm-student", 16, 1)))
    topk = records.recipe_create(team=team, created_by=user, name="topk", scheme="offline",
                                 terms=[{"name": "topk", "weight": 1.0, "params": {"k": 16}}])

    def launch_lm(name: str, seeds: list[int]):
        with mock.patch(DISPATCH):
            experiment = launch.experiment_create(
                team=team, created_by=user, name=name, dataset=dataset, teacher=teacher, students=[student],
                recipes=[topk], seeds=seeds, train={"max_steps": 4, "batch_size": 8, "eval_every": 4,
                                                    "log_every": 2, "save_every": 4})
        return list(experiment.runs.filter(is_baseline=False).order_by("seed"))

    first, other_seed = launch_lm("lm", [0, 1])
    run_distillation.apply(args=(first.id,))
    first.refresh_from_db()
    assert first.status == Run.Status.SUCCEEDED, first.error
    stores = {store.split: store for store in TeacherStore.objects.all()}
    train = stores["train"]
    assert (train.kind, train.k, train.teacher, train.dataset, train.max_length) == (
        "topk", 16, teacher, dataset, 24)
    assert train.positions and train.size_bytes and train.bytes_per_token == pytest.approx(
        train.size_bytes / train.positions, rel=0.05)
    assert all(teacher_stores.store_needed_by(store=store) == [] for store in stores.values())
    [again] = launch_lm("lm again", [0])
    assert all(teacher_stores.store_needed_by(store=store) == [again] for store in stores.values())
    with pytest.raises(ValidationError, match=f"#{again.id}"):
        teacher_stores.store_delete(store=train)
    run_distillation.apply(args=(again.id,))
    again.refresh_from_db()
    assert again.status == Run.Status.SUCCEEDED, again.error
    assert set(again.teacher_store_uses.values_list("store__split", "filled")) == {
        (split, False) for split in stores}
    assert TeacherStore.objects.count() == len(stores)
    assert other_seed.status == Run.Status.QUEUED
