"""The API registers a served teacher as the model form does: a configured server's name and the served
model's name; an unknown server is a 400 on its field (issue 14)."""

from __future__ import annotations

import pytest

from experiments.models import ModelSpec

pytestmark = pytest.mark.django_db


def test_the_api_registers_a_served_teacher_by_server_name(api, team, settings):
    settings.TEACHER_SERVERS = {"gpu-pool": "http://10.1.2.3:8000"}
    body = {"team": team.pk, "name": "served", "source": "server", "task": "causal_lm", "server": "gpu-pool",
            "served_model": "org/teacher"}
    created = api.post("/api/models/", body)
    assert created.status_code == 201, created.json()
    spec = ModelSpec.objects.get(name="served")
    assert (spec.source, spec.hub_id, spec.config) == ("server", "org/teacher", {"server": "gpu-pool"})

    refused = api.post("/api/models/", {**body, "name": "other", "server": "prod"})
    assert refused.status_code == 400
    assert "server" in str(refused.json()) and "10.1.2.3" not in str(refused.json())
