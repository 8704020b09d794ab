"""Teams and roles, the header's team switcher, and sorting / pagination of the list pages."""

from __future__ import annotations

import re
import threading
import time

import pytest
from django.core.exceptions import ValidationError
from django.db import connections, transaction
from django.urls import reverse

from experiments.models import Membership
from experiments.services import teams
from tests.factories import (
    DatasetSpecFactory,
    ExperimentFactory,
    MembershipFactory,
    ModelSpecFactory,
    RecipeFactory,
    TeamFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def lead(team):
    user = UserFactory(username="lena-lead")
    MembershipFactory(user=user, team=team, role=Membership.Role.LEAD)
    return user


@pytest.fixture
def as_lead(client, lead):
    client.force_login(lead)
    return client


def _role(team, user) -> str | None:
    membership = Membership.objects.filter(team=team, user=user).first()
    return membership.role if membership else None


def _membership(team, user) -> Membership:
    return Membership.objects.get(team=team, user=user)


def _messages(response) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


# --- the team page --------------------------------------------------------------------------------
def test_team_page_lists_members_with_roles_leads_first(client, team, user, lead):
    client.force_login(user)

    response = client.get(reverse("experiments:team_detail", args=[team.pk]))

    members = list(response.context["members"])
    assert [(m.user, m.role) for m in members] == [(lead, "lead"), (user, "member")]
    assert response.context["can_manage"] is False
    assert b"Add a member" not in response.content


def test_team_list_counts_every_member_and_shows_my_role(client, team, user, lead):
    client.force_login(user)

    row = client.get(reverse("experiments:team_list")).context["teams"].get()

    assert (row.member_count, row.my_role) == (2, "member")


def test_a_lead_adds_an_existing_user_by_username(as_lead, team):
    newcomer = UserFactory(username="nina")

    response = as_lead.post(reverse("experiments:team_member_add", args=[team.pk]),
                            {"username": " nina ", "role": "member"}, follow=True)

    assert _role(team, newcomer) == "member"
    assert "nina joined" in " ".join(_messages(response))


def test_adding_an_unknown_user_is_a_username_error(as_lead, team):
    response = as_lead.post(reverse("experiments:team_member_add", args=[team.pk]),
                            {"username": "<script>nobody</script>", "role": "member"})

    assert response.status_code == 200
    assert "No user is called" in response.context["add_form"].errors["username"][0]
    assert b"<script>nobody" not in response.content
    assert Membership.objects.filter(team=team).count() == 1


def test_adding_someone_twice_is_a_username_error(as_lead, team, user):
    response = as_lead.post(reverse("experiments:team_member_add", args=[team.pk]),
                            {"username": user.username, "role": "lead"})

    assert "already in" in response.context["add_form"].errors["username"][0]
    assert _role(team, user) == "member"


@pytest.mark.parametrize("data", [{"username": "", "role": "member"}, {"username": "nina", "role": "owner"}])
def test_bad_add_member_input_is_a_field_error(as_lead, team, data):
    UserFactory(username="nina")

    response = as_lead.post(reverse("experiments:team_member_add", args=[team.pk]), data)

    assert response.status_code == 200
    assert response.context["add_form"].errors
    assert Membership.objects.filter(team=team).count() == 1


def test_a_member_cannot_manage_the_team(client, team, user, lead):
    client.force_login(user)
    newcomer = UserFactory()
    lead_membership = _membership(team, lead)

    add = client.post(reverse("experiments:team_member_add", args=[team.pk]),
                      {"username": newcomer.username, "role": "member"})
    promote = client.post(reverse("experiments:team_member_role", args=[team.pk, _membership(team, user).pk]),
                          {"role": "lead"})
    remove = client.post(reverse("experiments:team_member_remove", args=[team.pk, lead_membership.pk]))

    assert (add.status_code, promote.status_code, remove.status_code) == (403, 403, 403)
    assert (_role(team, newcomer), _role(team, user), _role(team, lead)) == (None, "member", "lead")


def test_a_lead_promotes_and_removes_members(as_lead, team, user):
    membership = _membership(team, user)

    as_lead.post(reverse("experiments:team_member_role", args=[team.pk, membership.pk]), {"role": "lead"})
    assert _role(team, user) == "lead"
    as_lead.post(reverse("experiments:team_member_remove", args=[team.pk, membership.pk]))
    assert _role(team, user) is None


def test_the_last_lead_can_be_neither_demoted_nor_removed(as_lead, team, lead):
    membership = _membership(team, lead)

    demote = as_lead.post(reverse("experiments:team_member_role", args=[team.pk, membership.pk]),
                          {"role": "member"}, follow=True)
    remove = as_lead.post(
        reverse("experiments:team_member_remove", args=[team.pk, membership.pk]), follow=True
    )

    assert "last lead" in " ".join(_messages(demote))
    assert "last lead" in " ".join(_messages(remove))
    assert _role(team, lead) == "lead"


def test_a_lead_can_step_down_when_another_lead_remains(as_lead, team, user, lead):
    Membership.objects.filter(team=team, user=user).update(role=Membership.Role.LEAD)

    response = as_lead.post(
        reverse("experiments:team_member_remove", args=[team.pk, _membership(team, lead).pk])
    )

    assert response.url == reverse("experiments:team_list")
    assert _role(team, lead) is None and _role(team, user) == "lead"


def test_staff_manage_any_team(client, staff_user, team, user):
    client.force_login(staff_user)

    client.post(reverse("experiments:team_member_role", args=[team.pk, _membership(team, user).pk]),
                {"role": "lead"})

    assert _role(team, user) == "lead"


@pytest.mark.django_db(transaction=True)
def test_two_demotions_at_once_leave_one_lead(team, staff_user):
    first, second = UserFactory(), UserFactory()
    a = MembershipFactory(team=team, user=first, role=Membership.Role.LEAD)
    b = MembershipFactory(team=team, user=second, role=Membership.Role.LEAD)
    first_holds_the_lock = threading.Event()
    errors: list[Exception] = []

    def demote_b_and_wait() -> None:
        try:
            with transaction.atomic():
                teams.team_member_set_role(membership=b, role=Membership.Role.MEMBER, by=staff_user)
                first_holds_the_lock.set()
                time.sleep(0.5)  # the other demotion must now wait for this commit
        finally:
            connections.close_all()

    def demote_a() -> None:
        first_holds_the_lock.wait(5)
        try:
            teams.team_member_set_role(membership=a, role=Membership.Role.MEMBER, by=staff_user)
        except ValidationError as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=demote_b_and_wait), threading.Thread(target=demote_a)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)

    # The second demotion waited for the first to commit, then saw that it would remove the last lead.
    assert len(errors) == 1
    assert Membership.objects.filter(team=team, role=Membership.Role.LEAD).count() == 1


# --- the team switcher ----------------------------------------------------------------------------
@pytest.fixture
def two_teams(user, team):
    other = TeamFactory(name="Speech")
    MembershipFactory(user=user, team=other)
    ExperimentFactory(team=team, name="vision experiment")
    ExperimentFactory(team=other, name="speech experiment")
    return team, other


def _switch(client, team_id, next_url="/experiments/"):
    return client.post(reverse("experiments:team_switch"), {"team": team_id or "", "next": next_url})


def test_the_header_offers_the_users_teams_only(client_logged_in, two_teams, other_team):
    html = client_logged_in.get(reverse("experiments:home")).content.decode()

    options = re.findall(r'<option value="(\d*)"[^>]*>([^<]+)</option>', html.split('id="team-switch"')[1])
    assert [name for _, name in options] == ["All my teams", *sorted(t.name for t in two_teams)]
    assert other_team.name not in html


def test_switching_team_filters_the_lists_and_all_my_teams_shows_everything(client_logged_in, two_teams):
    team, other = two_teams
    url = reverse("experiments:experiment_list")

    response = _switch(client_logged_in, other.pk)
    assert response.status_code == 302 and response.url == url
    page = client_logged_in.get(url)
    assert [e.name for e in page.context["page"].object_list] == ["speech experiment"]
    assert page.context["team_switcher"].current == other
    assert client_logged_in.session["team_id"] == other.pk

    _switch(client_logged_in, None)
    names = {e.name for e in client_logged_in.get(url).context["page"].object_list}
    assert names == {"speech experiment", "vision experiment"}
    assert "team_id" not in client_logged_in.session


def test_switching_to_a_team_the_user_is_not_in_is_refused(client_logged_in, two_teams, other_team):
    response = _switch(client_logged_in, other_team.pk)

    assert response.status_code == 400
    assert "team_id" not in client_logged_in.session


@pytest.mark.parametrize("next_url", ["https://evil.example/", "//evil.example/x", "models", ""])
def test_the_switch_never_redirects_off_site(client_logged_in, two_teams, next_url):
    response = _switch(client_logged_in, two_teams[0].pk, next_url)

    assert response.status_code == 302
    assert response.url == reverse("experiments:home")


def test_a_team_left_since_is_forgotten(client_logged_in, user, two_teams):
    team, other = two_teams
    _switch(client_logged_in, other.pk)
    Membership.objects.filter(user=user, team=other).delete()

    page = client_logged_in.get(reverse("experiments:experiment_list"))

    assert [e.name for e in page.context["page"].object_list] == ["vision experiment"]
    assert page.context["team"] is None
    assert "team_id" not in client_logged_in.session


def test_staff_switch_to_any_team(client, staff_user, team, other_team):
    ExperimentFactory(team=other_team, name="theirs")
    ExperimentFactory(team=team, name="ours")
    client.force_login(staff_user)

    _switch(client, other_team.pk)

    page = client.get(reverse("experiments:experiment_list"))
    assert [e.name for e in page.context["page"].object_list] == ["theirs"]


@pytest.mark.parametrize(("name", "factory", "noun"), [
    ("model_list", ModelSpecFactory, "models"), ("dataset_list", DatasetSpecFactory, "datasets"),
    ("recipe_list", RecipeFactory, "recipes"), ("experiment_list", ExperimentFactory, "experiments"),
])
def test_an_empty_team_says_what_to_do_next(client_logged_in, user, team, name, factory, noun):
    factory(team=team)
    empty = TeamFactory(name="Speech")
    MembershipFactory(user=user, team=empty)
    _switch(client_logged_in, empty.pk)

    html = client_logged_in.get(reverse(f"experiments:{name}")).content.decode()

    assert f"No {noun} in Speech yet" in html
    assert 'href="/' in html.split(f"No {noun} in Speech yet")[1].split("</p>")[0]


# --- sorting and pagination -----------------------------------------------------------------------
def test_lists_show_25_rows_a_page_and_page_two_the_rest(client_logged_in, team):
    for i in range(30):
        ModelSpecFactory(team=team, name=f"model-{i:02d}")
    url = reverse("experiments:model_list")

    first = client_logged_in.get(url)
    second = client_logged_in.get(url, {"page": 2})

    assert [m.name for m in first.context["page"].object_list] == [f"model-{i:02d}" for i in range(25)]
    assert [m.name for m in second.context["page"].object_list] == [f"model-{i:02d}" for i in range(25, 30)]
    assert 'href="?page=2"' in first.content.decode()
    assert "Page 2 of 2" in second.content.decode()


@pytest.mark.parametrize("page", ["abc", "999", "-1", "0", "1e9", "%00"])
def test_a_bad_page_number_shows_a_page(client_logged_in, team, page):
    ModelSpecFactory(team=team)

    assert client_logged_in.get(reverse("experiments:model_list"), {"page": page}).status_code == 200


def test_sorting_by_a_column_and_back(client_logged_in, team):
    ModelSpecFactory(team=team, name="big", param_count=9_000_000)
    ModelSpecFactory(team=team, name="small", param_count=1_000)
    ModelSpecFactory(team=team, name="unknown", param_count=None)
    url = reverse("experiments:model_list")

    descending = client_logged_in.get(url, {"sort": "-params"})
    ascending = client_logged_in.get(url, {"sort": "params"})

    assert [m.name for m in descending.context["models"]] == ["big", "small", "unknown"]
    assert [m.name for m in ascending.context["models"]] == ["small", "big", "unknown"]
    html = descending.content.decode()
    # The sorted header says so and links to the other direction; the others sort as a first click would.
    assert re.search(r'aria-sort="descending"><a class="sort-link" href="\?sort=params"', html)
    assert 'href="?sort=-created_at"' in html and 'href="?sort=name"' in html


@pytest.mark.parametrize(
    "sort", ["password", "team__memberships__user__password", "-", "", "name;drop", "x" * 500]
)
@pytest.mark.parametrize("name", ["model_list", "dataset_list", "recipe_list", "experiment_list"])
def test_an_unknown_sort_falls_back_to_the_default(client_logged_in, team, name, sort):
    ExperimentFactory(team=team)

    response = client_logged_in.get(reverse(f"experiments:{name}"), {"sort": sort})

    assert response.status_code == 200
    assert response.context["sort"] in ("name", "-created_at")


@pytest.mark.parametrize(
    ("name", "sort"),
    [
        ("model_list", "-created_at"),
        ("model_list", "team"),
        ("model_list", "labels"),
        ("model_list", "source"),
        ("dataset_list", "-classes"),
        ("dataset_list", "source"),
        ("recipe_list", "scheme"),
        ("recipe_list", "-name"),
        ("experiment_list", "-runs"),
        ("experiment_list", "dataset"),
        ("experiment_list", "team"),
    ],
)
def test_every_offered_sort_works(client_logged_in, team, name, sort):
    ExperimentFactory.create_batch(2, team=team)
    RecipeFactory.create_batch(2, team=team)

    response = client_logged_in.get(reverse(f"experiments:{name}"), {"sort": sort})

    assert response.status_code == 200
    assert response.context["sort"] == sort


def test_page_links_keep_the_sort(client_logged_in, team):
    DatasetSpecFactory.create_batch(26, team=team)

    html = client_logged_in.get(reverse("experiments:dataset_list"), {"sort": "-created_at"}).content.decode()

    assert 'href="?sort=-created_at&amp;page=2"' in html


def test_the_add_member_form_is_labelled_and_focused(as_lead, team):
    html = as_lead.get(reverse("experiments:team_detail", args=[team.pk])).content.decode()

    assert re.search(r'<label for="id_username"[^>]*>', html)
    assert re.search(r'<input[^>]*name="username"[^>]*autofocus', html)


def test_create_forms_start_in_the_header_team_with_the_cursor_in_the_name(client, user):
    from django.urls import reverse

    from tests.factories import MembershipFactory, TeamFactory

    first, second = TeamFactory(name="aaa-team"), TeamFactory(name="zzz-team")
    MembershipFactory(team=first, user=user)
    MembershipFactory(team=second, user=user)
    client.force_login(user)
    session = client.session
    session["team_id"] = second.pk
    session.save()
    for name in ("model_create", "dataset_create", "recipe_create", "experiment_create"):
        response = client.get(reverse(f"experiments:{name}"))
        form = response.context["form"]
        assert form["team"].value() == second.pk, name
        assert 'autofocus' in str(form["name"]), name
