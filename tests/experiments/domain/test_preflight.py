"""Pre-flight checks before launch: each check passing, warning and failing, and the check step of the
page."""

from datetime import timedelta
from unittest import mock

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse
from django.utils import timezone

from experiments.domain import preflight, sweeps, tokenizers
from experiments.models import Experiment, ModelSpec, Recipe, Run, Worker
from experiments.services import launch
from tests.factories import DatasetSpecFactory, ExperimentFactory, ModelSpecFactory, RecipeFactory, RunFactory

pytestmark = pytest.mark.django_db

DISPATCH = "experiments.services.dispatch._dispatch"
TINY_GPT2 = {
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "vocab_size": 500,
    "n_positions": 64,
}
# Far beyond any single GPU: ~740 billion parameters.
HUGE_LLAMA = {
    "model_type": "llama",
    "hidden_size": 16384,
    "num_hidden_layers": 200,
    "num_attention_heads": 128,
    "intermediate_size": 53248,
    "vocab_size": 128000,
    "max_position_embeddings": 4096,
}
KD = [
    {"name": "ce", "weight": 0.5, "params": {}},
    {"name": "kd", "weight": 0.5, "params": {"temperature": 2.0}},
]


def _lm(team, name, *, tokenizer_id="", config=None, **extra):
    return ModelSpecFactory(
        team=team,
        name=name,
        source=ModelSpec.Source.CONFIG,
        builtin_arch="",
        task="causal_lm",
        num_labels=0,
        config=config or TINY_GPT2,
        tokenizer_id=tokenizer_id,
        **extra,
    )


@pytest.fixture
def lm_setup(team):
    return {
        "dataset": DatasetSpecFactory(team=team, name="fortunes", builtin_name="fortunes", task="causal_lm",
                                      num_labels=0, label_names=[]),
        "teacher": _lm(team, "gpt2-teacher", tokenizer_id="gpt2"),
        "student": _lm(team, "gpt2-student", tokenizer_id="gpt2"),
        "smol": _lm(team, "smol-student", tokenizer_id="HuggingFaceTB/SmolLM2-135M"),
        # Online: dense kd on a causal LM cannot run from the (top-k) teacher cache.
        "kd": RecipeFactory(team=team, name="lm-kd", scheme=Recipe.Scheme.ONLINE, terms=KD),
        "uld": RecipeFactory(team=team, name="lm-uld", scheme=Recipe.Scheme.ONLINE,
                             terms=[{"name": "ce", "weight": 0.5, "params": {}},
                                    {"name": "uld", "weight": 0.5, "params": {}}]),
        "seq_kd": RecipeFactory(team=team, name="lm-seqkd", scheme=Recipe.Scheme.SEQ_KD,
                                terms=[{"name": "ce", "weight": 1.0, "params": {}}]),
    }


def _online_worker(*queues):
    return Worker.objects.create(name=f"w{len(queues)}@host", hostname="host", queues=list(queues),
                                 state=Worker.State.ONLINE, last_heartbeat=timezone.now())


def _report(setup, **overrides):
    kwargs = {"dataset": setup["dataset"], "teacher": setup["teacher"], "students": setup["students"],
              "recipes": [setup["recipe"]], "seeds": [0], "train": {"max_steps": 100}}
    return preflight.experiment_preflight(**{**kwargs, **overrides})


def _check(report, key):
    return next(c for c in report.checks if c.key == key)


# --- runs -----------------------------------------------------------------------------------------
def test_the_run_count_passes_under_the_limit(digits_setup):
    check = _check(_report(digits_setup, train={"lr": [1e-3, 3e-3]}), "runs")

    assert check.level == "ok"
    assert check.summary.startswith(
        "8 runs: 2 students × 1 seed × 2 training settings × (kd-t4 v1 + baseline)"
    )


def test_the_run_count_over_the_limit_is_the_only_check_and_an_error(digits_setup, settings):
    settings.MAX_RUNS_PER_EXPERIMENT = 5

    report = _report(digits_setup, term_sweeps={"kd.temperature": [1.0, 2.0, 4.0]})

    assert [c.key for c in report.checks] == ["runs"]
    assert report.checks[0].level == "error" and report.checks[0].field == "term_sweeps"
    assert "8 runs" in report.checks[0].summary and "The limit is 5" in report.checks[0].summary
    assert not report.can_launch


# --- label spaces ---------------------------------------------------------------------------------
def test_labels_pass_when_every_model_predicts_the_datasets_classes(digits_setup):
    check = _check(_report(digits_setup), "labels")

    assert check.level == "ok" and "predicts the 10 classes of digits" in check.summary


def test_labels_are_an_error_when_the_teacher_predicts_other_classes(digits_setup, team):
    teacher = ModelSpecFactory(team=team, name="five-way", num_labels=5)

    check = preflight.check_labels(dataset=digits_setup["dataset"], teacher=teacher,
                                   students=digits_setup["students"])

    assert check.level == "error" and check.field == "teacher"
    assert "five-way predicts 5 classes but digits has 10" in check.summary


def test_labels_warn_when_a_teacher_trained_here_learned_other_label_names(digits_setup, team):
    other = DatasetSpecFactory(team=team, name="shuffled", label_names=list("abcdefghij"))
    source_run = RunFactory(
        experiment=ExperimentFactory(team=team, dataset=other),
        student=ModelSpecFactory(team=team, name="source-student"),
        recipe=digits_setup["recipe"],
    )
    teacher = ModelSpecFactory(team=team, name="trained-elsewhere", source=ModelSpec.Source.RUN,
                               source_run=source_run)

    check = preflight.check_labels(dataset=digits_setup["dataset"], teacher=teacher,
                                   students=digits_setup["students"])

    assert check.level == "warning"
    assert "trained on shuffled, whose classes are a, b, c" in check.summary


def test_labels_are_not_applicable_without_classes(lm_setup):
    check = preflight.check_labels(dataset=lm_setup["dataset"], teacher=lm_setup["teacher"],
                                   students=[lm_setup["student"]])

    assert check.level == "notice" and "no classes to match" in check.summary


# --- tokenizers -----------------------------------------------------------------------------------
def _tokenizers(setup, student, recipe, teacher=None):
    return preflight.check_tokenizers(dataset=setup["dataset"], teacher=teacher or setup["teacher"],
                                      students=[student], recipes=[setup[recipe]])


def test_tabular_models_have_no_tokenizers_to_compare(digits_setup):
    check = _check(_report(digits_setup), "tokenizers")

    assert check.level == "notice" and "numeric features" in check.summary


def test_tokenizers_pass_when_both_records_name_the_same_one(lm_setup):
    check = _tokenizers(lm_setup, lm_setup["student"], "kd")

    assert check.level == "ok" and "both use gpt2" in check.summary


def test_a_tokenizer_mismatch_without_a_cross_tokenizer_method_is_an_error(lm_setup):
    check = _tokenizers(lm_setup, lm_setup["smol"], "kd")

    assert check.level == "error" and check.field == "students"
    assert "different tokenizers (gpt2 vs HuggingFaceTB/SmolLM2-135M)" in check.summary


@pytest.mark.parametrize("recipe", ["uld", "seq_kd"])
def test_a_tokenizer_mismatch_with_a_cross_tokenizer_method_is_a_notice(lm_setup, recipe):
    check = _tokenizers(lm_setup, lm_setup["smol"], recipe)

    assert check.level == "notice" and "cross-tokenizer method" in check.summary


@pytest.mark.parametrize("scheme", ["offline", "on_policy"])
def test_uld_pairs_tokenizers_in_cached_and_on_policy_runs_too(lm_setup, team, scheme):
    uld = RecipeFactory(team=team, name=f"{scheme}-uld", scheme=scheme, terms=lm_setup["uld"].terms)

    check = preflight.check_tokenizers(dataset=lm_setup["dataset"], teacher=lm_setup["teacher"],
                                       students=[lm_setup["smol"]], recipes=[uld])

    assert check.level == "notice" and "cross-tokenizer method" in check.summary


def test_uld_beside_a_position_by_position_term_still_needs_one_tokenizer(lm_setup, team):
    mixed = RecipeFactory(
        team=team,
        name="uld-and-topk",
        terms=[*lm_setup["uld"].terms, {"name": "topk", "weight": 1.0, "params": {"k": 8}}],
    )

    check = preflight.check_tokenizers(dataset=lm_setup["dataset"], teacher=lm_setup["teacher"],
                                       students=[lm_setup["smol"]], recipes=[mixed])

    # The engine's own refusal, word for word (workers.engine.recipe_rules.cross_tokenizer_problem).
    assert check.level == "error" and "only the uld term can compare them" in check.summary
    assert "topk compares token positions one to one. Remove it" in check.summary


def test_unrecorded_tokenizers_cannot_be_checked(lm_setup, team):
    hub_a = ModelSpecFactory(
        team=team,
        name="hub-a",
        source="hf",
        builtin_arch="",
        hub_id="org/a",
        task="causal_lm",
        num_labels=0,
        config={},
    )
    hub_b = ModelSpecFactory(
        team=team,
        name="hub-b",
        source="hf",
        builtin_arch="",
        hub_id="org/b",
        task="causal_lm",
        num_labels=0,
        config={},
    )

    check = _tokenizers(lm_setup, hub_b, "kd", teacher=hub_a)

    assert check.level == "unknown" and "cannot check" in check.summary


def test_a_derived_student_shares_its_parents_tokenizer(lm_setup, team):
    parent = ModelSpecFactory(team=team, name="hub-parent", source="hf", builtin_arch="", hub_id="org/parent",
                              task="causal_lm", num_labels=0, config={})
    derived = ModelSpecFactory(team=team, name="half", source="derived", builtin_arch="", parent=parent,
                               task="causal_lm", num_labels=0, config={"layers": "every_other"})

    assert tokenizers.tokenizer_identity(derived) == tokenizers.tokenizer_identity(parent)
    assert _tokenizers(lm_setup, derived, "kd", teacher=parent).level == "ok"


def test_classification_logits_do_not_depend_on_tokenizers(team):
    dataset = DatasetSpecFactory(team=team, name="news", builtin_name="bbc-news", num_labels=5,
                                 label_names=["b", "e", "p", "s", "t"])
    kwargs = {"source": "config", "builtin_arch": "", "num_labels": 5, "config": {"model_type": "bert"}}
    teacher = ModelSpecFactory(team=team, name="bert-a", tokenizer_id="bert-base-uncased", **kwargs)
    student = ModelSpecFactory(team=team, name="bert-b", tokenizer_id="roberta-base", **kwargs)
    hidden = RecipeFactory(
        team=team, name="hidden", terms=[{"name": "hidden_mse", "weight": 1.0, "params": {}}]
    )

    logits = preflight.check_tokenizers(dataset=dataset, teacher=teacher, students=[student],
                                        recipes=[RecipeFactory(team=team, name="cls-kd")])
    aligned = preflight.check_tokenizers(
        dataset=dataset, teacher=teacher, students=[student], recipes=[hidden]
    )

    assert logits.level == "ok" and "own tokenizer" in logits.summary
    assert aligned.level == "error"  # hidden states compare token positions


def test_experiment_create_refuses_a_tokenizer_error_and_accepts_a_notice(lm_setup, team, user):
    kwargs = {"team": team, "created_by": user, "name": "lm", "dataset": lm_setup["dataset"],
              "teacher": lm_setup["teacher"], "students": [lm_setup["smol"]], "seeds": [0],
              "train": {"max_steps": 10}}
    with mock.patch(DISPATCH), pytest.raises(ValidationError) as exc:
        launch.experiment_create(recipes=[lm_setup["kd"]], **kwargs)
    assert "different tokenizers" in exc.value.message_dict["students"][0]
    assert not Experiment.objects.exists()

    with mock.patch(DISPATCH):
        experiment = launch.experiment_create(recipes=[lm_setup["uld"]], **kwargs)
    assert experiment.runs.count() == 2


# --- GPU memory -----------------------------------------------------------------------------------
def _memory(setup, **overrides):
    kwargs = {"dataset": setup["dataset"], "teacher": setup["teacher"], "students": setup["students"],
              "recipes": [setup["recipe"]], "train": {"batch_size": 64}}
    return preflight.check_memory(preflight.run_shapes(**{**kwargs, **overrides}))


def test_memory_passes_when_an_online_worker_has_room(digits_setup):
    _online_worker("gpu-24g")

    check = _memory(digits_setup)

    assert check.level == "ok"
    assert "Largest run: ~" in check.summary and "queue 'gpu-24g'" in check.summary
    assert any("Breakdown" in line for line in check.details)


def test_memory_warns_when_no_online_worker_takes_the_runs(digits_setup):
    check = _memory(digits_setup)

    assert check.level == "warning"
    assert "No online worker consumes queue 'training'" in check.summary


def test_memory_warns_when_the_runs_need_a_bigger_gpu_than_any_online(lm_setup, team):
    _online_worker("gpu-8g")
    big = _lm(team, "smollm-sized", tokenizer_id="gpt2", config={
        "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16,
        "intermediate_size": 8192, "vocab_size": 49152, "max_position_embeddings": 2048})

    check = _memory({**lm_setup, "students": [big], "recipe": lm_setup["kd"]}, train={"batch_size": 16})

    assert check.level == "warning"
    assert "no online worker serves a queue with that much (largest: gpu-8g)" in check.summary


def test_a_run_larger_than_any_gpu_is_an_error_and_blocks_the_launch(lm_setup, team, user):
    huge = _lm(team, "huge", tokenizer_id="gpt2", config=HUGE_LLAMA)

    check = _memory({**lm_setup, "students": [huge], "recipe": lm_setup["kd"]})

    assert check.level == "error" and "more than any single GPU" in check.summary
    with pytest.raises(ValidationError) as exc:
        launch.experiment_create(team=team, created_by=user, name="too big", dataset=lm_setup["dataset"],
                                   teacher=lm_setup["teacher"], students=[huge], recipes=[lm_setup["kd"]],
                                   seeds=[0])
    assert "more than any single GPU" in exc.value.message_dict["batch_size"][0]
    assert not Run.objects.exists()


def test_models_of_unknown_size_cannot_be_checked(digits_setup, team):
    _online_worker("gpu-80g")
    dataset = DatasetSpecFactory(team=team, name="news", builtin_name="bbc-news", num_labels=10)
    hub = ModelSpecFactory(team=team, name="hub", source="hf", builtin_arch="", hub_id="org/not-in-the-cache",
                           config={})

    check = _memory({**digits_setup, "dataset": dataset, "teacher": hub, "students": [hub]})

    assert check.level == "unknown" and "could not be sized" in check.summary


def test_each_swept_batch_size_is_sized(digits_setup):
    shapes = preflight.run_shapes(dataset=digits_setup["dataset"], teacher=digits_setup["teacher"],
                                  students=digits_setup["students"][:1], recipes=[digits_setup["recipe"]],
                                  train={"batch_size": [16, 256], "lr": [1e-3, 1e-2]})

    assert sorted(s.config["train"]["batch_size"] for s in shapes) == [16, 16, 256, 256]  # kd + baseline each
    assert all(s.config["train"]["lr"] == 1e-3 for s in shapes)


# --- time -----------------------------------------------------------------------------------------
def _finished(student, dataset, *, steps, seconds):
    started = timezone.now() - timedelta(hours=1)
    return RunFactory(experiment=ExperimentFactory(team=student.team, dataset=dataset), student=student,
                      status=Run.Status.SUCCEEDED, total_steps=steps, step=steps, started_at=started,
                      finished_at=started + timedelta(seconds=seconds))


def test_time_cannot_be_estimated_without_similar_runs(digits_setup):
    check = _check(_report(digits_setup), "time")

    assert check.level == "unknown" and check.summary == "No similar runs yet."


def test_time_is_the_median_seconds_per_step_of_similar_runs_times_the_steps(digits_setup, team):
    student, other = digits_setup["students"]
    dataset = digits_setup["dataset"]
    for seconds in (100, 200, 900):  # 0.1, 0.2 and 0.9 s/step: the median is 0.2
        _finished(student, dataset, steps=1000, seconds=seconds)
    _finished(student, dataset, steps=100_000, seconds=1)                 # not a similar length
    _finished(student, DatasetSpecFactory(team=team), steps=1000, seconds=1)  # another dataset
    _finished(other, dataset, steps=1000, seconds=300)
    _finished(other, dataset, steps=2000, seconds=1000)                  # 0.3 and 0.5: the median is 0.4

    speeds = preflight.similar_run_speeds(students=[student, other], dataset=dataset, min_steps=750,
                                          max_steps=12_000)
    check = _check(_report(digits_setup, train={"max_steps": 3000}), "time")

    assert speeds[student.pk] == (pytest.approx(0.2), 3)
    assert speeds[other.pk] == (pytest.approx(0.4), 2)
    assert check.level == "ok"
    # 0.2 s/step × 3000 steps = 10 min and 0.4 × 3000 = 20 min per run; 2 runs each (kd + baseline).
    assert check.summary == "About 10 min to 20 min per run; ~1.0 h of training in all, on one worker."
    assert any("median 0.2 s/step over 3 finished runs" in line for line in check.details)


def test_time_says_which_students_have_no_similar_runs(digits_setup):
    student, other = digits_setup["students"]
    _finished(student, digits_setup["dataset"], steps=100, seconds=60)

    check = _check(_report(digits_setup), "time")

    assert check.level == "ok"
    assert any(f"No similar runs yet for {other}" in line for line in check.details)


def test_similar_run_speeds_is_one_query_whatever_the_number_of_runs(digits_setup, django_assert_num_queries):
    student = digits_setup["students"][0]
    for i in range(30):
        _finished(student, digits_setup["dataset"], steps=100, seconds=10 + i)

    with django_assert_num_queries(1):
        speeds = preflight.similar_run_speeds(
            students=digits_setup["students"], dataset=digits_setup["dataset"], min_steps=1, max_steps=1000
        )

    assert speeds[student.pk] == (pytest.approx(0.245), 30)  # the middle two of 0.10 … 0.39 s/step


@pytest.mark.parametrize(("seconds", "text"), [(30, "< 1 min"), (600, "10 min"), (7560, "2.1 h"),
                                               (302400, "3.5 days")])
def test_duration_text(seconds, text):
    assert preflight.duration_text(seconds) == text


# --- the check step on the page -------------------------------------------------------------------
def _post(team, setup, **extra):
    data = {
        "team": team.pk,
        "name": "checked",
        "dataset": setup["dataset"].pk,
        "teacher": setup["teacher"].pk,
        "students": [s.pk for s in setup["students"]],
        "recipes": [setup["recipe"].pk],
        "seeds": "0,1",
        "max_steps": "50",
        "lr": "1e-3:1e-2:log3",
        "lr_schedule": "linear",
    }
    return {**data, **extra}


def test_the_check_step_recounts_and_shows_every_check_without_creating_anything(client_logged_in, team,
                                                                                 digits_setup):
    response = client_logged_in.post(reverse("experiments:experiment_check"), _post(team, digits_setup))

    assert response.status_code == 200
    report = response.context["report"]
    assert report.count.total == 2 * 2 * 3 * 2
    assert [c.key for c in report.checks] == ["runs", "recipes", "labels", "tokenizers", "memory", "time"]
    html = response.content.decode()
    assert 'id="preflight"' in html and "24 runs" in html and "No similar runs yet." in html
    assert not Experiment.objects.exists() and not Run.objects.exists()


def test_the_check_step_shows_the_errors_launching_would_give(client_logged_in, team, digits_setup, settings):
    settings.MAX_RUNS_PER_EXPERIMENT = 20
    response = client_logged_in.post(reverse("experiments:experiment_check"), _post(team, digits_setup))

    assert "would create 24 runs; the limit is 20" in response.context["form"].errors["lr"][0]
    assert not response.context["report"].can_launch


def test_the_check_step_with_invalid_input_shows_field_errors_only(client_logged_in, team, digits_setup):
    response = client_logged_in.post(
        reverse("experiments:experiment_check"), _post(team, digits_setup, lr="1:2:x")
    )

    assert response.status_code == 200 and response.context["report"] is None
    assert "is not a range" in response.context["form"].errors["lr"][0]


def test_the_check_step_only_answers_posts(client_logged_in):
    assert client_logged_in.get(reverse("experiments:experiment_check")).status_code == 405


def test_the_form_offers_the_check_and_the_live_count(client_logged_in, team, digits_setup):
    html = client_logged_in.get(reverse("experiments:experiment_create")).content.decode()

    assert reverse("experiments:experiment_check") in html
    assert "data-sweep-count" in html and "js/experiment_setup.js" in html
    assert sweeps.SYNTAX_HELP.replace('"', "&quot;") in html
    assert 'data-chain="1"' in html and 'data-terms="ce kd"' in html
