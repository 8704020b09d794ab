"""The order a queue serves an experiment's runs: distilled runs first, waits cleared when the run waited for
finishes, each queued run's place in its queue."""

from datetime import timedelta
from unittest import mock

import pytest
from django.urls import reverse
from django.utils import timezone

from experiments.domain import queue_order
from experiments.models import Run
from experiments.services import dispatch, launch, lifecycle, records

pytestmark = pytest.mark.django_db

DISPATCH = "workers.tasks.run_distillation.apply_async"
TRAIN = {"max_steps": 40, "eval_every": 20, "save_every": 20, "log_every": 10}


@pytest.fixture(autouse=True)
def _broker_up():
    dispatch._broker_down_until = 0.0
    yield
    dispatch._broker_down_until = 0.0


def sent_run_ids(send: mock.Mock) -> list[int]:
    return [call.kwargs["args"][0] for call in send.call_args_list]


def launch_kd(digits_setup, team, user, *, teacher=None, students=None, seeds=(0,)):
    return launch.experiment_create(
        team=team, created_by=user, name="kd", dataset=digits_setup["dataset"],
        teacher=teacher or digits_setup["teacher"], students=students or digits_setup["students"],
        recipes=[digits_setup["recipe"]], seeds=list(seeds), train=TRAIN,
    )


@pytest.fixture
def pending_teacher(digits_setup, team, user, django_capture_on_commit_callbacks):
    """A teacher trained by a run of another experiment, still queued."""
    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        training = launch.experiment_create(
            team=team, created_by=user, name="teacher", dataset=digits_setup["dataset"],
            students=[digits_setup["teacher"]], recipes=[records.hard_labels_recipe(team=team)], seeds=[0],
            train=TRAIN,
        )
    run = training.runs.get()
    teacher = records.model_register_from_run(run=run, name="trained-teacher", created_by=user,
                                              allow_pending=True)
    return run, teacher


def finish(run: Run, task_id: str = "t-teacher") -> None:
    lifecycle.run_claim(run_id=run.id, task_id=task_id, worker_name="w")
    lifecycle.run_finish(run_id=run.id, task_id=task_id,
                         result={"steps": 40, "student": {"accuracy": 0.9, "params": 100}})


def test_a_launch_sends_distilled_runs_before_the_baselines_and_places_match(
    digits_setup, team, user, django_capture_on_commit_callbacks
):
    with mock.patch(DISPATCH) as send, django_capture_on_commit_callbacks(execute=True):
        experiment = launch_kd(digits_setup, team, user, seeds=(0, 1))
    runs = {r.id: r for r in experiment.runs.all()}
    order = sent_run_ids(send)
    assert sorted(order) == sorted(runs)
    kinds = [runs[i].is_baseline for i in order]
    assert kinds == sorted(kinds) and kinds.count(True) == 4 and kinds.count(False) == 4
    queue_order.annotate_positions(list(runs.values()))
    assert [runs[i].queue_position for i in order] == list(range(1, len(order) + 1))
    assert runs[order[2]].queue_place == f"3rd in {runs[order[2]].queue} queue"


def test_a_finished_run_clears_the_waits_in_its_own_transaction_and_sends_its_dependents(
    digits_setup, team, user, pending_teacher, django_capture_on_commit_callbacks
):
    teacher_run, teacher = pending_teacher
    with mock.patch(DISPATCH) as send, django_capture_on_commit_callbacks(execute=True):
        experiment = launch_kd(digits_setup, team, user, teacher=teacher)
    distilled = list(experiment.runs.filter(is_baseline=False))
    baselines = list(experiment.runs.filter(is_baseline=True))
    assert all(r.waiting_for_id == teacher_run.id for r in distilled)
    assert sorted(sent_run_ids(send)) == sorted(r.id for r in baselines)  # the distilled runs wait
    queue_order.annotate_positions(distilled)
    assert [r.queue_position for r in distilled] == [None, None]

    before = timezone.now()
    with mock.patch(DISPATCH) as send, django_capture_on_commit_callbacks(execute=True) as callbacks:
        finish(teacher_run)
        # Cleared before the commit: whoever reads the run after the finish sees no wait.
        assert not Run.objects.filter(waiting_for=teacher_run).exists()
        assert send.call_count == 0
    assert len(callbacks) >= 2
    assert sorted(sent_run_ids(send)) == sorted(r.id for r in distilled)
    for run in distilled:
        run.refresh_from_db()
        assert run.waiting_for_id is None and run.ready_at >= before and run.status == Run.Status.QUEUED


def test_the_runs_table_and_run_page_show_the_place_and_no_stale_wait(
    client_logged_in, digits_setup, team, user, pending_teacher, django_capture_on_commit_callbacks
):
    teacher_run, teacher = pending_teacher
    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        experiment = launch_kd(digits_setup, team, user, teacher=teacher,
                               students=digits_setup["students"][:1])
    distilled = experiment.runs.get(is_baseline=False)
    baseline = experiment.runs.get(is_baseline=True)
    url = reverse("experiments:experiment_detail", args=[experiment.id])
    page = client_logged_in.get(url).content.decode()
    assert f"waits for <a href=\"/runs/{teacher_run.id}/\">run #{teacher_run.id}</a>" in page
    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        finish(teacher_run)
    page = client_logged_in.get(url).content.decode()
    assert f"run #{teacher_run.id}</a>" not in page
    # The teacher's run left the queue; the distilled run is served before the baseline sent earlier.
    assert f"queued · 1st in {distilled.queue} queue" in page
    assert f"queued · 2nd in {baseline.queue} queue" in page
    status = client_logged_in.get(reverse("experiments:run_status_json", args=[distilled.id])).json()["html"]
    assert "Waits for" not in status and f"queued · 1st in {distilled.queue} queue" in status


def test_a_baseline_gives_its_turn_once_to_distilled_runs_that_became_ready_after_it(
    digits_setup, team, user, pending_teacher, django_capture_on_commit_callbacks
):
    teacher_run, teacher = pending_teacher
    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        experiment = launch_kd(digits_setup, team, user, teacher=teacher)
    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        finish(teacher_run)
    baseline = experiment.runs.filter(is_baseline=True).order_by("id").first()
    distilled = experiment.runs.filter(is_baseline=False).order_by("id").first()

    with mock.patch(DISPATCH) as send, django_capture_on_commit_callbacks(execute=True):
        assert dispatch.run_yield_turn(run_id=baseline.id, task_id=baseline.task_id)
    send.assert_called_once_with(args=(baseline.id,), queue=baseline.queue, task_id=baseline.task_id)
    moved = Run.objects.get(id=baseline.id)
    assert moved.status == Run.Status.QUEUED and moved.attempt == 0
    assert moved.ready_at > max(experiment.runs.filter(is_baseline=False).values_list("ready_at", flat=True))

    with mock.patch(DISPATCH) as send, django_capture_on_commit_callbacks(execute=True):
        assert not dispatch.run_yield_turn(run_id=baseline.id, task_id=baseline.task_id)  # no cycle
        assert not dispatch.run_yield_turn(run_id=distilled.id, task_id=distilled.task_id)  # not a baseline
        assert not dispatch.run_yield_turn(run_id=baseline.id, task_id="another-delivery")
    assert send.call_count == 0
    claimed = lifecycle.run_claim(run_id=baseline.id, task_id=baseline.task_id, worker_name="w")
    assert claimed is not None and claimed.status == Run.Status.RUNNING


def test_a_baseline_with_no_later_distilled_run_takes_its_turn(
    digits_setup, team, user, django_capture_on_commit_callbacks
):
    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        experiment = launch_kd(digits_setup, team, user)
    for run in experiment.runs.all():  # sent distilled first: no baseline has a reason to wait
        assert not dispatch.run_yield_turn(run_id=run.id, task_id=run.task_id)


def test_serve_order_moves_baselines_behind_later_distilled_runs_of_their_experiment_only():
    t0 = timezone.now()
    at = [t0 + timedelta(seconds=s) for s in range(6)]
    ready = [
        (10, 1, True, at[0]),    # baseline of experiment 1, sent first
        (11, 2, True, at[1]),    # baseline of experiment 2: no distilled run of its own behind it
        (12, 1, False, at[2]),   # distilled run of experiment 1, released later
        (13, 1, True, at[3]),    # another baseline of experiment 1
        (14, 1, False, at[4]),
        (15, 3, False, at[5]),
    ]
    assert queue_order.serve_order(ready) == [11, 12, 14, 15, 10, 13]
    assert queue_order.serve_order(reversed(ready)) == [11, 12, 14, 15, 10, 13]
    assert queue_order.serve_order([]) == []


def test_places_are_read_in_one_query_whatever_the_number_of_runs(
    digits_setup, team, user, django_assert_num_queries
):
    with mock.patch(DISPATCH):
        experiment = launch_kd(digits_setup, team, user, seeds=(0, 1, 2))
    runs = list(experiment.runs.all())
    with django_assert_num_queries(1):
        queue_order.annotate_positions(runs)
    assert sorted(r.queue_position for r in runs) == list(range(1, len(runs) + 1))
    Run.objects.filter(id=runs[0].id).update(status=Run.Status.CANCELLED, finished_at=timezone.now())
    fresh = list(experiment.runs.all())
    queue_order.annotate_positions(fresh)
    assert sorted(r.queue_position for r in fresh if r.queue_position) == list(range(1, len(runs)))
    assert next(r for r in fresh if r.id == runs[0].id).queue_position is None


@pytest.mark.parametrize(("n", "text"), [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"),
                                         (12, "12th"), (13, "13th"), (21, "21st"), (102, "102nd")])
def test_ordinal(n, text):
    assert queue_order.ordinal(n) == text


def test_places_from_the_database_follow_serve_order_on_mixed_queues(digits_setup, team, user):
    import random

    with mock.patch(DISPATCH):
        experiments = [launch_kd(digits_setup, team, user, seeds=(0, 1)) for _ in range(3)]
    runs = list(Run.objects.filter(experiment__in=experiments))
    rng = random.Random(7)
    t0 = timezone.now()
    for run in runs:  # released at shuffled times, on two queues, some tied
        run.ready_at = t0 + timedelta(seconds=rng.randrange(6))
        run.queue = rng.choice(["training", "gpu-24g"])
    Run.objects.bulk_update(runs, ["ready_at", "queue"])
    waiting = runs[0]
    Run.objects.filter(id=waiting.id).update(waiting_for=runs[1])
    runs = list(Run.objects.filter(experiment__in=experiments))
    queue_order.annotate_positions(runs)
    expected: dict[int, int] = {}
    for queue in ("training", "gpu-24g"):
        ready = [(r.id, r.experiment_id, r.is_baseline, r.ready_at) for r in runs
                 if r.queue == queue and r.waiting_for_id is None]
        expected |= {run_id: place for place, run_id in enumerate(queue_order.serve_order(ready), start=1)}
    assert {r.id: r.queue_position for r in runs} == {**expected, waiting.id: None}
    assert len(expected) == len(runs) - 1
    # One experiment's table: its runs' places among every ready run of their queues, not among themselves.
    table = list(Run.objects.filter(experiment=experiments[1]))
    queue_order.annotate_positions(table)
    assert {r.id: r.queue_position for r in table} == {r.id: expected[r.id] for r in table}
    one = Run.objects.get(id=table[-1].id)
    assert one.queue_position == expected[one.id]
