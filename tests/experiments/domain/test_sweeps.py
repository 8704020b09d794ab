"""Sweeps: the value syntax, the grid and its count, experiments created from a sweep, and bad sweep input."""

import time
from unittest import mock

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from experiments import forms
from experiments.domain import sweep_plan, sweeps
from experiments.models import Experiment, Recipe, Run
from experiments.services import launch
from tests.factories import DatasetSpecFactory, RecipeFactory

DISPATCH = "experiments.services.dispatch._dispatch"


# --- the value syntax -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "kind", "values"),
    [
        ("3e-4", float, [3e-4]),
        ("1e-4, 3e-4, 1e-3", float, [1e-4, 3e-4, 1e-3]),
        ("1e-4:1e-3:log4", float, [1e-4, 0.000215443, 0.000464159, 1e-3]),
        ("0.1:0.9:lin5", float, [0.1, 0.3, 0.5, 0.7, 0.9]),
        ("0.1:0.9:step0.2", float, [0.1, 0.3, 0.5, 0.7, 0.9]),
        ("2:8:step2", int, [2, 4, 6, 8]),
        ("2:9:step2", int, [2, 4, 6, 8]),
        ("16:128:log4", int, [16, 32, 64, 128]),
        (" 1e-4 , 5e-4:1e-3:LIN2 ", float, [1e-4, 5e-4, 1e-3]),
        ("1e3", int, [1000]),
    ],
)
def test_parse_values_reads_lists_and_ranges(text, kind, values):
    assert sweeps.parse_values(text, kind=kind, limit=200) == pytest.approx(values)


def test_int_values_come_back_as_ints():
    assert all(type(v) is int for v in sweeps.parse_values("16:128:log4, 7", kind=int, limit=200))


@pytest.mark.parametrize(
    ("text", "kind", "message"),
    [
        ("fast", float, '"fast" is not a number'),
        ("nan", float, "is not a number"),
        ("inf", float, "is not a number"),
        ("1e400", float, "too large"),
        ("1,,2", float, "single commas"),
        ("1:2", float, "is not a range"),
        ("1:2:log", float, "is not a range"),
        ("1:2:cube3", float, "is not a range"),
        ("5:1:lin3", float, "start must be smaller"),
        ("0:1:log3", float, "log range starts above 0"),
        ("1:2:lin1", float, "2 or more"),
        ("1:2:lin2.5", float, "2 or more"),
        ("1:2:step0", float, "step must be above 0"),
        ("1, 1.0", float, "appears more than once"),
        ("1.5", int, "not a whole number"),
        ("1:4:step0.5", int, "whole numbers"),
        ("1:3:log6", int, "repeats values"),
        ("", float, "Enter a value"),
        ("<script>alert(1)</script>", float, "is not a number"),
        ("../../etc/passwd", float, "is not a number"),
    ],
)
def test_parse_values_refuses_bad_syntax_with_a_message(text, kind, message):
    with pytest.raises(sweeps.SweepError, match=message.replace("(", r"\(")):
        sweeps.parse_values(text, kind=kind, limit=200)


@pytest.mark.parametrize(
    "text", ["1:1e9:step1", "1e-8:1:log1000000000", "0:1e300:step1e-300", "1:2:lin1e300"]
)
def test_huge_ranges_are_refused_by_their_count_without_expanding_them(text):
    started = time.perf_counter()
    with pytest.raises(sweeps.SweepError, match="at most 200 fit in one experiment"):
        sweeps.parse_values(text, limit=200)
    assert time.perf_counter() - started < 0.5  # expanding a billion values would take minutes


def test_bounds_are_checked_on_a_ranges_ends():
    with pytest.raises(sweeps.SweepError, match="less than or equal to 1"):
        sweeps.parse_values("0.5:2:lin3", lo=0, hi=1, limit=200)
    with pytest.raises(sweeps.SweepError, match="greater than or equal to 1"):
        sweeps.parse_values("0, 4", kind=int, lo=1, hi=10, limit=200)
    assert sweeps.parse_values("1:10:lin10", kind=int, lo=1, hi=10, limit=200) == list(range(1, 11))


def test_the_limit_counts_list_items_too():
    with pytest.raises(sweeps.SweepError, match="This gives 201 values"):
        sweeps.parse_values(",".join(str(i) for i in range(201)), kind=int, limit=200)


# --- recipe term sweeps ---------------------------------------------------------------------------
def test_term_sweeps_are_read_one_per_line_in_the_engines_types():
    axes = sweeps.parse_term_sweeps(
        "kd.temperature = 2, 4, 8\n\n# comment\nKD.Weight=0.5:0.9:lin3\ntopk.k = 8:64:log4\n"
        "topk.divergence = kd, jsd\ntaid.adaptive = true, false\njsd.beta = 0.1:0.9:step0.4",
        limit=200,
    )

    assert axes == {
        "kd.temperature": [2.0, 4.0, 8.0],
        "kd.weight": [0.5, 0.7, 0.9],
        "topk.k": [8, 16, 32, 64],
        "topk.divergence": ["kd", "jsd"],
        "taid.adaptive": [True, False],
        "jsd.beta": [0.1, 0.5, 0.9],
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kd.temperature", "write TERM.PARAM = values"),
        ("temperature = 2", "write TERM.PARAM = values"),
        ("foo.x = 1", "there is no loss term foo"),
        ("kd.temp = 2", "kd has no parameter temp"),
        ("kd.temperature = 0, 2", "must be > 0"),
        ("kd.temperature = hot", "is not a number"),
        ("kd.weight = -1", "greater than or equal to 0"),
        ("topk.divergence = kd, cosine", "not one of"),
        ("hidden_mse.layer_map = 1", "cannot be swept"),
        ("kd.temperature = 2\nkd.temperature = 4", "swept twice"),
        ("kd.temperature = 1:1e9:step1", "1,000,000,000 values"),
        ("\n".join(f"kd.temperature = {i + 1}" for i in range(21)), "At most 20"),
        ("<img src=x onerror=alert(1)>.x = 1", "write TERM.PARAM"),
    ],
)
def test_bad_term_sweeps_name_the_line_at_fault(text, message):
    with pytest.raises(sweeps.SweepError, match=message):
        sweeps.parse_term_sweeps(text, limit=200)


def test_apply_term_values_sets_params_and_weights_on_a_copy():
    terms = [
        {"name": "ce", "weight": 0.1, "params": {}},
        {
            "name": "kd",
            "weight": 0.9,
            "params": {"temperature": 4.0},
            "schedule": {"weight": {"kind": "linear", "start": 0.9, "end": 0.1}},
        },
    ]

    swept = sweeps.apply_term_values(terms, {"kd.temperature": 2.0, "kd.weight": 0.5})

    assert swept[1]["params"] == {"temperature": 2.0} and swept[1]["weight"] == 0.5
    assert swept[1]["schedule"]["weight"]["start"] == 0.5  # a scheduled weight starts at the swept value
    assert terms[1]["params"] == {"temperature": 4.0} and terms[1]["schedule"]["weight"]["start"] == 0.9


# --- labels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "text"),
    [
        (3e-4, "3e-4"),
        (1e-3, "1e-3"),
        (4.0, "4"),
        (0.25, "0.25"),
        (0.000215443, "2.154e-4"),
        (64, "64"),
        (2.5e7, "2.5e7"),
        ("jsd", "jsd"),
        (True, "true"),
    ],
)
def test_format_number_is_short(value, text):
    assert sweeps.format_number(value) == text


def test_run_label_shows_the_swept_values_of_a_config():
    train = {"lr": [1e-4, 3e-4], "max_steps": 100, "term_sweeps": {"kd.temperature": [2.0, 4.0]}}
    config = {
        "train": {"lr": 3e-4, "max_steps": 100},
        "terms": [{"name": "kd", "weight": 1.0, "params": {"temperature": 4.0}}],
    }

    assert sweep_plan.run_label(train=train, config=config) == "lr=3e-4 τ=4"
    assert sweep_plan.run_label(train={"lr": 1e-3}, config=config) == ""
    # A baseline has no kd term: only the training settings show.
    assert sweep_plan.run_label(train=train, config={"train": {"lr": 1e-4}, "terms": []}) == "lr=1e-4"


def test_axis_labels_disambiguate_a_parameter_swept_in_two_terms():
    axes = ["kd.temperature", "jsd.temperature", "jsd.beta", "kd.weight"]
    assert [sweep_plan.axis_label(a, axes) for a in axes] == ["kd.τ", "jsd.τ", "β", "w_kd"]


# --- the grid and its count -----------------------------------------------------------------------
def _recipe(team, name, scheme=Recipe.Scheme.OFFLINE, terms=None, **extra):
    return RecipeFactory(
        team=team,
        name=name,
        scheme=scheme,
        terms=terms
        or [
            {"name": "ce", "weight": 0.1, "params": {}},
            {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}},
        ],
        **extra,
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("train", "term_sweeps", "expected"),
    [
        ({}, {}, 2 * 2 * (1 + 1 + 2 + 3 + 1)),
        ({"lr": [1e-3, 3e-3]}, {}, 2 * 2 * 2 * (1 + 1 + 2 + 3 + 1)),
        # kd.temperature multiplies the recipes with a kd term only (kd, the assistant chain,
        # self-distillation); jsd.beta the jsd recipe only.
        (
            {"lr": [1e-3, 3e-3], "batch_size": [16, 32, 64]},
            {"kd.temperature": [2.0, 4.0], "jsd.beta": [0.2, 0.8]},
            2 * 2 * 6 * (2 + 2 + 2 * 2 + 3 * 2 + 1),
        ),
    ],
)
def test_count_runs_matches_the_plan_that_is_built(team, digits_setup, train, term_sweeps, expected):
    jsd = _recipe(team, "jsd", terms=[{"name": "jsd", "weight": 1.0, "params": {}}])
    assistant_chain = _recipe(team, "ta", scheme=Recipe.Scheme.TEACHER_ASSISTANT)
    born_again = _recipe(team, "sd", scheme=Recipe.Scheme.SELF_DISTILLATION, scheme_params={"generations": 3})
    recipes = [digits_setup["recipe"], jsd, assistant_chain, born_again]

    count = sweep_plan.count_runs(
        students=2, seeds=2, train=train, recipes=recipes, term_sweeps=term_sweeps, with_baseline=True
    )
    plan = launch.experiment_plan(
        team=team,
        students=digits_setup["students"],
        recipes=recipes,
        seeds=[0, 1],
        teacher=digits_setup["teacher"],
        assistant=digits_setup["teacher"],
        train_points=sweep_plan.grid_points(sweep_plan.train_axes(train)),
        term_sweeps=term_sweeps,
    )

    assert count.total == len(plan) == expected
    assert count.baselines == sum(p.is_baseline for p in plan)


def test_grid_points_vary_the_last_axis_fastest():
    assert sweep_plan.grid_points({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
    ]
    assert sweep_plan.grid_points({}) == [{}]
    assert sweep_plan.grid_size({"a": [1, 2, 3], "b": [1, 2]}) == 6


# --- experiments created from a sweep -------------------------------------------------------------
def _create(setup, team, user, **overrides):
    kwargs = {
        "team": team,
        "created_by": user,
        "name": "lr × τ",
        "dataset": setup["dataset"],
        "teacher": setup["teacher"],
        "students": setup["students"],
        "recipes": [setup["recipe"]],
        "seeds": [0],
        "train": {"max_steps": 30, "lr": [1e-3, 3e-3, 1e-2]},
        "term_sweeps": {"kd.temperature": [2.0, 8.0]},
    }
    return launch.experiment_create(**{**kwargs, **overrides})


@pytest.mark.django_db
def test_experiment_create_with_a_sweep_makes_one_run_per_point_with_concrete_values(
    digits_setup, team, user, django_capture_on_commit_callbacks
):
    with mock.patch(DISPATCH) as dispatch, django_capture_on_commit_callbacks(execute=True):
        experiment = _create(digits_setup, team, user)

    runs = list(experiment.runs.select_related("experiment"))
    # 2 students × 1 seed × 3 learning rates × (kd at 2 temperatures + the baseline)
    assert len(runs) == 2 * 3 * (2 + 1) == 18
    distilled = [r for r in runs if not r.is_baseline]
    points = {
        (r.student_id, r.config["train"]["lr"], r.config["terms"][1]["params"]["temperature"])
        for r in distilled
    }
    assert points == {
        (s.pk, lr, t) for s in digits_setup["students"] for lr in (1e-3, 3e-3, 1e-2) for t in (2.0, 8.0)
    }
    baselines = [r for r in runs if r.is_baseline]
    assert {(r.student_id, r.config["train"]["lr"]) for r in baselines} == {
        (s.pk, lr) for s in digits_setup["students"] for lr in (1e-3, 3e-3, 1e-2)
    }
    assert all(r.config["terms"] == [{"name": "ce", "weight": 1.0, "params": {}}] for r in baselines)
    # Every frozen config is concrete and loads in the engine; the records keep the sweep.
    from workers.engine.config import RunConfig

    assert all(RunConfig.from_dict(r.config).train.max_steps == 30 for r in runs)
    assert experiment.train["lr"] == [1e-3, 3e-3, 1e-2]
    assert experiment.train["term_sweeps"] == {"kd.temperature": [2.0, 8.0]}
    assert digits_setup["recipe"].terms[1]["params"]["temperature"] == 4.0  # the recipe itself is unchanged
    assert dispatch.call_count == 18
    labels = {sweep_plan.run_label(train=experiment.train, config=r.config) for r in distilled}
    assert "lr=3e-3 τ=8" in labels and len(labels) == 6


@pytest.mark.django_db
def test_a_swept_max_steps_sets_each_runs_total_steps(digits_setup, team, user):
    with mock.patch(DISPATCH):
        experiment = _create(
            digits_setup,
            team,
            user,
            students=digits_setup["students"][:1],
            train={"max_steps": [20, 40]},
            term_sweeps={},
        )

    assert sorted(experiment.runs.values_list("total_steps", flat=True)) == [20, 20, 40, 40]
    assert all(r.total_steps == r.config["train"]["max_steps"] for r in experiment.runs.all())


@pytest.mark.django_db
def test_a_sweep_over_the_run_limit_is_refused_with_the_count_on_the_swept_fields(
    digits_setup, team, user, settings
):
    settings.MAX_RUNS_PER_EXPERIMENT = 10
    with mock.patch(DISPATCH) as dispatch, pytest.raises(ValidationError) as exc:
        _create(digits_setup, team, user)

    errors = exc.value.message_dict
    assert "would create 18 runs; the limit is 10" in errors["lr"][0]
    assert "would create 18 runs" in errors["term_sweeps"][0]
    assert Experiment.objects.count() == 0 and Run.objects.count() == 0
    dispatch.assert_not_called()


@pytest.mark.django_db
def test_a_sweep_too_large_to_plan_is_refused_before_any_run_is_built(digits_setup, team, user):
    # 200 values × 200 values × 2 students: 80,000 points, refused by arithmetic.
    train = {"lr": [1e-4 + i * 1e-6 for i in range(200)], "weight_decay": [i / 1000 for i in range(200)]}
    with (
        mock.patch("experiments.services.launch.experiment_plan") as plan,
        pytest.raises(ValidationError) as exc,
    ):
        _create(digits_setup, team, user, train=train, term_sweeps={})

    assert "would create 160,000 runs" in exc.value.message_dict["lr"][0]
    plan.assert_not_called()


@pytest.mark.django_db
def test_warmup_must_fit_the_shortest_swept_run(digits_setup, team, user):
    with pytest.raises(ValidationError) as exc:
        _create(digits_setup, team, user, train={"max_steps": [10, 100], "warmup_steps": 20}, term_sweeps={})

    assert "20 warm-up steps do not fit in a run of 10 steps" in exc.value.message_dict["warmup_steps"][0]


@pytest.mark.django_db
def test_a_term_sweep_needs_a_chosen_recipe_with_that_term(digits_setup, team, user):
    with pytest.raises(ValidationError) as exc:
        _create(digits_setup, team, user, term_sweeps={"jsd.beta": [0.1, 0.9]})

    assert "no chosen recipe has a jsd term" in exc.value.message_dict["term_sweeps"][0]


@pytest.mark.django_db
def test_a_term_sweep_is_checked_with_the_rest_of_the_recipe(digits_setup, team, user):
    taid = _recipe(team, "taid", terms=[{"name": "taid", "weight": 1.0, "params": {"t_end": 0.5}}])

    with pytest.raises(ValidationError) as exc:
        _create(digits_setup, team, user, recipes=[taid], term_sweeps={"taid.t_start": [0.2, 0.6]})

    message = exc.value.message_dict["term_sweeps"][0]
    assert "taid v1 with taid.t_start=0.6" in message and "t_end" in message
    assert not Experiment.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "train",
    [
        {"lr": ["fast", 1e-3]},
        {"lr": [1e-3, 1e-3]},
        {"lr": [1e-3, 5.0]},
        {"batch_size": [16, 2.5]},
        {"lr_schedule": ["linear", "cosine"]},
        {"lr": list(range(1, 300))},
    ],
)
def test_bad_swept_settings_are_field_errors_from_the_service(digits_setup, team, user, train):
    with pytest.raises(ValidationError) as exc:
        _create(digits_setup, team, user, train=train, term_sweeps={})

    assert set(exc.value.message_dict) == set(train)


# --- through the page -----------------------------------------------------------------------------
def _post(team, setup, **extra):
    data = {
        "team": team.pk,
        "name": "lr sweep",
        "dataset": setup["dataset"].pk,
        "teacher": setup["teacher"].pk,
        "students": [setup["students"][0].pk],
        "recipes": [setup["recipe"].pk],
        "seeds": "0",
        "max_steps": "20",
        "lr": "1e-3, 3e-3",
        "term_sweeps": "kd.temperature = 2:8:step2",
        "lr_schedule": "linear",
    }
    data.update(extra)
    return {k: v for k, v in data.items() if v is not None}


@pytest.mark.django_db
def test_the_form_parses_sweeps_into_service_kwargs(user, team, digits_setup):
    form = forms.ExperimentForm(_post(team, digits_setup, batch_size="16:64:log3"), user=user)

    assert form.is_valid(), form.errors
    kwargs = form.service_kwargs()
    assert kwargs["train"] == {
        "max_steps": 20,
        "lr": [1e-3, 3e-3],
        "batch_size": [16, 32, 64],
        "lr_schedule": "linear",
    }
    assert kwargs["term_sweeps"] == {"kd.temperature": [2.0, 4.0, 6.0, 8.0]}


@pytest.mark.django_db
def test_launching_a_sweep_from_the_page_creates_every_run(client_logged_in, team, digits_setup):
    with mock.patch(DISPATCH):
        response = client_logged_in.post(reverse("experiments:experiment_create"), _post(team, digits_setup))

    experiment = Experiment.objects.get()
    assert response.status_code == 302
    assert experiment.runs.count() == 2 * (4 + 1)  # 2 lr × (4 temperatures + baseline)
    page = client_logged_in.get(response.url)
    assert "created with 10 runs" in page.content.decode()
    # Each run of the table is tagged with its point of the sweep.
    labels = {run.pk: f"#{run.pk}<" for run in experiment.runs.all()}
    html = page.content.decode()
    assert all(marker in html for marker in labels.values())
    assert html.count('title="Swept values of this run"') == experiment.runs.count()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", "1e-8:1:step1e-9", "at most 200 fit"),
        ("lr", "2:3:lin3", "less than or equal to 1"),
        ("max_steps", "1:1e9:step1", "at most 200 fit"),
        ("lr", "1e400", "too large"),
        ("lr", "nan", "not a number"),
        ("lr", "1,,2", "single commas"),
        ("lr", "<script>alert(1)</script>", "not a number"),
        ("lr", "1" * 300, "at most 200 characters"),
        ("batch_size", "2.5", "whole number"),
        ("batch_size", "0:64:step16", "greater than or equal to 1"),
        ("term_sweeps", "kd.temperature = -1", "must be > 0"),
        ("term_sweeps", "../../etc/passwd = 1", "TERM.PARAM"),
        ("term_sweeps", "kd.temperature = 1\n" * 30, "At most 20"),
        ("term_sweeps", "kd.temperature = 1\nkd.temperature = 2", "swept twice"),
        ("term_sweeps", "x" * 3000, "at most 2000 characters"),
        ("seeds", "0-1000000000", "At most 20 seeds"),
    ],
)
def test_bad_sweeps_on_the_page_are_field_errors_and_create_nothing(
    client_logged_in, team, digits_setup, field, value, message
):
    started = time.perf_counter()
    response = client_logged_in.post(
        reverse("experiments:experiment_create"), _post(team, digits_setup, **{field: value})
    )

    assert response.status_code == 200
    assert message in " ".join(response.context["form"].errors[field])
    assert not Experiment.objects.exists()
    assert time.perf_counter() - started < 5


@pytest.mark.django_db
def test_the_run_limit_on_the_page_names_the_count(client_logged_in, team, digits_setup, settings):
    settings.MAX_RUNS_PER_EXPERIMENT = 6
    response = client_logged_in.post(reverse("experiments:experiment_create"), _post(team, digits_setup))

    assert "would create 10 runs; the limit is 6" in response.context["form"].errors["lr"][0]
    assert not Experiment.objects.exists()


@pytest.mark.django_db
def test_names_with_markup_are_stored_as_text_and_shown_escaped(client_logged_in, team, digits_setup):
    name = '<script>alert("x")</script> ../../etc/passwd'
    with mock.patch(DISPATCH):
        response = client_logged_in.post(
            reverse("experiments:experiment_create"), _post(team, digits_setup, name=name, term_sweeps="")
        )

    experiment = Experiment.objects.get()
    assert experiment.name == name
    html = client_logged_in.get(response.url).content.decode()
    assert "<script>alert(" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; ../../etc/passwd" in html


@pytest.mark.django_db
@pytest.mark.parametrize(
    "extra",
    [
        {"students": ["abc"]},
        {"students": ["../../1"]},
        {"dataset": "999999"},
        {"recipes": []},
        {"name": ""},
        {"name": "x" * 201},
        {"teacher": "<b>"},
        {"description": "d" * 6000},
        {"lr_schedule": "sawtooth"},
        {"seeds": ""},
        {"team": "0"},
    ],
)
def test_missing_wrong_and_oversized_fields_are_field_errors(client_logged_in, team, digits_setup, extra):
    response = client_logged_in.post(
        reverse("experiments:experiment_create"), {**_post(team, digits_setup), **extra}
    )

    assert response.status_code == 200
    assert set(extra) & set(response.context["form"].errors)
    assert not Experiment.objects.exists()


@pytest.mark.django_db
def test_an_embedding_dataset_has_no_baselines_in_the_count(team, user, digits_setup):
    dataset = DatasetSpecFactory(
        team=team, name="bbc", builtin_name="bbc-news", task="embedding", num_labels=0, label_names=[]
    )
    recipe = RecipeFactory(team=team, terms=[{"name": "embedding_mse", "weight": 1.0, "params": {}}])

    count = sweep_plan.count_runs(
        students=1,
        seeds=2,
        train={"lr": [1e-3, 1e-2]},
        recipes=[recipe],
        term_sweeps={},
        with_baseline=dataset.task != "embedding",
    )

    assert count.total == 4 and count.baselines == 0
