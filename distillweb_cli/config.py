"""Where the CLI finds the server and the token: flags, then DISTILLWEB_URL / DISTILLWEB_TOKEN, then the file
written by ``distillweb login`` (``~/.config/distillweb/config.json``, readable by its owner only)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


class ConfigError(Exception):
    """No server or token is configured, or the config file cannot be read."""


@dataclass(frozen=True)
class Settings:
    url: str
    token: str


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "distillweb" / "config.json"


def read_file() -> dict[str, str]:
    path = config_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return (
        {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}
        if isinstance(data, dict)
        else {}
    )


def save(*, url: str, token: str) -> Path:
    """Write the config file with 0600 permissions (its folder 0700): it holds a secret."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"url": url, "token": token}, fh, indent=2)
        fh.write("\n")
    os.chmod(path, 0o600)  # an existing file keeps its old mode through os.open
    return path


def resolve(*, url: str | None = None, token: str | None = None) -> Settings:
    """The server and token to use; raises ConfigError when either is missing."""
    stored = read_file()
    url = url or os.environ.get("DISTILLWEB_URL") or stored.get("url")
    token = token or os.environ.get("DISTILLWEB_TOKEN") or stored.get("token")
    if not url or not token:
        raise ConfigError(
            "not logged in: run `distillweb login --url URL --token TOKEN` (a token comes from the "
            'site\'s "API token" page), or set DISTILLWEB_URL and DISTILLWEB_TOKEN'
        )
    return Settings(url=normalise_url(url), token=token)


def normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"the server URL must start with http:// or https://, got {url!r}")
    return url
