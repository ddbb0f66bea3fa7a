"""The server side of Extracts: everything the service does in its own process.

Request to download, by module::

    settings   the start-up options (flag, environment variable, default)
    startup    checks before listening (state file, storage, source, token) and the banner
    http       the JSON envelope, error classes, bearer auth, body limits
    handlers   the JSON API's handlers; ``Service``, what they share
    config     an extract's fields: validation, defaults, OpenAPI schemas
    cron       the schedule grammar and the next due time
    records    record fields and types, rows to records, list queries
    catalog    every read of the source the service makes itself (in threads)
    state      the state file: schema, migrations, connections, ids, timestamps
    runs       every status change of a run, in the state file
    pool       the worker processes, their message queue, their replacement
    schedule   scheduled runs and the retention sweep, on a clock
    storage    where files live: write, hold, delete, sweep, sign (the local directory)
    downloads  single files and ZIPs, streamed from held files
    ranges     byte ranges (RFC 9110)
    zipstream  the byte layout of the resumable ZIP, and the deflated one
    openapi    ``/openapi.json``, from the route table and the field tables
    page       ``GET /``: the web page and its files (``static/``), under a strict CSP
    metrics    ``GET /metrics``: Prometheus series from the state and from requests

``extracts_app`` (beside this package) holds the route table, ``create_app``
and ``main``; ``executor`` what runs in the worker processes.
"""
