"""The layering rules, read from the source (every import statement, at any depth, lazy ones included):

- the engine (``workers/engine``) imports nothing of Django, the web apps, Celery or the rest of ``workers``;
- ``experiments/plots.py`` builds figures from values: no ORM, no records;
- ``experiments/domain`` holds rules without requests or records: no views, forms, services, selectors or ORM;
- reads never write: ``experiments/selectors.py`` imports no services;
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
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py") if "migrations" not in p.parts)


def breaking(paths: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for path in paths:
        hits = sorted(m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in forbidden))
        if hits:
            bad[str(path.relative_to(REPO))] = hits
    return bad


def test_the_engine_imports_no_django_web_or_celery():
    forbidden = ("django", "experiments", "api", "distillweb", "distillweb_cli", "celery", "workers.tasks",
                 "workers.reporting", "workers.fleet", "workers.fleet_tasks", "workers.lifecycle_tasks",
                 "workers.lost_process", "workers.sessions", "workers.gpus", "workers.apps")
    assert breaking(python_files("workers/engine"), forbidden) == {}


def test_plots_read_no_records():
    assert breaking([REPO / "experiments/plots.py"], ("django.db", "experiments.models", "experiments.selectors",
                                                       "experiments.services")) == {}


def test_the_domain_imports_no_views_forms_services_or_orm():
    forbidden = ("experiments.views", "experiments.views_compare", "experiments.views_fleet", "experiments.views_setup",
                 "experiments.views_teams", "experiments.forms", "experiments.forms_compare", "experiments.services",
                 "experiments.selectors", "experiments.models", "django.db", "django.http", "api")
    assert breaking(python_files("experiments/domain"), forbidden) == {}


def test_selectors_import_no_services():
    assert breaking([REPO / "experiments/selectors.py"], ("experiments.services",)) == {}


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
