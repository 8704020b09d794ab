"""Request bodies with a size cap, checked on the Content-Length before anything is read.

DRF hands some parsers the raw stream, which bypasses Django's DATA_UPLOAD_MAX_MEMORY_SIZE check (applied only
when ``request.body`` is read): JSON gets that cap here too, YAML documents a smaller one of their own.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import exceptions, parsers, status

from experiments.domain import inputs

YAML_MAX_BYTES = 256 * 1024


class RequestTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is too large."
    default_code = "too_large"


def _check_size(parser_context: dict[str, Any] | None, limit: int) -> None:
    request = (parser_context or {}).get("request")
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0) if request is not None else 0
    except ValueError:
        raise exceptions.ParseError("Bad Content-Length header.") from None
    if length > limit:
        raise RequestTooLarge(f"The request body is {length} bytes; the limit is {limit}.")


class CappedJSONParser(parsers.JSONParser):
    """JSON bodies, capped in size, and checked as a whole before any view reads them: text with a NUL
    character or a lone surrogate, non-text keys and nesting deeper than ``validation.MAX_NESTING`` are field
    errors (a 400), wherever they sit in the body, instead of a database error later
    (``validation.data_errors``)."""

    def parse(self, stream, media_type=None, parser_context=None):
        _check_size(parser_context, settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:  # the json module's own limit, met by "[[[[…" bodies
            raise exceptions.ParseError(
                f"JSON parse error - nested deeper than {inputs.MAX_NESTING} levels."
            ) from None
        if errors := inputs.data_errors(data):
            raise exceptions.ValidationError(errors)
        return data


class YAMLTextParser(parsers.BaseParser):
    """A YAML document, handed to the view as text (api.yaml_io parses it with ``yaml.safe_load``)."""

    media_type = "application/yaml"

    def parse(self, stream, media_type=None, parser_context=None) -> str:
        _check_size(parser_context, YAML_MAX_BYTES)
        data = stream.read(YAML_MAX_BYTES + 1) if stream is not None else b""
        if len(data) > YAML_MAX_BYTES:
            raise RequestTooLarge(f"A YAML document may be at most {YAML_MAX_BYTES} bytes.")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise exceptions.ParseError("The YAML document is not valid UTF-8.") from None


class XYAMLTextParser(YAMLTextParser):
    media_type = "application/x-yaml"


class TextYAMLParser(YAMLTextParser):
    media_type = "text/yaml"


class PlainTextYAMLParser(YAMLTextParser):
    media_type = "text/plain"


YAML_PARSERS = [YAMLTextParser, XYAMLTextParser, TextYAMLParser, PlainTextYAMLParser]
