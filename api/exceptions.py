"""Errors as JSON: DRF's own, the services' Django ValidationError as 400 with field keys, and an oversized
body as 413."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from .parsers import RequestTooLarge


def validation_detail(exc: DjangoValidationError) -> dict[str, list[str]]:
    """A service's ValidationError as DRF's error body: ``{field: [messages]}``; keyless ones under
    ``non_field_errors``."""
    if hasattr(exc, "error_dict"):
        return {("non_field_errors" if k == "__all__" else k): v for k, v in exc.message_dict.items()}
    return {"non_field_errors": exc.messages}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(validation_detail(exc))
    elif isinstance(
        exc, RequestDataTooBig
    ):  # Django's DATA_UPLOAD_MAX_MEMORY_SIZE, met while DRF reads the body
        exc = RequestTooLarge(f"The request body is over {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes.")
    return drf_exception_handler(exc, context)
