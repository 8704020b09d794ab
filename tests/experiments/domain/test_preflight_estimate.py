"""The pre-flight time estimate for students without run history, and the parameter counts it scales by."""

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from experiments.domain import model_size, preflight
from experiments.models import ModelSpec, Run
from tests.factories import DatasetSpecFactory, ExperimentFactory, ModelSpecFactory, RunFactory

pytestmark = pytest.mark.django_db


def _torch_params(hidden_sizes, *, input_width, num_labels):
    """The engine's own MLP, built and counted by torch: an independent check of the formula."""
    from workers.engine.models import MLP

    return sum(p.numel() for p in MLP(input_width, num_labels, hidden_sizes).parameters())


def _finished(student, dataset, *, steps, seconds):
    started = timezone.now() - timedelta(hours=1)
    return RunFactory(experiment=ExperimentFactory(team=student.team, dataset=dataset), student=student,
                      status=Run.Status.SUCCEEDED, total_steps=steps, step=steps, started_at=started,
                      finished_at=started + timedelta(seconds=seconds))


def _time(setup, students, **train):
    report = preflight.experiment_preflight(dataset=setup["dataset"], teacher=setup["teacher"],
                                            students=students, recipes=[setup["recipe"]], seeds=[0],
                                            train={"max_steps": 1000, **train})
    return next(c for c in report.checks if c.key == "time")


# --- parameter counts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden", [[16], [256, 128], [7, 7, 7]])
def test_a_builtin_mlp_on_a_dataset_has_the_count_torch_gives(team, hidden):
    digits = DatasetSpecFactory(team=team, builtin_name="digits")
    spec = ModelSpecFactory(team=team, config={"hidden_sizes": hidden}, num_labels=10)

    size = model_size.model_size(spec, dataset=digits)

    assert size.exact and size.low == _torch_params(hidden, input_width=64, num_labels=10)
    assert "64 features" in size.how


def test_without_a_dataset_an_mlp_counts_on_the_packaged_sets_with_its_classes(team):
    ten = ModelSpecFactory(team=team, config={"hidden_sizes": [32]}, num_labels=10)   # digits only
    three = ModelSpecFactory(team=team, config={"hidden_sizes": [32]}, num_labels=3)  # iris and wine
    seven = ModelSpecFactory(team=team, config={"hidden_sizes": [32]}, num_labels=7)  # no packaged set

    assert model_size.model_size(ten).low == _torch_params([32], input_width=64, num_labels=10)
    assert model_size.model_size(ten).exact
    spread = model_size.model_size(three)
    assert (spread.low, spread.high) == (_torch_params([32], input_width=4, num_labels=3),
                                         _torch_params([32], input_width=13, num_labels=3))
    assert "iris" in spread.how and "wine" in spread.how
    assert model_size.size_text(spread) == f"{spread.low}–{spread.high}"
    assert model_size.model_size(seven) is None and model_size.size_text(None) == "—"


def test_a_recorded_count_wins_and_an_unprepared_hub_model_has_none(team):
    recorded = ModelSpecFactory(team=team, param_count=22_700_000)
    hub = ModelSpecFactory(team=team, source=ModelSpec.Source.HF, builtin_arch="", hub_id="org/model",
                           config={}, num_labels=10)

    assert model_size.size_text(model_size.model_size(recorded)) == "22.7M"
    assert model_size.model_size(hub) is None


@pytest.mark.parametrize("name", sorted(model_size.PACKAGED_FEATURE_WIDTHS))
def test_the_packaged_feature_widths_and_classes_are_the_ones_the_engine_loads(name):
    from workers.engine.config import DatasetConfig
    from workers.engine.data import load_dataset

    loaded = load_dataset(DatasetConfig(source="builtin", name=name))

    assert loaded.input_dim == model_size.PACKAGED_FEATURE_WIDTHS[name]
    assert len(loaded.label_names) == model_size.PACKAGED_CLASSES[name]


# --- the estimate -------------------------------------------------------------------------------------------
def test_a_student_without_runs_is_extrapolated_by_parameter_count(digits_setup):
    measured, new = digits_setup["students"]                     # mlp-16 and mlp-32 on digits
    for seconds in (100, 200, 300):                              # median 0.2 s/step
        _finished(measured, digits_setup["dataset"], steps=1000, seconds=seconds)
    ratio = _torch_params([32], input_width=64, num_labels=10) / _torch_params([16], input_width=64,
                                                                               num_labels=10)

    check = _time(digits_setup, [measured, new])

    assert check.level == "ok"
    assert check.summary.endswith("Extrapolated by parameter count for mlp-32.")
    line = next(d for d in check.details if d.startswith("No similar runs yet for mlp-32"))
    assert f"~{0.2 * ratio:.3g} s/step extrapolated from mlp-16" in line
    # 2 runs each (kd + baseline) × 1000 steps: 0.2 s/step for one, 0.2 × ratio for the other.
    total = (0.2 + 0.2 * ratio) * 1000 * 2
    assert f"~{preflight.duration_text(total)} of training in all" in check.summary


def test_the_reference_may_be_a_student_of_another_experiment_on_the_dataset(digits_setup, team):
    elsewhere = ModelSpecFactory(team=team, name="mlp-64", config={"hidden_sizes": [64]})
    other_data = DatasetSpecFactory(team=team)
    _finished(elsewhere, digits_setup["dataset"], steps=1000, seconds=400)
    small = ModelSpecFactory(team=team, name="mlp-8", config={"hidden_sizes": [8]})
    _finished(small, other_data, steps=1000, seconds=5)          # another dataset: never a reference

    check = _time(digits_setup, digits_setup["students"])

    assert check.level == "ok"
    assert all("extrapolated from mlp-64" in d for d in check.details)
    assert "mlp-16, mlp-32" in check.summary


def test_the_nearest_reference_in_size_is_scaled():
    tiny, big = ModelSpec(pk=1, name="tiny"), ModelSpec(pk=2, name="big")
    references = [(tiny, 1_000, 0.01), (big, 1_000_000, 2.0)]

    near_big = preflight.extrapolated_step_time(params=500_000, references=references)
    near_tiny = preflight.extrapolated_step_time(params=3_000, references=references)

    assert near_big == (big, 1_000_000, pytest.approx(1.0))
    assert near_tiny == (tiny, 1_000, pytest.approx(0.03))
    assert preflight.extrapolated_step_time(params=10, references=[]) is None


def test_a_student_of_unknown_size_makes_the_estimate_partial_and_says_so(digits_setup, team):
    measured = digits_setup["students"][0]
    unknown = ModelSpecFactory(team=team, name="hub-net", source=ModelSpec.Source.HF, builtin_arch="",
                               hub_id="org/net", config={})
    _finished(measured, digits_setup["dataset"], steps=1000, seconds=200)

    check = _time(digits_setup, [measured, unknown])

    assert check.level == "notice"
    assert check.summary.startswith("Partial estimate, without hub-net: About ")
    assert any("hub-net" in d and "not counted in the total" in d for d in check.details)


def test_without_any_run_on_the_dataset_there_is_no_estimate(digits_setup, team):
    _finished(digits_setup["students"][0], DatasetSpecFactory(team=team), steps=1000, seconds=100)

    check = _time(digits_setup, digits_setup["students"])

    assert check.level == "unknown" and check.summary == "No similar runs yet."


def test_speeds_of_every_student_on_a_dataset_come_in_one_query(digits_setup, team,
                                                                django_assert_num_queries):
    a, b = digits_setup["students"]
    other = ModelSpecFactory(team=team)
    for student, seconds in ((a, 100), (b, 300), (other, 500)):
        _finished(student, digits_setup["dataset"], steps=1000, seconds=seconds)

    with django_assert_num_queries(1):
        speeds = preflight.similar_run_speeds(students=None, dataset=digits_setup["dataset"], min_steps=250,
                                              max_steps=4000)

    assert speeds == {a.pk: (pytest.approx(0.1), 1), b.pk: (pytest.approx(0.3), 1),
                      other.pk: (pytest.approx(0.5), 1)}


def test_a_derived_student_is_sized_from_its_parents_config_and_extrapolated(team):
    from experiments.services import records as records_writes
    from tests.factories import RecipeFactory

    bert = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
            "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 64}
    news = DatasetSpecFactory(team=team, name="news", builtin_name="bbc-news", num_labels=5,
                              label_names=["business", "entertainment", "politics", "sport", "tech"])
    parent = ModelSpecFactory(team=team, name="bert-4", source=ModelSpec.Source.CONFIG, builtin_arch="",
                              config=bert, num_labels=5, tokenizer_id="google-bert/bert-base-uncased")
    derived = records_writes.derived_student_preview(parent=parent, layers="every_other")   # unsaved
    _finished(parent, news, steps=1000, seconds=500)                                       # 0.5 s/step
    setup = {"dataset": news, "teacher": parent, "recipe": RecipeFactory(team=team)}

    check = _time(setup, [derived])

    assert check.level == "ok"
    line = next(d for d in check.details if d.startswith(f"No similar runs yet for {derived}"))
    seconds = float(re.search(r"~([\d.e-]+) s/step extrapolated from bert-4", line).group(1))
    counts = re.search(r"\(([\d,]+) vs ([\d,]+)\)", line).groups()
    params, parent_params = (int(n.replace(",", "")) for n in counts)
    # Half the layers: fewer parameters than the parent, so a proportionally shorter step.
    assert params < parent_params
    assert seconds == pytest.approx(0.5 * params / parent_params, rel=1e-2)
