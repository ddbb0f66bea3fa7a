"""The ``extracts-app`` console script: a command (``export``, ``verify``, ``run``) or the service.

The commands load none of the service's modules, so ``extracts-app export``
starts in a tenth of a second; ``extracts-app`` alone, or ``serve``, hands
every option to ``extracts_app.main``, which also answers the commands when
run as ``python extracts_app.py``.
"""

from __future__ import annotations

import sys

from extracts.commands import is_command, run_command


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if is_command(argv):
        raise SystemExit(run_command(argv, own_process=True))
    import extracts_app

    extracts_app.main(argv)
