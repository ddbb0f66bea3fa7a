"""The layout holds: no import cycle among the production modules, no module too long, one style.

The production modules are ``extracts_app.py`` and the packages ``extracts/`` and ``executor/``.
Every import counts, wherever it is: at the top, inside a function, under ``TYPE_CHECKING``.
``python tests/test_layout.py`` prints the import graph (each module, then what it imports).
"""

from __future__ import annotations

import ast
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("extracts", "executor")
MAX_LINES = 600
MAX_APP_LINES = 400


def production_files() -> dict[str, Path]:
    """Module name → file, for every production module."""
    files = {"extracts_app": ROOT / "extracts_app.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The production modules ``name`` imports anywhere in its file (a name taken from a package
    is its ``__init__``, unless it is a submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # import a.b.c: the deepest production module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = production_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_finds_imports_anywhere_in_a_file(tmp_path: Path) -> None:
    """The parser sees imports in functions and under TYPE_CHECKING, relative ones, and packages."""
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import p.a\n"
        "if TYPE_CHECKING:\n    from p.b import Thing\n"
        "def f():\n    from . import c\n    from .d import x\n    import os\n"
        "from p import e, helper\n"
    )
    modules = {"p", "p.a", "p.b", "p.c", "p.d", "p.e", "p.m"}
    assert imports_of("p.m", source, modules) == {"p", "p.a", "p.b", "p.c", "p.d", "p.e"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_production_modules() -> None:
    graph = import_graph()
    assert len(graph) > 20 and graph["extracts_app"], graph  # the walk found the modules
    assert cycles(graph) == []


def test_the_pool_children_import_no_server_module() -> None:
    """What a pool child runs before its job imports nothing of the server side.

    The forkserver imports ``executor.entry``; each child it forks runs the main
    script again as ``__mp_main__`` (CPython gh-126631). Each service start would
    otherwise import the server side twice (about 0.4 s of CPU more).
    """
    probe = (
        "import runpy, sys\n"
        "import executor.entry\n"
        f"runpy.run_path({str(ROOT / 'extracts_app.py')!r}, run_name='__mp_main__')\n"
        "server = ('extracts.', 'starlette', 'databases', 'uvicorn')\n"
        "found = [m for m in sys.modules if m.startswith(server) and not m.startswith('extracts.storage')]\n"
        "print(sorted(found))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_commands_import_no_server_module(tmp_path: Path) -> None:
    """``python extracts_app.py export|verify|run`` dispatches before the service's imports
    (Starlette, databases and SQLAlchemy, uvicorn): about 0.3 s of CPU for each command."""
    sqlite3.connect(tmp_path / "shop.db").executescript("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    probe = (
        "import sys\n"
        "import extracts_app\n"
        "for argv, status in ((['export', 'shop.db', '-d', 'out', '-q'], 0), (['verify', 'bad.zip'], 1)):\n"
        "    try:\n"
        "        extracts_app.main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == status, (argv, exc.code)\n"
        "server = ('starlette', 'databases', 'sqlalchemy', 'uvicorn')\n"
        "print(sorted(m for m in sys.modules if m.startswith(server)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_no_production_module_is_too_long() -> None:
    lengths = {name: len(path.read_text().splitlines()) for name, path in production_files().items()}
    assert lengths["extracts_app"] <= MAX_APP_LINES, lengths["extracts_app"]
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


def test_ruff_finds_nothing_to_fix_or_reformat() -> None:
    for command in (["check", "."], ["format", "--check", "."]):
        done = subprocess.run(
            [sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"ruff {' '.join(command)}:\n{done.stdout}{done.stderr}"


def test_tests_take_helpers_from_helpers_not_from_conftest() -> None:
    """conftest.py holds fixtures only; what tests share is in tests/helpers.py."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if "conftest" in names:
                offenders.append(path.name)
    assert offenders == []


HTTPX_CALLS = {"get", "post", "put", "patch", "delete", "head", "options", "request", "stream"}
HTTPX_CALLS |= {"Client", "AsyncClient"}


def test_tests_and_benchmarks_share_one_tls_context() -> None:
    """Every httpx client the tests and benchmarks make is given the shared TLS context.

    httpx builds a context for each new client, loading the CA bundle (about 50 ms of
    CPU): the suite made thousands (a health poll every 20 ms), a fifth of its CPU.
    """
    offenders = []
    for path in sorted([*(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "httpx"
                and node.func.attr in HTTPX_CALLS
                and not any(keyword.arg == "verify" for keyword in node.keywords)
            ) or (
                isinstance(node, ast.ImportFrom)
                and node.module == "httpx"
                and any(alias.name in HTTPX_CALLS for alias in node.names)
            ):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def main() -> None:
    graph = import_graph()
    width = max(map(len, graph))
    for name in sorted(graph):
        print(f"{name:<{width}} -> {', '.join(sorted(graph[name])) or '(nothing)'}")
    found = cycles(graph)
    print("\nimport cycles: " + ("; ".join(" <-> ".join(c) for c in found) if found else "none"))


if __name__ == "__main__":
    main()
