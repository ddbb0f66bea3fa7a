"""The Extracts service as the command line reaches it: its URL and token, and its JSON API.

HTTP through the standard library's urllib: a few kinds of plain requests need no
client dependency, and the commands start fast. The URL and token default as the
SPEC says: ``EXTRACTS_URL``/``EXTRACTS_TOKEN``, then the service's own defaults
(``EXTRACTS_HOST``/``EXTRACTS_PORT``) and the token file it writes beside its state
file (``EXTRACTS_DB`` + ``.token``).
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from executor.sources.sqlite import sqlite_path
from extracts.dialects import POSTGRES, dialect_of
from extracts.settings import SETTINGS

DEFAULT_URL = "http://127.0.0.1:9001"


class Failed(Exception):
    """The command cannot go on; the message is the one line shown."""


def _default(name: str) -> Any:
    setting = next(s for s in SETTINGS if s.name == name)
    return os.environ.get(setting.env) or setting.default


def default_url() -> str:
    """``EXTRACTS_URL``, else where a service started with the same environment listens."""
    if os.environ.get("EXTRACTS_URL"):
        return os.environ["EXTRACTS_URL"]
    host = _default("host")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{host}]' if ':' in host else host}:{_default('port')}"


def token_file() -> Path | None:
    """The token file the service keeps beside its state file, named as the service names it
    (``sqlite:///…`` as a path); None for a PostgreSQL state, whose instances share a given token."""
    db = str(_default("db"))
    if dialect_of(db) is POSTGRES:
        return None
    state = sqlite_path(db)
    return state.with_name(state.name + ".token")


def default_token() -> str | None:
    """``EXTRACTS_TOKEN``, else the token file the service keeps beside its state file."""
    if os.environ.get("EXTRACTS_TOKEN"):
        return os.environ["EXTRACTS_TOKEN"].strip()
    path = token_file()
    try:
        return None if path is None else path.read_text().strip() or None
    except OSError:
        return None


class Client:
    """The service's JSON API and downloads, with the bearer token."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url.rstrip("/"), token

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> urllib.request.Request:
        return urllib.request.Request(
            self.url + path,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", **(headers or {})},
        )

    def open(self, request: urllib.request.Request, missing_ok: bool = False) -> Any:
        """The response; None for a 404 when ``missing_ok``; else Failed with the service's message."""
        try:
            return urllib.request.urlopen(request, timeout=30)
        except urllib.error.HTTPError as exc:
            with exc:
                if exc.code == 404 and missing_ok:
                    return None
                try:
                    message = orjson.loads(exc.read())["error"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    message = exc.reason
            hint = " (check --token or EXTRACTS_TOKEN)" if exc.code == 401 else ""
            path = request.full_url.removeprefix(self.url)
            raise Failed(f"{request.get_method()} {path}: {exc.code} {message}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Failed(f"cannot reach the service at {self.url}: {reason}") from None
        except http.client.HTTPException as exc:  # not HTTP at all (BadStatusLine, …)
            raise Failed(f"the service at {self.url} did not answer in HTTP: {exc!r}") from None

    def call(self, method: str, path: str, missing_ok: bool = False) -> Any:
        """The ``data`` of a JSON answer (None for a 404 when ``missing_ok``)."""
        response = self.open(self.request(method, path), missing_ok)
        if response is None:
            return None
        with response:
            body = response.read()
        try:
            return orjson.loads(body)["data"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise Failed(
                f"{method} {path}: the answer is not the JSON an Extracts service sends; "
                f"is {self.url} the service?"
            ) from None
