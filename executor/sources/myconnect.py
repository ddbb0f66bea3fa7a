"""Connecting to MySQL / MariaDB: the URL's options, each session's settings, TLS settled once.

PyMySQL given no TLS option (its PREFERRED mode) uses TLS when the server offers
it, without checking the certificate, and to be ready builds a new default SSL
context for every connection, loading the system's CA store: about 30 ms of
CPU each, for a run's snapshot connection, its helpers, the connection that
holds the lock while they start and each ``KILL QUERY``. The first connection
shows what the server offers; the later ones ask for exactly that
(``Connector``): TLS with one context built once (nothing is verified in this
mode, so it holds no CA store), or none. A server whose TLS changes between two
connections of one source gets the first one's choice; a refused connection
fails the run as unavailable, and the next one settles it again.
"""

from __future__ import annotations

import re
import ssl
from contextlib import suppress
from typing import Any

import pymysql
from pymysql.constants import CLIENT, ER

SESSION_SETTINGS = (
    "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
    "SET time_zone = '+00:00'",  # TIMESTAMP values in UTC
    # The row SQL's literals ('\\n', '') mean what they say whatever the server's sql_mode
    # (NO_BACKSLASH_ESCAPES, EMPTY_STRING_IS_NULL, ORACLE…), as mysqldump's session does.
    "SET SESSION sql_mode = ''",
    "SET net_write_timeout = 600",  # a slow disk on our side must not abort a streaming read
    "SET SESSION group_concat_max_len = 4294967295",  # a chunk's JSON (executor.sources.myread)
)


# MySQL 8 caches information_schema.TABLES' statistics for a day (TABLE_ROWS, DATA_LENGTH): a
# table's size (``mysnap.TABLE_SIZE_SQL``) must be today's. MariaDB has no such cache or variable,
# nor may a server that only calls itself MySQL 8 (TiDB, Vitess): there, it is left out.
_MYSQL8_SETTINGS = ("SET SESSION information_schema_stats_expiry = 0",)


def session_settings(server_info: str) -> tuple[str, ...]:
    """The statements a reading session starts with, for the server that says ``server_info``."""
    major = re.match(r"\d+", server_info)
    mysql8 = "mariadb" not in server_info.lower() and major is not None and int(major[0]) >= 8
    return SESSION_SETTINGS + (_MYSQL8_SETTINGS if mysql8 else ())


def _flag(value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


URL_OPTIONS = {
    "unix_socket": str,
    "connect_timeout": int,
    "ssl_ca": str,
    "ssl_cert": str,
    "ssl_key": str,
    "ssl_verify_cert": _flag,
    "ssl_verify_identity": _flag,
    "ssl_disabled": _flag,
}
_TLS_OPTIONS = ("ssl_ca", "ssl_cert", "ssl_key", "ssl_verify_cert", "ssl_verify_identity", "ssl_disabled")

_preferred_context: ssl.SSLContext | None = None


def preferred_tls() -> ssl.SSLContext:
    """The context of PyMySQL's PREFERRED mode (no certificate or host checked), built once."""
    global _preferred_context
    if _preferred_context is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        _preferred_context = context
    return _preferred_context


def tls_as_offered(capabilities: int) -> dict[str, Any]:
    """The connect arguments that ask for what PREFERRED mode found, given the server's capabilities."""
    return {"ssl": preferred_tls()} if capabilities & CLIENT.SSL else {"ssl_disabled": True}


class Connector:
    """Opens the source's connections; with no TLS option given, settles TLS on the first one."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args
        self._unsettled = not any(args.get(option) for option in _TLS_OPTIONS)

    def connect(self, **overrides: Any) -> pymysql.Connection:
        """A bare connection (``KILL QUERY``): no session settings."""
        conn = pymysql.connect(**{**self.args, **overrides})
        if self._unsettled:
            self._unsettled = False
            self.args.update(tls_as_offered(conn.server_capabilities))
        return conn

    def session(self) -> pymysql.Connection:
        """A connection for reading: read-only, REPEATABLE READ, UTC (``session_settings``)."""
        conn = self.connect()
        try:
            with conn.cursor() as cursor:
                for statement in session_settings(conn.get_server_info()):
                    try:
                        cursor.execute(statement)
                    except pymysql.err.OperationalError as exc:
                        if statement not in _MYSQL8_SETTINGS or exc.args[0] != ER.UNKNOWN_SYSTEM_VARIABLE:
                            raise
        except BaseException:
            with suppress(pymysql.err.Error, OSError):  # the original error is the one to see
                conn.close()
            raise
        return conn
