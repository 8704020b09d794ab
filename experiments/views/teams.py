"""Team pages: the user's teams, one team's members, what a lead changes there, and the header's team switch.

A team the user is not in gives 404 (staff see every team). Membership changes are POSTs that only a lead of
the team (or staff) may make: others get 403. The forms here only validate; ``experiments.services.teams``
decides.
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, HttpResponseRedirect
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from experiments.models import Membership, Team
from experiments.selectors import teams as teams_reads
from experiments.services import teams as teams_writes


class MemberAddForm(forms.Form):
    username = forms.CharField(max_length=150, widget=forms.TextInput(attrs={"autofocus": True}),
                               help_text="An existing account; they see the team's records at once.")
    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.MEMBER,
                             help_text="Leads can also add, promote and remove members.")


class MemberRoleForm(forms.Form):
    role = forms.ChoiceField(choices=Membership.Role.choices)


class TeamSwitchForm(forms.Form):
    team = forms.IntegerField(required=False, min_value=1)  # empty: all the user's teams
    next = forms.CharField(required=False, max_length=2000)


def _team(request: HttpRequest, team_id: int) -> Team:
    return get_object_or_404(teams_reads.team_summaries(user=request.user), pk=team_id)


def _managed_team(request: HttpRequest, team_id: int) -> Team:
    """The team whose membership the request changes: 404 if the user is not in it, 403 if not a lead."""
    team = _team(request, team_id)
    if not teams_reads.can_manage(user=request.user, team=team):
        raise PermissionDenied("Only a lead of this team can change its members.")
    return team


def _membership(team: Team, membership_id: int) -> Membership:
    return get_object_or_404(Membership.objects.select_related("user", "team"), pk=membership_id, team=team)


@require_GET
def team_list_page(request: HttpRequest) -> HttpResponse:
    return TemplateResponse(
        request, "experiments/team_list.html", {"teams": teams_reads.team_summaries(user=request.user)}
    )


@require_GET
def team_detail(request: HttpRequest, team_id: int) -> HttpResponse:
    team = _team(request, team_id)
    return _render_team(request, team, MemberAddForm())


def _render_team(request: HttpRequest, team: Team, add_form: MemberAddForm) -> HttpResponse:
    context = {
        "team": team,
        "members": teams_reads.team_members(team=team),
        "can_manage": teams_reads.can_manage(user=request.user, team=team),
        "add_form": add_form,
        "roles": Membership.Role.choices,
    }
    return TemplateResponse(request, "experiments/team_detail.html", context)


@require_POST
def team_member_add(request: HttpRequest, team_id: int) -> HttpResponse:
    team = _managed_team(request, team_id)
    form = MemberAddForm(request.POST)
    if form.is_valid():
        try:
            membership = teams_writes.team_member_add(team=team, by=request.user, **form.cleaned_data)
        except ValidationError as exc:
            for field, errors in exc.message_dict.items():
                for error in errors:
                    form.add_error(field if field in form.fields else None, error)
        else:
            messages.success(
                request, f"{membership.user} joined {team} as {membership.get_role_display().lower()}."
            )
            return redirect("experiments:team_detail", team_id=team.pk)
    return _render_team(request, team, form)


@require_POST
def team_member_role(request: HttpRequest, team_id: int, membership_id: int) -> HttpResponse:
    team = _managed_team(request, team_id)
    membership = _membership(team, membership_id)
    form = MemberRoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose a role: member or lead.")
        return redirect("experiments:team_detail", team_id=team.pk)
    try:
        membership = teams_writes.team_member_set_role(membership=membership, role=form.cleaned_data["role"],
                                                by=request.user)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        messages.success(
            request, f"{membership.user} is now a {membership.get_role_display().lower()} of {team}."
        )
    return redirect("experiments:team_detail", team_id=team.pk)


@require_POST
def team_member_remove(request: HttpRequest, team_id: int, membership_id: int) -> HttpResponse:
    team = _managed_team(request, team_id)
    membership = _membership(team, membership_id)
    try:
        teams_writes.team_member_remove(membership=membership, by=request.user)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect("experiments:team_detail", team_id=team.pk)
    if membership.user_id == request.user.pk and not request.user.is_staff:
        messages.success(request, f"You left {team}.")
        return redirect("experiments:team_list")
    messages.success(request, f"{membership.user} was removed from {team}.")
    return redirect("experiments:team_detail", team_id=team.pk)


@require_POST
def team_switch(request: HttpRequest) -> HttpResponse:
    """Choose the team the list pages show (or all the user's teams), then go back to the page it came
    from."""
    form = TeamSwitchForm(request.POST)
    if not form.is_valid():
        return HttpResponseBadRequest("Choose a team from the list.")
    try:
        teams_writes.select_team(request, team_id=form.cleaned_data["team"])
    except ValidationError:
        return HttpResponseBadRequest("You are not in that team.")
    target = form.cleaned_data["next"]
    if target.startswith("/") and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return HttpResponseRedirect(target)
    return redirect("experiments:home")
