"""Shared fixtures: users in teams, and a ready digits setup (dataset, teacher, students, recipe)."""

import uuid

import pytest
import torch

# Tiny test models run fastest on one thread, and two threads per process thrash the 2-core CI machine
# when a worker process trains beside the test process.
torch.set_num_threads(1)

# Imports of Django code live inside the fixtures, so that the engine's tests (tests/workers/engine) can run
# without Django at all: `pytest tests/workers/engine -p no:django`.


def pytest_collection_modifyitems(config, items):
    """pytest-timeout's per-test guard (``timeout`` in pyproject.toml) scales like every wait for a worker
    (tests/waiting.py, DISTILLWEB_TEST_WAIT_SCALE), so a loaded machine is never cut off by the guard before a
    wait's own bound. A ``--timeout`` given on the command line, or a test's own timeout mark, is kept."""
    from tests.waiting import wait_scale

    if config.getoption("timeout", None) is not None:
        return
    base = float(config.getini("timeout") or 0)
    if not base:
        return
    guard = pytest.mark.timeout(base * max(1.0, wait_scale()))
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(guard)


@pytest.fixture(autouse=True)
def _artifact_root(request, tmp_path):
    """Every Django test writes artifacts to its own folder."""
    if not request.config.pluginmanager.hasplugin("django"):
        return
    settings = request.getfixturevalue("settings")
    settings.ARTIFACT_ROOT = tmp_path / "artifacts"
    settings.ARTIFACT_ROOT.mkdir()


@pytest.fixture
def team(db):
    from tests.factories import TeamFactory

    return TeamFactory()


@pytest.fixture
def user(team):
    from tests.factories import MembershipFactory, UserFactory

    user = UserFactory()
    MembershipFactory(user=user, team=team, role="member")
    return user


@pytest.fixture
def other_team(db):
    from tests.factories import TeamFactory

    return TeamFactory()


@pytest.fixture
def other_user(other_team):
    from tests.factories import MembershipFactory, UserFactory

    user = UserFactory()
    MembershipFactory(user=user, team=other_team)
    return user


@pytest.fixture
def staff_user(db):
    from tests.factories import UserFactory

    return UserFactory(is_staff=True, is_superuser=True)


@pytest.fixture
def client_logged_in(client, user):
    client.force_login(user)
    return client


@pytest.fixture
def digits_setup(team, user):
    """A digits dataset, an MLP teacher, two MLP students and a kd recipe, all in ``team``."""
    from tests.factories import DatasetSpecFactory, ModelSpecFactory, RecipeFactory

    return {
        "dataset": DatasetSpecFactory(team=team, name="digits"),
        "teacher": ModelSpecFactory(team=team, name="mlp-teacher", config={"hidden_sizes": [64]}),
        "students": [
            ModelSpecFactory(team=team, name="mlp-16", config={"hidden_sizes": [16]}),
            ModelSpecFactory(team=team, name="mlp-32", config={"hidden_sizes": [32]}),
        ],
        "recipe": RecipeFactory(team=team, name="kd-t4"),
    }


@pytest.fixture
def celery_worker_process(transactional_db, settings, tmp_path, request):
    """One real `celery worker` on a queue of its own, sharing the test database and artifact root (with its
    pool's import warm-up where the test is marked ``worker_warmup``)."""
    from django.db import connections

    from tests.worker_process import WorkerProcess, redis_broker_url

    broker = redis_broker_url()
    queue = f"test-{uuid.uuid4().hex[:8]}"
    settings.RUN_QUEUE = queue
    worker = WorkerProcess(queue=queue, name=f"it-{queue}", broker_url=broker, log=tmp_path / "worker.log",
                           read_roots=(tmp_path,),  # the test's own files, wherever it registers them from
                           warmup=request.node.get_closest_marker("worker_warmup") is not None)
    try:
        worker.wait_registered()
        yield worker
    finally:
        worker.stop()
        connections.close_all()
