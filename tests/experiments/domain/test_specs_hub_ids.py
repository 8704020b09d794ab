"""The web's model and dataset forms, the records themselves (admin) and the worker's resolved config: a hub
identifier is never a file path, and a run reads another run's model only when both belong to one team."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from experiments.domain import engine_config
from experiments.models import DatasetSpec, ModelSpec
from tests.factories import ExperimentFactory, ModelSpecFactory, RunFactory

pytestmark = pytest.mark.django_db

NOT_HUB_IDS = ["/etc/passwd", "../../other-team", "~", "file:///etc/passwd", "%2e%2e%2f", "..%2fetc"]


@pytest.fixture
def other_teams_folders(settings, other_team) -> list[str]:
    root = settings.ARTIFACT_ROOT
    uploads = root / "datasets" / str(other_team.pk)
    uploads.mkdir(parents=True)
    (uploads / "secret.csv").write_text("text,label\nsecret,1\nother,0\n")
    final = root / "runs" / str(RunFactory(experiment__team=other_team).pk) / "final"
    final.mkdir(parents=True)
    return [str(uploads / "secret.csv"), str(final)]


def _model_post(team, **fields):
    return {"team": team.pk, "name": "m", "source": "hf", "num_labels": 2, **fields}


@pytest.mark.parametrize(("field", "extra"), [("hub_id", {}), ("revision", {"hub_id": "org/model"}),
                                             ("tokenizer_id", {"hub_id": "org/model"})])
def test_the_model_form_refuses_paths_as_hub_identifiers(
    client_logged_in, team, other_teams_folders, field, extra
):
    for value in [*NOT_HUB_IDS, *other_teams_folders]:
        response = client_logged_in.post(reverse("experiments:model_create"),
                                         _model_post(team, **{**extra, field: value}))
        assert response.status_code == 200
        assert response.context["form"].errors[field], value
    assert not ModelSpec.objects.filter(team=team).exists()


def test_the_model_form_refuses_a_config_tokenizer_outside_the_model_roots(
    client_logged_in, team, settings, tmp_path, other_teams_folders
):
    settings.MODEL_ROOTS = [tmp_path]
    for value in [*NOT_HUB_IDS, *other_teams_folders]:
        response = client_logged_in.post(reverse("experiments:model_create"), _model_post(
            team, source="config", config=f'{{"model_type": "bert", "tokenizer": "{value}"}}'))
        assert "tokenizer" in response.context["form"].errors["config"][0], value
    (tmp_path / "tokenizers" / "bert").mkdir(parents=True)
    for tokenizer in ("bert-base-uncased", str(tmp_path / "tokenizers" / "bert")):
        response = client_logged_in.post(
            reverse("experiments:model_create"),
            _model_post(
                team,
                name=tokenizer[-8:],
                source="config",
                config=f'{{"model_type": "bert", "tokenizer": "{tokenizer}"}}',
            ),
        )
        assert response.status_code == 302, response.context["form"].errors
    assert ModelSpec.objects.filter(team=team).count() == 2


def test_the_model_form_refuses_another_teams_run_folder_under_a_model_root(client_logged_in, team, settings,
                                                                             tmp_path, other_teams_folders):
    settings.MODEL_ROOTS = [tmp_path]  # covers the artifact root: a misconfiguration that must not open it
    (tmp_path / "escape").symlink_to(other_teams_folders[1])
    for value in (other_teams_folders[1], str(tmp_path / "escape")):
        response = client_logged_in.post(
            reverse("experiments:model_create"), _model_post(team, local_path=value)
        )
        assert "outside the allowed" in response.context["form"].errors["local_path"][0]
        assert str(tmp_path) not in response.context["form"].errors["local_path"][0]
    assert not ModelSpec.objects.filter(team=team).exists()


def test_the_dataset_form_refuses_paths_as_hub_dataset_names(client_logged_in, team, other_teams_folders):
    for value in [*NOT_HUB_IDS, *other_teams_folders, "csv"]:
        response = client_logged_in.post(
            reverse("experiments:dataset_create"),
            {
                "team": team.pk,
                "name": "d",
                "source": "hf",
                "hub_name": value,
                "text_column": "text",
                "label_column": "label",
                "num_labels": 2,
                "eval_fraction": "0.2",
                "split_seed": "0",
                "max_length": "128",
            },
        )
        assert response.context["form"].errors["hub_name"], value
    assert not DatasetSpec.objects.filter(team=team).exists()


def test_records_saved_from_the_admin_keep_the_hub_syntax(team):
    for fields, field in (
        ({"hub_id": "/srv/artifacts/runs/3/final"}, "hub_id"),
        ({"revision": "../main"}, "revision"),
        ({"tokenizer_id": "file:///etc"}, "tokenizer_id"),
    ):
        with pytest.raises(ValidationError) as exc:
            ModelSpecFactory.build(team=team, source="hf", **fields).full_clean()
        assert field in exc.value.message_dict
    with pytest.raises(ValidationError) as exc:
        DatasetSpec(team=team, name="d", source="hf", hub_name="%2e%2e%2f", num_labels=2).full_clean()
    assert "hub_name" in exc.value.message_dict


def test_the_worker_allows_only_run_outputs_of_the_runs_team(team, other_team, digits_setup, settings):
    experiment = ExperimentFactory(team=team, dataset=digits_setup["dataset"])
    own, foreign = RunFactory(experiment=experiment), RunFactory(experiment__team=other_team)
    config = {
        "student": {"source": "run", "path": f"runs/{own.pk}/final"},
        "teacher": {"source": "run", "path": f"runs/{foreign.pk}/final"},
        "extra_teachers": [{"source": "derived", "parent": {"source": "run", "path": "runs/../../etc"}}],
    }
    run = RunFactory(experiment=experiment)
    resolved = engine_config.resolve_paths(config, run=run, artifact_root=settings.ARTIFACT_ROOT)
    allowed = resolved["allowed_paths"]
    assert allowed["run_outputs"] == [str(settings.ARTIFACT_ROOT / f"runs/{own.pk}/final")]
    assert allowed["uploads"] == str(settings.ARTIFACT_ROOT / "datasets" / str(team.pk))
    assert allowed["artifact_root"] == str(settings.ARTIFACT_ROOT)
    assert allowed["model_roots"] == [str(p) for p in settings.MODEL_ROOTS]
    # A stored config cannot widen what its run may read.
    crafted = engine_config.resolve_paths({**config, "allowed_paths": {"model_roots": ["/"]}}, run=run,
                                          artifact_root=settings.ARTIFACT_ROOT)
    assert crafted["allowed_paths"] == allowed



def test_the_tokenizer_check_names_local_tokenizer_folders_without_their_path(team, settings, tmp_path):
    from experiments.domain import preflight
    from tests.factories import DatasetSpecFactory, RecipeFactory

    folder = tmp_path / "models" / "shared-tokenizer"
    config = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 500,
              "tokenizer": str(folder)}
    teacher, student = (
        ModelSpecFactory(
            team=team, name=n, source="config", builtin_arch="", task="causal_lm", num_labels=0, config=config
        )
        for n in ("teacher", "student")
    )
    check = preflight.check_tokenizers(
        dataset=DatasetSpecFactory(
            team=team, builtin_name="fortunes", task="causal_lm", num_labels=0, label_names=[]
        ),
        teacher=teacher,
        students=[student],
        recipes=[RecipeFactory(team=team, terms=[{"name": "kd", "weight": 1.0, "params": {}}])],
    )
    assert check.level == "ok" and "both use shared-tokenizer" in check.summary
    assert str(tmp_path) not in check.summary + " ".join(check.details)
