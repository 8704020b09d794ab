"""POST /api/models/ and /api/datasets/: a hub identifier is never a file path, and local paths stay under the
configured roots and out of the artifact root (every team's runs and uploads)."""

from __future__ import annotations

import pytest
from django.urls import reverse

from experiments.models import DatasetSpec, ModelSpec
from tests.factories import RunFactory

pytestmark = pytest.mark.django_db

NOT_HUB_IDS = ["/etc/passwd", "../../other-team", "org/../../x", "~", "~/models", "file:///etc/passwd",
               "http://example.org/model", "%2e%2e%2f", "..%2f..%2fetc", "org%2Fname", "C:\\models", "a b"]
HF_MODEL = {"name": "m", "source": "hf", "hub_id": "org/model", "num_labels": 2}
BUILTIN_MODEL = {
    "name": "m",
    "source": "builtin",
    "builtin_arch": "mlp",
    "hidden_sizes": "32",
    "num_labels": 10,
}
VALID = {
    "hub_id": ["sentence-transformers/all-MiniLM-L6-v2", "gpt2", "HuggingFaceTB/SmolLM2-135M"],
    "revision": ["main", "v1.0", "refs/pr/1", "0123456789abcdef0123456789abcdef01234567"],
    "tokenizer_id": ["gpt2", "sentence-transformers/all-MiniLM-L6-v2", "bert-base-uncased"],
}
HUB_DATASET = {
    "name": "d",
    "source": "hf",
    "hub_name": "org/news",
    "text_column": "text",
    "label_column": "label",
    "num_labels": 2,
}


@pytest.fixture
def other_teams_folders(settings, other_team) -> list[str]:
    """Another team's uploaded file and run output, as they lie under the artifact root."""
    root = settings.ARTIFACT_ROOT
    uploads = root / "datasets" / str(other_team.pk)
    uploads.mkdir(parents=True)
    (uploads / "secret.csv").write_text("text,label\nsecret,1\nother,0\n")
    run = RunFactory(experiment__team=other_team)
    final = root / "runs" / str(run.pk) / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    return [str(uploads), str(uploads / "secret.csv"), str(final), str(root / "datasets" / "1")]


def _url(name: str) -> str:
    return reverse(f"api:{name}")


def _refused(api, url: str, body: dict, field: str) -> None:
    response = api.post(url, body)
    assert response.status_code == 400, (body, response.content)
    assert field in response.json(), (body, response.json())
    assert response.json()[field][0]


@pytest.mark.parametrize(
    ("field", "base"),
    [
        ("hub_id", HF_MODEL),
        ("revision", HF_MODEL),
        ("tokenizer_id", HF_MODEL),
        ("tokenizer_id", BUILTIN_MODEL),
    ],
)
def test_model_hub_fields_refuse_paths_urls_and_encoded_strings(api, team, other_teams_folders, field, base):
    for value in [*NOT_HUB_IDS, *other_teams_folders]:
        _refused(api, _url("model_list"), {**base, field: value}, field)
    assert not ModelSpec.objects.filter(team=team).exists()
    for i, value in enumerate(VALID[field]):  # the hub's own ids stay accepted
        response = api.post(_url("model_list"), {**base, "name": f"ok-{i}", field: value})
        assert response.status_code == 201, response.json()
        assert response.json()[field] == value


def test_a_config_models_tokenizer_is_a_hub_id_or_a_folder_under_a_model_root(
    api, team, settings, tmp_path, other_teams_folders
):
    settings.MODEL_ROOTS = [tmp_path]  # a root that (wrongly) covers the artifact root too
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "escape").symlink_to(other_teams_folders[2])
    body = {"name": "m", "source": "config", "num_labels": 2, "config": {"model_type": "bert"}}
    for value in [*NOT_HUB_IDS, *other_teams_folders, str(tmp_path / "models" / "escape")]:
        _refused(
            api, _url("model_list"), {**body, "config": {"model_type": "bert", "tokenizer": value}}, "config"
        )
    assert not ModelSpec.objects.filter(team=team).exists()


def test_dataset_hub_names_refuse_paths_and_file_readers(api, team, other_teams_folders):
    for value in [*NOT_HUB_IDS, *other_teams_folders, "csv", "json", "imagefolder"]:
        _refused(api, _url("dataset_list"), {**HUB_DATASET, "hub_name": value}, "hub_name")
    assert not DatasetSpec.objects.filter(team=team).exists()
    for i, value in enumerate(["SetFit/bbc-news", "imdb", "HuggingFaceFW/fineweb-edu"]):
        response = api.post(_url("dataset_list"), {**HUB_DATASET, "name": f"ok-{i}", "hub_name": value})
        assert response.status_code == 201, response.json()


def test_local_paths_never_reach_the_artifact_root_even_under_a_root(
    api, team, settings, tmp_path, other_teams_folders
):
    settings.MODEL_ROOTS = [tmp_path]
    settings.DATASET_ROOTS = [tmp_path]
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "run").symlink_to(other_teams_folders[2])
    (tmp_path / "links" / "upload.csv").symlink_to(other_teams_folders[1])
    (tmp_path / "mine.csv").write_text("text,label\na,1\nb,0\n")
    for value in [*other_teams_folders, str(tmp_path / "links" / "run")]:
        _refused(
            api,
            _url("model_list"),
            {"name": "m", "source": "hf", "local_path": value, "num_labels": 2},
            "local_path",
        )
    for value in [*other_teams_folders[:2], str(tmp_path / "links" / "upload.csv")]:
        body = {**HUB_DATASET, "hub_name": "", "local_path": value}
        _refused(api, _url("dataset_list"), body, "local_path")
        body = {
            **HUB_DATASET,
            "hub_name": "",
            "local_path": str(tmp_path / "mine.csv"),
            "eval_local_path": value,
        }
        _refused(api, _url("dataset_list"), body, "eval_local_path")
    assert (
        not ModelSpec.objects.filter(team=team).exists()
        and not DatasetSpec.objects.filter(team=team).exists()
    )


def test_messages_do_not_repeat_the_servers_paths(api, team, settings, tmp_path, other_teams_folders):
    settings.MODEL_ROOTS = [tmp_path]
    response = api.post(
        _url("model_list"),
        {"name": "m", "source": "hf", "local_path": other_teams_folders[2], "num_labels": 2},
    )
    assert response.status_code == 400 and str(tmp_path) not in response.content.decode()


def test_an_uploaded_dataset_shows_where_it_is_stored_without_the_servers_path(api, team, user, settings):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from experiments.services import records

    upload = SimpleUploadedFile(
        "reviews.csv", b"text,label\n" + b"".join(b"row %d,%d\n" % (i, i % 2) for i in range(20))
    )
    dataset = records.dataset_spec_create(
        team=team, created_by=user, name="reviews", source="upload", upload=upload
    )
    shown = api.get(reverse("api:dataset_detail", kwargs={"pk": dataset.pk})).json()["local_path"]
    assert shown.startswith(f"ARTIFACT_ROOT/datasets/{team.pk}/") and shown.endswith(".csv")
    assert str(settings.ARTIFACT_ROOT) not in api.get(_url("dataset_list")).content.decode()
