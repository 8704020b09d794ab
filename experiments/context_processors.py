"""Template context for every page: the header's team switcher."""

from __future__ import annotations

from dataclasses import dataclass

from django.http import HttpRequest
from django.utils.functional import SimpleLazyObject

from experiments.models import Team
from experiments.selectors import teams


@dataclass(frozen=True)
class TeamSwitcher:
    """The teams the header offers and the one chosen (None: "All my teams")."""

    teams: list[Team]
    current: Team | None


def team_switcher(request: HttpRequest) -> dict[str, object]:
    """``team_switcher`` for the header, validated against the user's memberships.

    Lazy: partials rendered for the JSON endpoints never show the header, so they never pay for its query. A
    list view that filters by the chosen team reads the same per-request list of teams (one query in all).
    """
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    return {"team_switcher": SimpleLazyObject(lambda: TeamSwitcher(teams.user_teams(request),
                                                                   teams.selected_team(request)))}
