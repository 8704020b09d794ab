"""The input rules read a value given as a value (a JSON list, an object) and the same value typed as text to
the same result, with the same messages."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from experiments.domain import fields, input_rules, sweeps


def _message(parse, value) -> str:
    with pytest.raises(ValidationError) as caught:
        parse(value)
    return " ".join(caught.value.messages)


@pytest.mark.parametrize(
    ("typed", "given"),
    [
        ("256, 128", [256, "128"]),
        ("", []),
    ],
)
def test_hidden_sizes_typed_and_listed_are_the_same(typed, given):
    rule = input_rules.MODEL_SPEC["hidden_sizes"]
    assert rule.from_text(typed) == rule.from_value(given) == fields.hidden_sizes(given)


@pytest.mark.parametrize("given", [[256.5], ["wide"], [0]])
def test_hidden_sizes_refused_alike(given):
    rule = input_rules.MODEL_SPEC["hidden_sizes"]
    typed = ",".join(str(v) for v in given)
    assert _message(rule.from_text, typed) == _message(rule.from_value, given)


def test_seeds_take_numbers_and_ranges():
    assert fields.seeds([0, "2-4"]) == fields.seeds_text("0, 2-4") == [0, 2, 3, 4]
    assert _message(fields.seeds, [1, 1]) == "Seeds must be different from each other."
    assert _message(fields.seeds, [-1]) == _message(fields.seeds_text, "-1")


def test_a_config_object_is_checked_as_typed_json():
    assert fields.model_config({"model_type": "bert"}) == fields.json_object_text('{"model_type": "bert"}')
    assert _message(fields.json_object_text, "[1]") == _message(fields.model_config, [1])


def test_a_swept_list_stays_a_list_of_the_typed_values():
    limit = 100
    assert sweeps.value_list([1e-4, "3e-4", "1e-3:1e-2:log2"], limit=limit) == sweeps.parse_values(
        "1e-4, 3e-4, 1e-3:1e-2:log2", limit=limit
    )
    with pytest.raises(sweeps.SweepError, match="not a whole number"):
        sweeps.value_list([2.5], kind=int, limit=limit)
    with pytest.raises(sweeps.SweepError, match="Give numbers, not true/false"):
        sweeps.value_list([True], limit=limit)
    with pytest.raises(sweeps.SweepError, match="one value or range per list item"):
        sweeps.value_list(["1, 2"], limit=limit)


def test_term_sweeps_given_as_values_match_the_typed_lines():
    typed = sweeps.parse_term_sweeps("kd.temperature = 2, 8\ntopk.tail = true, false", limit=100)
    given = sweeps.term_sweeps_value(
        {"kd.temperature": [2, 8], "topk.tail": [True, False]}, cap=2000, limit=100
    )
    lines = sweeps.term_sweeps_value(
        ["kd.temperature = 2, 8", {"param": "topk.tail", "values": "true, false"}], cap=2000, limit=100
    )
    assert typed == given == lines == {"kd.temperature": [2.0, 8.0], "topk.tail": [True, False]}


def test_term_sweep_errors_name_the_line_as_typed():
    with pytest.raises(sweeps.SweepError) as typed:
        sweeps.parse_term_sweeps("kd.temperature = 2, 2", limit=100)
    with pytest.raises(sweeps.SweepError) as given:
        sweeps.term_sweeps_value({"kd.temperature": [2, 2]}, cap=2000, limit=100)
    assert str(typed.value) == str(given.value)


def test_service_errors_go_to_their_fields_or_the_whole_input():
    exc = ValidationError({"config": ["Too wide."], "hub_id": ["Unknown."], "__all__": ["Taken."]})
    targets = fields.service_error_targets(exc, {"hidden_sizes", "name"}, {"config": "hidden_sizes"})
    assert targets == [("hidden_sizes", "Too wide."), (None, "Hub id: Unknown."), (None, "Taken.")]


def test_leaderboard_rules_check_the_budget():
    rules = input_rules.LEADERBOARD_QUERY
    assert rules["max_params"].clean("1000") == 1000
    assert _message(rules["max_params"].clean, "0") == "Ensure this value is greater than or equal to 1."
    assert _message(rules["scope"].clean, "world").startswith("Select a valid choice.")


def test_values_of_the_wrong_shape_are_refused_before_any_check():
    rules = input_rules.EXPERIMENT
    assert fields.value_shape_problem(rules["seeds"], [0, [1]]) == "Give a list of numbers or names."
    assert fields.value_shape_problem(rules["students"], [{"id": 1}]) == "Give a list of ids."
    assert fields.value_shape_problem(rules["vary_labelled_subset"], "yes") == "Enter true or false."
    assert fields.value_shape_problem(rules["name"], True) == "Give a number or text, not true/false."
    assert fields.value_shape_problem(rules["lr"], {"a": 1}) == fields.SWEEP_SHAPE
    assert fields.value_shape_problem(rules["lr"], [1e-4, "1e-3:1e-2:log3"]) is None  # read by the parser
    assert fields.name_problem("<b>run</b>") == "Names cannot contain < or > or control characters."


def test_cleaned_values_read_lists_as_values_and_run_the_checks_across_fields():
    cleaned = fields.CleanedValues(
        input_rules.MODEL_SPEC,
        {
            "name": "mlp",
            "source": "builtin",
            "builtin_arch": "mlp",
            "hidden_sizes": [64, 32],
            "num_labels": 3,
        },
        context={"team": {"queryset": None}},
        checks=input_rules.model_spec_checks,
    )
    assert cleaned.data["hidden_sizes"] == [64, 32] and cleaned.data["task"] == "classification"
    assert set(cleaned.errors) == {"team"}
