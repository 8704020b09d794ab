import pytest
from django.contrib import admin
from django.urls import reverse

from experiments.models import Run
from tests.factories import RunFactory

pytestmark = pytest.mark.django_db


def test_every_record_is_in_the_admin_and_its_list_renders(client, staff_user):
    run = RunFactory()
    client.force_login(staff_user)
    app_models = [m for m in admin.site._registry if m._meta.app_label == "experiments"]
    assert {m.__name__ for m in app_models} >= {"Team", "Membership", "ModelSpec", "DatasetSpec", "Recipe",
                                                "Experiment", "Run", "MetricPoint", "Evaluation", "Artifact",
                                                "Worker"}
    for model in app_models:
        url = reverse(f"admin:experiments_{model._meta.model_name}_changelist")
        assert client.get(url).status_code == 200, url
    response = client.get(reverse("admin:experiments_run_changelist"), {"status__exact": "queued"})
    assert f">{run.pk}<" in response.content.decode()


def test_admin_cancel_action_goes_through_the_service(client, staff_user):
    queued = RunFactory()
    client.force_login(staff_user)
    client.post(reverse("admin:experiments_run_changelist"),
                {"action": "cancel_runs", "_selected_action": [queued.pk]})
    queued.refresh_from_db()
    assert queued.status == Run.Status.CANCELLED and queued.cancel_requested


def test_admin_is_staff_only(client, user):
    client.force_login(user)
    response = client.get(reverse("admin:experiments_run_changelist"))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_admin_requeue_action_starts_a_new_attempt_or_says_why_not(client, staff_user):
    run = RunFactory()
    client.force_login(staff_user)
    changelist = reverse("admin:experiments_run_changelist")
    client.post(changelist, {"action": "cancel_runs", "_selected_action": [run.pk]})
    response = client.post(changelist, {"action": "requeue_runs", "_selected_action": [run.pk]}, follow=True)
    run.refresh_from_db()
    assert run.status == Run.Status.QUEUED
    assert "1 run(s) requeued" in response.content.decode()
    assert run.transitions.order_by("-id").first().to_status == Run.Status.QUEUED
    response = client.post(changelist, {"action": "requeue_runs", "_selected_action": [run.pk]}, follow=True)
    assert f"#{run.pk}:" in response.content.decode()                # a queued run cannot be requeued
