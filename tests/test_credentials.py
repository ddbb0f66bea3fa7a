"""Secrets in source locations: every form the drivers accept is hidden (pure functions)."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

import pytest

from executor.credentials import BlankingFormatter, blank, redact, source_secrets
from executor.sources import SourceError, open_source

# (location, what redact shows, the secrets as the driver would use them)
CASES = [
    ("postgresql://u@h/db?password=S3cret", "postgresql://u@h/db?password=***", ["S3cret"]),
    ("postgresql://u:S3cret@h:5432/db", "postgresql://u:***@h:5432/db", ["S3cret"]),
    # A raw '@' in the password: urllib ends the user-info at the last '@', so must we.
    ("mysql://root:p@ssw0rd@h/db", "mysql://root:***@h/db", ["p@ssw0rd"]),
    ("mysql://root:p@ss:w@rd@h:3306/db", "mysql://root:***@h:3306/db", ["p@ss:w@rd"]),
    ("mysql://root:pa/ss@h/db", "mysql://root:***@h/db", ["pa/ss"]),
    ("postgresql://u:pa?ss#x@h/db", "postgresql://u:***@h/db", ["pa?ss#x"]),
    ("postgresql://u:p%40ss%2F@h/db", "postgresql://u:***@h/db", ["p%40ss%2F", "p@ss/"]),
    (
        "postgresql://u:pw@h1:5432,h2:5433/db?target_session_attrs=any",
        "postgresql://u:***@h1:5432,h2:5433/db?target_session_attrs=any",
        ["pw"],
    ),
    (
        "postgres://h/db?sslmode=require&passfile=/home/u/.pgpass&sslpassword=kp%2B1&sslkey=/k/c.key",
        "postgres://h/db?sslmode=require&passfile=***&sslpassword=***&sslkey=***",
        ["/home/u/.pgpass", "kp+1", "/k/c.key"],
    ),
    # libpq decodes parameter names too.
    (
        "postgresql://h/db?pass%77ord=S3cret&Client_Secret=a+b&api_token=tok3n",
        "postgresql://h/db?pass%77ord=***&Client_Secret=***&api_token=***",
        ["S3cret", "a b", "a+b", "tok3n"],
    ),
    (
        "mysql://u:pw@h/db?ssl_key=/k.pem&ssl_ca=/ca.pem",
        "mysql://u:***@h/db?ssl_key=***&ssl_ca=/ca.pem",
        ["pw", "/k.pem"],
    ),
    # An '@' after the host: everything up to the last '@' is hidden (and the sources refuse
    # the URL as ambiguous, see below).
    (
        "postgresql://u:pw@h/db?application_name=me@corp",
        "postgresql://u:***@corp",
        ["pw@h/db?application_name=me"],
    ),
    (
        "postgresql://h/db?password=S3cret&application_name=me@corp",
        "postgresql://h/db?password=***&application_name=me@corp",
        ["S3cret"],
    ),
    # libpq keyword/value strings (read as an SQLite path, and echoed by its error).
    ("host=h password=S3cret dbname=x", "host=h password=*** dbname=x", ["S3cret"]),
    ("host=h password = 'a b\\'c' dbname=x", "host=h password = *** dbname=x", ["a b'c"]),
    (
        "host=h password=a\\ b sslpassword='unterminated",
        "host=h password=*** sslpassword=***",
        ["a b", "unterminated"],
    ),
    ("/srv/password=S3cret host=h", "/srv/password=*** host=h", ["S3cret"]),
    # Nothing secret: unchanged.
    ("postgresql://[::1]:5432/db?sslmode=disable", "postgresql://[::1]:5432/db?sslmode=disable", []),
    ("/data/shop.db", "/data/shop.db", []),
    ("sqlite:////data/a:b@c.db", "sqlite:////data/a:b@c.db", []),
]


@pytest.mark.parametrize(("location", "shown", "hidden"), CASES)
def test_redact_hides_every_secret_form(location: str, shown: str, hidden: list[str]) -> None:
    assert redact(location) == shown
    found = source_secrets(location)
    for secret in hidden:
        assert secret in found
        assert secret not in shown
        assert blank(f"the driver said: {secret}!", found) == "the driver said: ***!"
    assert list(found) == sorted(found, key=len, reverse=True)  # longest first: no partial leak


def test_urllib_ends_the_user_info_at_the_last_at_sign() -> None:
    """What the MySQL source reads: the redaction must hide the same password."""
    for password in ("p@ss", "p:ss", "p@s:s@", "p%40ss"):
        url = urlsplit(f"mysql://root:{password}@h:3306/db")
        assert (url.username, url.password, url.hostname) == ("root", password, "h")
        assert redact(url.geturl()) == "mysql://root:***@h:3306/db"
    # A raw '/' ends the authority for urllib: the driver would read another password.
    assert urlsplit("mysql://root:pa/ss@h/db").password is None


@pytest.mark.parametrize(
    "location",
    [
        "postgresql://postgres:p@S3cret@127.0.0.1:5432/test",  # libpq: password 'p', host 'S3cret@…'
        "postgresql://postgres:pa/S3cret@127.0.0.1:5432/test",  # libpq: host 'postgres', port 'pa'
        "mysql://root:pa/S3cret@127.0.0.1:3306/test",  # urllib: host 'root', port 'pa'
        "mysql://root:pa?S3cret@127.0.0.1:3306/test",
        "postgresql://postgres:pw@127.0.0.1:5432/test?application_name=me@S3cret",  # '@' after the host
    ],
)
def test_a_password_the_driver_would_split_is_refused_without_echoing_it(location: str) -> None:
    with pytest.raises(SourceError) as raised:
        open_source(location)
    message = str(raised.value)
    assert "ambiguous" in message and "S3cret" not in message
    assert raised.value.__cause__ is None


def test_log_lines_and_tracebacks_are_blanked() -> None:
    formatter = BlankingFormatter("%(levelname)s %(message)s", "mysql://root:p@ss-S3cret@h/db")
    try:
        raise RuntimeError("driver echoed p@ss-S3cret")
    except RuntimeError as exc:
        record = logging.LogRecord(
            "x",
            logging.ERROR,
            __file__,
            1,
            "failed with %s",
            ("p@ss-S3cret",),
            (type(exc), exc, exc.__traceback__),
        )
    text = formatter.format(record)
    assert "S3cret" not in text and text.startswith("ERROR failed with ***") and "driver echoed ***" in text
