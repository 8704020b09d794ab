"""GET /api/teacher-stores/: a team's stores with their size, bytes/token, reuse and runs; another team's
stores are not listed; a token is required."""

import pytest
from django.utils import timezone

from experiments.models import Run
from experiments.services import teacher_stores
from tests.factories import ExperimentFactory, RunFactory
from tests.teacher_store_entries import artifact_cache, topk_use

pytestmark = pytest.mark.django_db

URL = "/api/teacher-stores/"


def _record(team, teacher, *, hit: bool, use: dict) -> Run:
    experiment = ExperimentFactory(team=team, teacher=teacher)
    run = RunFactory(experiment=experiment, team=team, teacher=teacher, status=Run.Status.SUCCEEDED,
                     started_at=timezone.now(), finished_at=timezone.now(),
                     config={"teacher": {"source": "builtin", "name": "mlp"}, "dataset": {}})
    facts = teacher_stores.store_facts({"teacher_cache": [{**use, "hit": hit}]})
    teacher_stores.stores_record(run=run, facts=facts)
    return run


def test_the_list_gives_each_store_with_its_figures_and_runs(api, team, digits_setup):
    use = topk_use(artifact_cache(), positions=50, k=8)
    filler = _record(team, digits_setup["teacher"], hit=False, use=use)
    reuser = _record(team, digits_setup["teacher"], hit=True, use=use)
    response = api.get(URL)
    assert response.status_code == 200
    [store] = response.json()["results"]
    assert store["key"] == use["key"] and store["kind"] == "topk" and store["k"] == 8
    assert store["teacher"]["name"] == "mlp-teacher" and store["positions"] == 50
    assert store["bytes_per_token"] == pytest.approx(store["size_bytes"] / 50)
    assert (store["reuse_count"], store["run_count"]) == (1, 2)
    assert store["recent_run_ids"] == [reuser.pk, filler.pk]
    assert store["url"].endswith(f"/stores/{store['id']}/")


def test_another_teams_stores_are_not_listed_and_a_token_is_required(api, anonymous, other_team):
    from tests.factories import ModelSpecFactory

    _record(other_team, ModelSpecFactory(team=other_team), hit=False, use=topk_use(artifact_cache()))
    assert api.get(URL).json()["results"] == []
    assert anonymous.get(URL).status_code in (401, 403)
