"""The worker fleet console: staff-only pages and actions, worker registration rules, the offline sweep, the
home page's fleet summary, and a real worker drained and resumed through the console."""

import json
import time
import uuid
from datetime import timedelta
from types import SimpleNamespace
from unittest import mock

import pytest
import redis
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone
from kombu import Connection

from experiments.models import Run, Worker
from experiments.selectors import fleet as fleet_reads
from experiments.services import fleet as fleet_writes
from experiments.services import launch, records
from tests import waiting
from tests.factories import ExperimentFactory, MembershipFactory, RunFactory, TeamFactory, UserFactory
from workers.fleet_tasks import fleet_sweep

ACTIONS = ["worker_drain", "worker_resume", "worker_shutdown", "worker_add_queue", "worker_remove_queue"]
GIB = 1024**3


def make_worker(name="gpu0@host-a", *, age_s=1.0, state=Worker.State.ONLINE, **fields):
    defaults = {"hostname": "host-a", "pid": 4242, "queues": ["gpu-80g"], "state": state,
                "last_heartbeat": timezone.now() - timedelta(seconds=age_s)}
    return Worker.objects.create(name=name, **{**defaults, **fields})


def gpu(index=0, *, util=0, used_gib=1, name="NVIDIA H100 80GB HBM3"):
    return {"index": index, "name": name, "uuid": f"GPU-{index}", "memory_total_bytes": 80 * GIB,
            "memory_used_bytes": used_gib * GIB, "utilization_pct": util, "temperature_c": 40}


def texts(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


@pytest.fixture
def staff_client(client, staff_user):
    client.force_login(staff_user)
    return client


@pytest.fixture
def run(team):
    return RunFactory(experiment=ExperimentFactory(team=team))


# --- permissions ----------------------------------------------------------------------------------
@pytest.mark.django_db
def test_anonymous_users_are_sent_to_the_login_page_everywhere(client):
    worker = make_worker()
    pages = [reverse("experiments:worker_list"), reverse("experiments:worker_list_json")]
    actions = [reverse(f"experiments:{name}", args=[worker.pk]) for name in ACTIONS]

    responses = [client.get(url) for url in pages] + [client.post(url, {"queue": "cpu"}) for url in actions]

    for url, response in zip(pages + actions, responses, strict=True):
        assert response.status_code == 302 and response["Location"].startswith(reverse("login")), url
    assert Worker.objects.get(pk=worker.pk).state == Worker.State.ONLINE


@pytest.mark.django_db
def test_non_staff_get_403_on_the_page_the_json_and_every_action(client_logged_in):
    worker = make_worker()
    with mock.patch.object(fleet_writes, "_send") as send:
        assert client_logged_in.get(reverse("experiments:worker_list")).status_code == 403
        assert client_logged_in.get(reverse("experiments:worker_list_json")).status_code == 403
        for name in ACTIONS:
            url = reverse(f"experiments:{name}", args=[worker.pk])
            assert client_logged_in.post(url, {"queue": "cpu"}).status_code == 403, name
            assert client_logged_in.get(url).status_code == 403, name
    send.assert_not_called()
    assert Worker.objects.get(pk=worker.pk).state == Worker.State.ONLINE


@pytest.mark.django_db
def test_actions_accept_only_post(staff_client):
    worker = make_worker()
    for name in ACTIONS:
        assert staff_client.get(reverse(f"experiments:{name}", args=[worker.pk])).status_code == 405


@pytest.mark.django_db
def test_admin_worker_actions_report_an_offline_worker(staff_client):
    worker = make_worker(age_s=3600)

    response = staff_client.post(reverse("admin:experiments_worker_changelist"),
                                 {"action": "drain_workers", "_selected_action": [worker.pk]}, follow=True)

    assert response.status_code == 200
    assert any("is offline" in text for text in texts(response))
    assert Worker.objects.get(pk=worker.pk).state == Worker.State.ONLINE


# --- unknown / offline workers, queue names ----------------------------------------------------------
@pytest.mark.django_db
@pytest.mark.parametrize("name", ACTIONS)
def test_actions_on_an_unknown_worker_say_so(staff_client, name):
    with mock.patch.object(fleet_writes, "_send") as send:
        response = staff_client.post(
            reverse(f"experiments:{name}", args=[987654]), {"queue": "cpu"}, follow=True
        )

    assert response.status_code == 200
    assert any("no such worker" in text for text in texts(response))
    send.assert_not_called()


@pytest.mark.django_db
@pytest.mark.parametrize(("state", "age_s"), [(Worker.State.OFFLINE, 1), (Worker.State.ONLINE, 3600)])
@pytest.mark.parametrize("name", ACTIONS)
def test_actions_on_an_offline_worker_say_so_and_change_nothing(staff_client, name, state, age_s):
    worker = make_worker(state=state, age_s=age_s, queues=["gpu-80g", "cpu"])
    with mock.patch.object(fleet_writes, "_send") as send:
        response = staff_client.post(reverse(f"experiments:{name}", args=[worker.pk]), {"queue": "cpu"},
                                     follow=True)

    assert any(f"Worker {worker.name} is offline" in text for text in texts(response))
    send.assert_not_called()
    after = Worker.objects.get(pk=worker.pk)
    assert (after.state, after.queues) == (state, ["gpu-80g", "cpu"])


@pytest.mark.django_db
@pytest.mark.parametrize(
    "queue", ["", "   ", "has space", "a" * 65, "q;rm -rf", "<script>", "queue/1", "ünïcode"]
)
def test_queue_names_are_validated(staff_client, queue):
    worker = make_worker()
    with mock.patch.object(fleet_writes, "_send") as send:
        response = staff_client.post(
            reverse("experiments:worker_add_queue", args=[worker.pk]), {"queue": queue}, follow=True
        )

    assert any("A queue name is 1–64 letters" in text for text in texts(response))
    send.assert_not_called()
    assert Worker.objects.get(pk=worker.pk).queues == ["gpu-80g"]


@pytest.mark.parametrize("queue", ["gpu-80g", "cpu", "a" * 64, "celery", "team.a:gpu_24g"])
def test_valid_queue_names_pass(queue):
    assert fleet_writes.validate_queue_name(queue) == queue


@pytest.mark.django_db
def test_a_worker_that_does_not_answer_is_reported_and_left_as_it_was(staff_client):
    worker = make_worker()
    with mock.patch.object(fleet_writes, "_send", return_value=None):
        response = staff_client.post(reverse("experiments:worker_drain", args=[worker.pk]), follow=True)

    assert any("did not answer" in text for text in texts(response))
    assert Worker.objects.get(pk=worker.pk).state == Worker.State.ONLINE


@pytest.mark.django_db
def test_a_broker_that_is_down_gives_a_clear_message(staff_client):
    worker = make_worker()
    down = Connection("redis://127.0.0.1:1/0", connect_timeout=1)
    with mock.patch.object(fleet_writes.celery_app, "connection_for_write", return_value=down):
        response = staff_client.post(reverse("experiments:worker_drain", args=[worker.pk]), follow=True)

    assert any("broker could not be reached" in text for text in texts(response))
    assert Worker.objects.get(pk=worker.pk).state == Worker.State.ONLINE


@pytest.mark.django_db
def test_queue_changes_on_a_draining_worker_only_change_what_resume_consumes(staff_client):
    worker = make_worker(state=Worker.State.DRAINING)
    with mock.patch.object(fleet_writes, "_send") as send:
        staff_client.post(reverse("experiments:worker_add_queue", args=[worker.pk]), {"queue": "cpu"})
        staff_client.post(reverse("experiments:worker_remove_queue", args=[worker.pk]), {"queue": "gpu-80g"})
        response = staff_client.post(
            reverse("experiments:worker_remove_queue", args=[worker.pk]), {"queue": "cpu"}, follow=True
        )

    send.assert_not_called()
    assert any("only queue" in text for text in texts(response))
    assert Worker.objects.get(pk=worker.pk).queues == ["cpu"]


# --- escaping ---------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_heartbeat_data_is_escaped_on_the_page_and_plain_text_in_the_json(staff_client):
    evil = "<img src=x onerror=alert(1)>"
    make_worker(name="<script>w</script>", hostname="<b>host</b>", queues=["gpu-80g"],
                versions={"torch": "<i>2.4</i>"}, gpus=[gpu(name=evil)])

    page = staff_client.get(reverse("experiments:worker_list")).content.decode()
    data = staff_client.get(reverse("experiments:worker_list_json"))

    assert "<img src=x" not in page and "<script>w</script>" not in page and "<b>host</b>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "<i>2.4</i>" not in page
    assert data["Content-Type"] == "application/json"
    (worker,) = data.json()["workers"]
    assert worker["gpus"][0]["name"] == evil  # text; the page's script inserts it with textContent


def test_the_console_script_never_inserts_data_as_html():
    from django.contrib.staticfiles import finders

    script = open(finders.find("js/fleet.js")).read()

    assert "textContent" in script
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "outerHTML" not in script


@pytest.mark.django_db
def test_the_page_shows_gpus_queues_runs_and_heartbeat_age(staff_client, run):
    worker = make_worker(age_s=12, gpus=[gpu(0, util=55, used_gib=20), gpu(1, util=0, used_gib=0)],
                         queues=["gpu-80g", "cpu"])
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, started_at=timezone.now(),
                                         worker_name=worker.name, step=3, total_steps=10)

    response = staff_client.get(reverse("experiments:worker_list"))
    html = response.content.decode()

    assert "20.0 / 80.0 GiB" in html and "util 55%" in html and "40 °C" in html
    assert 'style="width: 25%"' in html
    assert reverse("experiments:run_detail", args=[run.pk]) in html
    assert reverse("experiments:worker_list_json") in html and "js/fleet.js" in html
    assert reverse("experiments:worker_drain", args=[worker.pk]) in html and "csrfmiddlewaretoken" in html
    data = staff_client.get(reverse("experiments:worker_list_json")).json()
    (row,) = data["workers"]
    assert (
        row["state"] == "online" and 11 <= row["heartbeat_age_s"] < 20 and row["queues"] == ["gpu-80g", "cpu"]
    )
    assert [r["url"] for r in row["runs"]] == [reverse("experiments:run_detail", args=[run.pk])]
    assert [g["busy"] for g in row["gpus"]] == [True, True]  # a run is on this worker: both its GPUs are busy


# --- registration and heartbeats --------------------------------------------------------------------
@pytest.mark.django_db
def test_a_worker_cannot_register_under_the_name_of_a_live_one(caplog):
    make_worker(name="gpu0@a", hostname="a", pid=100)

    with pytest.raises(fleet_writes.WorkerNameInUse, match="is online as pid 100 on a"):
        fleet_writes.worker_register(name="gpu0@a", hostname="b", pid=200, queues=["x"], versions={})

    holder = Worker.objects.get(name="gpu0@a")
    assert (holder.hostname, holder.pid, holder.queues) == ("a", 100, ["gpu-80g"])
    assert "refused to register worker gpu0@a" in caplog.text
    # the refused process cannot beat for, or unregister, the holder either
    assert not fleet_writes.worker_heartbeat(name="gpu0@a", gpus=[gpu()], hostname="b", pid=200)
    fleet_writes.worker_mark_offline(name="gpu0@a", hostname="b", pid=200)
    assert Worker.objects.get(name="gpu0@a").state == Worker.State.ONLINE


@pytest.mark.django_db
@pytest.mark.parametrize(("holder", "pid_alive"), [
    ({"age_s": 3600}, None),  # silent too long
    ({"state": Worker.State.OFFLINE}, None),  # shut down
    ({"hostname": "b", "pid": 200}, None),  # the same process registering again
    ({"hostname": "b", "pid": 150}, lambda pid: False),  # its host knows the old process died (a restart)
])
def test_a_name_is_free_again_once_its_holder_is_gone(holder, pid_alive):
    make_worker(name="gpu0@b", **{"hostname": "a", "pid": 100, **holder})

    worker = fleet_writes.worker_register(
        name="gpu0@b", hostname="b", pid=200, queues=["x"], versions={"torch": "2"}, pid_alive=pid_alive
    )

    assert (worker.hostname, worker.pid, worker.queues, worker.state) == (
        "b",
        200,
        ["x"],
        Worker.State.ONLINE,
    )


@pytest.mark.django_db
def test_a_live_process_on_the_same_host_keeps_its_name():
    make_worker(name="gpu0@a", hostname="a", pid=100)

    with pytest.raises(fleet_writes.WorkerNameInUse):
        fleet_writes.worker_register(name="gpu0@a", hostname="a", pid=101, queues=[], versions={},
                                 pid_alive=lambda pid: pid == 100)


@pytest.mark.django_db
@pytest.mark.parametrize(("consuming", "state", "queues"), [
    (["gpu-80g"], Worker.State.ONLINE, ["gpu-80g"]),
    ([], Worker.State.DRAINING, ["gpu-80g", "cpu"]),  # it was drained: keep the queues resume will consume
])
def test_a_worker_swept_offline_while_silent_comes_back_on_its_next_beat(consuming, state, queues):
    from workers.fleet import beat

    make_worker(name="gpu0@a", hostname="a", pid=100, age_s=3600, queues=["gpu-80g", "cpu"])
    fleet_sweep.apply()
    consumer = SimpleNamespace(
        task_consumer=SimpleNamespace(queues=[SimpleNamespace(name=q) for q in consuming])
    )

    beat(name="gpu0@a", hostname="a", pid=100, consumer=consumer)

    worker = Worker.objects.get(name="gpu0@a")
    assert (worker.state, worker.queues) == (state, queues)
    assert timezone.now() - worker.last_heartbeat < timedelta(seconds=5)
    assert worker.gpus == []  # this host has no GPU


# --- the offline sweep ------------------------------------------------------------------------------
@pytest.mark.django_db
def test_the_sweep_marks_silent_workers_offline(settings):
    silent = make_worker(name="a", age_s=settings.WORKER_OFFLINE_AFTER_S + 5)
    silent_draining = make_worker(
        name="b", age_s=settings.WORKER_OFFLINE_AFTER_S + 5, state=Worker.State.DRAINING
    )
    never = make_worker(name="c", last_heartbeat=None)
    fresh = make_worker(name="d", age_s=2)

    assert fleet_sweep.apply().get() == 3

    states = dict(Worker.objects.values_list("name", "state"))
    assert states == {silent.name: "offline", silent_draining.name: "offline", never.name: "offline",
                      fresh.name: "online"}
    assert fleet_sweep.apply().get() == 0


def test_the_sweep_is_scheduled_by_celery_beat_and_imported_by_workers(settings):
    from distillweb.celery import app

    entry = settings.CELERY_BEAT_SCHEDULE["fleet-sweep"]
    assert entry["task"] == "workers.fleet_sweep"
    assert 0 < entry["schedule"] <= settings.WORKER_OFFLINE_AFTER_S
    assert "workers.fleet_tasks" in app.conf.imports
    app.loader.import_default_modules()
    assert "workers.fleet_sweep" in app.tasks


# --- home page summary ------------------------------------------------------------------------------
@pytest.mark.django_db
def test_home_summarises_workers_gpus_and_queues(client_logged_in, run, settings):
    busy_by_run = make_worker(name="w1", gpus=[gpu(0, util=0)])
    make_worker(name="w2", gpus=[gpu(0, util=55), gpu(1, util=5)])
    make_worker(name="w3", gpus=[gpu(0)], state=Worker.State.DRAINING)
    make_worker(name="w4", gpus=[gpu(0, util=99)], age_s=settings.WORKER_OFFLINE_AFTER_S + 1)  # not counted
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, started_at=timezone.now(),
                                         worker_name=busy_by_run.name)
    with mock.patch.object(
        fleet_reads, "queue_depths", side_effect=lambda names: dict.fromkeys(names, 7)
    ) as depths:
        response = client_logged_in.get(reverse("experiments:home"))

    summary = response.context["fleet"]
    assert (summary.workers_online, summary.workers_draining, summary.gpus_busy, summary.gpus_free) == (
        2,
        1,
        2,
        2,
    )
    assert set(depths.call_args.args[0]) == {settings.RUN_QUEUE, "gpu-80g"}
    html = response.content.decode()
    assert "GPUs busy / free" in html and "2 / 2" in html and "gpu-80g" in html
    assert reverse("experiments:worker_list") not in html  # the console link is for staff


@pytest.mark.django_db
def test_home_says_unknown_when_the_broker_cannot_count(client_logged_in):
    down = Connection("redis://127.0.0.1:1/0", connect_timeout=1)
    with mock.patch.object(fleet_reads.celery_app, "connection_for_read", return_value=down):
        response = client_logged_in.get(reverse("experiments:home"))

    assert response.status_code == 200
    assert response.context["fleet"].queue_depths == {"training": None}
    assert "unknown" in response.content.decode()


# --- real worker processes --------------------------------------------------------------------------
def test_queue_depths_are_read_from_the_redis_broker():
    from tests.worker_process import redis_broker_url

    url = redis_broker_url()
    name = f"fleet-depth-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(url)
    try:
        client.rpush(name, json.dumps({"body": "x"}), json.dumps({"body": "y"}))
        assert fleet_reads.queue_depths([name, f"{name}-empty"]) == {name: 2, f"{name}-empty": 0}
    finally:
        client.delete(name)


def digits_experiment(user, team, name: str, *, max_steps: int):
    dataset = records.dataset_spec_create(team=team, created_by=user, name=f"digits-{name}", source="builtin",
                                           builtin_name="digits")
    student = records.model_spec_create(team=team, created_by=user, name=f"mlp-{name}", source="builtin",
                                         builtin_arch="mlp", config={"hidden_sizes": [64]}, num_labels=10)
    experiment = launch.experiment_create(
        team=team, created_by=user, name=name, dataset=dataset, students=[student],
        recipes=[records.hard_labels_recipe(team=team)], seeds=[0],
        train={"max_steps": max_steps, "eval_every": max_steps, "save_every": max_steps, "log_every": 10,
               "batch_size": 32, "lr": 0.01},
    )
    return experiment.runs.get()


def wait_until(predicate, *, timeout: float, worker, what: str):
    """Poll ``predicate`` while the worker lives; ``timeout`` is an idle machine's bound, scaled
    (tests/waiting.py)."""
    return waiting.wait_until(predicate, timeout=timeout, what=what, every=0.2, check=worker.check_alive,
                              describe=worker.tail)


def status(run) -> str:
    run.refresh_from_db()
    return run.status


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_drained_worker_finishes_its_run_takes_no_new_one_and_works_again_when_resumed(
    celery_worker_process, client
):
    worker = celery_worker_process
    staff = UserFactory(is_staff=True)
    client.force_login(staff)
    user, team = UserFactory(), TeamFactory()
    MembershipFactory(user=user, team=team)
    row = Worker.objects.get(name=worker.name)
    assert row.gpus == [] and row.versions["cuda"] == "none" and row.versions["torch"]

    first = digits_experiment(user, team, "first", max_steps=400)
    wait_until(
        lambda: status(first) == Run.Status.RUNNING, timeout=120, worker=worker, what="the first run to start"
    )

    response = client.post(reverse("experiments:worker_drain", args=[row.pk]), follow=True)
    assert [
        t for t in texts(response) if "is draining" in t and f"no longer consuming from {worker.queue}" in t
    ]
    assert Worker.objects.get(pk=row.pk).state == Worker.State.DRAINING
    assert status(first) == Run.Status.RUNNING  # drained mid-run

    second = digits_experiment(user, team, "second", max_steps=20)
    wait_until(lambda: status(first) == Run.Status.SUCCEEDED, timeout=240, worker=worker,
               what="the first run to finish")
    time.sleep(4)  # several heartbeats and consumer cycles: a consuming worker would have taken it by now
    assert status(second) == Run.Status.QUEUED
    assert fleet_reads.queue_depths([worker.queue]) == {worker.queue: 1}  # still waiting in the broker
    data = client.get(reverse("experiments:worker_list_json")).json()
    assert [(w["name"], w["state"], w["runs"]) for w in data["workers"]] == [(worker.name, "draining", [])]

    response = client.post(reverse("experiments:worker_resume", args=[row.pk]), follow=True)
    assert [t for t in texts(response) if "takes work again" in t and f"add consumer {worker.queue}" in t]
    wait_until(lambda: status(second) == Run.Status.SUCCEEDED, timeout=120, worker=worker,
               what="the second run to finish after resume")
    second.refresh_from_db()
    assert second.worker_name == worker.name and Worker.objects.get(pk=row.pk).state == Worker.State.ONLINE

    # Queues: add one (the worker really consumes it), then take it away again.
    response = client.post(reverse("experiments:worker_add_queue", args=[row.pk]), {"queue": "extra.q"},
                           follow=True)
    assert "add consumer extra.q" in " ".join(texts(response))
    assert Worker.objects.get(pk=row.pk).queues == sorted([worker.queue, "extra.q"])
    wait_until(lambda: {worker.queue, "extra.q"} <= _active_queues(worker.name), timeout=20, worker=worker,
               what="the worker to consume extra.q")
    response = client.post(reverse("experiments:worker_remove_queue", args=[row.pk]), {"queue": "extra.q"},
                           follow=True)
    assert "no longer consuming from extra.q" in " ".join(texts(response))
    assert Worker.objects.get(pk=row.pk).queues == [worker.queue]

    # Shut down: the process exits and its row shows offline.
    response = client.post(reverse("experiments:worker_shutdown", args=[row.pk]), follow=True)
    assert "told to shut down" in " ".join(texts(response))
    worker.process.wait(timeout=waiting.scaled(60))
    assert Worker.objects.get(pk=row.pk).state == Worker.State.OFFLINE


def _active_queues(name: str) -> set[str]:
    replies = fleet_writes.celery_app.control.inspect(destination=[name], timeout=2).active_queues() or {}
    return {q["name"] for q in replies.get(name, [])}


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_registered_worker_that_is_not_running_does_not_answer(settings, client):
    from tests.worker_process import redis_broker_url

    redis_broker_url()
    settings.WORKER_CONTROL_TIMEOUT_S = 0.5
    ghost = make_worker(name=f"ghost-{uuid.uuid4().hex[:6]}@nowhere")
    client.force_login(UserFactory(is_staff=True))

    response = client.post(reverse("experiments:worker_drain", args=[ghost.pk]), follow=True)

    assert any(f"Worker {ghost.name} did not answer within 0.5 s" in t for t in texts(response))
    assert Worker.objects.get(pk=ghost.pk).state == Worker.State.ONLINE
