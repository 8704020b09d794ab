"""A run's resources as training settings (experiments.domain.validation, engine_config, fields): bounds,
the batch split over the ranks, the frozen config, sweeps of the choices, and the run page's summary."""

from unittest import mock

import pytest
from django.core.exceptions import ValidationError

from experiments.domain import engine_config, fields, input_rules, sweep_plan
from experiments.domain.validation import MULTI_HOST_MESSAGE, clean_train
from experiments.models import Experiment
from experiments.services import launch
from workers.engine.config import TrainConfig

DISPATCH = "experiments.services.dispatch._dispatch"


def _errors(train):
    with pytest.raises(ValidationError) as exc:
        clean_train(train)
    return exc.value.message_dict


# --- bounds and choices -------------------------------------------------------------------------------------
def test_the_resources_default_to_one_rank_auto_strategy_and_precision():
    cleaned = clean_train({})

    keys = ("gpus", "processes", "strategy", "precision", "activation_checkpointing")
    assert [cleaned[k] for k in keys] == [1, 1, "auto", "auto", False]


def test_resources_within_bounds_are_kept():
    cleaned = clean_train({"gpus": 4, "processes": 2, "strategy": "ddp", "precision": "fp32",
                           "activation_checkpointing": True, "batch_size": 64})

    assert (cleaned["gpus"], cleaned["processes"], cleaned["strategy"], cleaned["precision"]) == \
        (4, 2, "ddp", "fp32")
    assert cleaned["activation_checkpointing"] is True


def test_more_than_eight_gpus_is_refused_as_a_multi_host_run():
    assert _errors({"gpus": 16})["gpus"] == [MULTI_HOST_MESSAGE]
    assert "multi-host runs are not supported yet" in MULTI_HOST_MESSAGE


@pytest.mark.parametrize("value", [0, 9])
def test_processes_outside_one_to_eight_are_refused(value):
    assert _errors({"processes": value})["processes"] == ["Must be between 1 and 8."]


def test_zero_gpus_is_refused():
    assert _errors({"gpus": 0})["gpus"] == ["Must be between 1 and 8."]


@pytest.mark.parametrize(("key", "value", "message"), [
    ("strategy", "zero3", "Choose one of: auto, ddp, fsdp (or a list of them, a sweep)."),
    ("precision", "fp16", "Choose one of: auto, bf16, fp32 (or a list of them, a sweep)."),
    ("activation_checkpointing", "yes", "Give true or false, or both as a list [false, true] (a sweep)."),
    ("activation_checkpointing", 1, "Give true or false, or both as a list [false, true] (a sweep)."),
])
def test_unknown_choices_are_refused_on_their_field(key, value, message):
    assert _errors({key: value})[key] == [message]


def test_strategy_with_a_single_rank_is_allowed():
    # One rank trains as one process whatever the strategy: a sweep over gpus [1, 2, 4] keeps one strategy.
    assert clean_train({"strategy": "fsdp", "gpus": 1})["strategy"] == "fsdp"
    assert clean_train({"strategy": "ddp", "gpus": [1, 2, 4], "batch_size": 64})["gpus"] == [1, 2, 4]


# --- the batch split over the ranks -------------------------------------------------------------------------
def test_the_batch_must_divide_by_the_gpus():
    message = _errors({"gpus": 4, "batch_size": 30})["batch_size"][0]

    assert message == ("The batch is split evenly over the run's ranks: batch size 30 does not divide by "
                       "4 GPUs (one rank per GPU). Give a multiple of 4.")


def test_the_batch_must_divide_by_the_cpu_processes_too():
    # Whether a run on the auto device gets a GPU is known only when it is routed: both must divide.
    message = _errors({"gpus": 2, "processes": 3, "batch_size": 32})["batch_size"][0]

    assert "does not divide by 3 CPU processes" in message


def test_every_swept_batch_and_rank_count_must_divide():
    assert "batch size 12 does not divide by 8 GPUs" in _errors(
        {"gpus": [2, 8], "batch_size": [16, 12]})["batch_size"][0]
    assert clean_train({"gpus": [2, 4], "batch_size": [16, 32]})["gpus"] == [2, 4]


# --- sweeps -------------------------------------------------------------------------------------------------
def test_precision_and_strategy_sweep_as_lists_of_choices():
    cleaned = clean_train({"precision": ["bf16", "fp32"], "strategy": ["ddp", "fsdp"],
                           "activation_checkpointing": [False, True]})

    assert sweep_plan.train_axes(cleaned) == {
        "strategy": ["ddp", "fsdp"], "precision": ["bf16", "fp32"], "activation_checkpointing": [False, True]}
    assert sweep_plan.grid_size(sweep_plan.train_axes(cleaned)) == 8


def test_a_repeated_swept_choice_is_refused():
    assert _errors({"precision": ["bf16", "bf16"]})["precision"] == ["Each swept value may appear once."]


@pytest.mark.parametrize(("text", "value"), [
    ("fsdp", "fsdp"), ("DDP, fsdp", ["ddp", "fsdp"]), (["auto"], "auto"), (["ddp", "fsdp"], ["ddp", "fsdp"]),
])
def test_the_strategy_text_reads_one_choice_or_a_sweep(text, value):
    assert fields.choice_sweep_text("strategy", text) == value


@pytest.mark.parametrize(("text", "value"), [("off", False), ("on", True), ("both", [False, True]),
                                             ("False", False), ("", None)])
def test_activation_checkpointing_reads_off_on_or_both(text, value):
    assert fields.choice_sweep_text("activation_checkpointing", text) == value


def test_the_gpus_field_gives_the_multi_host_message_for_text_and_values():
    with pytest.raises(ValidationError) as exc:
        fields.train_sweep_text("gpus", "4, 16")
    assert exc.value.messages == [MULTI_HOST_MESSAGE]
    with pytest.raises(ValidationError) as exc:
        fields.train_sweep_value("gpus", [12])
    assert exc.value.messages == [MULTI_HOST_MESSAGE]
    assert fields.train_sweep_text("gpus", "1:4:step1") == [1, 2, 3, 4]


def test_the_input_rules_put_the_resources_in_the_training_settings():
    data = {"gpus": [4], "processes": [], "strategy": ["ddp", "fsdp"], "precision": "bf16",
            "activation_checkpointing": False}

    assert input_rules.experiment_train_settings(data) == {
        "gpus": 4, "strategy": ["ddp", "fsdp"], "precision": "bf16", "activation_checkpointing": False}


# --- the frozen config --------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_the_frozen_config_holds_the_resources_like_lr(digits_setup, team, user):
    with mock.patch(DISPATCH):
        experiment = launch.experiment_create(
            team=team, created_by=user, name="ddp", dataset=digits_setup["dataset"],
            teacher=digits_setup["teacher"], students=digits_setup["students"][:1],
            recipes=[digits_setup["recipe"]], seeds=[0],
            train={"max_steps": 10, "batch_size": 32, "gpus": 4, "processes": 2, "strategy": "ddp",
                   "precision": "bf16", "activation_checkpointing": True},
        )

    for run in experiment.runs.all():
        train = run.config["train"]
        resources = (train["gpus"], train["processes"], train["strategy"], train["precision"])
        assert resources == (4, 2, "ddp", "bf16")
        assert train["activation_checkpointing"] is True
        engine = TrainConfig(**train)  # the engine's own dataclass takes every key
        assert (engine.gpus, engine.strategy) == (4, "ddp")


@pytest.mark.django_db
def test_a_config_without_resources_gets_the_defaults(digits_setup):
    experiment = Experiment(dataset=digits_setup["dataset"], train={"max_steps": 5})
    config = engine_config.build_run_config(experiment=experiment, student=digits_setup["students"][0],
                                            recipe=None, seed=0, teacher=None)

    assert {k: config["train"][k] for k in ("gpus", "processes", "strategy", "precision")} == \
        {"gpus": 1, "processes": 1, "strategy": "auto", "precision": "auto"}
    assert config["train"]["activation_checkpointing"] is False


@pytest.mark.django_db
def test_a_sweep_of_precision_and_strategy_creates_a_run_per_point(digits_setup, team, user):
    with mock.patch(DISPATCH):
        experiment = launch.experiment_create(
            team=team, created_by=user, name="precisions", dataset=digits_setup["dataset"],
            teacher=digits_setup["teacher"], students=digits_setup["students"][:1],
            recipes=[digits_setup["recipe"]], seeds=[0],
            train={"max_steps": 10, "precision": ["bf16", "fp32"], "strategy": ["ddp", "fsdp"]},
        )

    points = {(r.config["train"]["precision"], r.config["train"]["strategy"]) for r in experiment.runs.all()}
    assert points == {("bf16", "ddp"), ("bf16", "fsdp"), ("fp32", "ddp"), ("fp32", "fsdp")}
    assert experiment.runs.count() == 4 * 2  # kd + baseline at each point


# --- the run page's summary ---------------------------------------------------------------------------------
def test_run_resources_resolve_auto_where_the_queue_says():
    config = {"train": {"gpus": 4, "processes": 2, "strategy": "auto", "precision": "auto"}}

    on_gpu = engine_config.run_resources(config, on_gpu=True)
    assert on_gpu == {"world_size": "4 (4 GPUs)", "strategy": "fsdp (auto)",
                      "precision": "auto (bf16 on its GPU)", "activation_checkpointing": "off"}
    on_cpu = engine_config.run_resources(config, on_gpu=False)
    assert on_cpu["world_size"] == "2 (2 CPU processes)" and on_cpu["precision"] == "auto (fp32 on a CPU)"
    unknown = engine_config.run_resources(config, on_gpu=None)
    assert unknown["world_size"] == "4 on GPUs (4 GPUs), 2 on a CPU (2 CPU processes)"


def test_run_resources_of_an_old_config_read_as_one_rank():
    resources = engine_config.run_resources({"train": {"max_steps": 5}}, on_gpu=None)

    assert resources["world_size"] == "1"
    assert resources["strategy"] == "auto: one rank, trained as a single process"
