"""A builtin MLP's exported bundle states its exact input preprocessing (feature order, scaling statistics or
the fixed divisor, label order) in the model card and in ``preprocessing.json``, exactly enough that plain
torch, outside distillweb, reproduces the run's predictions on the raw validation rows.

The students are trained for a few steps by the real engine on iris (z-scored with the train split's
statistics) and digits (pixels divided by 16), and recorded through ``run_finish`` as a worker records them.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from django.urls import reverse
from django.utils import timezone

from experiments.models import Artifact, Evaluation, Recipe, Run
from experiments.services import lifecycle
from tests.factories import DatasetSpecFactory, ExperimentFactory, ModelSpecFactory, RecipeFactory, RunFactory
from tests.waiting import scaled

pytestmark = pytest.mark.django_db

LABELS = {"iris": ["setosa", "versicolor", "virginica"], "digits": [str(i) for i in range(10)]}
SPLIT_SEED = 5

# Runs in a fresh interpreter with distillweb's packages made unimportable: only the card's own code, the
# bundle's files, torch, safetensors and the raw rows as scikit-learn ships them.
OUTSIDE = r'''
import json
import sys

for blocked in ("distillweb", "experiments", "workers", "tests"):
    sys.modules[blocked] = None  # an import of any of them now fails

CARD_CODE

from sklearn import datasets

task = json.load(open("task.json"))
bunch = getattr(datasets, "load_" + task["dataset"])()
rows = bunch.data[task["eval_rows"]]  # raw values, in scikit-learn's column order
inputs = prepare(rows)
with torch.no_grad():
    predicted = net(inputs).argmax(-1).tolist()
names = [str(n) for n in bunch.target_names]
truth = [names[t] for t in bunch.target[task["eval_rows"]]]
correct = sum(prep["label_names"][p] == t for p, t in zip(predicted, truth))
json.dump({"predicted": predicted, "correct": correct, "inputs": inputs.tolist(),
           "features": list(bunch.feature_names)}, open("outside.json", "w"))
'''


@pytest.fixture(scope="module", params=["iris", "digits"])
def trained(request, tmp_path_factory):
    """(dataset name, frozen config, TrainResult dict) of an MLP trained for a few steps on hard labels."""
    from workers.engine.config import RunConfig
    from workers.engine.trainer import train

    name = request.param
    config = {
        "student": {"source": "builtin", "name": "mlp", "params": {"hidden_sizes": [16]},
                    "num_labels": len(LABELS[name])},
        "teacher": None,
        "dataset": {"source": "builtin", "name": name, "split_seed": SPLIT_SEED},
        "terms": [{"name": "ce", "weight": 1.0, "params": {}}],
        "scheme": "hard_labels",
        "task": "classification",
        "train": {"max_steps": 25, "batch_size": 32, "lr": 1e-2, "log_every": 5, "eval_every": 1000,
                  "save_every": 1000, "seed": 0, "device": "cpu"},
    }
    result = train(RunConfig.from_dict({**config, "output_dir": str(tmp_path_factory.mktemp(f"{name}-run"))}))
    return name, config, result.to_dict()


@pytest.fixture
def exported(trained, team, client_logged_in, settings, tmp_path):
    """The run recorded as a worker records it, its bundle downloaded and unzipped: (run, dataset name, the
    engine's final folder, the unzipped folder)."""
    name, config, result = trained
    dataset = DatasetSpecFactory(team=team, name=name, builtin_name=name, num_labels=len(LABELS[name]),
                                 label_names=LABELS[name], split_seed=SPLIT_SEED)
    student = ModelSpecFactory(team=team, name="mlp-16", config={"hidden_sizes": [16]},
                               num_labels=len(LABELS[name]))
    recipe = RecipeFactory(team=team, name="hard_labels", scheme=Recipe.Scheme.HARD_LABELS,
                           terms=[{"name": "ce", "weight": 1.0, "params": {}}])
    run = RunFactory(experiment=ExperimentFactory(team=team, dataset=dataset), student=student, recipe=recipe,
                     is_baseline=True, config=config, total_steps=25)
    final = Path(settings.ARTIFACT_ROOT) / "runs" / str(run.pk) / "final"
    shutil.copytree(result["final_dir"], final)
    assert lifecycle.run_claim(run_id=run.pk, task_id=f"task-{run.pk}", worker_name="test-worker") is not None
    finished = {**result, "final_dir": str(final), "last_checkpoint": None, "teacher_cache": []}
    lifecycle.run_finish(run_id=run.pk, task_id=f"task-{run.pk}", result=finished)
    run.refresh_from_db()

    response = client_logged_in.get(reverse("experiments:run_model_download", kwargs={"run_id": run.pk}))
    assert response.status_code == 200
    zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))).extractall(tmp_path / "bundle")
    return run, name, final, tmp_path / "bundle" / f"mlp-16-run{run.pk}"


def _engine_view(name: str, final: Path):
    """The engine's own eval inputs, eval row indices into scikit-learn's rows, and the run's predictions."""
    import torch
    from sklearn import datasets as sk

    from workers.engine.config import DatasetConfig, ModelConfig
    from workers.engine.data import load_dataset
    from workers.engine.models import load_model
    from workers.engine.splits import stratified_split

    dataset = load_dataset(DatasetConfig(source="builtin", name=name, split_seed=SPLIT_SEED))
    model = load_model(ModelConfig(source="run", path=str(final)), dataset=dataset, role="teacher").model
    model.eval()
    with torch.no_grad():
        predicted = model(torch.as_tensor(dataset.eval.inputs)).argmax(-1).tolist()
    targets = getattr(sk, f"load_{name}")().target.astype(np.int64)
    _, eval_rows = stratified_split(targets, 0.2, seed=SPLIT_SEED)
    assert np.array_equal(targets[eval_rows], dataset.eval.labels)
    return dataset, eval_rows, predicted


def test_the_bundle_holds_the_engine_s_preprocessing_record(exported):
    run, name, final, bundle = exported

    record = json.loads((bundle / "preprocessing.json").read_text())

    assert record == json.loads((final / "preprocessing.json").read_text())
    assert record["dataset"] == name and record["label_names"] == LABELS[name]
    assert record["method"] == {"iris": "standardise", "digits": "scale"}[name]
    width = {"iris": 4, "digits": 64}[name]
    assert len(record["features"]) == len(record["mean"]) == len(record["std"]) == width
    if name == "digits":
        assert set(record["std"]) == {16.0} and set(record["mean"]) == {0.0}


def test_the_card_states_feature_order_statistics_and_label_order_exactly(exported):
    run, name, _, bundle = exported
    card = (bundle / "README.md").read_text()
    record = json.loads((bundle / "preprocessing.json").read_text())

    section = card.split("## Input preprocessing", 1)[1].split("## How to use", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (.+?) \| (\S+) \| (\S+) \|$", section, re.M)
    assert [int(r[0]) for r in rows] == list(range(len(record["features"])))
    assert [r[1] for r in rows] == record["features"]
    # The card's numbers read back as the very floats of the record.
    assert [float(r[2]) for r in rows] == record["mean"] and [float(r[3]) for r in rows] == record["std"]
    assert "float32((x - mean) / std)" in section and "float64" in section
    assert f"Raw rows as read from scikit-learn: sklearn.datasets.load_{name}().data." in section
    order = ", ".join(f"{i} = {n}" for i, n in enumerate(LABELS[name]))
    assert f"in this order: {order}." in section
    if name == "iris":
        assert "train split (" in section and "sepal length (cm)" in section
    else:
        assert "divided by a fixed number, not by data statistics: 16.0 for every feature" in section


def test_plain_torch_outside_distillweb_reproduces_the_run_s_predictions_on_raw_rows(exported):
    run, name, final, bundle = exported
    card = (bundle / "README.md").read_text()
    card_code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    dataset, eval_rows, engine_predicted = _engine_view(name, final)
    (bundle / "task.json").write_text(json.dumps({"dataset": name, "eval_rows": eval_rows.tolist()}))
    script = bundle / "outside.py"
    script.write_text(OUTSIDE.replace("CARD_CODE", card_code.replace(f'"./{bundle.name}"', '"."')))

    done = subprocess.run([sys.executable, "-I", str(script)], cwd=bundle, capture_output=True, text=True,
                          timeout=scaled(60))

    assert done.returncode == 0, done.stderr
    outside = json.loads((bundle / "outside.json").read_text())
    # The documented preprocessing of raw rows gives the engine's inputs bit for bit ...
    assert np.array_equal(np.asarray(outside["inputs"], dtype=np.float32), dataset.eval.inputs)
    # ... so every row gets the same prediction as the run's own model in the engine.
    assert outside["predicted"] == engine_predicted
    student = run.evaluations.get(role=Evaluation.Role.STUDENT)
    assert len(engine_predicted) == len(eval_rows) == len(dataset.eval)
    assert outside["correct"] / len(eval_rows) == pytest.approx(student.accuracy, abs=1e-6)


def test_a_bundle_saved_without_a_record_says_the_statistics_are_unknown(client_logged_in, team, settings,
                                                                        tmp_path):
    run = RunFactory(experiment=ExperimentFactory(team=team), status=Run.Status.SUCCEEDED, step=20,
                     total_steps=20, finished_at=timezone.now())
    folder = Path(settings.ARTIFACT_ROOT) / "runs" / str(run.pk) / "final"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "distillweb_model.json").write_text(json.dumps(
        {"format": "builtin", "arch": "mlp", "params": {"hidden_sizes": [4]}, "input_dim": 64,
         "num_labels": 10, "label_names": LABELS["digits"]}))
    Artifact.objects.create(run=run, kind=Artifact.Kind.MODEL, path=f"runs/{run.pk}/final")

    response = client_logged_in.get(reverse("experiments:run_model_download", kwargs={"run_id": run.pk}))
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    card = archive.read(next(n for n in archive.namelist() if n.endswith("README.md"))).decode()

    section = card.split("## Input preprocessing", 1)[1].split("## How to use", 1)[0]
    assert "saved without a record of its input preprocessing" in section
    assert "def prepare" not in card and "prepared as distillweb prepares them" in card
