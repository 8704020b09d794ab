"""``path_for``: a one-id route's path from one reverse per route, equal to ``{% url %}``'s."""

from __future__ import annotations

import pytest
from django.template import Context, Template
from django.urls import reverse, set_script_prefix

from experiments.templatetags.distill import path_for

ROUTES = ["experiments:run_detail", "experiments:run_config_json", "experiments:model_detail",
          "experiments:experiment_detail"]


@pytest.mark.parametrize("name", ROUTES)
@pytest.mark.parametrize("pk", [1, 42, 987654321, 10**12])
def test_the_path_is_the_reversed_url(name, pk):
    assert path_for(pk, name) == reverse(name, args=[pk])


def test_a_script_prefix_is_followed():
    try:
        set_script_prefix("/board/")
        assert path_for(7, "experiments:run_detail") == reverse("experiments:run_detail", args=[7])
        assert path_for(7, "experiments:run_detail").startswith("/board/")
    finally:
        set_script_prefix("/")
    assert not path_for(7, "experiments:run_detail").startswith("/board/")


def test_the_filter_in_a_template_escapes_nothing_and_rejects_a_non_id():
    html = Template('{% load distill %}<a href="{{ pk|path_for:"experiments:run_detail" }}">').render(
        Context({"pk": 5})
    )
    assert html == f'<a href="{reverse("experiments:run_detail", args=[5])}">'
    with pytest.raises(ValueError):
        path_for("../5", "experiments:run_detail")
