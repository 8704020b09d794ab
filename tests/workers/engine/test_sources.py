"""Where a run reads models and data from (workers.engine.sources): a hub id is never a file path, local paths
only under the worker's roots, a run's model only as a resolved ``run`` source; messages name no machine
path."""

from __future__ import annotations

import builtins
import io
import re
from pathlib import Path
from typing import Any

import pytest

from workers.engine import sources
from workers.engine.config import AllowedPaths, ModelConfig, RunConfig
from workers.engine.errors import DataError, ModelLoadError
from workers.engine.models import load_model, save_model
from workers.engine.trainer import train

from .conftest import TINY_BERT

VALID_REPO_IDS = [
    "sentence-transformers/all-MiniLM-L6-v2",
    "gpt2",
    "HuggingFaceTB/SmolLM2-135M",
    "SetFit/bbc-news",
    "bert-base-uncased",
    "org_1/model.v2",
]
VALID_REVISIONS = ["main", "v1.0", "refs/pr/1", "0123456789abcdef0123456789abcdef01234567"]
NOT_HUB_IDS = [
    "/etc",
    "/srv/artifacts/datasets/1",
    "/srv/artifacts/runs/3/final",
    "../other-team",
    "a/../../b",
    "..",
    "~",
    "~/models",
    "file:///etc/passwd",
    "file:/etc",
    "http://example.org/x",
    "s3://bucket/m",
    "%2e%2e%2f",
    "org%2fname",
    "..%2f..%2fetc",
    "a\\b",
    "org/",
    "/org",
    "-org/x",
    "org/x.",
    "a b",
    "a\tb",
    "a\x00b",
    "",
    "C:/models",
]
NOT_REPO_IDS = [*NOT_HUB_IDS, "org/name/extra", "a--b", "x.git", "x" * 97]


@pytest.mark.parametrize("value", VALID_REPO_IDS)
def test_hub_ids_of_the_hub_syntax_are_accepted(value):
    assert sources.repo_id_problem(value) is None
    assert sources.dataset_name_problem(value) is None


@pytest.mark.parametrize("value", VALID_REVISIONS)
def test_branches_tags_and_commit_shas_are_revisions(value):
    assert sources.revision_problem(value) is None


@pytest.mark.parametrize("value", NOT_REPO_IDS)
def test_paths_urls_and_encoded_strings_are_not_hub_ids(value):
    assert sources.repo_id_problem(value)
    assert sources.dataset_name_problem(value)
    if value in NOT_HUB_IDS:  # a revision or config name may be longer, a revision have several parts
        assert sources.revision_problem(value)
        assert sources.config_name_problem(value)


def test_file_readers_of_the_datasets_package_are_not_hub_datasets():
    for name in ("csv", "json", "text", "parquet", "imagefolder", "JSON"):
        assert "file reader" in sources.dataset_name_problem(name)


# --- the engine refuses a crafted config before it reads anything -------------------------------------------


@pytest.fixture
def tiny_bert_folder(tmp_path, topics) -> Path:
    """Another team's trained model: a saved tiny BERT in a folder whose relative name looks like a hub id."""
    loaded = load_model(ModelConfig(source="config", params=TINY_BERT), dataset=topics, role="student")
    return save_model(loaded, tmp_path / "team-a" / "model")


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every file the process opens through Python, and every transformers / datasets / safetensors load."""
    opened: list[str] = []
    real_open = builtins.open

    def spy_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    import datasets
    import transformers

    from workers.engine import cache, models

    def refuse(name):
        def called(*args, **kwargs):
            opened.append(f"{name}{args}")
            raise AssertionError(f"{name} was called")

        return called

    for cls in (
        transformers.AutoConfig,
        transformers.AutoTokenizer,
        transformers.AutoModel,
        transformers.AutoModelForSequenceClassification,
    ):
        monkeypatch.setattr(cls, "from_pretrained", refuse(f"{cls.__name__}.from_pretrained"))
    monkeypatch.setattr(datasets, "load_dataset", refuse("datasets.load_dataset"))
    monkeypatch.setattr(models, "load_file", refuse("safetensors.load_file"))
    monkeypatch.setattr(cache, "digest_path", refuse("digest_path"))
    return opened


def _run(tmp_path: Path, **overrides: Any) -> RunConfig:
    data: dict[str, Any] = {
        "student": {"source": "config", "params": TINY_BERT},
        "dataset": {"source": "builtin", "name": "bbc-news"},
        "terms": [{"name": "ce", "weight": 0.5}, {"name": "kd", "weight": 0.5}],
        "scheme": "offline",
        "train": {"max_steps": 2, "device": "cpu"},
        "output_dir": str(tmp_path / "out"),
    }
    data |= overrides
    return RunConfig.from_dict(data)


def _touched(opened: list[str], folder: Path) -> list[str]:
    return [
        p
        for p in opened
        if str(folder) in p
        or str(folder.resolve()) in p
        or "team-a" in p
        or p.startswith(("AutoConfig", "AutoTokenizer", "AutoModel", "datasets", "safetensors", "digest"))
    ]


def test_a_hub_id_that_names_a_local_model_folder_fails_the_run_and_reads_nothing(
    tmp_path, tiny_bert_folder, monkeypatch, reads
):
    monkeypatch.chdir(
        tmp_path
    )  # "team-a/model" is valid hub syntax and, here, an existing folder with a model
    for role in ("teacher", "student"):
        cfg = _run(tmp_path, **{role: {"source": "hf", "name": "team-a/model"}})
        with pytest.raises(
            ModelLoadError,
            match="'team-a/model' is not a hub id here: a file or folder of that name exists on the worker",
        ):
            train(cfg)
    assert _touched(reads, tiny_bert_folder) == []


@pytest.mark.parametrize("field", ["name", "tokenizer"])
def test_a_path_given_as_a_hub_id_fails_the_run_and_reads_nothing(tmp_path, tiny_bert_folder, reads, field):
    model = (
        {"source": "hf", "name": str(tiny_bert_folder)}
        if field == "name"
        else {"source": "config", "params": {**TINY_BERT, "tokenizer": "../" + str(tiny_bert_folder)}}
    )
    with pytest.raises(ModelLoadError, match="is not a hub id"):
        train(_run(tmp_path, teacher=model))
    assert _touched(reads, tiny_bert_folder) == []


def test_a_revision_that_is_a_path_fails_the_run(tmp_path, reads):
    with pytest.raises(ModelLoadError, match="its revision is not a hub revision"):
        train(_run(tmp_path, teacher={"source": "hf", "name": "gpt2", "revision": "../../../etc"}))


def test_a_hub_dataset_name_that_names_a_local_folder_fails_the_run_and_reads_nothing(
    tmp_path, monkeypatch, reads
):
    data = tmp_path / "team-a" / "uploads"
    data.mkdir(parents=True)
    (data / "train.csv").write_text("text,label\nsecret,1\n")
    monkeypatch.chdir(tmp_path)
    reads.clear()
    for name, message in (
        ("team-a/uploads", "not a hub id here"),
        (str(data), "is not a hub id"),
        ("csv", "file reader of the datasets package"),
    ):
        with pytest.raises(DataError, match=message):
            train(_run(tmp_path, dataset={"source": "hf", "name": name, "text_column": "text"}))
    assert not [p for p in reads if "train.csv" in p or "datasets" in p]


# --- local paths against the worker's roots ----------------------------------------------------------------


@pytest.fixture
def machine(tmp_path, tiny_bert_folder):
    """A worker's folders: a model root, a dataset root, and an artifact root with two teams' runs and
    uploads."""
    artifacts = tmp_path / "artifacts"
    for rel in ("runs/5/final", "runs/6/final", "datasets/1", "datasets/2"):
        (artifacts / rel).mkdir(parents=True)
    (artifacts / "datasets/1/secret.csv").write_text("text,label\na,1\nb,0\n")
    (artifacts / "datasets/2/mine.csv").write_text("text,label\na,1\nb,0\n")
    models, data = tmp_path / "models", tmp_path / "data"
    models.mkdir()
    data.mkdir()
    (models / "escape").symlink_to(tiny_bert_folder)
    (data / "escape.csv").symlink_to(artifacts / "datasets/1/secret.csv")
    # The model root covering the artifact root is a misconfiguration the engine must survive.
    allowed = AllowedPaths(
        model_roots=(str(models), str(artifacts)),
        dataset_roots=(str(data), str(artifacts)),
        run_outputs=(str(artifacts / "runs/5/final"),),
        artifact_root=str(artifacts),
        uploads=str(artifacts / "datasets/2"),
    )
    return {"artifacts": artifacts, "models": models, "data": data, "allowed": allowed}


def _checked(tmp_path: Path, machine: dict[str, Any], **overrides: Any) -> None:
    cfg = _run(tmp_path, **overrides)
    sources.check_run_sources(
        RunConfig.from_dict({**cfg.to_dict(), "allowed_paths": machine["allowed"].__dict__})
    )


def test_local_models_outside_the_workers_roots_are_refused(tmp_path, machine, tiny_bert_folder):
    artifacts = machine["artifacts"]
    refused = [
        {"source": "hf", "path": str(tiny_bert_folder)},  # outside every root
        {"source": "hf", "path": str(machine["models"] / "escape")},  # a symlink out of a root
        {"source": "hf", "path": str(artifacts / "runs/6/final")},  # a run's output, as a folder
        {"source": "hf", "path": str(machine["models"] / ".." / "team-a" / "model")},  # .. out of a root
        {"source": "run", "path": str(artifacts / "runs/6/final")},  # another team's run
        {"source": "run", "path": str(artifacts / "datasets/1")},
        {"source": "config", "params": {**TINY_BERT, "tokenizer": str(tiny_bert_folder)}},
        {
            "source": "derived",
            "params": {"layers": "all"},
            "parent": {"source": "run", "path": str(artifacts / "runs/6/final")},
        },
    ]
    for model in refused:
        with pytest.raises(
            ModelLoadError, match="is outside the folders this worker may read models from"
        ) as exc:
            _checked(tmp_path, machine, teacher=model)
        assert str(tmp_path) not in str(exc.value)
    _checked(tmp_path, machine, teacher={"source": "run", "path": str(artifacts / "runs/5/final")})


def test_local_dataset_files_outside_the_workers_roots_are_refused(tmp_path, machine):
    artifacts, data = machine["artifacts"], machine["data"]
    for path in (
        artifacts / "datasets/1/secret.csv",
        data / "escape.csv",
        artifacts / "runs/5/final",
        data / ".." / "artifacts" / "datasets" / "1" / "secret.csv",
    ):
        with pytest.raises(
            DataError, match="is outside the folders this worker may read datasets from"
        ) as exc:
            _checked(tmp_path, machine, dataset={"source": "hf", "path": str(path)})
        assert str(tmp_path) not in str(exc.value)
    with pytest.raises(DataError, match="outside the folders"):
        _checked(
            tmp_path,
            machine,
            dataset={
                "source": "hf",
                "path": str(artifacts / "datasets/2/mine.csv"),
                "eval_path": str(artifacts / "datasets/1/secret.csv"),
            },
        )
    _checked(tmp_path, machine, dataset={"source": "hf", "path": str(artifacts / "datasets/2/mine.csv")})


# --- messages ---------------------------------------------------------------------------------------------


def test_a_run_model_whose_folder_was_deleted_says_so_even_for_tabular_data(tmp_path, digits, topics):
    gone = ModelConfig(source="run", path=str(tmp_path / "artifacts" / "runs" / "7" / "final"))
    for dataset, task in ((digits, None), (topics, None), (topics, "causal_lm")):
        with pytest.raises(ModelLoadError) as exc:
            load_model(gone, dataset=dataset, role="teacher", task=task)
        assert "the model folder of run 7 no longer exists" in str(exc.value)
        assert "needs text" not in str(exc.value) and str(tmp_path) not in str(exc.value)


def test_model_descriptions_and_redacted_messages_name_no_absolute_path(tmp_path):
    assert ModelConfig(source="run", path=str(tmp_path / "runs/12/final-a2")).describe() == "run 12"
    assert ModelConfig(source="hf", path=str(tmp_path / "MiniLM")).describe() == "MiniLM"
    text = (
        f"{tmp_path}/artifacts/runs/3/final is gone; see /usr/lib/python3/site-packages/x.py, "
        "https://huggingface.co/org/name and org/name, 1/2 of it"
    )
    shown = sources.redact_paths(text, [("ARTIFACT_ROOT", tmp_path / "artifacts")])
    assert shown == (
        "ARTIFACT_ROOT/runs/3/final is gone; see …/x.py, https://huggingface.co/org/name and "
        "org/name, 1/2 of it"
    )
    assert not re.search(r"(?<![\w:/])/(?:usr|tmp|srv|etc|home|root)\b", shown)


def test_the_allowed_paths_survive_the_json_round_trip(tmp_path):
    cfg = _run(
        tmp_path,
        allowed_paths={
            "model_roots": ["/m"],
            "dataset_roots": [],
            "run_outputs": ["/a/runs/1/final"],
            "artifact_root": "/a",
            "uploads": "/a/datasets/3",
        },
    )
    assert cfg.allowed_paths == AllowedPaths(
        model_roots=("/m",), run_outputs=("/a/runs/1/final",), artifact_root="/a", uploads="/a/datasets/3"
    )
    assert RunConfig.from_json(cfg.to_json()) == cfg == RunConfig.from_dict(cfg.to_dict())
    assert _run(tmp_path).allowed_paths is None
