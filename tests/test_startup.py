"""Start-up: the console script on the demo default, options, and failing fast (its ``main``, in
this process: it exits before serving)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import app_command, free_port, http_get, script_command

from extracts.settings import parse_settings


def launch(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, script: bool = False
) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EXTRACTS_")}
    # Its own storage directory: the default /tmp/extracts is held by whichever instance has it.
    clean["EXTRACTS_STORAGE"] = str(tmp_path / "storage")
    command = script_command() if script else app_command()
    return subprocess.Popen(
        [*command, *args],
        cwd=tmp_path,
        env=clean | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run_main(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, caplog, *args: str
) -> tuple[int, str, str]:
    """The console script's ``main`` in this process, for a start-up that fails before serving:
    its exit code, what it printed, what it logged. As ``launch`` would: no EXTRACTS_ variable,
    the storage in ``tmp_path``, run from there."""
    import extracts_app
    from extracts import startup

    for key in [k for k in os.environ if k.startswith("EXTRACTS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("EXTRACTS_STORAGE", str(tmp_path / "storage"))
    monkeypatch.chdir(tmp_path)
    held = len(startup._HELD)
    try:
        with pytest.raises(SystemExit) as exited:
            extracts_app.main(list(args))
    finally:
        for fd in startup._HELD[held:]:  # the lock files it took before failing
            os.close(fd)
        del startup._HELD[held:]
    printed = capsys.readouterr()
    return exited.value.code, printed.out + printed.err, caplog.text


def wait_healthy(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if http_get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"nothing healthy on port {port}")


@pytest.mark.slow
def test_no_options_serves_the_demo_database(tmp_path: Path) -> None:
    port = free_port()
    process = launch(
        tmp_path,
        script=True,
        env={"EXTRACTS_PORT": str(port), "EXTRACTS_STORAGE": str(tmp_path / "artifacts")},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(port)
        token_file = tmp_path / "extracts.db.token"
        token = token_file.read_text().strip()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert (tmp_path / "demo.db").is_file() and (tmp_path / "extracts.db").is_file()
        headers = {"Authorization": f"Bearer {token}"}
        schemas = http_get(f"{base}/api/describe", headers=headers).json()["data"]
        assert {s["name"] for s in schemas} == {"users", "products", "orders", "order_items", "active_users"}
        assert {s["name"]: s["row_count"] for s in schemas}["users"] == 200
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "demo" in output and str(tmp_path / "demo.db") in output
    assert token in output and f"curl -H 'Authorization: Bearer {token}' {base}/api/describe" in output
    # The token is reused at the next start.
    port = free_port()
    process = launch(tmp_path, "--port", str(port))
    wait_healthy(port)
    process.terminate()
    assert token in process.communicate(timeout=30)[0]
    assert token_file.read_text().strip() == token


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--source", "/nonexistent/shop.db"], "cannot open the source"),
        (["--source", "{tmp}/not-a-db.db"], "cannot open the source"),
        (["--db", "/proc/extracts/state.db"], "cannot write the state file /proc/extracts/state.db"),
        (["--storage", "{tmp}/a-file/storage"], "cannot create or write the storage directory"),
        (["--source", "postgresql://nobody:hunter2@127.0.0.1:1/none"], "cannot open the source"),
    ],
)
def test_start_up_fails_fast_with_one_line(
    tmp_path: Path, args: list[str], expected: str, monkeypatch: pytest.MonkeyPatch, capsys, caplog
) -> None:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "not-a-db.db").write_text("this is not a database" * 100)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    started = time.monotonic()
    code, output, logged = run_main(tmp_path, monkeypatch, capsys, caplog, "--port", str(free_port()), *args)
    assert code == 1
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("extracts-app: ") and expected in lines[0], output
    assert "hunter2" not in output + logged
    assert time.monotonic() - started < 20
    assert not (tmp_path / "nonexistent").exists()


@pytest.mark.parametrize(
    "source",
    [
        "host=127.0.0.1 port=1 password=hunter2 dbname=none",  # libpq keyword/value: read as a path
        "host=127.0.0.1 password='hunter2 with spaces'",
        "postgresql://nobody:x@hunter2@127.0.0.1:1/none",  # libpq would make 'hunter2@127.0.0.1' the host
        "postgresql://nobody@127.0.0.1:1/none?sslpassword=hunter2&password=hunter2",
        "mysql://root:hunter2/x@127.0.0.1:1/none",  # urllib would make 'hunter2' the port
        "mysql://root:x@hunter2@127.0.0.1:1/none",
    ],
)
def test_start_up_errors_never_show_a_password(
    tmp_path: Path, source: str, monkeypatch: pytest.MonkeyPatch, capsys, caplog
) -> None:
    code, output, logged = run_main(tmp_path, monkeypatch, capsys, caplog, "--port", "1", "--source", source)
    assert code == 1
    assert output.startswith("extracts-app: cannot open the source: ") and output.count("\n") == 1, output
    assert "hunter2" not in output + logged


def test_settings_from_flags_environment_and_defaults(tmp_path: Path) -> None:
    settings = parse_settings([], {})
    assert (settings.source, settings.db, settings.storage) == (
        None,
        Path("extracts.db").absolute(),
        "/tmp/extracts",
    )
    assert (settings.host, settings.port, settings.token) == ("127.0.0.1", 9001, None)
    assert settings.workers == (os.cpu_count() or 1) and settings.min_free_mb == 100
    assert settings.cleanup_interval == 3600
    env = {
        "EXTRACTS_SOURCE": "x.db",
        "EXTRACTS_DB": "/tmp/s.db",
        "EXTRACTS_STORAGE": "/tmp/st",
        "EXTRACTS_HOST": "0.0.0.0",
        "EXTRACTS_PORT": "9100",
        "EXTRACTS_TOKEN": "tok",
        "EXTRACTS_WORKERS": "3",
        "EXTRACTS_MIN_FREE_MB": "5",
        "EXTRACTS_CLEANUP_INTERVAL": "60",
    }
    settings = parse_settings([], env)
    endpoint = {"EXTRACTS_STORAGE_ENDPOINT": "http://127.0.0.1:9000"}
    assert (
        parse_settings(["--storage", "s3://b/p"], env | endpoint).storage_endpoint
        == endpoint["EXTRACTS_STORAGE_ENDPOINT"]
    )
    assert (
        settings.source,
        settings.db,
        settings.storage,
        settings.host,
        settings.port,
        settings.token,
        settings.workers,
        settings.min_free_mb,
        settings.cleanup_interval,
    ) == ("x.db", Path("/tmp/s.db"), "/tmp/st", "0.0.0.0", 9100, "tok", 3, 5, 60.0)
    # An object store URL stays a URL; a relative directory becomes absolute.
    assert parse_settings(["--storage", "s3://bucket/pre"], {}).storage == "s3://bucket/pre"
    assert parse_settings(["--storage", "st"], {}).storage == str(Path("st").absolute())
    settings = parse_settings(["--port", "9200", "--workers", "1", "--min-free-mb", "7"], env)
    assert (settings.port, settings.workers, settings.min_free_mb) == (9200, 1, 7)
    with pytest.raises(SystemExit):
        parse_settings(["--port", "many"], {})
    with pytest.raises(SystemExit):
        parse_settings([], {"EXTRACTS_WORKERS": "0"})


def test_more_workers_than_one_instance_may_start_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    """Every worker starts with the pool: --workers 100000 forked until the machine gave out."""
    assert parse_settings(["--workers", "256"], {}).workers == 256
    for args, environ in ((["--workers", "100000"], {}), ([], {"EXTRACTS_WORKERS": "257"})):
        with pytest.raises(SystemExit) as exited:
            parse_settings(args, environ)
        assert exited.value.code == 2
        assert "--workers [EXTRACTS_WORKERS] must be between 1 and 256" in capsys.readouterr().err


def test_a_state_or_storage_url_of_another_kind_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    """Taken as a path, ``--db mysql://h/x`` made a directory ``mysql:`` and a state file in it."""
    monkeypatch.chdir(tmp_path)
    assert parse_settings(["--db", "sqlite:///rel.db"], {}).db == tmp_path / "rel.db"
    assert parse_settings(["--db", "SQLite:////abs/s.db"], {}).db == Path("/abs/s.db")
    for args, expected in [
        (["--db", "mysql://root@127.0.0.1/x"], "--db [EXTRACTS_DB]: mysql:// is no state database"),
        (["--storage", "file:///tmp/x"], "--storage [EXTRACTS_STORAGE]: file:// is no storage"),
        # A directory has no endpoint: the option would be ignored without a word.
        (
            ["--storage", "st", "--storage-endpoint", "http://127.0.0.1:9000"],
            "--storage-endpoint [EXTRACTS_STORAGE_ENDPOINT]: only an object store --storage",
        ),
    ]:
        with pytest.raises(SystemExit) as exited:
            parse_settings(args, {})
        assert exited.value.code == 2 and expected in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "option,value,expected",
    [
        ("--lease-seconds", "nan", "'nan' is not a finite number of seconds"),
        ("--lease-seconds", "inf", "'inf' is not a finite number of seconds"),
        ("--cleanup-interval", "nan", "'nan' is not a finite number of seconds"),
        ("--cleanup-interval", "1e400", "'1e400' is not a finite number of seconds"),
        ("--lease-seconds", "1e12", "must be between 1 and 86,400"),
    ],
)
def test_seconds_that_are_no_finite_number_are_a_usage_error(
    option: str, value: str, expected: str, capsys: pytest.CaptureFixture
) -> None:
    """float() takes 'nan' and 'inf', which passed the range checks: --lease-seconds nan or inf
    ended in a traceback at start-up, --cleanup-interval nan started a service whose sweep timer
    was NaN, and --lease-seconds 1e12 started one whose every claim of a run failed with
    OverflowError (the lease's end past year 9999), its runs queued for good."""
    name = option.removeprefix("--").replace("-", "_").upper()
    for args, environ in (([option, value], {}), ([], {f"EXTRACTS_{name}": value})):
        with pytest.raises(SystemExit) as exited:
            parse_settings(args, environ)
        assert exited.value.code == 2
        assert f"{option} [EXTRACTS_{name}]" in (err := capsys.readouterr().err) and expected in err, err
    settings = parse_settings(["--lease-seconds", "86400", "--cleanup-interval", "0.5"], {})
    assert (settings.lease_seconds, settings.cleanup_interval) == (86400, 0.5)


@pytest.mark.parametrize("option,value", [("--port", "99999"), ("--port", "-1"), ("--min-free-mb", "-1")])
def test_a_number_out_of_range_is_a_usage_error(tmp_path: Path, option: str, value: str) -> None:
    """--port 99999 printed "listening on http://127.0.0.1:99999", then the bind raised
    OverflowError, which uvicorn does not catch: the service hung for good, serving nothing
    (the app's stop waited on a loop being torn down). A negative reserve was taken too."""
    process = launch(tmp_path, option, value, "--db", str(tmp_path / "s.db"), "--workers", "1")
    try:
        output = process.communicate(timeout=30)[0]
    finally:
        process.kill()
    assert process.returncode == 2, output
    name = option.removeprefix("--").replace("-", "_").upper()
    assert output.splitlines()[-1].startswith(f"extracts-app: error: {option} [EXTRACTS_{name}] must be "), (
        output
    )
    assert "listening" not in output and not (tmp_path / "s.db").exists()


@pytest.mark.slow
def test_an_address_it_cannot_listen_on_stops_it_before_the_banner(tmp_path: Path) -> None:
    """A port in use, or a host that does not resolve, failed only once uvicorn bound, after the
    app's start-up: the banner had said "listening on", the state file and token were made,
    and the exit status was 3 after six log lines. Now: one line, exit 1, nothing made."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for host, expected in [
            ("127.0.0.1", f"extracts-app: cannot listen on 127.0.0.1:{port}: Address already in use"),
            (
                "nosuch.invalid",
                "extracts-app: --host nosuch.invalid: not an address this machine can listen on",
            ),
        ]:
            process = launch(tmp_path, "--host", host, "--port", port, "--db", str(tmp_path / "s.db"))
            try:
                output = process.communicate(timeout=30)[0]
            finally:
                process.kill()
            assert process.returncode == 1, output
            assert output.startswith(expected) and len(output.splitlines()) == 1, output
            assert list(tmp_path.iterdir()) == [], output


def _listens(host: str, port: int) -> bool:
    """Whether asyncio's server (uvicorn's) listens on ``host:port``."""

    async def bind() -> None:
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, port)
        server.close()
        await server.wait_closed()

    try:
        asyncio.run(bind())
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    "ipv6",
    [
        pytest.param(None, id="a kernel without IPv6"),
        pytest.param("2001:db8::1", id="an IPv6 address not on this machine"),
    ],
)
def test_the_address_check_agrees_with_the_server_on_a_name_of_several_addresses(
    monkeypatch: pytest.MonkeyPatch, ipv6: str | None
) -> None:
    """Debian's ``localhost`` is ::1 and 127.0.0.1. On a kernel without IPv6 (``ipv6.disable=1``)
    the ::1 socket cannot be made: asyncio's server skips it and listens on 127.0.0.1, while the
    check made it too, unguarded, and start-up ended on a traceback. An address the machine does
    not have is the server's to judge as well (Python 3.13 skips it, 3.11 refuses it): the check
    binds as the running Python's asyncio does."""
    from extracts.startup import StartupError, check_address

    port, getaddrinfo, make = free_port(), socket.getaddrinfo, socket.socket

    def localhost(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host != "localhost":
            return getaddrinfo(host, port, *args, **kwargs)
        stream = (socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
        return [
            (socket.AF_INET6, *stream, (ipv6 or "::1", port, 0, 0)),
            (socket.AF_INET, *stream, ("127.0.0.1", port)),
        ]

    class WithoutIPv6(make):  # type: ignore[misc, valid-type]
        def __init__(self, family: int = -1, *args: Any, **kwargs: Any) -> None:
            if family == socket.AF_INET6:
                raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
            super().__init__(family, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", localhost)
    if ipv6 is None:
        monkeypatch.setattr(socket, "socket", WithoutIPv6)
    listens = _listens("localhost", port)
    assert listens or ipv6 is not None  # without IPv6, asyncio listens on 127.0.0.1
    try:
        check_address("localhost", port)
        checked = True
    except StartupError:
        checked = False
    assert checked == listens


@pytest.mark.parametrize(
    "option", ["--host", "--storage", "--db", "--source", "--storage-endpoint", "--port"]
)
def test_an_empty_option_is_a_usage_error(option: str, capsys: pytest.CaptureFixture) -> None:
    """--host '' bound every interface, IPv4 and IPv6 (an empty EXTRACTS_HOST is 127.0.0.1),
    --storage '' wrote runs into the current directory, --db '' took it for the state file."""
    with pytest.raises(SystemExit) as exited:
        parse_settings([option, ""], {})
    env = option.removeprefix("--").replace("-", "_").upper()
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"extracts-app: error: {option} [EXTRACTS_{env}] must not be empty; leave it out for its default"
    )


def test_ctrl_c_before_the_service_started_is_one_line(tmp_path: Path) -> None:
    """Ctrl-C while start-up opened the source (before uvicorn takes the signals over) printed
    a KeyboardInterrupt traceback. The source here is a server that takes the connection and
    never answers, so the signal lands in that window every time."""
    import signal
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        process = subprocess.Popen(
            [*app_command(), "--port", str(free_port()), "--db", str(tmp_path / "s.db")]
            + ["--storage", str(tmp_path / "files"), "--source", f"mysql://root@127.0.0.1:{port}/x"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        silent.settimeout(30)
        connection, _ = silent.accept()  # start-up is opening the source now
        with connection:
            time.sleep(0.2)
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert err == "extracts-app: interrupted before the service started\n"


@pytest.mark.slow
def test_an_in_process_service_refused_at_start_up_leaves_nothing_held(tmp_path: Path) -> None:
    """The tests' in-process service: a start-up refused (a second instance on the same state)
    kept the lock files it had taken, its socket and its log capture, for the rest of the test
    process: every later in-process service on that state would have been refused too."""
    from helpers import make_shop_db, start_in_process, start_service

    from extracts import startup
    from extracts.startup import StartupError

    source = str(make_shop_db(tmp_path / "shop.db"))
    (tmp_path / "one").mkdir()
    first = start_service(tmp_path / "one", source)
    try:
        fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(StartupError, match="in use by another extracts-app"):
            start_in_process(tmp_path / "two", source, db=first.db)
        assert startup._HELD == [] and len(os.listdir("/proc/self/fd")) == fds
    finally:
        first.stop()
    again = start_in_process(tmp_path / "three", source, db=first.db)  # the state is free again
    again.stop()
