"""Derived students on the web side: the service, validation, the engine config, the model page's form."""

from unittest import mock

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from experiments.domain import engine_config
from experiments.models import Experiment, ModelSpec
from experiments.services import launch, records
from tests.factories import DatasetSpecFactory, ModelSpecFactory, RecipeFactory
from workers.engine.config import ModelConfig, RunConfig

pytestmark = pytest.mark.django_db
DISPATCH = "experiments.services.dispatch._dispatch"

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
             "intermediate_size": 64, "vocab_size": 500, "max_position_embeddings": 64}


@pytest.fixture
def bert(team):
    return ModelSpecFactory(team=team, name="tiny-bert", source=ModelSpec.Source.CONFIG, builtin_arch="",
                            config=TINY_BERT, num_labels=5, tokenizer_id="bert-base-uncased")


@pytest.fixture
def hub_model(team):
    return ModelSpecFactory(team=team, name="minilm", source=ModelSpec.Source.HF, builtin_arch="", config={},
                            hub_id="sentence-transformers/all-MiniLM-L6-v2", num_labels=5)


# --- service and validation ---------------------------------------------------------------------------------
def test_model_derive_creates_a_student_in_the_parents_team(bert, user):
    spec = records.model_derive(parent=bert, name="bert-half", created_by=user, layers="every_other",
                                 hidden_size=16)
    spec.refresh_from_db()
    assert spec.source == ModelSpec.Source.DERIVED and spec.parent == bert and spec.team == bert.team
    assert spec.config == {"layers": "every_other", "hidden_size": 16}
    assert (spec.task, spec.num_labels, spec.tokenizer_id) == (bert.task, 5, "bert-base-uncased")
    assert "Derived from tiny-bert: every other; hidden size 16." in spec.notes
    assert list(bert.derived.all()) == [spec]


def test_explicit_layers_are_sorted_and_checked_against_the_parent(bert, user):
    spec = records.model_derive(parent=bert, name="bert-13", created_by=user, layers=[3, 1])
    assert spec.config == {"layers": [1, 3]}
    with pytest.raises(ValidationError) as exc:
        records.model_derive(parent=bert, name="bad", created_by=user, layers=[0, 4])
    assert exc.value.message_dict == {"layers": ["Layer 4 is out of range: the parent model has 4 layers "
                                                 "(ids 0 to 3)."]}
    with pytest.raises(ValidationError) as exc:
        records.model_derive(parent=bert, name="bad", created_by=user, layers="all", hidden_size=20,
                              num_attention_heads=3)
    message = exc.value.message_dict["hidden_size"][0]
    assert "hidden_size 20 is not divisible by num_attention_heads 3" in message
    with pytest.raises(ValidationError) as exc:
        records.model_derive(parent=bert, name="bad", created_by=user, layers="half")
    assert "layers" in exc.value.message_dict
    assert not ModelSpec.objects.filter(name="bad").exists()


def test_a_derived_parent_is_checked_with_its_own_derivation(bert, user):
    half = records.model_derive(parent=bert, name="bert-half", created_by=user, layers="every_other")
    with pytest.raises(ValidationError, match="the parent model has 2 layers"):
        records.model_derive(parent=half, name="bert-quarter", created_by=user, layers=[2])
    quarter = records.model_derive(parent=half, name="bert-quarter", created_by=user, layers=[1])
    assert quarter.parent == half


def test_hub_parents_are_checked_by_the_worker_and_builtin_parents_refused(hub_model, team, user):
    # The hub model's depth is unknown without downloading it: any well-formed spec is accepted here.
    spec = records.model_derive(parent=hub_model, name="minilm-3", created_by=user, layers=[0, 2, 4])
    assert spec.config == {"layers": [0, 2, 4]}
    mlp = ModelSpecFactory(team=team)
    with pytest.raises(ValidationError) as exc:
        records.model_derive(parent=mlp, name="mlp-half", created_by=user, layers="every_other")
    assert "only transformers models can be derived from" in exc.value.message_dict["parent"][0]


def test_derived_engine_config_round_trips_through_the_run_config(bert, user):
    half = records.model_derive(parent=bert, name="bert-half", created_by=user, layers="every_other")
    quarter = records.model_derive(parent=half, name="bert-quarter", created_by=user, layers=[1],
                                    intermediate_size=32)
    cfg = engine_config.model_config(quarter)
    assert cfg == {"source": "derived", "num_labels": 5, "params": {"layers": [1], "intermediate_size": 32},
                   "parent": {"source": "derived", "num_labels": 5, "params": {"layers": "every_other"},
                              "parent": {"source": "config", "num_labels": 5, "params": TINY_BERT}}}
    run = RunConfig.from_dict({"student": cfg, "dataset": {"source": "builtin", "name": "bbc-news"},
                               "terms": [{"name": "ce"}]})
    assert isinstance(run.student.parent.parent, ModelConfig) and run.student.parent.parent.source == "config"
    assert RunConfig.from_json(run.to_json()) == run


# --- trust_remote_code --------------------------------------------------------------------------------------
def test_trust_remote_code_is_refused_unless_the_server_allows_it(team, user, settings):
    settings.ALLOW_TRUST_REMOTE_CODE = False
    fields = {"name": "remote", "source": "hf", "hub_id": "org/custom", "num_labels": 2,
              "config": {"trust_remote_code": True}}
    with pytest.raises(ValidationError) as exc:
        records.model_spec_create(team=team, created_by=user, **fields)
    assert exc.value.message_dict == {"config": ["trust_remote_code is disabled on this server."]}

    settings.ALLOW_TRUST_REMOTE_CODE = True
    spec = records.model_spec_create(team=team, created_by=user, **fields)
    assert engine_config.model_config(spec)["trust_remote_code"] is True
    derived = records.model_derive(parent=spec, name="remote-half", created_by=user, layers="every_other")
    assert engine_config.model_config(derived)["parent"]["trust_remote_code"] is True
    # Switching the setting off later wins over the stored record: the worker never gets the flag.
    settings.ALLOW_TRUST_REMOTE_CODE = False
    assert "trust_remote_code" not in engine_config.model_config(spec)
    assert RunConfig.from_dict({"student": engine_config.model_config(derived), "terms": [{"name": "ce"}],
                                "dataset": {"source": "builtin", "name": "bbc-news"}}).student.parent \
        .trust_remote_code is False


def test_plain_hub_models_never_carry_the_flag(hub_model, settings):
    settings.ALLOW_TRUST_REMOTE_CODE = True
    assert "trust_remote_code" not in engine_config.model_config(hub_model)


# --- the form on the model page -----------------------------------------------------------------------------
def test_model_page_offers_the_derive_form_for_transformers_models_only(client_logged_in, bert, team):
    page = client_logged_in.get(reverse("experiments:model_detail", args=[bert.pk]))
    assert page.status_code == 200
    assert b"Derive a student" in page.content and b'value="tiny-bert-student"' in page.content
    mlp = ModelSpecFactory(team=team)
    assert b"Derive a student" not in client_logged_in.get(reverse("experiments:model_detail",
                                                                   args=[mlp.pk])).content


def test_deriving_from_the_page_redirects_to_the_new_model(client_logged_in, bert, user):
    url = reverse("experiments:model_derive", args=[bert.pk])
    response = client_logged_in.post(url, {"name": "bert-02", "layers": "0, 2", "hidden_size": "16"})
    spec = ModelSpec.objects.get(name="bert-02")
    assert response.status_code == 302
    assert response.url == reverse("experiments:model_detail", args=[spec.pk])
    assert spec.config == {"layers": [0, 2], "hidden_size": 16} and spec.created_by == user
    page = client_logged_in.get(response.url)
    assert b"Derived from" in page.content and reverse("experiments:model_detail", args=[bert.pk]).encode() \
        in page.content
    parent_page = client_logged_in.get(reverse("experiments:model_detail", args=[bert.pk]))
    assert b"Already derived" in parent_page.content and b"bert-02" in parent_page.content


@pytest.mark.parametrize(("data", "field", "message"), [
    ({"name": "x", "layers": "0,9"}, "layers", "Layer 9 is out of range"),
    ({"name": "x", "layers": "half"}, "layers", "layer ids such as"),
    ({"name": "x", "layers": "all", "hidden_size": "20"}, "hidden_size", "not a multiple of the parent"),
    ({"name": "tiny-bert", "layers": "all"}, "name", "already exists"),
    ({"name": "", "layers": "all"}, "name", "required"),
])
def test_derive_errors_are_shown_next_to_their_field(client_logged_in, bert, data, field, message):
    response = client_logged_in.post(reverse("experiments:model_derive", args=[bert.pk]), data)
    assert response.status_code == 200
    errors = response.context["derive_form"].errors
    assert any(message in e for e in errors[field]), errors
    assert message.encode() in response.content
    assert ModelSpec.objects.filter(source=ModelSpec.Source.DERIVED).count() == 0


def test_derive_needs_login(client, bert):
    url = reverse("experiments:model_derive", args=[bert.pk])
    response = client.post(url, {"name": "x", "layers": "all"})
    assert response.status_code == 302 and response.url.startswith(reverse("login"))
    assert not ModelSpec.objects.filter(name="x").exists()


def test_derive_is_post_only_and_other_teams_models_give_404(client_logged_in, other_team):
    foreign = ModelSpecFactory(team=other_team, source=ModelSpec.Source.CONFIG, builtin_arch="",
                               config=TINY_BERT)
    url = reverse("experiments:model_derive", args=[foreign.pk])
    assert client_logged_in.post(url, {"name": "x", "layers": "all"}).status_code == 404
    assert client_logged_in.get(url).status_code == 405
    assert not ModelSpec.objects.filter(name="x").exists()


# --- derive a student inline while setting up an experiment -------------------------------------------------
@pytest.fixture
def news(team):
    return DatasetSpecFactory(team=team, name="bbc", builtin_name="bbc-news", num_labels=5,
                              label_names=["business", "entertainment", "politics", "sport", "tech"])


def test_an_experiment_can_derive_its_student_from_the_teacher(bert, news, team, user, client_logged_in):
    recipe = RecipeFactory(team=team)
    data = {"team": team.pk, "name": "derive-inline", "dataset": news.pk, "teacher": bert.pk,
            "derive_student": "every_other", "recipes": [recipe.pk], "seeds": "0"}
    with mock.patch(DISPATCH):
        response = client_logged_in.post(reverse("experiments:experiment_create"), data)
    assert response.status_code == 302, response.context["form"].errors
    derived = ModelSpec.objects.get(parent=bert)
    assert derived.source == ModelSpec.Source.DERIVED and derived.config == {"layers": "every_other"}
    assert derived.name == "tiny-bert (every other layer)"
    experiment = Experiment.objects.get(name="derive-inline")
    assert set(experiment.runs.values_list("student_id", flat=True)) == {derived.pk}
    # A second experiment reuses the derived student instead of registering another one.
    with mock.patch(DISPATCH):
        client_logged_in.post(reverse("experiments:experiment_create"), {**data, "name": "again"})
    assert ModelSpec.objects.filter(parent=bert).count() == 1


def test_deriving_needs_a_teacher_and_a_refused_experiment_keeps_no_derived_model(bert, news, team, user,
                                                                                 client_logged_in):
    recipe = RecipeFactory(team=team)
    base = {"team": team.pk, "name": "x", "dataset": news.pk, "recipes": [recipe.pk], "seeds": "0"}
    response = client_logged_in.post(
        reverse("experiments:experiment_create"), {**base, "derive_student": "every_third"}
    )
    assert "Choose a teacher to derive a student from." in response.content.decode()
    response = client_logged_in.post(reverse("experiments:experiment_create"), base)
    assert "Choose at least one student, or derive one from the teacher." in response.content.decode()
    with pytest.raises(ValidationError):    # refused (seeds over the limit): the derived model goes too
        launch.experiment_create(team=team, created_by=user, name="refused", dataset=news, students=[],
                                   recipes=[recipe], seeds=list(range(500)), teacher=bert,
                                   derive_student="every_other")
    assert not ModelSpec.objects.filter(parent=bert).exists()


def test_the_check_step_counts_the_student_it_would_derive(bert, news, team, client_logged_in):
    recipe = RecipeFactory(team=team)
    data = {
        "team": team.pk,
        "name": "check",
        "dataset": news.pk,
        "teacher": bert.pk,
        "derive_student": "every_other",
        "recipes": [recipe.pk],
        "seeds": "0,1",
    }
    response = client_logged_in.post(reverse("experiments:experiment_check"), data)
    assert response.status_code == 200 and response.context["report"] is not None
    assert response.context["report"].count.total == 2 * (1 + 1)  # 2 seeds × (the recipe + its baseline)
    assert not ModelSpec.objects.filter(parent=bert).exists()          # nothing saved before launch
