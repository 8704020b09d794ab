"""The teacher-store pages: the list (size, bytes/token, reuse count, runs), a store's page, delete (refused
while a queued run needs the store), another team's stores out of reach, and the store a run used named on
its page."""

from pathlib import Path

import pytest
from django.urls import reverse
from django.utils import timezone

from experiments.models import Run, TeacherStore, TeacherStoreUse
from experiments.selectors import teacher_stores as store_reads
from experiments.services import teacher_stores
from tests.factories import ExperimentFactory, RunFactory
from tests.teacher_store_entries import artifact_cache, topk_use

pytestmark = pytest.mark.django_db


@pytest.fixture
def experiment(team, digits_setup):
    return ExperimentFactory(team=team, dataset=digits_setup["dataset"], teacher=digits_setup["teacher"])


def _run(experiment, status: str, **extra) -> Run:
    config = {"teacher": {"source": "builtin", "name": "mlp"},
              "dataset": {"source": "builtin", "name": "digits"}, "train": {"max_steps": 20}}
    finished = {"finished_at": timezone.now()} if status in Run.TERMINAL else {}
    started = {"started_at": timezone.now()} if status != Run.Status.QUEUED else {}
    return RunFactory(experiment=experiment, team=experiment.team, teacher=experiment.teacher, config=config,
                      status=status, **finished, **started, **extra)


@pytest.fixture
def store(experiment) -> TeacherStore:
    """A real entry filled by one run and reused by another."""
    use = topk_use(artifact_cache())
    filler, reuser = (_run(experiment, Run.Status.SUCCEEDED) for _ in range(2))
    teacher_stores.stores_record(run=filler, facts=teacher_stores.store_facts({"teacher_cache": [use]}))
    hit = {**use, "hit": True}
    teacher_stores.stores_record(run=reuser, facts=teacher_stores.store_facts({"teacher_cache": [hit]}))
    return TeacherStore.objects.get()


def test_the_list_shows_size_bytes_per_token_reuse_and_runs(client, user, store):
    client.force_login(user)
    response = client.get(reverse("experiments:store_list"))
    assert response.status_code == 200
    html = response.content.decode()
    row = html[html.index(f'data-store-id="{store.pk}"'):]
    row = row[:row.index("</tr>")]
    assert "mlp-teacher" in row and "k = 8" in row and "digits" in row and "max length 64" in row
    assert f"{store.size_bytes / 30:.0f}" in row  # bytes/token of a format-1 entry, from its positions
    uses = list(store.uses.order_by("id").values_list("run_id", flat=True))
    assert all(reverse("experiments:run_detail", args=[run_id]) in row for run_id in uses)
    assert '<td class="num">1</td>' in row  # reused once
    assert 'name="csrfmiddlewaretoken"' in row and "data-confirm=" in row


def test_another_teams_store_is_not_found_and_not_listed(client, other_user, store):
    client.force_login(other_user)
    assert f'data-store-id="{store.pk}"' not in client.get(reverse("experiments:store_list")).content.decode()
    assert client.get(reverse("experiments:store_detail", args=[store.pk])).status_code == 404
    assert client.post(reverse("experiments:store_delete", args=[store.pk])).status_code == 404
    assert TeacherStore.objects.filter(pk=store.pk).exists()


def test_login_is_required(client, store):
    response = client.get(reverse("experiments:store_list"))
    assert response.status_code == 302 and "/login/" in response["Location"]


def test_the_store_page_lists_every_run_that_used_it(client, user, store):
    client.force_login(user)
    html = client.get(reverse("experiments:store_detail", args=[store.pk])).content.decode()
    assert "filled it" in html and "reused it" in html and store.key in html
    assert "Reused</dt><dd>1 time by 2 runs" in html


def test_delete_is_refused_while_a_queued_run_needs_the_store(client, user, store, experiment):
    queued = _run(experiment, Run.Status.QUEUED)
    client.force_login(user)
    response = client.post(reverse("experiments:store_delete", args=[store.pk]), follow=True)
    html = response.content.decode()
    assert f"needed by queued or running run #{queued.pk} (queued)" in html
    assert TeacherStore.objects.filter(pk=store.pk).exists()


def test_delete_removes_the_store_and_keeps_the_runs_history(client, user, store, settings,
                                                            django_capture_on_commit_callbacks):
    folder = Path(settings.ARTIFACT_ROOT) / store.path
    assert folder.is_dir()
    client.force_login(user)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(reverse("experiments:store_delete", args=[store.pk]), follow=True)
    assert "deleted (" in response.content.decode() and "freed" in response.content.decode()
    assert not TeacherStore.objects.exists() and not folder.exists()
    assert TeacherStoreUse.objects.filter(store_deleted_at__isnull=False).count() == 2


def test_delete_needs_a_post(client, user, store):
    client.force_login(user)
    assert client.get(reverse("experiments:store_delete", args=[store.pk])).status_code == 405


def test_the_run_page_names_the_store_it_used(client, user, store):
    use = store.uses.order_by("id").first()
    client.force_login(user)
    html = client.get(reverse("experiments:run_detail", args=[use.run_id])).content.decode()
    assert reverse("experiments:store_detail", args=[store.pk]) in html and store.label in html


def test_the_model_card_names_the_store_and_says_it_was_reused(store):
    from experiments.export import model_card

    filler, reuser = (use.run for use in store.uses.order_by("id"))
    card = model_card(run=reuser, fmt="builtin", meta={}, folder_name="student", student=None, teacher=None,
                      baseline=None)
    assert f"- Teacher outputs (train split): {store.label}, reused from an earlier run (store " \
           f"`{store.key[:12]}`)" in card
    assert "computed by this run" in model_card(run=filler, fmt="builtin", meta={}, folder_name="student",
                                                student=None, teacher=None, baseline=None)


def test_store_labels_for_runs_names_each_runs_train_store_in_one_query(store, experiment,
                                                                        django_assert_num_queries):
    filler, reuser = (use.run_id for use in store.uses.order_by("id"))
    plain = _run(experiment, Run.Status.SUCCEEDED)
    TeacherStoreUse.objects.create(run_id=reuser, key="e" * 64, label="eval entry", split="eval", filled=True)
    with django_assert_num_queries(1):
        labels = store_reads.store_labels_for_runs([filler, reuser, plain.pk])
    assert labels == {filler: store.label, reuser: store.label}
    TeacherStoreUse.objects.filter(run_id=filler).update(store_deleted_at=timezone.now(), split="eval")
    assert store_reads.store_labels_for_runs([filler]) == {filler: f"{store.label} (deleted)"}


def test_the_list_reads_a_fixed_number_of_queries_whatever_the_number_of_stores(client, user, store,
                                                                               experiment):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert client.get(reverse("experiments:store_list")).status_code == 200
        return len(captured)

    client.force_login(user)
    one = queries()
    for i in range(5):
        extra = TeacherStore.objects.create(team=store.team, key=f"{i}" * 64, kind="logits", split="eval",
                                            teacher_label="t", dataset=store.dataset, path="x")
        for _ in range(3):
            TeacherStoreUse.objects.create(run=_run(experiment, Run.Status.SUCCEEDED), store=extra,
                                           key=extra.key, label=extra.label, split="eval", filled=False)
    assert queries() == one
