"""Filters: every problem named by check_where, and each operator counted against plain SQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    Channel,
    assert_same_rows,
    make_job,
    make_source,
    quote,
    source_rows,
)

from executor import check_where, compile_where, open_source
from executor.sources import Source

USER_COLUMNS = ["id", "email", "name", "age", "score", "avatar", "created_at"]


@pytest.fixture(scope="module")
def source_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(tmp_path_factory.mktemp("source") / "source.db")


@pytest.fixture(scope="module")
def source(source_db: Path) -> Iterator[Source]:
    with open_source(str(source_db)) as opened:
        yield opened


# ---------------------------------------------------------------- check_where


def test_valid_filters_have_no_problems() -> None:
    where = {
        "age": 3,
        "name": None,
        "email": {"$like": "%@example.com"},
        "score": {"$gte": 0.5, "$lt": 2},
        "id": {"$in": [1, 2]},
        "avatar": {"$null": False},
        "created_at": {"$ne": None},
    }
    assert check_where(where, USER_COLUMNS) == []
    assert check_where(None, USER_COLUMNS) == []
    assert check_where({}, USER_COLUMNS) == []


def test_every_problem_is_named_with_its_field() -> None:
    where = {
        "agee": 1,
        "age": {"$gt": [1]},
        "name": {"$regex": "x", "$eq": {"a": 1}},
        "email": ["a", "b"],
        "score": {},
        "id": {"$in": []},
        "avatar": {"$nin": [1, None]},
        "created_at": {"$like": 5, "$null": "yes"},
    }
    problems = check_where(where, USER_COLUMNS, field="filter.users.where")
    assert problems == [
        (
            "filter.users.where.agee",
            "unknown column 'agee'; the columns are: id, email, name, age, score, avatar, created_at",
        ),
        ("filter.users.where.age.$gt", "$gt needs a string, a number or a boolean"),
        (
            "filter.users.where.name.$regex",
            "unknown operator '$regex'; use one of $eq, $ne, $gt, $gte, $lt, $lte, $in, $nin, $like, $null",
        ),
        ("filter.users.where.name.$eq", "$eq needs a string, a number or a boolean or null"),
        ("filter.users.where.email", 'use {"$in": [...]} to match one of several values'),
        (
            "filter.users.where.score",
            "an operator object needs at least one operator: $eq, $ne, $gt, $gte, "
            "$lt, $lte, $in, $nin, $like, $null",
        ),
        ("filter.users.where.id.$in", "$in needs a non-empty array of scalars"),
        (
            "filter.users.where.avatar.$nin",
            "$nin needs an array of a string, a number or a boolean values (match NULL with $null)",
        ),
        ("filter.users.where.created_at.$like", "$like needs a string pattern"),
        ("filter.users.where.created_at.$null", "$null needs true or false"),
    ]


def test_a_where_that_is_not_an_object_is_one_problem() -> None:
    assert check_where(["age"], USER_COLUMNS) == [
        ("where", "must be an object mapping column names to a value or an operator object")
    ]
    assert check_where({"age": {"$in": list(range(1001))}}, USER_COLUMNS) == [
        ("where.age.$in", "$in takes at most 1000 values")
    ]


OUTSIDE = (
    "is outside the signed 64-bit integers every source can bind "
    "(-9223372036854775808 to 9223372036854775807)"
)
WITH_NUL = "a string with NUL (\\u0000) is not a value this source can bind: its text cannot hold NUL"


def test_only_values_the_source_can_bind_pass() -> None:
    """SQLite binds no integer past 64 signed bits, PostgreSQL no string with NUL: both failed every run."""
    where = {
        "id": {"$gt": 2**64 - 1, "$lte": 2**63 - 1},
        "age": 2**63,
        "score": {"$in": [1, -(2**63) - 1], "$ne": -(2**63)},
        "name": "Ana\x00",
        "email": {"$like": "%\x00", "$nin": ["a", "b\x00"]},
        "created_at": {"$eq": 10**400},
        "avatar": {"$gte": 1e308, "$eq": True},
    }
    outside = [
        ("filter.users.where.id.$gt", f"$gt: 18446744073709551615 {OUTSIDE}"),
        ("filter.users.where.age", f"9223372036854775808 {OUTSIDE}"),
        ("filter.users.where.score.$in", f"$in item 1: -9223372036854775809 {OUTSIDE}"),
        ("filter.users.where.created_at.$eq", f"$eq: an integer of 1329 bits {OUTSIDE}"),
    ]
    # Integers: the range every source binds, whatever the source.
    assert check_where(where, USER_COLUMNS, field="filter.users.where") == outside
    # NUL: refused only where the source's text cannot hold it (PostgreSQL).
    assert check_where(where, USER_COLUMNS, field="filter.users.where", text_holds_nul=False) == [
        ("filter.users.where.id.$gt", f"$gt: 18446744073709551615 {OUTSIDE}"),
        ("filter.users.where.age", f"9223372036854775808 {OUTSIDE}"),
        ("filter.users.where.score.$in", f"$in item 1: -9223372036854775809 {OUTSIDE}"),
        ("filter.users.where.name", WITH_NUL),
        ("filter.users.where.email.$like", f"$like: {WITH_NUL}"),
        ("filter.users.where.email.$nin", f"$nin item 1: {WITH_NUL}"),
        ("filter.users.where.created_at.$eq", f"$eq: an integer of 1329 bits {OUTSIDE}"),
    ]


def test_compile_binds_every_value_and_quotes_every_column() -> None:
    where = {
        "age": {"$gte": 18, "$lt": 65},
        'we"ird': None,
        "id": {"$nin": [1, 2]},
        "name": {"$like": "A%"},
        "score": {"$null": False},
        "email": {"$ne": None},
    }
    sql, params = compile_where(where, quote, "%s")
    assert sql == (
        ' WHERE "age" >= %s AND "age" < %s AND "we""ird" IS NULL AND "id" NOT IN (%s, %s)'
        ' AND "name" LIKE %s AND "score" IS NOT NULL AND "email" IS NOT NULL'
    )
    assert params == [18, 65, 1, 2, "A%"]
    assert compile_where(None, quote, "?") == ("", [])
    assert compile_where({}, quote, "?") == ("", [])


# ---------------------------------------------------------------- each operator against plain SQL

CASES = [
    ("users", {"age": 34}, '"age" = 34'),
    ("users", {"name": None}, '"name" IS NULL'),
    ("users", {"age": {"$eq": 70}}, '"age" = 70'),
    ("users", {"age": {"$eq": None}}, '"age" IS NULL'),
    ("users", {"age": {"$ne": 34}}, '"age" <> 34'),
    ("users", {"age": {"$ne": None}}, '"age" IS NOT NULL'),
    ("orders", {"total": {"$gt": 20}}, '"total" > 20'),
    ("orders", {"total": {"$gte": 20}}, '"total" >= 20'),
    ("orders", {"total": {"$lt": 20.5}}, '"total" < 20.5'),
    ("orders", {"total": {"$lte": 20}}, '"total" <= 20'),
    ("orders", {"user_id": {"$in": [1, 3]}}, '"user_id" IN (1, 3)'),
    ("orders", {"user_id": {"$nin": [1, 3]}}, '"user_id" NOT IN (1, 3)'),
    ("orders", {"note": {"$like": "note 1%"}}, "\"note\" LIKE 'note 1%'"),
    ("orders", {"note": {"$null": True}}, '"note" IS NULL'),
    ("orders", {"note": {"$null": False}}, '"note" IS NOT NULL'),
    (
        "orders",
        {"total": {"$gt": 10, "$lte": 40}, "user_id": 2},
        '"total" > 10 AND "total" <= 40 AND "user_id" = 2',
    ),
    ("order items", {'sku "quoted"': "SKU-3-2"}, '"sku ""quoted""" = \'SKU-3-2\''),
    ("keyed", {"n": {"$gte": 2}}, '"n" >= 2'),  # WITHOUT ROWID: the cursor path
    ("adults", {"name": {"$like": "a%"}}, "\"name\" LIKE 'a%'"),  # a view: the cursor path
    # The ends of the integers every source binds.
    ("users", {"id": {"$gte": 2**62, "$lte": 2**63 - 1}}, '"id" >= 4611686018427387904'),
    ("users", {"id": {"$gt": -(2**63), "$nin": [2**63 - 1, 1]}}, '"id" <> 1'),
]


@pytest.mark.parametrize(("table", "where", "condition"), CASES, ids=[str(c[1]) for c in CASES])
def test_each_operator_selects_what_sql_selects(
    source: Source, source_db: Path, table: str, where: dict[str, Any], condition: str
) -> None:
    assert check_where(where, source.columns(table)) == []
    # Rowid tables export in rowid order, whatever index the filter could use.
    order = " ORDER BY rowid" if table in ("users", "orders", "order items") else ""
    want = source_rows(source_db, table, f"SELECT * FROM {quote(table)} WHERE {condition}{order}")
    assert want  # every case selects something ...
    assert len(want) < len(source_rows(source_db, table))  # ... and leaves something out
    with source.snapshot():
        assert source.count(table, where) == len(want)
        got = [row for batch in source.json_batches(table, where, 7) for row in batch]
    assert_same_rows([json.loads(row) for row in got], want)


@pytest.mark.parametrize(
    "where",
    [
        {"name": "x' OR '1'='1"},
        {"email": {"$like": "%' OR 1=1 --"}},
        {"name": {"$in": ["'); DROP TABLE users; --", 'Ana Żółć" OR "1"="1']}},
    ],
)
def test_injection_in_a_value_is_just_a_value(source: Source, source_db: Path, where: dict[str, Any]) -> None:
    with source.snapshot():
        assert source.count("users", where) == 0
        assert [row for batch in source.json_batches("users", where, 10) for row in batch] == []
    assert len(source_rows(source_db, "users")) == 4  # the table is still there


def test_injection_in_a_column_name_is_an_unknown_column(source: Source) -> None:
    where = {'age" = 1 OR "1': 1}
    assert check_where(where, source.columns("users"))[0][1].startswith("unknown column")


def test_a_run_exports_and_counts_the_filtered_rows(tmp_path: Path, manager: Any, source_db: Path) -> None:
    channel = Channel(manager)
    job = make_job(
        tmp_path,
        source_db,
        schemas=["orders", "users"],
        filter={"orders": {"where": {"user_id": {"$in": [1, 2]}, "total": {"$gt": 30}}}},
    )
    result = channel.run(job)
    want = source_rows(
        source_db, "orders", "SELECT * FROM orders WHERE user_id IN (1, 2) AND total > 30 ORDER BY id"
    )
    assert result["records_total"] == result["records_exported"] == len(want) + 4
    orders = (Path(job["run_dir"]) / "orders.jsonl").read_bytes().split(b"\n")[:-1]
    assert_same_rows([json.loads(line) for line in orders], want)


def test_a_stored_filter_past_64_bits_fails_its_run_with_a_sentence(
    tmp_path: Path, manager: Any, source_db: Path
) -> None:
    """Saved before validation refused it: the run used to end in sqlite3's OverflowError."""
    job = make_job(tmp_path, source_db, schemas=["users"], filter={"users": {"where": {"id": 2**63}}})
    result = Channel(manager).run(job)
    assert result["status"] == "failed"
    assert result["error"].startswith(
        f"The filter filter.users.where.id no longer fits the source (9223372036854775808 {OUTSIDE})"
    )
