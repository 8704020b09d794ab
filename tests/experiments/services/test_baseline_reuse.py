"""A hard-label baseline identical to one that already succeeded in the team (same content address) takes its
results instead of training; a user can still train it."""

from unittest import mock

import pytest
from django.urls import reverse
from django.utils import timezone

from experiments.domain import config_digest
from experiments.models import Artifact, Evaluation, MetricPoint, Run
from experiments.services import baseline_reuse, dispatch, launch, lifecycle, telemetry
from tests.factories import DatasetSpecFactory, ModelSpecFactory

pytestmark = pytest.mark.django_db

DISPATCH = "workers.tasks.run_distillation.apply_async"
TRAIN = {"max_steps": 40, "eval_every": 20, "save_every": 20, "log_every": 10}


@pytest.fixture(autouse=True)
def _broker_up():
    dispatch._broker_down_until = 0.0
    yield
    dispatch._broker_down_until = 0.0


def launch_kd(setup, team, user, *, seeds=(0,), train=None, **extra):
    return launch.experiment_create(
        team=team, created_by=user, name="kd", dataset=setup["dataset"], teacher=setup["teacher"],
        students=setup["students"][:1], recipes=[setup["recipe"]], seeds=list(seeds), train=train or TRAIN,
        **extra,
    )


def train_to_success(run: Run, *, accuracy: float, task_id: str = "t1") -> None:
    lifecycle.run_claim(run_id=run.id, task_id=task_id, worker_name="w")
    now = timezone.now()
    telemetry.run_record_metrics(run_id=run.id, task_id=task_id,
                                 points=[("loss", 10, 1.5, now), ("loss", 20, 0.7, now),
                                         ("eval/accuracy", 20, accuracy, now)])
    final = f"runs/{run.id}/final-a1"
    lifecycle.run_finish(run_id=run.id, task_id=task_id,
                         result={"steps": 40, "student": {"accuracy": accuracy, "params": 1234,
                                                          "latency_ms_p50": 0.5}})
    Artifact.objects.create(run=run, kind=Artifact.Kind.MODEL, path=final, size_bytes=99, sha256="a" * 64)


@pytest.fixture
def trained(digits_setup, team, user, django_capture_on_commit_callbacks):
    """An experiment whose baseline trained and succeeded."""
    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        first = launch_kd(digits_setup, team, user)
    baseline = first.runs.get(is_baseline=True)
    train_to_success(baseline, accuracy=0.81)
    return Run.objects.get(id=baseline.id)


def test_an_identical_baseline_takes_the_results_instead_of_training(
    digits_setup, team, user, trained, django_capture_on_commit_callbacks
):
    with mock.patch(DISPATCH) as send, django_capture_on_commit_callbacks(execute=True):
        second = launch_kd(digits_setup, team, user)
    reused = second.runs.get(is_baseline=True)
    distilled = second.runs.get(is_baseline=False)
    assert reused.config_digest == trained.config_digest and len(reused.config_digest) == 64
    assert reused.status == Run.Status.SUCCEEDED and reused.reused_from_id == trained.id and reused.is_reused
    assert reused.reused_from_number == trained.id and reused.finished_at and reused.step == 40
    # Only the distilled run trains.
    assert [c.kwargs["args"][0] for c in send.call_args_list] == [distilled.id]
    evaluation = Evaluation.objects.get(run=reused, role=Evaluation.Role.STUDENT)
    assert (evaluation.accuracy, evaluation.param_count, evaluation.team_id) == (0.81, 1234, team.id)
    def curves(run):
        return list(MetricPoint.objects.filter(run=run).order_by("name", "step")
                    .values_list("name", "step", "value"))

    assert curves(reused) == curves(trained) and len(curves(trained)) == 3
    assert Artifact.objects.get(run=reused, kind=Artifact.Kind.MODEL).path == f"runs/{trained.id}/final-a1"
    reasons = list(reused.transitions.values_list("to_status", "reason"))
    assert [s for s, _ in reasons] == ["running", "succeeded"]
    assert all(f"Reused the results of run #{trained.id}" in r for _, r in reasons)


def test_reuse_needs_the_same_seed_settings_team_and_data(
    digits_setup, team, user, other_team, other_user, trained, django_capture_on_commit_callbacks
):
    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        other_seed = launch_kd(digits_setup, team, user, seeds=(1,))
        other_lr = launch_kd(digits_setup, team, user, train={**TRAIN, "lr": 0.02})
        copy = DatasetSpecFactory(team=team, name="digits-again", eval_fraction=0.3)
        other_split = launch_kd({**digits_setup, "dataset": copy}, team, user)
        not_asked = launch_kd(digits_setup, team, user, reuse_baselines=False)
        theirs = {
            "dataset": DatasetSpecFactory(team=other_team, name="digits"),
            "teacher": ModelSpecFactory(team=other_team, name="t", config={"hidden_sizes": [64]}),
            "students": [ModelSpecFactory(team=other_team, name="s", config={"hidden_sizes": [16]})],
            "recipe": digits_setup["recipe"].__class__.objects.create(
                team=other_team, name="kd", scheme=digits_setup["recipe"].scheme,
                terms=digits_setup["recipe"].terms),
        }
        other_team_run = launch_kd(theirs, other_team, other_user)
    for experiment in (other_seed, other_lr, other_split, not_asked, other_team_run):
        baseline = experiment.runs.get(is_baseline=True)
        assert baseline.status == Run.Status.QUEUED and baseline.reused_from_id is None
    assert not_asked.runs.get(is_baseline=True).config_digest == trained.config_digest
    assert other_team_run.runs.get(is_baseline=True).config_digest == trained.config_digest  # same content
    assert other_seed.runs.get(is_baseline=True).config_digest != trained.config_digest


def test_a_reused_run_is_never_the_source_and_distilled_runs_always_train(
    digits_setup, team, user, trained, django_capture_on_commit_callbacks
):
    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        second = launch_kd(digits_setup, team, user)
        third = launch_kd(digits_setup, team, user)
    assert third.runs.get(is_baseline=True).reused_from_id == trained.id
    assert second.runs.get(is_baseline=True).reused_from_id == trained.id
    assert {r.status for r in Run.objects.filter(is_baseline=False)} == {Run.Status.QUEUED}


def test_requeue_trains_a_reused_run_after_all(
    client_logged_in, digits_setup, team, user, trained, django_capture_on_commit_callbacks
):
    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        second = launch_kd(digits_setup, team, user)
    reused = second.runs.get(is_baseline=True)
    page = client_logged_in.get(reverse("experiments:run_detail", args=[reused.id])).content.decode()
    assert f"Reused from <a href=\"/runs/{trained.id}/\">run #{trained.id}</a>" in page
    table = client_logged_in.get(reverse("experiments:experiment_detail", args=[second.id])).content.decode()
    assert f"reused from <a href=\"/runs/{trained.id}/\">run #{trained.id}</a>" in table
    assert reused.can_requeue

    with mock.patch(DISPATCH) as send, django_capture_on_commit_callbacks(execute=True):
        response = client_logged_in.post(reverse("experiments:run_requeue", args=[reused.id]))
    assert response.status_code == 302
    reused.refresh_from_db()
    assert reused.status == Run.Status.QUEUED and reused.reused_from_id is None and not reused.is_reused
    assert (reused.step, reused.attempt, reused.result, reused.finished_at) == (0, 0, {}, None)
    send.assert_called_once_with(args=(reused.id,), queue=reused.queue, task_id=reused.task_id)
    assert not Evaluation.objects.filter(run=reused).exists() and not MetricPoint.objects.filter(run=reused)
    assert not Artifact.objects.filter(run=reused).exists()
    assert Evaluation.objects.filter(run=trained).count() == 1
    assert Artifact.objects.filter(run=trained).count() == 1
    assert list(reused.transitions.values_list("to_status", flat=True)) == ["running", "succeeded", "queued"]

    claimed = lifecycle.run_claim(run_id=reused.id, task_id=reused.task_id, worker_name="w")
    assert claimed is not None and claimed.attempt == 1  # it trains now
    train_to_success(claimed, accuracy=0.79, task_id=reused.task_id)
    assert Evaluation.objects.get(run=reused, role="student").accuracy == 0.79


def test_a_deleted_source_leaves_the_copies_and_the_mark(
    client_logged_in, digits_setup, team, user, trained, django_capture_on_commit_callbacks
):
    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        second = launch_kd(digits_setup, team, user)
    trained.experiment.delete()
    reused = second.runs.get(is_baseline=True)
    assert reused.reused_from_id is None and reused.is_reused and reused.reused_from_number == trained.id
    assert Evaluation.objects.get(run=reused).accuracy == 0.81
    page = client_logged_in.get(reverse("experiments:run_detail", args=[reused.id])).content.decode()
    assert f"Reused from run #{trained.id}" in page


def test_the_digest_is_canonical_and_follows_data_content(tmp_path, settings):
    data = tmp_path / "rows.csv"
    data.write_text("text,label\na,0\n")
    config = {"dataset": {"source": "hf", "path": str(data)}, "train": {"lr": 0.1, "seed": 0},
              "student": {"source": "builtin", "name": "mlp"}, "teacher": None}
    same_keys_reordered = {"train": {"seed": 0, "lr": 0.1}, "teacher": None,
                           "student": {"name": "mlp", "source": "builtin"}, "dataset": config["dataset"]}
    first = config_digest.config_digest(config)
    assert first == config_digest.config_digest(same_keys_reordered)
    assert first != config_digest.config_digest({**config, "train": {"lr": 0.1, "seed": 1}})
    data.write_text("text,label\nbb,1\n")  # another size: the digest never trusts a stale cache entry
    assert config_digest.config_digest(config) != first
    with mock.patch.object(config_digest, "code_version", return_value="another engine"):
        data.write_text("text,label\na,0\n")
        assert config_digest.config_digest(config) != first
    assert config_digest.config_digest(config) == first


def test_a_model_trained_here_is_addressed_by_the_digest_its_run_recorded(trained):
    config = {"student": {"source": "run", "path": f"runs/{trained.id}/final"}, "train": {"seed": 0}}
    before = config_digest.config_digest(config)
    pending = {"student": {"source": "run", "path": "runs/999999/final"}, "train": {"seed": 0}}
    assert config_digest.config_digest(pending) != before
    Artifact.objects.create(run=trained, kind=Artifact.Kind.MODEL, path=f"runs/{trained.id}/final-a2",
                            sha256="b" * 64)  # the run trained again: a new final model
    memo: dict[str, str] = {}
    after = config_digest.config_digest(config, memo=memo)
    assert after != before and after == config_digest.config_digest(config, memo=memo)
    assert memo == {f"run:runs/{trained.id}/final": "b" * 64}


def test_a_baseline_whose_twin_succeeded_after_its_launch_reuses_it_when_a_worker_receives_it(
    digits_setup, team, user, django_capture_on_commit_callbacks
):
    from workers.tasks import run_distillation

    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        first = launch_kd(digits_setup, team, user)
        second = launch_kd(digits_setup, team, user)  # launched while the first baseline is still queued
        not_asked = launch_kd(digits_setup, team, user, reuse_baselines=False)
    twin, late, kept = (e.runs.get(is_baseline=True) for e in (first, second, not_asked))
    assert late.status == Run.Status.QUEUED and late.may_reuse and not kept.may_reuse
    train_to_success(twin, accuracy=0.8)

    with mock.patch("workers.engine.trainer.train") as train:
        run_distillation.apply(args=(late.id,), task_id=late.task_id)
    train.assert_not_called()
    late.refresh_from_db()
    assert late.status == Run.Status.SUCCEEDED and late.reused_from_id == twin.id
    assert Evaluation.objects.get(run=late, role="student").accuracy == 0.8
    assert baseline_reuse.run_reuse_on_delivery(run_id=kept.id, task_id=kept.task_id) is None

    with mock.patch(DISPATCH), django_capture_on_commit_callbacks(execute=True):
        retrained = lifecycle.run_requeue(run=late, reason="Train it.")
    assert not retrained.may_reuse and retrained.status == Run.Status.QUEUED
    assert baseline_reuse.run_reuse_on_delivery(run_id=late.id, task_id=retrained.task_id) is None
    assert Run.objects.get(id=late.id).status == Run.Status.QUEUED  # it trains this time
