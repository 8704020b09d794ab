"""Recipe versions on the pages: every version labelled "name vN", pickers with the latest first, the recipe
page (versions, what changed, experiments that used each, YAML export and import) and the recipe form (one
row per term, only that term's parameters, errors beside their field)."""

from __future__ import annotations

import re

import pytest
import yaml
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from api.parsers import YAML_MAX_BYTES
from experiments.domain.recipe_versions import ADDED, CHANGED, REMOVED, recipe_changes
from experiments.forms import ExperimentForm
from experiments.models import Recipe
from experiments.services import records
from tests.factories import ExperimentFactory, RecipeFactory

pytestmark = pytest.mark.django_db


def _save(team, user, name="jsd-hidden", scheme="online", terms=None, **kwargs) -> Recipe:
    terms = terms if terms is not None else [{"name": "ce", "weight": 0.5}, {"name": "jsd", "weight": 0.5}]
    return records.recipe_create(team=team, created_by=user, name=name, scheme=scheme, terms=terms, **kwargs)


def _recipe_post(team, rows, **extra) -> dict[str, str]:
    data = {
        "team": team.pk,
        "name": "kd-t4",
        "scheme": "offline",
        "description": "",
        "terms-TOTAL_FORMS": str(len(rows)),
        "terms-INITIAL_FORMS": "0",
        **extra,
    }
    for i, row in enumerate(rows):
        data.update({f"terms-{i}-{k}": v for k, v in row.items()})
    return data


def _upload(text: str, name: str = "recipe.yaml") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, text.encode(), content_type="application/yaml")


# --- labels and pickers ---------------------------------------------------------------------------
def test_every_version_is_labelled_with_its_number(team, user):
    first = _save(team, user)
    second = _save(team, user, terms=[{"name": "kd"}])

    assert (str(first), str(second)) == ("jsd-hidden v1", "jsd-hidden v2")


def test_the_experiment_forms_recipe_picker_lists_the_latest_version_first_and_labels_each(team, user):
    first = _save(team, user)
    second = _save(team, user, terms=[{"name": "kd"}])
    other = _save(team, user, name="another")

    choices = [label for value, label in ExperimentForm(user=user).fields["recipes"].choices]

    assert choices == [str(other), str(second), str(first)]
    assert choices[1:] == ["jsd-hidden v2", "jsd-hidden v1"]


def test_pages_that_name_a_run_s_recipe_show_its_version(client_logged_in, team, user):
    recipe = _save(team, user)
    experiment = ExperimentFactory(team=team)
    experiment.recipes.add(recipe)

    html = client_logged_in.get(reverse("experiments:experiment_list")).content.decode()

    assert "jsd-hidden v1" in html


# --- the list --------------------------------------------------------------------------------------
def test_the_recipe_list_shows_each_recipe_once_at_its_latest_version_and_links_its_page(
    client_logged_in, team, user
):
    _save(team, user)
    latest = _save(team, user, terms=[{"name": "kd"}])

    response = client_logged_in.get(reverse("experiments:recipe_list"))

    assert [r.pk for r in response.context["recipes"]] == [latest.pk]
    html = response.content.decode()
    assert f'href="{reverse("experiments:recipe_detail", args=[latest.pk])}"' in html
    assert "jsd-hidden v2" in html


# --- the recipe page --------------------------------------------------------------------------------
def test_the_recipe_page_lists_every_version_with_what_changed(client_logged_in, team, user):
    first = _save(team, user, terms=[{"name": "ce", "weight": 0.5}, {"name": "jsd", "weight": 0.5}])
    second = _save(
        team,
        user,
        terms=[{"name": "ce", "weight": 0.2}, {"name": "kd", "weight": 0.8, "params": {"temperature": 2}}],
        scheme="offline",
        description="cheaper",
    )

    response = client_logged_in.get(reverse("experiments:recipe_detail", args=[first.pk]))

    assert response.status_code == 200
    rows = response.context["versions"]
    assert [r["recipe"].pk for r in rows] == [second.pk, first.pk]
    changes = {(c.kind, c.what): c for c in rows[0]["changes"]}
    assert changes[(CHANGED, "scheme")].old == "online" and changes[(CHANGED, "scheme")].new == "offline"
    assert changes[(CHANGED, "ce weight")].new == "0.2"
    assert (REMOVED, "term jsd") in changes and (ADDED, "term kd") in changes
    assert changes[(ADDED, "term kd")].new == "0.8·kd(temperature=2)"
    assert (CHANGED, "description") in changes
    assert rows[1]["changes"] == []
    html = response.content.decode()
    assert "jsd-hidden v2" in html and "jsd-hidden v1" in html
    assert "0.8·kd(temperature=2)" in html


def test_a_changed_parameter_and_scheme_parameter_are_named_with_both_values():
    old = {
        "scheme": "self_distillation",
        "scheme_params": {"generations": 2},
        "terms": [{"name": "kd", "weight": 1.0, "params": {"temperature": 4.0}}],
        "description": "",
    }
    new = {
        **old,
        "scheme_params": {"generations": 3},
        "terms": [
            {
                "name": "kd",
                "weight": 1.0,
                "params": {"temperature": 2.0},
                "schedule": {"weight": {"kind": "linear", "start": 1.0, "end": 0.0}},
            }
        ],
    }

    changes = [(c.kind, c.what, c.old, c.new) for c in recipe_changes(old, new)]

    assert changes == [
        (CHANGED, "scheme.generations", "2", "3"),
        (CHANGED, "kd weight schedule", "constant", "linear 1 → 0"),
        (CHANGED, "kd.temperature", "4", "2"),
    ]
    assert recipe_changes(old, old) == []


def test_a_term_used_twice_is_matched_by_its_order():
    old = {
        "scheme": "online",
        "terms": [
            {"name": "hidden_mse", "params": {"layer_map": "last"}},
            {"name": "hidden_mse", "params": {"layer_map": "uniform"}},
        ],
    }
    new = {"scheme": "online", "terms": [{"name": "hidden_mse", "params": {"layer_map": "last"}}]}

    changes = [(c.kind, c.what) for c in recipe_changes(old, new)]

    assert changes == [(REMOVED, "term hidden_mse #2")]


def test_the_recipe_page_links_the_experiments_that_used_each_version_in_the_users_teams(
    client_logged_in, team, user
):
    first = _save(team, user)
    second = _save(team, user, terms=[{"name": "kd"}])
    used_first = ExperimentFactory(team=team, name="sweep on v1")
    used_first.recipes.add(first)
    used_second = ExperimentFactory(team=team, name="sweep on v2")
    used_second.recipes.add(second)

    response = client_logged_in.get(reverse("experiments:recipe_detail", args=[second.pk]))

    by_version = {r["recipe"].version: [e.pk for e in r["experiments"]] for r in response.context["versions"]}
    assert by_version == {1: [used_first.pk], 2: [used_second.pk]}
    assert reverse("experiments:experiment_detail", args=[used_first.pk]) in response.content.decode()


def test_another_teams_recipe_page_is_not_found(client_logged_in, other_team):
    theirs = RecipeFactory(team=other_team)

    for name in ("recipe_detail", "recipe_export"):
        assert client_logged_in.get(reverse(f"experiments:{name}", args=[theirs.pk])).status_code == 404


def test_the_recipe_page_needs_a_login(client, team):
    recipe = RecipeFactory(team=team)

    response = client.get(reverse("experiments:recipe_detail", args=[recipe.pk]))

    assert response.status_code == 302 and "login" in response["Location"]


# --- YAML export and import -------------------------------------------------------------------------
def test_the_yaml_export_downloads_a_document_that_imports_as_the_next_version(client_logged_in, team, user):
    recipe = _save(
        team,
        user,
        scheme="self_distillation",
        scheme_params={"generations": 3},
        terms=[{"name": "kd", "weight": 1.0, "params": {"temperature": 2.0}}],
    )

    response = client_logged_in.get(reverse("experiments:recipe_export", args=[recipe.pk]))

    assert response.status_code == 200
    assert 'attachment; filename="jsd-hidden-v1.yaml"' == response["Content-Disposition"]
    document = yaml.safe_load(response.content)
    assert document["terms"] == recipe.terms and document["scheme_params"] == {"generations": 3}

    again = client_logged_in.post(
        reverse("experiments:recipe_import"),
        {"recipe": recipe.pk, "file": _upload(response.content.decode())},
    )

    imported = Recipe.objects.get(team=team, name="jsd-hidden", version=2)
    assert again.status_code == 302 and again["Location"] == reverse(
        "experiments:recipe_detail", args=[imported.pk]
    )
    assert (imported.terms, imported.scheme, imported.scheme_params) == (
        recipe.terms,
        recipe.scheme,
        recipe.scheme_params,
    )


def test_an_import_from_the_recipe_page_takes_that_recipes_name(client_logged_in, team, user):
    recipe = _save(team, user)
    text = "kind: recipe\nname: something-else\nscheme: offline\nterms:\n- name: kd\n  weight: 1\n"

    client_logged_in.post(reverse("experiments:recipe_import"), {"recipe": recipe.pk, "file": _upload(text)})

    assert list(Recipe.objects.filter(team=team).values_list("name", "version").order_by("version")) == [
        ("jsd-hidden", 1),
        ("jsd-hidden", 2),
    ]


def test_an_import_from_the_list_creates_a_new_recipe_in_the_chosen_team(client_logged_in, team, user):
    text = (
        "kind: recipe\nname: fresh\nscheme: offline\n"
        "terms:\n- name: ce\n  weight: 0.1\n- name: kd\n  weight: 0.9\n"
    )

    response = client_logged_in.post(
        reverse("experiments:recipe_import"), {"team": team.pk, "file": _upload(text)}
    )

    recipe = Recipe.objects.get(name="fresh")
    assert (recipe.team, recipe.version, recipe.created_by) == (team, 1, user)
    assert response["Location"] == reverse("experiments:recipe_detail", args=[recipe.pk])


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("name: [unclosed\n", "yaml"),
        ("kind: recipe\nname: bad\nscheme: offline\nterms:\n- name: hidden_mse\n", "scheme"),
        (
            "kind: recipe\nname: bad\nscheme: offline\nterms:\n- name: kd\n  params: {temperature: -1}\n",
            "terms",
        ),
        ("kind: recipe\nname: bad\nscheme: offline\nterms: []\ncolour: red\n", "colour"),
        ("a: &x [1]\nb: *x\n", "yaml"),
    ],
)
def test_a_bad_document_is_a_400_naming_the_field_and_saves_nothing(client_logged_in, team, text, field):
    response = client_logged_in.post(
        reverse("experiments:recipe_import"), {"team": team.pk, "file": _upload(text)}
    )

    assert response.status_code == 400
    assert field in [f for f, _ in response.context["import_errors"]]
    assert "data-import-errors" in response.content.decode()
    assert not Recipe.objects.exists()


def test_the_recipe_rules_refuse_an_import_with_the_engines_message(client_logged_in, team, user):
    recipe = _save(team, user)
    text = "kind: recipe\nname: x\nscheme: offline\nterms:\n- name: hidden_mse\n"

    response = client_logged_in.post(
        reverse("experiments:recipe_import"), {"recipe": recipe.pk, "file": _upload(text)}
    )

    assert response.status_code == 400
    messages = " ".join(m for _, m in response.context["import_errors"])
    assert "hidden_states" in messages and "online" in messages
    assert Recipe.objects.filter(name="jsd-hidden").count() == 1


def test_an_import_without_a_file_or_not_utf8_is_a_400_beside_the_file_field(client_logged_in, team):
    missing = client_logged_in.post(reverse("experiments:recipe_import"), {"team": team.pk})
    binary = client_logged_in.post(
        reverse("experiments:recipe_import"),
        {"team": team.pk, "file": SimpleUploadedFile("r.yaml", b"\xff\xfe\x00bad")},
    )

    for response in (missing, binary):
        assert response.status_code == 400
        assert response.context["import_form"].errors["file"]
    assert not Recipe.objects.exists()


def test_an_oversized_document_is_refused_before_it_is_stored(client_logged_in, team):
    text = "kind: recipe\nname: big\nscheme: offline\ndescription: " + "x" * (YAML_MAX_BYTES + 10) + "\n"

    response = client_logged_in.post(
        reverse("experiments:recipe_import"), {"team": team.pk, "file": _upload(text)}
    )

    assert response.status_code == 413
    assert not Recipe.objects.exists()


def test_an_import_into_another_teams_recipe_or_team_is_refused(client_logged_in, other_team):
    theirs = RecipeFactory(team=other_team, name="theirs")
    text = "kind: recipe\nname: x\nscheme: offline\nterms:\n- name: kd\n"

    into_recipe = client_logged_in.post(
        reverse("experiments:recipe_import"), {"recipe": theirs.pk, "file": _upload(text)}
    )
    into_team = client_logged_in.post(
        reverse("experiments:recipe_import"), {"team": other_team.pk, "file": _upload(text)}
    )

    assert into_recipe.status_code == 404
    assert into_team.status_code == 400 and into_team.context["import_form"].errors["team"]
    assert into_team.context["import_form"].errors["team"][0] in into_team.content.decode()  # shown
    assert Recipe.objects.count() == 1


# --- the form ---------------------------------------------------------------------------------------
def _row_params(html: str, index: int) -> dict[str, bool]:
    """Parameter name → shown, for term row ``index`` of the rendered form."""
    rows = re.split(r'<fieldset class="term-row', html.split('id="term-row-template"')[0])[1:]
    found = {}
    for hidden, name in re.findall(
        r'data-param data-terms="[^"]*"( hidden)?>\s*<label for="id_terms-\d+-(\w+)"', rows[index]
    ):
        found[name] = not hidden
    return found


def test_a_row_shows_only_its_terms_parameters_with_the_terms_defaults_as_placeholders(client_logged_in):
    response = client_logged_in.get(reverse("experiments:recipe_create"))

    html = response.content.decode()
    shown = {name for name, visible in _row_params(html, 1).items() if visible}
    assert shown == {"temperature"}  # the initial second row is kd
    assert {name for name, visible in _row_params(html, 0).items() if visible} == {"label_smoothing"}
    kd_row = response.context["terms"].forms[1]
    assert kd_row["temperature"].field.widget.attrs["placeholder"] == "4"
    jsd_defaults = kd_row["beta"].field.widget.attrs["data-defaults"].split()
    assert "jsd=0.5" in jsd_defaults
    assert 'src="/static/js/recipe_form.js"' in html and "<script>" not in html


def test_an_empty_row_shows_every_parameter_for_the_page_without_script(client_logged_in):
    html = client_logged_in.get(reverse("experiments:recipe_create")).content.decode()

    spare = _row_params(html, 2)
    assert spare and all(spare.values())


def test_a_parameter_the_term_does_not_take_is_an_error_beside_that_field(client_logged_in, team):
    response = client_logged_in.post(
        reverse("experiments:recipe_create"),
        _recipe_post(team, [{"name": "kd", "weight": "1", "beta": "0.3"}]),
    )

    assert response.status_code == 400
    row = response.context["terms"].forms[0]
    assert "kd has no parameter beta" in " ".join(row.errors["beta"])
    assert _row_params(response.content.decode(), 0)["beta"] is True  # shown, with its error
    assert not Recipe.objects.exists()


def test_saving_an_existing_name_makes_the_next_version_and_opens_its_page(client_logged_in, team, user):
    _save(team, user, name="kd-t4", scheme="offline", terms=[{"name": "kd"}])

    response = client_logged_in.post(
        reverse("experiments:recipe_create"),
        _recipe_post(team, [{"name": "kd", "weight": "1", "temperature": "2"}, {}]),
    )

    latest = Recipe.objects.get(name="kd-t4", version=2)
    assert response["Location"] == reverse("experiments:recipe_detail", args=[latest.pk])
    assert latest.terms[0]["params"]["temperature"] == 2.0


def test_the_form_prefilled_from_a_version_saves_the_same_recipe_as_the_next_version(
    client_logged_in, team, user
):
    recipe = _save(
        team,
        user,
        name="chain",
        scheme="self_distillation",
        scheme_params={"generations": 3},
        terms=[
            {"name": "ce", "weight": 0.25},
            {
                "name": "kd",
                "weight": 0.75,
                "params": {"temperature": 2.0},
                "schedule": {"weight": {"kind": "linear", "start": 0.75, "end": 0.5}},
            },
        ],
    )

    page = client_logged_in.get(reverse("experiments:recipe_create") + f"?from={recipe.pk}")
    form, terms = page.context["form"], page.context["terms"]
    data = {
        name: value
        for name, value in ((form[f].html_name, form[f].value()) for f in form.fields)
        if value not in (None, "")
    }
    data.update({"terms-TOTAL_FORMS": str(len(terms.forms)), "terms-INITIAL_FORMS": "0"})
    for row in terms.forms:
        for name in row.fields:
            value = row[name].value()
            if value is True:
                data[row[name].html_name] = "on"
            elif value not in (None, "", False):
                data[row[name].html_name] = value
    saved = client_logged_in.post(reverse("experiments:recipe_create"), data)

    assert saved.status_code == 302
    again = Recipe.objects.get(name="chain", version=2)
    assert (again.scheme, again.scheme_params, again.terms) == (
        recipe.scheme,
        recipe.scheme_params,
        recipe.terms,
    )


def test_a_scheme_parameter_is_saved_and_an_out_of_range_one_is_an_error_beside_it(client_logged_in, team):
    bad = client_logged_in.post(
        reverse("experiments:recipe_create"),
        _recipe_post(
            team, [{"name": "kd", "weight": "1"}], scheme="self_distillation", scheme_generations="99"
        ),
    )
    foreign = client_logged_in.post(
        reverse("experiments:recipe_create"),
        _recipe_post(team, [{"name": "kd", "weight": "1"}], scheme="offline", scheme_generations="2"),
    )
    good = client_logged_in.post(
        reverse("experiments:recipe_create"),
        _recipe_post(
            team, [{"name": "kd", "weight": "1"}], scheme="self_distillation", scheme_generations="4"
        ),
    )

    assert bad.status_code == 400 and "generations" in " ".join(
        bad.context["form"].errors["scheme_generations"]
    )
    assert foreign.status_code == 400 and foreign.context["form"].errors["scheme_generations"]
    assert good.status_code == 302
    assert Recipe.objects.get().scheme_params == {"generations": 4}


def test_a_staff_user_sees_any_teams_recipe_page(client, staff_user, team):
    recipe = RecipeFactory(team=team)
    client.force_login(staff_user)

    assert client.get(reverse("experiments:recipe_detail", args=[recipe.pk])).status_code == 200


def test_opening_the_import_address_goes_to_the_lists_import_form(client_logged_in):
    response = client_logged_in.get(reverse("experiments:recipe_import"))

    assert response.status_code == 302
    assert response["Location"] == reverse("experiments:recipe_list") + "#import"


def test_starting_from_a_version_with_a_parameter_schedule_says_the_form_keeps_it_constant(
    client_logged_in, team, user
):
    schedule = {"temperature": {"kind": "linear", "start": 4.0, "end": 1.0}}
    recipe = _save(
        team,
        user,
        name="annealed",
        scheme="offline",
        terms=[{"name": "kd", "weight": 1.0, "schedule": schedule}],
    )
    plain = _save(team, user, name="plain", scheme="offline", terms=[{"name": "kd"}])

    annealed = client_logged_in.get(reverse("experiments:recipe_create") + f"?from={recipe.pk}")
    constant = client_logged_in.get(reverse("experiments:recipe_create") + f"?from={plain.pk}")

    assert annealed.context["unedited_schedules"] == ["kd.temperature"]
    assert "schedules kd.temperature" in annealed.content.decode()
    assert constant.context["unedited_schedules"] == []
