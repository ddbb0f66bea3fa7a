-- The service's own state. Applied at every start-up; every statement is
-- idempotent. Schema changes bump PRAGMA user_version (extracts/state.py SCHEMA_VERSION)
-- and add a migration step in extracts/state.py migrate(), which runs before this file.
--
-- Enumerations are mirrored in Python: run statuses by executor/messages.py RunStatus,
-- triggered_by by extracts/state.py TriggeredBy, formats by extracts/config.py FORMATS;
-- change both together.
-- JSON-valued columns (include, schemas, filter, progress_detail, error_detail,
-- config_snapshot) hold JSON text. Booleans are 0/1. Timestamps are ISO 8601 UTC
-- text with a Z suffix, so they sort as text.

CREATE TABLE IF NOT EXISTS extracts (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL CHECK (length(trim(name)) BETWEEN 1 AND 200),
    description       TEXT,
    format            TEXT NOT NULL DEFAULT 'jsonl'
                      CHECK (format IN ('jsonl', 'json', 'yaml', 'archive')),
    include           TEXT NOT NULL DEFAULT '["describe","data"]',
    schemas           TEXT,
    filter            TEXT,
    compress          INTEGER NOT NULL DEFAULT 1 CHECK (compress IN (0, 1)),
    split_files       INTEGER NOT NULL DEFAULT 0 CHECK (split_files IN (0, 1)),
    split_max_records INTEGER NOT NULL DEFAULT 1000000
                      CHECK (split_max_records BETWEEN 1 AND 100000000),
    schedule          TEXT,
    schedule_enabled  INTEGER NOT NULL DEFAULT 0 CHECK (schedule_enabled IN (0, 1)),
    retention_days    INTEGER NOT NULL DEFAULT 7 CHECK (retention_days BETWEEN 1 AND 365),
    enabled           INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    max_attempts      INTEGER NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 10),
    retry_delay_seconds INTEGER NOT NULL DEFAULT 60 CHECK (retry_delay_seconds BETWEEN 1 AND 86400),
    next_run_at       TEXT,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    deleted_at        TEXT
);

CREATE INDEX IF NOT EXISTS extracts_live_created
    ON extracts (created_at) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS extracts_scheduled
    ON extracts (next_run_at) WHERE schedule_enabled = 1 AND deleted_at IS NULL;

CREATE TABLE IF NOT EXISTS extract_runs (
    id               TEXT PRIMARY KEY,
    extract_id       TEXT NOT NULL REFERENCES extracts (id),
    extract_name     TEXT NOT NULL,
    status           TEXT NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('pending', 'queued', 'running', 'completed',
                                       'failed', 'cancelled')),
    progress         INTEGER NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    progress_detail  TEXT NOT NULL,
    started_at       TEXT,
    completed_at     TEXT,
    duration_seconds REAL,
    records_exported INTEGER NOT NULL DEFAULT 0,
    schemas_exported INTEGER NOT NULL DEFAULT 0,
    artifacts_created INTEGER NOT NULL DEFAULT 0,
    total_size_bytes INTEGER NOT NULL DEFAULT 0,
    error            TEXT,
    error_detail     TEXT,
    triggered_by     TEXT NOT NULL DEFAULT 'manual'
                     CHECK (triggered_by IN ('manual', 'schedule', 'api', 'retry')),
    config_snapshot  TEXT NOT NULL,
    attempt          INTEGER NOT NULL DEFAULT 1 CHECK (attempt >= 1),
    retry_of         TEXT REFERENCES extract_runs (id),
    retry_run_id     TEXT,
    not_before       TEXT,
    instance_id      TEXT,
    lease_expires_at TEXT,
    lease_token      TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);

-- "One active run per extract" is a fact the database enforces: any number of
-- simultaneous POST .../run requests insert exactly one row (SPEC: Running).
CREATE UNIQUE INDEX IF NOT EXISTS extract_runs_one_active
    ON extract_runs (extract_id) WHERE status IN ('pending', 'queued', 'running');
CREATE INDEX IF NOT EXISTS extract_runs_extract_status
    ON extract_runs (extract_id, status);
CREATE INDEX IF NOT EXISTS extract_runs_status_created
    ON extract_runs (status, created_at);
CREATE INDEX IF NOT EXISTS extract_runs_created
    ON extract_runs (created_at);

CREATE TABLE IF NOT EXISTS extract_artifacts (
    id              TEXT PRIMARY KEY,
    run_id          TEXT NOT NULL REFERENCES extract_runs (id),
    extract_id      TEXT NOT NULL REFERENCES extracts (id),
    artifact_type   TEXT NOT NULL,
    artifact_name   TEXT NOT NULL,
    schema_name     TEXT,
    part            INTEGER,
    storage_path    TEXT NOT NULL,
    storage_backend TEXT NOT NULL DEFAULT 'local'
                    CHECK (storage_backend IN ('local', 's3', 'gcs', 'azure')),
    format          TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    size_bytes      INTEGER NOT NULL CHECK (size_bytes >= 0),
    records         INTEGER,
    checksum        TEXT NOT NULL,
    crc32           INTEGER NOT NULL,
    is_primary      INTEGER NOT NULL DEFAULT 0 CHECK (is_primary IN (0, 1)),
    created_at      TEXT NOT NULL,
    expires_at      TEXT NOT NULL,
    accessed_at     TEXT,
    download_count  INTEGER NOT NULL DEFAULT 0,
    deleted_at      TEXT,
    UNIQUE (run_id, artifact_name)
);

-- A run never records two files whose names differ at most in letter case: macOS and
-- Windows, where the ZIP is unpacked, take them for one file (SPEC: Artifacts). Names
-- are ASCII (executor.naming), so NOCASE compares them completely. (Version 2.)
CREATE UNIQUE INDEX IF NOT EXISTS extract_artifacts_run_name
    ON extract_artifacts (run_id, artifact_name COLLATE NOCASE);
CREATE INDEX IF NOT EXISTS extract_artifacts_run ON extract_artifacts (run_id);
CREATE INDEX IF NOT EXISTS extract_artifacts_extract ON extract_artifacts (extract_id);
CREATE INDEX IF NOT EXISTS extract_artifacts_expiry
    ON extract_artifacts (expires_at) WHERE deleted_at IS NULL;

-- The instances serving one state (SPEC: Beyond one machine): each heartbeats its row.
CREATE TABLE IF NOT EXISTS extracts_instances (
    id           TEXT PRIMARY KEY,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL,
    workers      INTEGER NOT NULL,
    active_runs  INTEGER NOT NULL DEFAULT 0
);

-- A job one instance at a time does (the scheduler, the retention sweep): held by a lease
-- the holder renews; when it lapses (the instance died), another takes it.
CREATE TABLE IF NOT EXISTS extracts_leaders (
    name        TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);

-- An extract with the statistics derived from its runs: counted, never stored,
-- so they cannot drift from the runs themselves. last_run_* describe the most
-- recently created run.
DROP VIEW IF EXISTS extracts_with_stats;
CREATE VIEW extracts_with_stats AS
SELECT e.*,
       last.id         AS last_run_id,
       last.status     AS last_run_status,
       last.created_at AS last_run_at,
       (SELECT count(*) FROM extract_runs r WHERE r.extract_id = e.id) AS total_runs,
       (SELECT count(*) FROM extract_runs r
         WHERE r.extract_id = e.id AND r.status = 'completed') AS successful_runs,
       (SELECT count(*) FROM extract_runs r
         WHERE r.extract_id = e.id AND r.status = 'failed') AS failed_runs,
       (SELECT count(*) FROM extract_runs r
         WHERE r.extract_id = e.id AND r.status = 'cancelled') AS cancelled_runs
FROM extracts e
LEFT JOIN extract_runs last ON last.id = (
    SELECT r.id FROM extract_runs r WHERE r.extract_id = e.id
    ORDER BY r.created_at DESC, r.rowid DESC LIMIT 1);
