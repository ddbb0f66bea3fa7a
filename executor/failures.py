"""Which failures are worth another attempt (SPEC: Retries), in one place.

Transient, retried per the extract's policy:

- the source unreachable, or the connection to it lost mid-run (``SourceUnavailable``);
- the object store failing: unreachable, credentials refused, throttled (``StoreUnavailable``);
- the worker process dying (killed, out of memory), or stopped because another one died;
- the service (or its instance) stopping while the run ran.

Permanent, never retried: everything else — a schema or column that no longer
exists, a configuration that no longer fits the source, free space under the
reserve, a permission error, a cancel, the extract disabled or deleted. The
worker judges the exceptions it catches (``is_transient``); the service marks
the failures it makes itself (a dead worker, an interrupted run) as transient.
"""

from __future__ import annotations

from executor.sources import SourceUnavailable
from extracts.storage import StoreUnavailable

TRANSIENT = (SourceUnavailable, StoreUnavailable)


def is_transient(exc: BaseException) -> bool:
    """Whether a run that failed with ``exc`` may succeed if run again later."""
    return isinstance(exc, TRANSIENT)
