"""With one real worker: the runs that waited for a teacher's training are released in the transaction that
finishes it, and they train before the baselines that were queued long before them."""

from datetime import timedelta

import pytest
from django.db import transaction

from experiments.models import Run
from experiments.services import launch, records
from tests import waiting
from tests.factories import MembershipFactory, TeamFactory, UserFactory

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_waits_clear_when_the_teacher_finishes_and_distilled_runs_start_before_the_baselines(
    celery_worker_process,
):
    worker = celery_worker_process
    user = UserFactory()
    team = TeamFactory()
    MembershipFactory(user=user, team=team)
    digits = records.dataset_spec_create(team=team, created_by=user, name="digits", source="builtin",
                                          builtin_name="digits")

    def mlp(name, hidden):
        return records.model_spec_create(team=team, created_by=user, name=name, source="builtin",
                                         builtin_arch="mlp", config={"hidden_sizes": hidden}, num_labels=10)

    train = {"max_steps": 40, "eval_every": 20, "save_every": 20, "log_every": 10, "batch_size": 64,
             "lr": 0.01}
    kd = records.recipe_create(team=team, created_by=user, name="kd", scheme="offline",
                               terms=[{"name": "ce", "weight": 0.1},
                                      {"name": "kd", "weight": 0.9, "params": {"temperature": 4}}])
    # One commit for both launches: the teacher's run cannot finish before the distilled runs wait for it.
    with transaction.atomic():
        training = launch.experiment_create(
            team=team, created_by=user, name="teacher", dataset=digits, students=[mlp("teacher-arch", [64])],
            recipes=[records.hard_labels_recipe(team=team)], seeds=[0], train={**train, "max_steps": 80},
        )
        teacher_run = training.runs.get()
        teacher = records.model_register_from_run(run=teacher_run, name="teacher", created_by=user,
                                                  allow_pending=True)
        experiment = launch.experiment_create(
            team=team, created_by=user, name="kd", dataset=digits, teacher=teacher,
            students=[mlp("s16", [16])], recipes=[kd], seeds=[0, 1], train=train,
        )
    distilled_ids = list(experiment.runs.filter(is_baseline=False).values_list("id", flat=True))
    baseline_ids = list(experiment.runs.filter(is_baseline=True).values_list("id", flat=True))
    assert len(distilled_ids) == 2 and len(baseline_ids) == 2
    assert set(Run.objects.filter(id__in=distilled_ids).values_list("waiting_for_id", flat=True)) == {
        teacher_run.id}

    stale_waits: list[list[int]] = []

    def all_finished():
        # Never a queued run that still waits for a run that has succeeded, whenever the page is read.
        stale = list(Run.objects.filter(status=Run.Status.QUEUED, waiting_for__status=Run.Status.SUCCEEDED)
                     .values_list("id", flat=True))
        if stale:
            stale_waits.append(stale)
        runs = list(Run.objects.filter(id__in=[teacher_run.id, *distilled_ids, *baseline_ids]))
        return runs if all(r.is_terminal for r in runs) else None

    runs = waiting.wait_until(all_finished, timeout=300, what="the teacher, distilled and baseline runs",
                              every=0.1, check=worker.check_alive, describe=worker.tail)
    assert stale_waits == []
    by_id = {r.id: r for r in runs}
    assert {r.status for r in runs} == {Run.Status.SUCCEEDED}, {r.id: r.error for r in runs}
    teacher_done = by_id[teacher_run.id].finished_at
    for run_id in distilled_ids:
        run = by_id[run_id]
        assert run.waiting_for_id is None
        # Released in the transaction that finished the teacher's run (its ready_at is set there).
        assert timedelta(0) <= run.ready_at - teacher_done < timedelta(seconds=1)
    # One worker: both distilled runs trained before either baseline, though the baselines were sent first.
    assert max(by_id[i].started_at for i in distilled_ids) < min(by_id[i].started_at for i in baseline_ids)
    for run_id in baseline_ids:
        claims = by_id[run_id].transitions.filter(to_status="running").count()
        assert by_id[run_id].attempt == 1 and claims == 1  # giving its turn claimed nothing
