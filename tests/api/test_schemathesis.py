"""Property-based requests against the served OpenAPI schema (schemathesis): every operation, called with
generated input by an authenticated user, answers without a server error, with a status code its schema
documents, in the documented content type and shape.

Bounded: ``SCHEMATHESIS_MAX_EXAMPLES`` generated cases per operation (default 6) after the schema's own
examples, no shrinking; the whole module takes about a minute on an idle 2-core machine.
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.conftest import make_token

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "6"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture
def in_test_transaction(db):
    """The app is called in this thread, inside the test's transaction: keep Django from closing the
    connection at the end of each request, as its test client does."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def records(in_test_transaction, user, digits_setup, experiment, run):
    """A team with records of every kind, so that some generated ids name real ones."""
    return {"token": make_token(user), "run": run}


# The schema as the server serves it (drf-spectacular renders it per request; no database access).
schema = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application())


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)
def test_every_operation_answers_as_documented(case, records):
    case.call_and_validate(headers={"Authorization": f"Bearer {records['token']}"}, checks=CHECKS)


def test_the_schema_documents_the_shared_error_answers_of_every_operation():
    operations = [
        (path, method, operation)
        for path, methods in schema.raw_schema["paths"].items()
        for method, operation in methods.items()
    ]

    assert len(operations) >= 29
    for path, method, operation in operations:
        codes = set(operation["responses"])
        assert {"401", "403"} <= codes, (method, path)
        if "{id}" in path:
            assert "404" in codes, (method, path)
        if "requestBody" in operation:
            assert {"400", "413", "415"} <= codes, (method, path)
    term_sweeps = schema.raw_schema["components"]["schemas"]["ExperimentCreateRequest"]["properties"][
        "term_sweeps"
    ]
    by_param = term_sweeps["oneOf"][1]["items"]["oneOf"][1]["properties"]["param"]
    assert by_param["pattern"] and "NUL" in schema.raw_schema["info"]["description"]
