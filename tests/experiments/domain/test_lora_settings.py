"""LoRA as training settings (experiments.domain.validation, engine_config, input_rules): bounds, the target
modules, students that take no adapter, the frozen config and sweeps of the rank."""

from unittest import mock

import pytest
from django.core.exceptions import ValidationError

from experiments.domain import fields, input_rules, sweep_plan
from experiments.domain.validation import clean_train
from experiments.services import launch
from workers.engine.config import TrainConfig

DISPATCH = "experiments.services.dispatch._dispatch"
TARGETS_MESSAGE = "Give module names separated by commas (e.g. q_proj,v_proj), at most 32."
LLAMA = {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 2, "intermediate_size": 32, "vocab_size": 160, "max_position_embeddings": 64}


def _errors(train):
    with pytest.raises(ValidationError) as exc:
        clean_train(train)
    return exc.value.message_dict


def test_lora_is_off_by_default_with_alpha_16_and_no_dropout():
    cleaned = clean_train({})

    assert [cleaned[k] for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_4bit")] == \
        [0, 16.0, 0.0, "", False]
    TrainConfig(**{k: v for k, v in cleaned.items() if k != "labelled_fraction"})  # the engine takes them


def test_lora_settings_within_bounds_are_kept():
    cleaned = clean_train({"lora_r": 256, "lora_alpha": 32, "lora_dropout": 0.05,
                           "lora_targets": " q_proj, v_proj ,q_proj", "lora_4bit": True})

    assert (cleaned["lora_r"], cleaned["lora_alpha"], cleaned["lora_dropout"]) == (256, 32.0, 0.05)
    assert cleaned["lora_targets"] == "q_proj,v_proj" and cleaned["lora_4bit"] is True
    assert clean_train({"lora_targets": ["gate_proj", "up_proj"]})["lora_targets"] == "gate_proj,up_proj"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lora_r", -1, "Must be between 0 and 256."),
    ("lora_r", 257, "Must be between 0 and 256."),
    ("lora_r", 2.5, "Enter a whole number."),
    ("lora_alpha", 0, "Must be between 0.001 and 10000."),
    ("lora_dropout", 1.0, "Must be between 0 and 0.99."),
    ("lora_dropout", -0.1, "Must be between 0 and 0.99."),
    ("lora_4bit", "yes", "Give true or false, or both as a list [false, true] (a sweep)."),
    ("lora_targets", "q_proj; rm -rf", TARGETS_MESSAGE),
    ("lora_targets", 5, TARGETS_MESSAGE),
])
def test_bad_lora_values_are_refused_on_their_field(key, value, message):
    assert _errors({key: value})[key] == [message]


def test_the_rank_sweeps_like_any_number():
    cleaned = clean_train({"lora_r": [8, 16]})

    assert cleaned["lora_r"] == [8, 16]
    assert sweep_plan.train_axes(cleaned)["lora_r"] == [8, 16]
    assert fields.train_sweep_text("lora_r", "8, 16") == [8, 16]


def test_the_input_rules_carry_the_lora_settings():
    data = {"lora_r": [8, 16], "lora_alpha": [32.0], "lora_targets": "q_proj,v_proj", "lora_4bit": False}

    assert input_rules.experiment_train_settings(data) == {
        "lora_r": [8, 16], "lora_alpha": 32.0, "lora_targets": "q_proj,v_proj", "lora_4bit": False}
    assert fields.choice_sweep_text("lora_4bit", "on") is True


@pytest.mark.django_db
def test_an_mlp_student_with_an_adapter_is_refused_on_lora_r(digits_setup, team):
    with pytest.raises(ValidationError) as exc:
        launch.experiment_validate(
            team=team, dataset=digits_setup["dataset"], teacher=digits_setup["teacher"],
            students=digits_setup["students"][:1], recipes=[digits_setup["recipe"]], seeds=[0],
            train={"lora_r": 8},
        )
    errors = exc.value.message_dict
    assert list(errors) == ["lora_r"]
    assert "builtin nets (mlp)" in errors["lora_r"][0] and "set 0" in errors["lora_r"][0]


@pytest.mark.django_db
def test_a_sweep_of_the_rank_freezes_each_value_in_its_runs(team, user):
    from tests.factories import DatasetSpecFactory, ModelSpecFactory, RecipeFactory

    corpus = DatasetSpecFactory(team=team, name="corpus", task="causal_lm", num_labels=0,
                                builtin_name="fortunes")
    student = ModelSpecFactory(team=team, name="tiny-llama", source="config", builtin_arch="", config=LLAMA,
                               task="causal_lm", num_labels=0)
    recipe = RecipeFactory(team=team, name="ce", scheme="hard_labels", terms=[{"name": "ce", "weight": 1.0}])
    with mock.patch(DISPATCH):
        experiment = launch.experiment_create(
            team=team, created_by=user, name="lora", dataset=corpus, teacher=None, students=[student],
            recipes=[recipe], seeds=[0],
            train={"max_steps": 10, "batch_size": 8, "lora_r": [8, 16], "lora_targets": "q_proj,v_proj"},
        )

    runs = list(experiment.runs.all())
    assert sorted(r.config["train"]["lora_r"] for r in runs) == [8, 16]
    for run in runs:
        train = run.config["train"]
        lora = (train["lora_alpha"], train["lora_targets"], train["lora_4bit"])
        assert lora == (16.0, "q_proj,v_proj", False)
        assert TrainConfig(**train).lora_r in (8, 16)  # the engine's own dataclass takes every key
