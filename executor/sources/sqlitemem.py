"""SQLite's memory statistics turned off, so that two connections really read at once.

By default SQLite counts every allocation under one process-wide mutex
(``SQLITE_CONFIG_MEMSTATUS``). Building JSON allocates for every value, so two
connections reading one table on two threads (``executor.sources.sqlite``)
spend their time waiting on that mutex. Measured here, 1M rows of
``json_object`` on two threads: 2.4-2.6 s against 2.2-2.3 s on one thread, with
70 % more CPU, 0.9 s of it in the kernel; with the statistics off, 1.3 s against
2.4 s, with the same CPU as one thread.

Python's sqlite3 module cannot set it. The C library can, through
``sqlite3_config``, but only between ``sqlite3_shutdown`` and
``sqlite3_initialize`` with no connection open in the process. So this runs
once, first thing, in processes that own every SQLite connection they make:
a pool worker, and ``extracts-app export`` run as a command of its own
(``run_command(..., own_process=True)``). It never runs in the service process,
which holds its state connections, nor where a program calls the export in its
own process (the tests do). Nothing else changes: the
statistics only feed ``sqlite3_memory_used`` and the soft heap limit, and no
one here reads either.
"""

from __future__ import annotations

import ctypes
import os
import sqlite3

_CONFIG_MEMSTATUS = 9  # sqlite3.h
_OK = 0


def turn_off_memory_statistics() -> bool:
    """True when SQLite in this process no longer counts allocations; call it with no connection open.

    It is off already in a build made with ``SQLITE_DEFAULT_MEMSTATUS=0``. Where
    Python's sqlite3 carries its own copy of SQLite rather than the shared
    ``libsqlite3.so.0`` (nothing to reach from here), this returns False and
    changes nothing.
    """
    probe = sqlite3.connect(":memory:")
    try:
        options = {row[0] for row in probe.execute("PRAGMA compile_options")}
    finally:
        probe.close()
    if "DEFAULT_MEMSTATUS=0" in options:
        return True
    try:  # RTLD_NOLOAD: the copy this process already uses, or none
        library = ctypes.CDLL("libsqlite3.so.0", mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
    except (OSError, AttributeError):
        return False
    library.sqlite3_config.argtypes = [ctypes.c_int, ctypes.c_int]
    if library.sqlite3_shutdown() != _OK:
        return False
    configured = library.sqlite3_config(_CONFIG_MEMSTATUS, 0) == _OK
    return library.sqlite3_initialize() == _OK and configured
