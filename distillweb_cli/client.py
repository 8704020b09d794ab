"""A small HTTP client of the API on urllib: bearer token, JSON in and out, errors as ApiError."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

USER_AGENT = "distillweb-cli/1"


class ApiError(Exception):
    """An HTTP error answer (``status``, the API's message and field errors) or an unreachable server."""

    def __init__(
        self, message: str, *, status: int | None = None, errors: dict[str, list[str]] | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors or {}

    def describe(self) -> str:
        """The error as lines for a terminal: the status and message, then one line per field error."""
        head = f"{self.status}: {self.message}" if self.status else self.message
        lines = [head]
        for field, messages in self.errors.items():
            for message in messages:
                lines.append(f"  {field}: {message}" if field != "non_field_errors" else f"  {message}")
        return "\n".join(lines)


def _error_from_body(status: int, reason: str, body: bytes) -> ApiError:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return ApiError(reason or "error", status=status)
    if isinstance(data, dict) and set(data) == {"detail"}:
        return ApiError(str(data["detail"]), status=status)
    if isinstance(data, dict):
        errors = {str(k): [str(m) for m in (v if isinstance(v, list) else [v])] for k, v in data.items()}
        return ApiError(reason or "invalid input", status=status, errors=errors)
    return ApiError(reason or "error", status=status)


class Client:
    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _url(self, path: str, params: dict[str, Any] | None) -> str:
        url = path if path.startswith(("http://", "https://")) else f"{self.url}/{path.lstrip('/')}"
        query = {k: v for k, v in (params or {}).items() if v is not None}
        return (
            f"{url}{'&' if '?' in url else '?'}{urllib.parse.urlencode(query, doseq=True)}" if query else url
        )

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None, json_body: Any = None,
                body: bytes | None = None, content_type: str | None = None, raw: bool = False) -> Any:
        """Send one request; returns the parsed JSON (or the text with ``raw``). Raises ApiError."""
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json, application/yaml",
                   "User-Agent": USER_AGENT}
        if json_body is not None:
            body, content_type = json.dumps(json_body).encode(), "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self._url(path, params), data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            raise _error_from_body(exc.code, exc.reason, exc.read()) from None
        except urllib.error.URLError as exc:
            raise ApiError(f"cannot reach {self.url}: {exc.reason}") from None
        except (TimeoutError, ConnectionError) as exc:
            raise ApiError(f"cannot reach {self.url}: {exc}") from None
        text = payload.decode("utf-8")
        if raw:
            return text
        try:
            return json.loads(text) if text else None
        except ValueError:
            raise ApiError(f"{self.url} did not answer with JSON; is it a distillweb server?") from None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def pages(self, path: str, **params: Any) -> Iterator[dict[str, Any]]:
        """Every row of a paginated list, following its ``next`` links."""
        page = self.get(path, **params)
        while True:
            yield from page["results"]
            if not page.get("next"):
                return
            page = self.request("GET", page["next"])
