"""The layering rules, read from the source (every import statement, at any depth, lazy ones included):

- the engine (``workers/engine``) imports nothing of Django, the web apps, Celery or the rest of ``workers``;
- ``experiments/plots.py`` builds figures from values: no ORM, no records;
- ``experiments/domain`` holds the rules forms, services and the API share: no views, forms, services,
  selectors, requests or API; it may read records but never writes one, and its pure modules (the leaderboard
  and comparison maths, sweeps) touch no ORM at all;
- reads never write: ``experiments/selectors`` imports no services;
- the API stands on its own: ``api`` imports no forms;
- template tags are for templates: no Python module imports ``experiments.templatetags``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports made absolute."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def python_files(*folders: str) -> list[Path]:
    return sorted(
        p for folder in folders for p in (REPO / folder).rglob("*.py") if "migrations" not in p.parts
    )


def breaking(paths: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for path in paths:
        hits = sorted(
            m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in forbidden)
        )
        if hits:
            bad[str(path.relative_to(REPO))] = hits
    return bad


def test_the_engine_imports_no_django_web_or_celery():
    forbidden = ("django", "experiments", "api", "distillweb", "distillweb_cli", "celery", "workers.tasks",
                 "workers.reporting", "workers.fleet", "workers.fleet_tasks", "workers.lifecycle_tasks",
                 "workers.lost_process", "workers.sessions", "workers.gpus", "workers.apps")
    assert breaking(python_files("workers/engine"), forbidden) == {}


def test_plots_read_no_records():
    assert (
        breaking(
            [REPO / "experiments/plots.py"],
            ("django.db", "experiments.models", "experiments.selectors", "experiments.services"),
        )
        == {}
    )


def test_the_domain_imports_no_views_forms_services_selectors_or_requests():
    forbidden = (
        "experiments.views",
        "experiments.forms",
        "experiments.forms_compare",
        "experiments.services",
        "experiments.selectors",
        "django.http",
        "api",
    )
    assert breaking(python_files("experiments/domain"), forbidden) == {}


PURE_DOMAIN = ("leaderboard", "compare", "sweeps")


def test_the_pure_domain_modules_touch_no_orm():
    paths = [REPO / f"experiments/domain/{name}.py" for name in PURE_DOMAIN]
    assert breaking(paths, ("experiments.models", "django.db")) == {}


# The ORM's writes, by method name: a domain module that calls one of these is writing records. ``update`` and
# ``delete`` count on a query (``Run.objects.filter(...).update()``), not on a dict or a set.
ORM_WRITES = {"save", "create", "bulk_create", "bulk_update", "get_or_create", "update_or_create",
              "select_for_update"}
QUERY_WRITES = {"update", "delete"}


def _is_write(call: ast.Call) -> bool:
    name, receiver = call.func.attr, call.func.value
    on_query = isinstance(receiver, ast.Call) or (
        isinstance(receiver, ast.Attribute) and receiver.attr == "objects"
    )
    return name in ORM_WRITES or (name in QUERY_WRITES and on_query)


def orm_writes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    calls = [
        node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    ]
    found = [f"{node.lineno}: .{node.func.attr}()" for node in calls if _is_write(node)]
    found += [f"{node.lineno}: transaction.{node.attr}" for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and node.attr in ("atomic", "on_commit")]
    return found


def test_the_domain_writes_no_records():
    writes = {
        str(p.relative_to(REPO)): hits for p in python_files("experiments/domain") if (hits := orm_writes(p))
    }
    assert writes == {}


def test_the_write_detector_sees_a_write(tmp_path, monkeypatch):
    source = "def f(run, d):\n    d.update(a=1)\n    run.save()\n    Run.objects.filter(pk=1).update(x=2)\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    assert orm_writes(REPO / "experiments/domain/_probe.py") == ["3: .save()", "4: .update()"]


def test_selectors_import_no_services():
    assert breaking(python_files("experiments/selectors"), ("experiments.services",)) == {}


def test_the_api_imports_no_forms():
    assert breaking(python_files("api"), ("experiments.forms", "experiments.forms_compare")) == {}


def test_no_python_module_imports_template_tags():
    modules = [p for p in python_files("experiments", "api", "workers", "distillweb", "distillweb_cli")
               if "templatetags" not in p.parts]
    assert breaking(modules, ("experiments.templatetags",)) == {}


@pytest.mark.parametrize(("source", "expected"), [
    ("from . import methods\n", {"workers.engine", "workers.engine.methods"}),
    ("def f():\n    from django.db import connection\n", {"django.db", "django.db.connection"}),
    ("import torch.nn as nn\n", {"torch.nn"}),
])
def test_imports_are_read_at_any_depth_and_made_absolute(tmp_path, monkeypatch, source, expected):
    path = REPO / "workers/engine/_probe_for_import_rules.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    assert imported_modules(path) == expected
