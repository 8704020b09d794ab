"""Team pages: the user's teams (where staff create one), one team's members and pending invites, what a lead
changes there, the page an invite link opens, and the header's team switch.

A team the user is not in gives 404 (staff see every team). Membership changes and invites are POSTs that only
a lead of the team (or staff) may make: others get 403. The two invite pages are the only pages here open
without logging in: the link's token is the credential (256 random bits: guessing one is hopeless, so the
link needs no throttle), a new account's password goes through the password validators, and signing in to an
existing account goes through the login page and its throttling. The forms here only validate;
``experiments.services.teams`` decides.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlencode

from django import forms
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_not_required
from django.contrib.auth.forms import UserCreationForm
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, HttpResponseRedirect
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from experiments.models import Membership, Team, TeamInvite
from experiments.selectors import teams as teams_reads
from experiments.services import teams as teams_writes


class MemberAddForm(forms.Form):
    username = forms.CharField(max_length=150, widget=forms.TextInput(attrs={"autofocus": True}),
                               help_text="An existing account; they see the team's records at once.")
    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.MEMBER,
                             help_text="Leads can also add, promote and remove members.")


class MemberRoleForm(forms.Form):
    role = forms.ChoiceField(choices=Membership.Role.choices)


class TeamCreateForm(forms.Form):
    name = forms.CharField(max_length=100)
    lead_username = forms.CharField(
        max_length=150, required=False, label="First lead (optional)",
        help_text="An existing account. Leave empty to invite the lead by a link from the team's page.",
    )


class InviteCreateForm(forms.Form):
    VALID_FOR_DAYS = [(1, "1 day"), (7, "7 days"), (14, "14 days"), (30, "30 days")]

    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.MEMBER,
                             help_text="The role the person gets when they accept.")
    valid_for_days = forms.TypedChoiceField(choices=VALID_FOR_DAYS, coerce=int, initial=7, required=False,
                                            empty_value=7, label="Valid for")
    note = forms.CharField(max_length=200, required=False, label="For (optional)",
                           help_text="Who it is for, to tell pending invites apart. Not sent anywhere.")


INVITE_FORM_IDS = "invite_%s"  # the add-member form on the same page has a role field too


class InviteRevokeForm(forms.Form):
    invite = forms.IntegerField(min_value=1)


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


def _add_errors(form: forms.Form, exc: ValidationError) -> None:
    if not hasattr(exc, "error_dict"):
        form.add_error(None, exc)
        return
    for field, errors in exc.message_dict.items():
        for error in errors:
            form.add_error(field if field in form.fields else None, error)


@require_http_methods(["GET", "POST"])
def team_list_page(request: HttpRequest) -> HttpResponse:
    """The user's teams; staff also create a team here (a POST from anyone else gets 403)."""
    form = TeamCreateForm(request.POST if request.method == "POST" else None)
    status = 200
    if request.method == "POST":
        if not request.user.is_staff:
            raise PermissionDenied("Only staff can create teams.")
        if form.is_valid():
            try:
                team = teams_writes.team_create_by_staff(by=request.user, **form.cleaned_data)
            except ValidationError as exc:
                _add_errors(form, exc)
            else:
                messages.success(request, f"Team {team} created. Add or invite its members here.")
                return redirect("experiments:team_detail", team_id=team.pk)
        status = 400
    context = {"teams": teams_reads.team_summaries(user=request.user), "create_form": form}
    return TemplateResponse(request, "experiments/team_list.html", context, status=status)


@require_GET
def team_detail(request: HttpRequest, team_id: int) -> HttpResponse:
    team = _team(request, team_id)
    return _render_team(request, team)


def _render_team(
    request: HttpRequest,
    team: Team,
    add_form: MemberAddForm | None = None,
    invite_form: InviteCreateForm | None = None,
    *,
    new_invite: TeamInvite | None = None,
    invite_url: str = "",
    status: int = 200,
) -> HttpResponse:
    can_manage = teams_reads.can_manage(user=request.user, team=team)
    context = {
        "team": team,
        "members": teams_reads.team_members(team=team),
        "can_manage": can_manage,
        "add_form": add_form or MemberAddForm(),
        "invite_form": invite_form or InviteCreateForm(auto_id=INVITE_FORM_IDS),
        "invites": teams_reads.team_pending_invites(team=team) if can_manage else [],
        "new_invite": new_invite,
        "invite_url": invite_url,
        "roles": Membership.Role.choices,
    }
    return TemplateResponse(request, "experiments/team_detail.html", context, status=status)


@require_POST
def team_member_add(request: HttpRequest, team_id: int) -> HttpResponse:
    team = _managed_team(request, team_id)
    form = MemberAddForm(request.POST)
    if form.is_valid():
        try:
            membership = teams_writes.team_member_add(team=team, by=request.user, **form.cleaned_data)
        except ValidationError as exc:
            _add_errors(form, exc)
        else:
            messages.success(
                request, f"{membership.user} joined {team} as {membership.get_role_display().lower()}."
            )
            return redirect("experiments:team_detail", team_id=team.pk)
    return _render_team(request, team, form)


@require_POST
def team_invite_create(request: HttpRequest, team_id: int) -> HttpResponse:
    """Make a one-time invite link and show it on the team's page, this once (only its hash is kept)."""
    team = _managed_team(request, team_id)
    form = InviteCreateForm(request.POST, auto_id=INVITE_FORM_IDS)
    if form.is_valid():
        data = form.cleaned_data
        try:
            invite, token = teams_writes.team_invite_create(
                team=team, role=data["role"], note=data["note"], by=request.user,
                valid_for=timedelta(days=data["valid_for_days"]),
            )
        except ValidationError as exc:
            _add_errors(form, exc)
        else:
            url = request.build_absolute_uri(reverse("experiments:team_invite_open", args=[token]))
            response = _render_team(request, team, new_invite=invite, invite_url=url)
            response["Cache-Control"] = "no-store"  # the page carries the link's token
            return response
    return _render_team(request, team, invite_form=form, status=400)


@require_POST
def team_invite_revoke(request: HttpRequest, team_id: int) -> HttpResponse:
    team = _managed_team(request, team_id)
    form = InviteRevokeForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose the invite to revoke.")
        return redirect("experiments:team_detail", team_id=team.pk)
    invite = get_object_or_404(TeamInvite.objects.select_related("team"), pk=form.cleaned_data["invite"],
                               team=team)
    try:
        teams_writes.team_invite_revoke(invite=invite, by=request.user)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
    else:
        whom = f" for {invite.note}" if invite.note else ""
        messages.success(request, f"The invite{whom} was revoked: its link no longer works.")
    return redirect("experiments:team_detail", team_id=team.pk)


class InviteSignupForm(UserCreationForm):
    """A new account made from an invite link: a username and a password (twice), checked by the site's
    password validators."""


INVITE_SESSION_KEY = "team_invite_id"


def _render_invite(request: HttpRequest, context: dict, *, status: int = 200) -> HttpResponse:
    return TemplateResponse(request, "experiments/team_invite_accept.html", context, status=status)


def _invite_refused(request: HttpRequest, exc: teams_writes.InviteRefused) -> HttpResponse:
    status = 404 if exc.reason == "invalid" else 409 if exc.reason == "member" else 410
    return _render_invite(request, {"invite": exc.invite, "problem": exc.messages[0], "reason": exc.reason},
                          status=status)


def _unusable(request: HttpRequest, invite: TeamInvite | None) -> HttpResponse | None:
    """The page that says why the invite cannot be used, or None if it can."""
    refusal = teams_reads.invite_refusal(invite)
    if refusal is None:
        return None
    reason, message = refusal
    return _invite_refused(request, teams_writes.InviteRefused(message, reason=reason, invite=invite))


@login_not_required
@never_cache
@require_GET
def team_invite_open(request: HttpRequest, token: str) -> HttpResponse:
    """The link itself: check its token, remember the invite in the session and go on to the accept page, so
    that the live token stays out of the address bar, the Referer header and the request logs (as Django's
    password reset does). A link that can no longer be used says why here."""
    invite = teams_reads.invite_for_token(token)
    if (refused := _unusable(request, invite)) is not None:
        return refused
    request.session[INVITE_SESSION_KEY] = invite.pk
    return redirect("experiments:team_invite_accept")


@login_not_required
@never_cache
@require_http_methods(["GET", "POST"])
def team_invite_accept(request: HttpRequest) -> HttpResponse:
    """The invite the session holds (from its link). Signed in: join the team with one click. Not signed in:
    make an account here (and join), or log in first and come back here."""
    invite_id = request.session.get(INVITE_SESSION_KEY)
    invite = TeamInvite.objects.select_related("team", "created_by").filter(pk=invite_id).first()
    if invite is None:
        return _render_invite(request, {"problem": "Open the invitation link you were sent to join a team.",
                                        "reason": "invalid"}, status=404)
    if (refused := _unusable(request, invite)) is not None:
        return refused
    context = {"invite": invite, "login_url": f"{reverse('login')}?{urlencode({'next': request.path})}"}
    if request.user.is_authenticated:
        return _accept_signed_in(request, invite, context)
    return _accept_new_account(request, invite, context)


def _joined(request: HttpRequest, membership: Membership, greeting: str = "") -> HttpResponse:
    request.session.pop(INVITE_SESSION_KEY, None)
    role = membership.get_role_display().lower()
    messages.success(request, f"{greeting}You joined {membership.team} as {role}.")
    return redirect("experiments:team_detail", team_id=membership.team_id)


def _accept_signed_in(request: HttpRequest, invite: TeamInvite, context: dict) -> HttpResponse:
    if request.method == "POST":
        try:
            membership = teams_writes.team_invite_accept(invite_id=invite.pk, user=request.user)
        except teams_writes.InviteRefused as exc:
            return _invite_refused(request, exc)
        return _joined(request, membership)
    context["already_member"] = Membership.objects.filter(team=invite.team, user=request.user).exists()
    return _render_invite(request, context)


def _accept_new_account(request: HttpRequest, invite: TeamInvite, context: dict) -> HttpResponse:
    form = context["form"] = InviteSignupForm(request.POST if request.method == "POST" else None)
    if request.method != "POST":
        return _render_invite(request, context)
    if form.is_valid():
        data = form.cleaned_data
        try:
            membership = teams_writes.team_invite_accept_new_user(
                invite_id=invite.pk, username=data["username"], password=data["password1"]
            )
        except teams_writes.InviteRefused as exc:
            return _invite_refused(request, exc)
        except ValidationError as exc:
            _add_errors(form, exc)
        else:
            login(request, membership.user, backend="django.contrib.auth.backends.ModelBackend")
            return _joined(request, membership, greeting=f"Welcome, {membership.user}. ")
    return _render_invite(request, context, status=400)


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
