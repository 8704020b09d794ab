"""drf-spectacular extensions: how the API's own authentication appears in the OpenAPI schema."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "api.authentication.BearerTokenAuthentication"
    name = "bearerToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": 'A personal API token from the "API token" page: `Authorization: Bearer dw_…`.',
        }


# --- the error answers every operation can give --------------------------------------------------------
_DETAIL = {"$ref": "#/components/schemas/ErrorDetail"}
_FIELD_ERRORS = {"$ref": "#/components/schemas/FieldErrors"}
_ERROR_SCHEMAS = {
    "ErrorDetail": {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]},
    "FieldErrors": {
        "type": "object",
        "description": "Field errors: {field: [messages]} (errors of the body as a whole under "
        "non_field_errors); a body that cannot be parsed: {detail: message}.",
        "additionalProperties": {},
    },
}
_COMMON = {
    "401": (
        "No credentials, or a token that is unknown, revoked or expired (JSON, with WWW-Authenticate)",
        _DETAIL,
    ),
    "403": ("Authenticated, but not allowed (a read-only token, a session without its CSRF token)", _DETAIL),
}
_WITH_INPUT = {
    "400": ("Invalid input: field errors (query parameters or body)", _FIELD_ERRORS),
}
_WITH_BODY = {
    "413": ("The body is larger than the server accepts", _DETAIL),
    "415": ("A body in a media type this operation does not read", _DETAIL),
}
_WITH_ID = {"404": ("No such record among your teams'", _DETAIL)}


INPUT_RULES = (
    "Every JSON body and YAML document is checked as a whole before any field is read "
    "(experiments.domain.inputs.data_errors): text, keys included, may not contain the NUL character "
    "(\\u0000) or a lone surrogate; numbers must be finite; object keys are text; values nest at most 20 "
    "levels. Anything else is a 400 with the field that holds it. A YAML document may hold only what JSON "
    "can (no dates, binary or sets)."
)


def document_error_responses(result: dict, generator, request, public) -> dict:
    """drf-spectacular postprocessing hook: every operation documents the errors the API's shared machinery
    gives (authentication and permissions, input validation, body parsing, unknown ids), besides its own."""
    result.setdefault("components", {}).setdefault("schemas", {}).update(_ERROR_SCHEMAS)
    info = result.setdefault("info", {})
    info["description"] = f"{info.get('description', '')}\n\n{INPUT_RULES}".strip()
    for methods in result.get("paths", {}).values():
        for operation in methods.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            params = operation.get("parameters", [])
            codes = dict(_COMMON) if operation.get("security") else {}
            if "requestBody" in operation or any(p.get("in") == "query" for p in params):
                codes.update(_WITH_INPUT)
            if "requestBody" in operation:
                codes.update(_WITH_BODY)
            if any(p.get("in") == "path" for p in params):
                codes.update(_WITH_ID)
            responses = operation["responses"]
            for code, (description, schema) in codes.items():
                responses.setdefault(
                    code, {"description": description, "content": {"application/json": {"schema": schema}}}
                )
    return result
