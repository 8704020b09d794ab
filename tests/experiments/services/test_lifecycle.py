"""The run lifecycle: the state machine and its history, leases and the requeue sweep, cancel and requeue."""

from datetime import timedelta
from unittest import mock

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from experiments.models import RUN_TRANSITIONS, MetricPoint, Run, RunTransition
from experiments.services import dispatch as dispatch_writes
from experiments.services import launch, lifecycle, telemetry

pytestmark = pytest.mark.django_db

DISPATCH = "workers.tasks.run_distillation.apply_async"
REVOKE = "celery.app.control.Control.revoke"


@pytest.fixture(autouse=True)
def _broker_up():
    """A test that simulates a broker outage must not make the next test's sends skip."""
    dispatch_writes._broker_down_until = 0.0
    yield
    dispatch_writes._broker_down_until = 0.0


@pytest.fixture
def experiment(digits_setup, team, user):
    with mock.patch(DISPATCH):
        return launch.experiment_create(
            team=team,
            created_by=user,
            name="kd",
            dataset=digits_setup["dataset"],
            teacher=digits_setup["teacher"],
            students=digits_setup["students"][:1],
            recipes=[digits_setup["recipe"]],
            seeds=[0],
            train={"max_steps": 40, "eval_every": 20, "save_every": 20, "log_every": 10},
        )


@pytest.fixture
def run(experiment) -> Run:
    return experiment.runs.get(is_baseline=False)


def history(run: Run) -> list[tuple[str, str]]:
    return list(RunTransition.objects.filter(run=run).order_by("id").values_list("from_status", "to_status"))


def expire_lease(run: Run, settings) -> None:
    stale = timezone.now() - timedelta(seconds=settings.RUN_HEARTBEAT_TIMEOUT_S + 5)
    Run.objects.filter(id=run.id).update(heartbeat_at=stale)


def sweep(django_capture_on_commit_callbacks) -> tuple[dict[str, int], mock.MagicMock]:
    with mock.patch(DISPATCH) as dispatch, django_capture_on_commit_callbacks(execute=True):
        counts = lifecycle.run_requeue_stale()
    return counts, dispatch


# --- the state machine ------------------------------------------------------------------------------
def test_claim_and_finish_are_recorded_as_transitions(run):
    lifecycle.run_claim(run_id=run.id, task_id="t1", worker_name="gpu0@a")
    telemetry.run_record_metrics(run_id=run.id, task_id="t1", points=[("loss", 10, 0.5, timezone.now())])
    assert lifecycle.run_finish(
        run_id=run.id, task_id="t1", result={"steps": 40, "student": {"accuracy": 0.9}}
    )
    rows = list(RunTransition.objects.filter(run=run).order_by("id"))
    assert [(r.from_status, r.to_status, r.attempt, r.worker_name) for r in rows] == [
        ("queued", "running", 1, "gpu0@a"), ("running", "succeeded", 1, "gpu0@a")]
    assert rows[0].reason == "Claimed by gpu0@a." and rows[1].reason == "Trained 40 steps and evaluated."
    assert rows[0].at <= rows[1].at
    run.refresh_from_db()
    assert run.status == Run.Status.SUCCEEDED and run.finished_at and run.step == 40


def test_a_failure_records_the_error_as_the_reason_and_fails_waiting_runs_with_theirs(run, experiment):
    dependent = experiment.runs.get(is_baseline=True)
    Run.objects.filter(id=dependent.id).update(waiting_for=run)
    lifecycle.run_claim(run_id=run.id, task_id="t1", worker_name="w")
    assert lifecycle.run_fail(run_id=run.id, task_id="t1", error="NaN loss at step 12.")
    assert history(run) == [("queued", "running"), ("running", "failed")]
    assert run.transitions.last().reason == "NaN loss at step 12."
    dependent.refresh_from_db()
    assert dependent.status == Run.Status.FAILED and dependent.finished_at
    assert history(dependent) == [("queued", "failed")]
    assert f"Run #{run.id}" in dependent.transitions.get().reason


def test_transitions_outside_the_table_are_refused_by_the_service_and_the_database(run):
    # A succeeded run goes back to the queue only when it had reused another run's results (baseline_reuse).
    assert RUN_TRANSITIONS[Run.Status.SUCCEEDED] == frozenset({Run.Status.QUEUED})
    with pytest.raises(ValueError, match="cannot go from succeeded to running"):
        lifecycle._transition(run_id=run.id, to=Run.Status.RUNNING, sources=[Run.Status.SUCCEEDED],
                              reason="x")
    with pytest.raises(ValueError, match="cannot go from queued to succeeded"):
        lifecycle._transition(run_id=run.id, to=Run.Status.SUCCEEDED, sources=[Run.Status.QUEUED], reason="x")
    with pytest.raises(IntegrityError), transaction.atomic():
        RunTransition.objects.create(run=run, from_status="succeeded", to_status="running")
    with pytest.raises(IntegrityError), transaction.atomic():
        RunTransition.objects.create(run=run, from_status="queued", to_status="queued")
    with pytest.raises(IntegrityError), transaction.atomic():
        Run.objects.filter(id=run.id).update(status=Run.Status.FAILED)  # a finished run has finished_at
    with pytest.raises(IntegrityError), transaction.atomic():
        Run.objects.filter(id=run.id).update(attempt=-1)


def test_a_transition_applies_once_when_two_changes_race(run):
    lifecycle.run_claim(run_id=run.id, task_id="t1", worker_name="w")
    assert lifecycle.run_fail(run_id=run.id, task_id="t1", error="boom")
    # The second writer's conditional UPDATE finds the run no longer running: nothing changes, nothing
    # recorded.
    assert lifecycle.run_finish(run_id=run.id, task_id="t1", result={"steps": 40}) is None
    assert lifecycle.run_mark_cancelled(run_id=run.id, task_id="t1") is False
    assert history(run) == [("queued", "running"), ("running", "failed")]
    assert Run.objects.get(id=run.id).status == Run.Status.FAILED


def test_a_launched_run_expects_the_task_id_it_was_sent_with(digits_setup, team, user,
                                                             django_capture_on_commit_callbacks):
    with mock.patch(DISPATCH) as dispatch, django_capture_on_commit_callbacks(execute=True):
        experiment = launch.experiment_create(
            team=team,
            created_by=user,
            name="kd",
            dataset=digits_setup["dataset"],
            teacher=digits_setup["teacher"],
            students=digits_setup["students"][:1],
            recipes=[digits_setup["recipe"]],
            seeds=[0],
        )
    runs = {run.id: run for run in experiment.runs.all()}
    sent = {call.kwargs["args"][0]: call.kwargs["task_id"] for call in dispatch.call_args_list}
    assert sent.keys() == runs.keys() and all(sent[i] == runs[i].task_id != "" for i in runs)  # revocable
    run_id = next(iter(runs))
    assert lifecycle.run_claim(run_id=run_id, task_id=sent[run_id], worker_name="w") is not None


# --- leases -----------------------------------------------------------------------------------------
def test_sweep_requeues_a_run_whose_lease_expired_with_a_fresh_task_on_its_queue(
        run, settings, django_capture_on_commit_callbacks):
    lifecycle.run_claim(run_id=run.id, task_id="first", worker_name="gpu0@dead")
    expire_lease(run, settings)
    counts, dispatch = sweep(django_capture_on_commit_callbacks)
    assert counts == {"queued": 1}
    run.refresh_from_db()
    assert run.status == Run.Status.QUEUED and run.task_id not in ("", "first") and run.finished_at is None
    dispatch.assert_called_once_with(args=(run.id,), queue=run.queue, task_id=run.task_id)
    requeue = run.transitions.last()
    assert (requeue.from_status, requeue.to_status, requeue.worker_name) == ("running", "queued", "gpu0@dead")
    assert requeue.reason.startswith("Worker lost: gpu0@dead stopped renewing the lease")


def test_sweep_leaves_runs_with_a_live_lease_alone(run, django_capture_on_commit_callbacks):
    lifecycle.run_claim(run_id=run.id, task_id="first", worker_name="w")
    counts, dispatch = sweep(django_capture_on_commit_callbacks)
    assert counts == {} and not dispatch.called
    assert Run.objects.get(id=run.id).status == Run.Status.RUNNING


def test_the_old_message_of_a_requeued_run_claims_nothing_and_the_fresh_one_resumes_it(
        run, settings, django_capture_on_commit_callbacks):
    lifecycle.run_claim(run_id=run.id, task_id="first", worker_name="w1")
    expire_lease(run, settings)
    sweep(django_capture_on_commit_callbacks)
    fresh = Run.objects.get(id=run.id).task_id
    # Redis redelivers the first message late (visibility timeout): it no longer matches the run.
    assert lifecycle.run_claim(run_id=run.id, task_id="first", worker_name="w1") is None
    assert lifecycle.run_claim(run_id=run.id, task_id="stray", worker_name="w2") is None
    taken = lifecycle.run_claim(run_id=run.id, task_id=fresh, worker_name="w2")
    assert taken is not None and taken.attempt == 2 and taken.worker_name == "w2"
    # While the new attempt is alive, neither message claims it again.
    assert lifecycle.run_claim(run_id=run.id, task_id="first", worker_name="w1") is None
    assert lifecycle.run_claim(run_id=run.id, task_id=fresh, worker_name="w3") is None
    # The old delivery, had it survived, can no longer write.
    assert (
        telemetry.run_record_metrics(
            run_id=run.id, task_id="first", points=[("loss", 10, 1.0, timezone.now())]
        )
        is False
    )
    assert history(run) == [("queued", "running"), ("running", "queued"), ("queued", "running")]


def test_a_late_delivery_takes_over_a_run_whose_lease_expired_and_records_the_requeue(run, settings):
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w1")
    expire_lease(run, settings)
    taken = lifecycle.run_claim(run_id=run.id, task_id="b", worker_name="w2")
    assert taken is not None and taken.task_id == "b" and taken.attempt == 2
    rows = list(run.transitions.order_by("id"))
    assert [(r.from_status, r.to_status, r.worker_name, r.attempt) for r in rows] == [
        ("queued", "running", "w1", 1), ("running", "queued", "w1", 1), ("queued", "running", "w2", 2)]


def test_the_restart_budget_fails_a_run_whose_worker_keeps_dying(
        run, experiment, settings, django_capture_on_commit_callbacks):
    settings.RUN_MAX_ATTEMPTS = 3
    dependent = experiment.runs.get(is_baseline=True)
    Run.objects.filter(id=dependent.id).update(waiting_for=run)
    task_id = "first"
    for attempt in (1, 2, 3):
        claimed = lifecycle.run_claim(run_id=run.id, task_id=task_id, worker_name=f"w{attempt}")
        assert claimed is not None and claimed.attempt == attempt
        expire_lease(run, settings)
        counts, dispatch = sweep(django_capture_on_commit_callbacks)
        task_id = Run.objects.get(id=run.id).task_id
    assert counts == {"failed": 1} and not dispatch.called
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and run.finished_at
    assert run.error == "The worker running this run stopped responding 3 times; giving up."
    assert [t for t in history(run) if t == ("running", "queued")] == [("running", "queued")] * 2
    assert Run.objects.get(id=dependent.id).status == Run.Status.FAILED
    # A direct takeover of a stale run respects the same budget.
    assert lifecycle.run_claim(run_id=run.id, task_id="late", worker_name="w4") is None


def test_a_user_requeue_starts_a_fresh_restart_budget(run, settings, django_capture_on_commit_callbacks):
    settings.RUN_MAX_ATTEMPTS = 1
    lifecycle.run_claim(run_id=run.id, task_id="first", worker_name="w1")
    expire_lease(run, settings)
    assert sweep(django_capture_on_commit_callbacks)[0] == {"failed": 1}
    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        lifecycle.run_requeue(run=run, reason="Requeued by alice.")
    claimed = lifecycle.run_claim(run_id=run.id, task_id=Run.objects.get(id=run.id).task_id, worker_name="w2")
    assert claimed is not None and claimed.attempt == 2
    expire_lease(run, settings)
    assert sweep(django_capture_on_commit_callbacks)[0] == {"failed": 1}  # one attempt per budget, again


def test_a_stale_run_whose_cancellation_was_requested_is_cancelled_not_requeued(
        run, settings, django_capture_on_commit_callbacks):
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w")
    Run.objects.filter(id=run.id).update(cancel_requested=True)
    expire_lease(run, settings)
    counts, dispatch = sweep(django_capture_on_commit_callbacks)
    assert counts == {"cancelled": 1} and not dispatch.called
    assert history(run)[-1] == ("running", "cancelled")


# --- cancel and requeue -----------------------------------------------------------------------------
def test_cancelling_a_queued_run_revokes_its_known_task(run, django_capture_on_commit_callbacks):
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w")
    lifecycle.run_fail(run_id=run.id, task_id="a", error="boom")
    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        run = lifecycle.run_requeue(run=run, reason="Requeued by alice.")
    with mock.patch(REVOKE) as revoke, django_capture_on_commit_callbacks(execute=True):
        cancelled = lifecycle.run_cancel(run=run)
    assert cancelled.status == Run.Status.CANCELLED and cancelled.cancel_requested
    revoke.assert_called_once_with(run.task_id)
    assert lifecycle.run_claim(run_id=run.id, task_id=run.task_id, worker_name="w") is None
    assert history(run)[-1] == ("queued", "cancelled")


def test_cancelling_a_running_run_flags_it_and_the_worker_records_the_stop(run):
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w")
    flagged = lifecycle.run_cancel(run=run)
    assert flagged.status == Run.Status.RUNNING and flagged.cancel_requested
    assert history(run) == [("queued", "running")]  # nothing changes until the worker stops
    assert lifecycle.run_mark_cancelled(run_id=run.id, task_id="a", step=20)
    assert history(run)[-1] == ("running", "cancelled")
    assert run.transitions.last().reason == "Stopped at step 20 after cancellation was requested."


def test_cancelling_a_run_whose_worker_died_cancels_it_at_once(run, settings):
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w")
    expire_lease(run, settings)
    assert lifecycle.run_cancel(run=run).status == Run.Status.CANCELLED


def test_requeue_of_a_failed_run_queues_a_new_attempt_and_the_runs_that_waited_for_it(
        run, experiment, django_capture_on_commit_callbacks):
    dependent = experiment.runs.get(is_baseline=True)
    Run.objects.filter(id=dependent.id).update(waiting_for=run)
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w")
    telemetry.run_record_metrics(run_id=run.id, task_id="a", points=[("loss", 10, 0.5, timezone.now())])
    lifecycle.run_fail(run_id=run.id, task_id="a", error="CUDA out of memory")
    with mock.patch(DISPATCH) as dispatch, django_capture_on_commit_callbacks(execute=True):
        requeued = lifecycle.run_requeue(run=run, reason="Requeued by alice.")
    assert requeued.status == Run.Status.QUEUED and requeued.error == "" and requeued.finished_at is None
    assert requeued.task_id not in ("", "a") and requeued.attempt == 1  # the claim makes it attempt 2
    dispatch.assert_called_once_with(args=(run.id,), queue=run.queue, task_id=requeued.task_id)
    assert lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w") is None  # the old message
    assert history(run)[-1] == ("failed", "queued") and run.transitions.last().reason == "Requeued by alice."
    assert MetricPoint.objects.filter(run=run).count() == 1  # metrics of the first attempt stay
    dependent.refresh_from_db()
    assert dependent.status == Run.Status.QUEUED and dependent.error == ""  # waits again, not sent
    assert lifecycle.run_claim(run_id=dependent.id, task_id="x", worker_name="w") is None


@pytest.mark.parametrize("state", ["succeeded", "queued", "running"])
def test_requeue_refuses_runs_that_have_not_stopped(run, state):
    if state != "queued":
        lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w")
    if state == "succeeded":
        lifecycle.run_finish(run_id=run.id, task_id="a", result={"steps": 40})
    with mock.patch(DISPATCH) as dispatch, pytest.raises(ValidationError) as exc:
        lifecycle.run_requeue(run=run, reason="again")
    assert {"succeeded": "succeeded; launch a new experiment", "queued": "already queued",
            "running": "its worker is alive"}[state] in exc.value.messages[0]
    assert not dispatch.called and Run.objects.get(id=run.id).status == state


def test_requeue_of_a_run_behind_a_failed_run_asks_for_that_one_first(run, experiment):
    dependent = experiment.runs.get(is_baseline=True)
    Run.objects.filter(id=dependent.id).update(waiting_for=run)
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w")
    lifecycle.run_fail(run_id=run.id, task_id="a", error="boom")
    with pytest.raises(
        ValidationError, match=f"waits for run #{run.id}, which failed; requeue that one first"
    ):
        lifecycle.run_requeue(run=dependent, reason="again")


def test_a_stale_running_run_can_be_requeued_by_a_user(run, settings, django_capture_on_commit_callbacks):
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w")
    expire_lease(run, settings)
    assert Run.objects.get(id=run.id).can_requeue
    with mock.patch(DISPATCH) as dispatch, django_capture_on_commit_callbacks(execute=True):
        requeued = lifecycle.run_requeue(run=run, reason="Requeued by alice.")
    assert requeued.status == Run.Status.QUEUED and dispatch.called
    assert history(run)[-1] == ("running", "queued")


# --- messages the broker lost -----------------------------------------------------------------------
def test_queued_runs_whose_message_was_lost_are_sent_again_when_their_queue_is_empty(
        run, experiment, settings, django_capture_on_commit_callbacks):
    settings.RUN_REDISPATCH_AFTER_S = 60
    baseline = experiment.runs.get(is_baseline=True)
    Run.objects.filter(id=run.id).update(created_at=timezone.now() - timedelta(minutes=5))
    with mock.patch(DISPATCH) as dispatch, django_capture_on_commit_callbacks(execute=True):
        assert dispatch_writes.run_redispatch_lost(queue_size=lambda queue: 3) == 0  # behind other messages
        assert dispatch_writes.run_redispatch_lost(queue_size=lambda queue: None) == 0  # the broker is down
        assert dispatch_writes.run_redispatch_lost(queue_size=lambda queue: 0) == 1
    run.refresh_from_db()
    dispatch.assert_called_once_with(args=(run.id,), queue=run.queue, task_id=run.task_id)
    assert run.task_id and Run.objects.get(id=baseline.id).task_id == ""  # queued a moment ago: left alone
    # Both messages may turn up; one claims the run, the other nothing.
    assert lifecycle.run_claim(run_id=run.id, task_id="original", worker_name="w") is not None
    assert lifecycle.run_claim(run_id=run.id, task_id=run.task_id, worker_name="w") is None


def test_a_send_that_fails_leaves_the_run_queued_for_the_sweep(run, django_capture_on_commit_callbacks):
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w")
    lifecycle.run_fail(run_id=run.id, task_id="a", error="boom")
    with mock.patch(DISPATCH, side_effect=BrokerError("Error 111 connecting to redis")) as dispatch, \
            django_capture_on_commit_callbacks(execute=True):
        requeued = lifecycle.run_requeue(run=run, reason="again")  # the broker error does not propagate
    assert dispatch.called and Run.objects.get(id=run.id).status == Run.Status.QUEUED
    with mock.patch(DISPATCH) as dispatch, django_capture_on_commit_callbacks(execute=True):
        dispatch_writes._send_on_commit(run_id=run.id, queue=run.queue, task_id=requeued.task_id)
    assert not dispatch.called  # sends pause briefly after a failure instead of timing out one by one


# --- the run page -----------------------------------------------------------------------------------
def test_the_run_page_shows_the_history_and_a_requeue_button_for_a_failed_run(client_logged_in, run):
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="gpu0@<b>host</b>")
    lifecycle.run_fail(run_id=run.id, task_id="a", error="CUDA out of memory <oops>")
    response = client_logged_in.get(reverse("experiments:run_detail", kwargs={"run_id": run.pk}))
    html = response.content.decode()
    assert response.status_code == 200
    assert 'id="run-history"' in html and "Claimed by gpu0@&lt;b&gt;host&lt;/b&gt;." in html
    assert "CUDA out of memory &lt;oops&gt;" in html and "<oops>" not in html
    assert reverse("experiments:run_requeue", kwargs={"run_id": run.pk}) in html
    assert len(response.context["transitions"]) == 2


def test_the_run_page_offers_no_requeue_for_a_live_run(client_logged_in, run):
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w")
    html = client_logged_in.get(reverse("experiments:run_detail", kwargs={"run_id": run.pk})).content.decode()
    assert reverse("experiments:run_requeue", kwargs={"run_id": run.pk}) not in html
    assert reverse("experiments:run_cancel", kwargs={"run_id": run.pk}) in html


def test_requeue_button_queues_the_run_again(client_logged_in, run, user, django_capture_on_commit_callbacks):
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w")
    lifecycle.run_fail(run_id=run.id, task_id="a", error="boom")
    url = reverse("experiments:run_requeue", kwargs={"run_id": run.pk})
    with mock.patch(DISPATCH) as dispatch, django_capture_on_commit_callbacks(execute=True):
        response = client_logged_in.post(url, follow=True)
    assert response.redirect_chain[-1][0] == reverse("experiments:run_detail", kwargs={"run_id": run.pk})
    assert "is queued again" in response.content.decode()
    run.refresh_from_db()
    assert run.status == Run.Status.QUEUED and dispatch.called
    assert run.transitions.last().reason == f"Requeued by {user.username}."


def test_requeue_of_a_succeeded_run_explains_why_not(client_logged_in, run):
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w")
    lifecycle.run_finish(run_id=run.id, task_id="a", result={"steps": 40})
    response = client_logged_in.post(
        reverse("experiments:run_requeue", kwargs={"run_id": run.pk}), follow=True
    )
    assert "succeeded; launch a new experiment to train it again" in response.content.decode()
    assert Run.objects.get(id=run.id).status == Run.Status.SUCCEEDED


def test_requeue_needs_post_and_the_run_team(client, client_logged_in, other_user, run):
    url = reverse("experiments:run_requeue", kwargs={"run_id": run.pk})
    assert client_logged_in.get(url).status_code == 405
    lifecycle.run_claim(run_id=run.id, task_id="a", worker_name="w")
    lifecycle.run_fail(run_id=run.id, task_id="a", error="boom")
    client.force_login(other_user)
    assert client.post(url).status_code == 404
    assert Run.objects.get(id=run.id).status == Run.Status.FAILED
