"""Shared fixtures: users in teams, and a ready digits setup (dataset, teacher, students, recipe)."""

import pytest

from experiments.models import Membership
from tests.factories import (
    DatasetSpecFactory,
    MembershipFactory,
    ModelSpecFactory,
    RecipeFactory,
    TeamFactory,
    UserFactory,
)


@pytest.fixture(autouse=True)
def _artifact_root(settings, tmp_path):
    """Every test writes artifacts to its own folder."""
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    settings.ARTIFACT_ROOT.mkdir()


@pytest.fixture
def team(db):
    return TeamFactory()


@pytest.fixture
def user(team):
    user = UserFactory()
    MembershipFactory(user=user, team=team, role=Membership.Role.MEMBER)
    return user


@pytest.fixture
def other_team(db):
    return TeamFactory()


@pytest.fixture
def other_user(other_team):
    user = UserFactory()
    MembershipFactory(user=user, team=other_team)
    return user


@pytest.fixture
def staff_user(db):
    return UserFactory(is_staff=True, is_superuser=True)


@pytest.fixture
def client_logged_in(client, user):
    client.force_login(user)
    return client


@pytest.fixture
def digits_setup(team, user):
    """A digits dataset, an MLP teacher, two MLP students and a kd recipe, all in ``team``."""
    return {
        "dataset": DatasetSpecFactory(team=team, name="digits"),
        "teacher": ModelSpecFactory(team=team, name="mlp-teacher", config={"hidden_sizes": [64]}),
        "students": [
            ModelSpecFactory(team=team, name="mlp-16", config={"hidden_sizes": [16]}),
            ModelSpecFactory(team=team, name="mlp-32", config={"hidden_sizes": [32]}),
        ],
        "recipe": RecipeFactory(team=team, name="kd-t4"),
    }
