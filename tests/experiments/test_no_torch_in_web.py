"""The web process renders and validates recipes without importing torch: the term catalogue and its
validation live in ``workers.engine.terms``, which imports neither torch nor numpy.

Each check runs in a fresh interpreter, so nothing another test imported hides an import of torch.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter at the repository root; it prints one JSON object last."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_term_catalogue_imports_neither_torch_nor_numpy():
    seen = _run("""
        import json, sys
        from workers.engine import terms
        print(json.dumps({"torch": "torch" in sys.modules, "numpy": "numpy" in sys.modules,
                          "terms": len(terms.LOSS_TERMS)}))
    """)
    assert seen == {"torch": False, "numpy": False, "terms": 16}


def test_rendering_and_validating_a_recipe_imports_no_torch():
    seen = _run("""
        import json, os, sys
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "distillweb.settings.test")
        import django
        django.setup()
        from django.core.exceptions import ValidationError
        from experiments import forms
        from experiments.domain import sweeps, tokenizers, validation
        from api import serializers

        # The recipe form: render the term rows, then validate a filled one and a wrong one.
        catalog = forms.loss_term_catalog()
        rows = {"terms-TOTAL_FORMS": "2", "terms-INITIAL_FORMS": "0",
                "terms-0-name": "ce", "terms-0-weight": "0.1",
                "terms-1-name": "kd", "terms-1-weight": "0.9", "terms-1-temperature": "4"}
        formset = forms.TermFormSet(rows, prefix="terms", form_kwargs={"catalog": catalog})
        rendered = str(forms.TermFormSet(prefix="terms", form_kwargs={"catalog": catalog}))
        valid = formset.is_valid()
        terms = formset.terms()
        bad = forms.TermFormSet({**rows, "terms-1-temperature": "0"}, prefix="terms",
                                form_kwargs={"catalog": catalog})
        bad_errors = bad.is_valid() is False and "temperature" in bad.forms[1].errors

        # The API: the request body's serializer, then the terms as the recipe service validates them.
        body = serializers.RecipeCreateSerializer(data={"name": "r", "terms": terms})
        body_valid = body.is_valid()
        cleaned = validation.clean_terms(body.validated_data["terms"], scheme="offline")
        try:
            validation.clean_terms([{"name": "kd", "weight": 1, "params": {"temperature": 0}}],
                                   scheme="offline")
            api_error = ""
        except ValidationError as exc:
            api_error = str(exc)

        # Sweeps of term parameters and the pre-flight's tokenizer rule read the same catalogue.
        swept = sweeps.check_term_values("kd.temperature", [2, 4], limit=10)
        rule = tokenizers.tokenizer_rule(task="causal_lm", scheme="offline", term_names=["ce", "uld"])
        print(json.dumps({"torch": "torch" in sys.modules, "rendered": "temperature" in rendered,
                          "valid": valid, "terms": terms, "bad_errors": bad_errors, "body_valid": body_valid,
                          "cleaned": cleaned, "api_error": api_error, "swept": swept, "rule": rule}))
    """)
    assert seen["torch"] is False
    assert seen["rendered"] and seen["valid"] and seen["bad_errors"] and seen["body_valid"]
    assert seen["terms"] == [{"name": "ce", "weight": 0.1, "params": {}},
                             {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}}]
    assert seen["cleaned"] == [{"name": "ce", "weight": 0.1, "params": {"label_smoothing": 0.0}},
                               {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}}]
    assert "Parameter 'temperature' of loss term 'kd' must be > 0, got 0." in seen["api_error"]
    assert seen["swept"] == [2.0, 4.0] and seen["rule"] == "cross"


def test_the_web_side_reads_the_catalogue_from_terms_only():
    engine_with_torch = ("workers.engine.losses", "workers.engine.methods", "workers.engine.trainer")
    bad = {}
    for path in sorted(p for folder in ("experiments", "api") for p in (REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if isinstance(node, ast.ImportFrom):
                names += [f"{node.module}.{a.name}" for a in node.names]
            hits = [n for n in names if any(n == m or n.startswith(m + ".") for m in engine_with_torch)]
            if hits:
                bad.setdefault(str(path.relative_to(REPO)), []).extend(hits)
    assert bad == {}
