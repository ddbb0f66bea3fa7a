"""The ``extracts-app`` console script: ``extracts_app.main``, a command or the service.

``extracts_app`` imports nothing heavy at its top and dispatches a command
(``export``, ``verify``, ``run``) before the service's imports, so
``extracts-app export`` starts in a tenth of a second.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    import extracts_app

    extracts_app.main(argv)
