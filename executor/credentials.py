"""The secrets a source location carries, and the location without them.

Every place that shows a source location shows ``redact(location)``; every message
that may echo a part of it (a driver's error, a traceback, a log line) goes through
``blank(text, source_secrets(location))``. The forms the drivers accept, all covered:

- URL user-info, ``scheme://user:password@host/…``: the password is everything from
  the first ``:`` to the LAST ``@`` of the location, whatever it holds (``@``, ``:``,
  ``/``, ``?``, ``%40``…). urllib (the MySQL source) also ends the user-info at the
  last ``@``, libpq at the first ``@`` or ``/``: a source whose driver would read
  another password than this refuses the URL (``ambiguous_password``), so that no
  piece of a password can become a host, port or database name in a message.
- URL query parameters whose name holds ``pass``, ``secret``, ``token`` or ``key``
  (libpq's ``password``, ``passfile``, ``sslpassword``, ``sslkey``; ``ssl_key``…);
  the value runs to the next ``&``.
- libpq keyword/value strings, ``host=h password=secret`` or ``password = 'a b\\'c'``,
  with the same names (such a string is read as an SQLite path, and echoed by its
  "does not exist" message).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable
from urllib.parse import unquote, unquote_plus

HIDDEN = "***"
_SECRET_WORDS = ("pass", "secret", "token", "key")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_QUERY_PARAMETER = re.compile(r"(?<=[?&])([^=&]*)=([^&]*)")
# libpq: keyword = value, the value single-quoted or bare up to whitespace; '\' escapes in both.
_KEYWORD_VALUE = re.compile(
    r"(?<![\w.-])(?P<name>[\w.-]+)\s*=\s*"
    r"(?P<value>'(?P<quoted>(?:\\.?|[^'\\])*)'?|(?P<bare>(?:\\.?|[^\s\\])*))"
)
_ESCAPE = re.compile(r"\\(.)")


def _is_secret(name: str) -> bool:
    name = unquote(name).lower()
    return any(word in name for word in _SECRET_WORDS)


def _split_url(location: str) -> tuple[str, str] | None:
    """(scheme, everything after '://') of a server URL; None for a path or keyword/value string."""
    scheme, separator, rest = location.partition("://")
    if not separator or not _SCHEME.fullmatch(scheme) or scheme.lower() == "sqlite":
        return None
    return scheme, rest


def url_userinfo(location: str) -> str | None:
    """A URL's user-info as written, ended by the last '@' of the location; None without one."""
    url = _split_url(location)
    if url is None:
        return None
    userinfo, at, _ = url[1].rpartition("@")
    return userinfo if at else None


def ambiguous_password(location: str, driver_userinfo: str | None) -> bool:
    """Whether the driver would read the URL's user-info differently, when it holds a password."""
    userinfo = url_userinfo(location)
    return userinfo is not None and ":" in userinfo and userinfo != driver_userinfo


def redact(location: str) -> str:
    """The location with every secret replaced by ``***``."""
    url = _split_url(location)
    if url is None:
        return _KEYWORD_VALUE.sub(_hide_keyword_value, location)
    scheme, rest = url
    userinfo, at, host_onwards = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}{':' + HIDDEN if colon else ''}@{host_onwards}"
    return f"{scheme}://{_QUERY_PARAMETER.sub(_hide_query_parameter, rest)}"


def _hide_query_parameter(match: re.Match[str]) -> str:
    return f"{match[1]}={HIDDEN}" if _is_secret(match[1]) else match[0]


def _hide_keyword_value(match: re.Match[str]) -> str:
    if not _is_secret(match["name"]):
        return match[0]
    return match[0][: match.start("value") - match.start()] + HIDDEN


@functools.lru_cache(maxsize=16)
def source_secrets(location: str) -> tuple[str, ...]:
    """Every secret of the location as written and as decoded, longest first."""
    written: list[str] = []
    decoded: list[str] = []
    if _split_url(location) is None:
        for match in _KEYWORD_VALUE.finditer(location):
            if _is_secret(match["name"]):
                inner = match["bare"] if match["quoted"] is None else match["quoted"]
                written.append(match["value"])
                decoded += [inner, _ESCAPE.sub(r"\1", inner)]
    else:
        userinfo = url_userinfo(location)
        if userinfo is not None and ":" in userinfo:
            written.append(userinfo.partition(":")[2])
        written += [value for name, value in _QUERY_PARAMETER.findall(location) if _is_secret(name)]
        decoded = [form for value in written for form in (unquote(value), unquote_plus(value))]
    return tuple(sorted({secret for secret in written + decoded if secret}, key=len, reverse=True))


def blank(text: str, hidden: Iterable[str]) -> str:
    """The text with each of the secrets replaced by ``***`` (give them longest first)."""
    for secret in hidden:
        text = text.replace(secret, HIDDEN)
    return text


class BlankingFormatter(logging.Formatter):
    """Formats log records, tracebacks included, with the source's secrets blanked out."""

    def __init__(self, fmt: str, location: str | None) -> None:
        super().__init__(fmt)
        self.hidden = source_secrets(location or "")

    def format(self, record: logging.LogRecord) -> str:
        return blank(super().format(record), self.hidden)
