"""Model export: a finished student as a zipped Hugging Face folder with a generated model card.

The students are trained for a few steps by the real engine (a tiny config-built BERT on a small text CSV, and
a builtin MLP on digits) and recorded through ``services.run_finish``, exactly as a worker records them.
"""

import csv
import io
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from django.urls import reverse
from django.utils import timezone

from experiments.models import Artifact, DatasetSpec, Evaluation, ModelSpec, Recipe, Run
from experiments.services import lifecycle
from tests.factories import DatasetSpecFactory, ExperimentFactory, ModelSpecFactory, RecipeFactory, RunFactory

pytestmark = pytest.mark.django_db

TINY_BERT = {
    "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "vocab_size": 500, "max_position_embeddings": 64,
}
STUDENT_BERT = {**TINY_BERT, "num_hidden_layers": 1}
KD_TERMS = [{"name": "ce", "weight": 0.1, "params": {}},
            {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}}]
TOPICS = {
    "sport": [
        "the team won the match",
        "a late goal in the final",
        "the striker scored twice",
        "fans cheered",
    ],
    "tech": [
        "the new phone has a faster chip",
        "software update fixes bugs",
        "a robot learns",
        "cloud servers",
    ],
    "money": ["shares fell on the market", "the bank raised rates", "profits rose this quarter", "tax cuts"],
}


# --- runs trained by the engine (once per module) ------------------------------------------------------
@pytest.fixture(scope="module")
def topics_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "topics.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["body", "topic"])
        for repeat in range(5):
            for topic, sentences in TOPICS.items():
                for sentence in sentences:
                    writer.writerow([f"{sentence} (story {repeat})", topic])
    return path


def _bert_config(topics_csv):
    return {
        "student": {"source": "config", "params": STUDENT_BERT, "num_labels": 3},
        "teacher": {"source": "config", "params": TINY_BERT, "num_labels": 3},
        "dataset": {"source": "hf", "path": str(topics_csv), "text_column": "body", "label_column": "topic",
                    "max_length": 32, "eval_fraction": 0.2, "split_seed": 0},
        "terms": KD_TERMS,
        "scheme": "online",
        "task": "classification",
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-3, "log_every": 2, "eval_every": 100,
                  "save_every": 100, "seed": 0, "device": "cpu"},
    }


@pytest.fixture(scope="module")
def bert_trained(tmp_path_factory, topics_csv):
    """(frozen config, TrainResult dict) of a tiny BERT distilled from a tiny BERT teacher for 4 steps."""
    from workers.engine.config import RunConfig
    from workers.engine.trainer import train

    config = _bert_config(topics_csv)
    result = train(RunConfig.from_dict({**config, "output_dir": str(tmp_path_factory.mktemp("bert-run"))}))
    return config, result.to_dict()


@pytest.fixture(scope="module")
def mlp_trained(tmp_path_factory):
    from workers.engine.config import RunConfig
    from workers.engine.trainer import train

    config = {
        "student": {"source": "builtin", "name": "mlp", "params": {"hidden_sizes": [16]}, "num_labels": 10},
        "teacher": None,
        "dataset": {"source": "builtin", "name": "digits"},
        "terms": [{"name": "ce", "weight": 1.0, "params": {}}],
        "scheme": "hard_labels",
        "task": "classification",
        "train": {"max_steps": 30, "batch_size": 32, "lr": 1e-2, "log_every": 10, "eval_every": 1000,
                  "save_every": 1000, "seed": 0, "device": "cpu"},
    }
    result = train(RunConfig.from_dict({**config, "output_dir": str(tmp_path_factory.mktemp("mlp-run"))}))
    return config, result.to_dict()


def _record(run, result, settings):
    """Copy the engine's final folder under this test's ARTIFACT_ROOT and finish the run like a worker
    does."""
    final = Path(settings.ARTIFACT_ROOT) / "runs" / str(run.pk) / "final"
    shutil.copytree(result["final_dir"], final)
    assert lifecycle.run_claim(run_id=run.pk, task_id=f"task-{run.pk}", worker_name="test-worker") is not None
    lifecycle.run_finish(
        run_id=run.pk,
        task_id=f"task-{run.pk}",
        result={**result, "final_dir": str(final), "last_checkpoint": None, "teacher_cache": []},
    )
    run.refresh_from_db()
    return run, final


@pytest.fixture
def bert_run(team, bert_trained, settings):
    config, result = bert_trained
    dataset = DatasetSpecFactory(team=team, name="topics", source=DatasetSpec.Source.HF, builtin_name="",
                                 text_column="body", label_column="topic", num_labels=3,
                                 label_names=["money", "sport", "tech"], max_length=32)
    teacher = ModelSpecFactory(
        team=team,
        name="tiny-bert-teacher",
        source=ModelSpec.Source.CONFIG,
        builtin_arch="",
        config=TINY_BERT,
        num_labels=3,
    )
    student = ModelSpecFactory(team=team, name="tiny-bert-student", source=ModelSpec.Source.CONFIG,
                               builtin_arch="", config=STUDENT_BERT, num_labels=3)
    recipe = RecipeFactory(team=team, name="kd-t4", scheme=Recipe.Scheme.ONLINE, terms=KD_TERMS)
    experiment = ExperimentFactory(team=team, name="topics sweep", dataset=dataset, teacher=teacher)
    run = RunFactory(experiment=experiment, student=student, teacher=teacher, recipe=recipe, config=config,
                     total_steps=4)
    run, final = _record(run, result, settings)
    baseline = RunFactory(experiment=experiment, student=student, recipe=RecipeFactory(team=team), seed=0,
                          is_baseline=True, status=Run.Status.SUCCEEDED, step=4, total_steps=4,
                          finished_at=timezone.now(), config=config)
    Evaluation.objects.create(
        team=team,
        role=Evaluation.Role.STUDENT,
        run=baseline,
        model=student,
        dataset=dataset,
        split_key=run.evaluations.get(role="student").split_key,
        accuracy=0.125,
    )
    return run, final


def _download(client, run):
    return client.get(reverse("experiments:run_model_download", kwargs={"run_id": run.pk}))


def _unzip(response, into):
    assert response.streaming, "the zip is streamed, not built in memory first"
    data = b"".join(response.streaming_content)
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.testzip() is None
    archive.extractall(into)
    return archive.namelist()


# --- a transformers student ------------------------------------------------------------------------------
def test_export_zips_weights_config_tokenizer_and_a_model_card(client_logged_in, bert_run, tmp_path):
    run, final = bert_run
    (final / "term_modules.safetensors").write_bytes(b"training-only projection heads")

    response = _download(client_logged_in, run)

    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    assert response["Content-Disposition"] == f'attachment; filename="tiny-bert-student-run{run.pk}.zip"'
    names = _unzip(response, tmp_path)
    root = f"tiny-bert-student-run{run.pk}"
    assert {f"{root}/model.safetensors", f"{root}/config.json", f"{root}/tokenizer.json",
            f"{root}/tokenizer_config.json", f"{root}/README.md"} <= set(names)
    assert f"{root}/term_modules.safetensors" not in names


def test_exported_student_loads_back_with_transformers(client_logged_in, bert_run, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, final = bert_run
    _unzip(_download(client_logged_in, run), tmp_path)
    folder = tmp_path / f"tiny-bert-student-run{run.pk}"

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    saved = load_file(final / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if k in state)
    assert model.config.num_labels == 3 and model.config.num_hidden_layers == 1
    with torch.no_grad():
        logits = model(**tokenizer(["the bank raised rates"], return_tensors="pt")).logits
    assert logits.shape == (1, 3)


def test_model_card_states_teacher_data_recipe_settings_and_metrics(client_logged_in, bert_run, tmp_path):
    run, _ = bert_run
    _unzip(_download(client_logged_in, run), tmp_path)
    card = (tmp_path / f"tiny-bert-student-run{run.pk}" / "README.md").read_text()
    student = run.evaluations.get(role=Evaluation.Role.STUDENT)
    teacher = Evaluation.objects.get(role=Evaluation.Role.TEACHER, model=run.teacher)

    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-classification\n")
    assert "# tiny-bert-student distilled from tiny-bert-teacher on topics" in card
    assert f"distillweb run #{run.pk}" in card and 'experiment "topics sweep"' in card
    assert "**tiny-bert-teacher**" in card and "randomly initialised `bert` config" in card
    assert "**topics**" in card and "money, sport, tech" in card
    assert "**kd-t4 v1**" in card and "Scheme: `online`" in card
    assert "| `kd` | 0.9 | temperature=4 | — |" in card and "| `ce` | 0.1 | — | — |" in card
    assert "| max_steps | 4 |" in card and "| lr | 0.001 |" in card
    accuracy_row = re.search(r"^\| accuracy \| (\S+) \| (\S+) \|$", card, re.M)
    assert accuracy_row and accuracy_row.groups() == (f"{student.accuracy:.4g}", f"{teacher.accuracy:.4g}")
    assert "**Retention**" in card
    gain = 100 * (student.accuracy - 0.125)
    assert f"**KD gain**: {gain:+.2f} percentage points" in card
    assert "AutoModelForSequenceClassification.from_pretrained" in card


def test_download_button_shows_on_a_finished_run(client_logged_in, bert_run):
    run, _ = bert_run

    html = client_logged_in.get(reverse("experiments:run_detail", kwargs={"run_id": run.pk})).content.decode()

    assert reverse("experiments:run_model_download", kwargs={"run_id": run.pk}) in html
    assert "Download model" in html


# --- a builtin net -------------------------------------------------------------------------------------
def test_builtin_mlp_exports_weights_metadata_and_a_card_whose_code_rebuilds_it(
    client_logged_in, team, digits_setup, mlp_trained, settings, tmp_path, monkeypatch
):
    from workers.engine.config import DatasetConfig, ModelConfig
    from workers.engine.data import load_dataset
    from workers.engine.models import load_model

    config, result = mlp_trained
    experiment = ExperimentFactory(team=team, dataset=digits_setup["dataset"])
    run = RunFactory(experiment=experiment, student=digits_setup["students"][0], is_baseline=True,
                     recipe=RecipeFactory(team=team, name="hard_labels", scheme=Recipe.Scheme.HARD_LABELS,
                                          terms=[{"name": "ce", "weight": 1.0, "params": {}}]), config=config)
    run, final = _record(run, result, settings)

    names = _unzip(_download(client_logged_in, run), tmp_path)

    root = f"mlp-16-run{run.pk}"
    assert set(names) == {f"{root}/model.safetensors", f"{root}/distillweb_model.json",
                          f"{root}/preprocessing.json", f"{root}/README.md"}
    card = (tmp_path / root / "README.md").read_text()
    assert "library_name" not in card and "not a transformers model" in card
    assert "Hard-label baseline" in card and "KD gain" not in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "model-card", "exec"), namespace)  # the card's own instructions
    digits = load_dataset(DatasetConfig(source="builtin", name="digits"))
    engine_model = load_model(
        ModelConfig(source="run", path=str(final)), dataset=digits, role="teacher"
    ).model
    features = torch.as_tensor(digits.eval.inputs[:16], dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(namespace["net"](features), engine_model.eval()(features))


# --- refusals ------------------------------------------------------------------------------------------
def _refusal(client, run):
    response = client.get(reverse("experiments:run_model_download", kwargs={"run_id": run.pk}), follow=True)
    assert response.redirect_chain[-1][0] == reverse("experiments:run_detail", kwargs={"run_id": run.pk})
    return " ".join(str(m) for m in response.context["messages"])


def _succeeded_run(team):
    return RunFactory(
        experiment=ExperimentFactory(team=team),
        status=Run.Status.SUCCEEDED,
        step=20,
        total_steps=20,
        finished_at=timezone.now(),
    )


def _fake_model_folder(folder):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    return folder


def test_a_run_without_a_model_artifact_says_so(client_logged_in, team):
    run = _succeeded_run(team)

    assert f"Run #{run.pk} recorded no final model" in _refusal(client_logged_in, run)


def test_an_unfinished_run_cannot_be_downloaded(client_logged_in, team):
    run = RunFactory(experiment=ExperimentFactory(team=team))

    assert "is queued: only the student of a succeeded run can be downloaded" in _refusal(
        client_logged_in, run
    )


@pytest.mark.parametrize("recorded", ["../outside-model", "{outside}"])
def test_a_path_outside_the_artifact_root_is_refused(client_logged_in, team, settings, tmp_path, recorded):
    outside = _fake_model_folder(tmp_path / "outside-model")
    run = _succeeded_run(team)
    Artifact.objects.create(run=run, kind=Artifact.Kind.MODEL, path=recorded.format(outside=outside))

    assert "outside the artifact storage" in _refusal(client_logged_in, run)


def test_a_symlink_out_of_the_artifact_root_is_refused(client_logged_in, team, settings, tmp_path):
    outside = _fake_model_folder(tmp_path / "secret-model")
    run = _succeeded_run(team)
    link = Path(settings.ARTIFACT_ROOT) / "runs" / str(run.pk) / "final"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside, target_is_directory=True)
    Artifact.objects.create(run=run, kind=Artifact.Kind.MODEL, path=f"runs/{run.pk}/final")

    assert "outside the artifact storage" in _refusal(client_logged_in, run)


def test_a_file_linking_out_of_the_artifact_root_is_refused(client_logged_in, team, settings, tmp_path):
    (tmp_path / "passwords.txt").write_text("secret")
    run = _succeeded_run(team)
    folder = _fake_model_folder(Path(settings.ARTIFACT_ROOT) / "runs" / str(run.pk) / "final")
    (folder / "vocab.txt").symlink_to(tmp_path / "passwords.txt")
    Artifact.objects.create(run=run, kind=Artifact.Kind.MODEL, path=f"runs/{run.pk}/final")

    assert "links to a file outside the artifact storage" in _refusal(client_logged_in, run)


def test_a_missing_folder_is_a_clear_message(client_logged_in, team):
    run = _succeeded_run(team)
    Artifact.objects.create(run=run, kind=Artifact.Kind.MODEL, path=f"runs/{run.pk}/final")

    assert "no longer in the artifact storage" in _refusal(client_logged_in, run)


def test_another_teams_model_is_404(client_logged_in, other_team, settings):
    run = _succeeded_run(other_team)
    _fake_model_folder(Path(settings.ARTIFACT_ROOT) / "runs" / str(run.pk) / "final")
    Artifact.objects.create(run=run, kind=Artifact.Kind.MODEL, path=f"runs/{run.pk}/final")

    assert _download(client_logged_in, run).status_code == 404


def test_the_zip_is_produced_in_bounded_chunks(team, settings):
    from experiments import export

    run = _succeeded_run(team)
    folder = _fake_model_folder(Path(settings.ARTIFACT_ROOT) / "runs" / str(run.pk) / "final")
    weights = bytes(range(256)) * (14 * 1024)  # 3.5 MiB
    (folder / "model.safetensors").write_bytes(weights)
    Artifact.objects.create(run=run, kind=Artifact.Kind.MODEL, path=f"runs/{run.pk}/final")

    chunks = list(export.model_export_stream(export.model_export(run=run)))

    assert len(chunks) >= 4 and max(len(c) for c in chunks) <= export.CHUNK_BYTES + 4096
    archive = zipfile.ZipFile(io.BytesIO(b"".join(chunks)))
    root = archive.namelist()[0].split("/")[0]
    assert archive.read(f"{root}/model.safetensors") == weights
    assert archive.getinfo(f"{root}/model.safetensors").compress_type == zipfile.ZIP_STORED
    assert f"distillweb run #{run.pk}" in archive.read(f"{root}/README.md").decode()
