"""The embedded default source: a small, realistic shop database.

Created when the service starts without ``--source`` so that a new user can try
every route at once. Deterministic (seeded), a few hundred rows, with unicode
text, NULLs, a BLOB column, a composite key and foreign keys.
"""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

DEMO_SCHEMA = """
CREATE TABLE users (
    id          INTEGER PRIMARY KEY,
    email       TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    country     TEXT,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    is_active   INTEGER NOT NULL DEFAULT 1,
    avatar      BLOB
);
CREATE TABLE products (
    id          INTEGER PRIMARY KEY,
    sku         TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    description TEXT,
    price       REAL NOT NULL,
    stock       INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE orders (
    id          INTEGER PRIMARY KEY,
    user_id     INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    status      TEXT NOT NULL DEFAULT 'pending',
    total       REAL NOT NULL,
    note        TEXT,
    ordered_at  TEXT NOT NULL
);
CREATE TABLE order_items (
    order_id    INTEGER NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    line        INTEGER NOT NULL,
    product_id  INTEGER NOT NULL REFERENCES products (id),
    quantity    INTEGER NOT NULL,
    unit_price  REAL NOT NULL,
    PRIMARY KEY (order_id, line)
);
CREATE INDEX orders_user ON orders (user_id);
CREATE INDEX orders_status_date ON orders (status, ordered_at);
CREATE VIEW active_users AS SELECT id, email, name FROM users WHERE is_active = 1;
"""

FIRST = [
    "Ana",
    "Björn",
    "Chloé",
    "Dmitri",
    "Emeka",
    "Fatima",
    "Grace",
    "Hiroshi",
    "Inés",
    "José",
    "Katarzyna",
    "Liam",
    "Mei",
    "Nadia",
    "Oluwaseun",
    "Priya",
    "Quentin",
    "Rosa",
    "Søren",
    "Tomás",
    "Uma",
    "Viktor",
    "Wen",
    "Yusuf",
    "Zoë",
    "李娜",
    "Ελένη",
]
LAST = [
    "Almeida",
    "Bergström",
    "Chen",
    "Dubois",
    "Eze",
    "Fernández",
    "García",
    "Hansen",
    "Ivanova",
    "Jóhannsson",
    "Kowalski",
    "López",
    "Müller",
    "Nakamura",
    "O'Brien",
    "Petrov",
    "Rossi",
    "Schmidt",
    "Tanaka",
    "Øster",
    "王",
    "Παπαδόπουλος",
]
COUNTRIES = ["PT", "SE", "FR", "RU", "NG", "MA", "US", "JP", "ES", "DE", "IT", "CN", "GR", None]
PRODUCTS = [
    ("Espresso beans 1 kg", "Dark roast, notes of cocoa"),
    ("Pour-over kettle", None),
    ("Ceramic mug – 350 ml", "Dishwasher safe"),
    ("Burr grinder", "40 settings"),
    ("Paper filters ×100", None),
    ("Matcha 30 g 抹茶", "Ceremonial grade"),
    ("Oat milk 1 l", "Barista edition"),
    ("Tea infuser", None),
    ("Milk frother", "USB-C"),
    ("Café crème 500 g", "Mild roast, «douce»"),
]
STATUSES = ["pending", "paid", "shipped", "delivered", "cancelled"]


def create_demo_database(path: Path, seed: int = 20250119) -> None:
    """Create the demo database at ``path`` (written to a temporary name, then renamed)."""
    rng = random.Random(seed)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    try:
        con.executescript(DEMO_SCHEMA)
        start = datetime(2024, 1, 1, tzinfo=UTC)
        users = []
        for uid in range(1, 201):
            first, last = rng.choice(FIRST), rng.choice(LAST)
            avatar = bytes(rng.getrandbits(8) for _ in range(16)) if uid % 3 == 0 else None
            when = start + timedelta(minutes=rng.randrange(0, 400_000))
            users.append(
                (
                    uid,
                    f"user{uid}@example.com",
                    f"{first} {last}",
                    rng.choice(COUNTRIES),
                    when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    int(uid % 11 != 0),
                    avatar,
                )
            )
        con.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?)", users)
        con.executemany(
            "INSERT INTO products VALUES (?, ?, ?, ?, ?, ?)",
            [
                (pid, f"SKU-{pid:04d}", name, desc, round(rng.uniform(2, 250), 2), rng.randrange(0, 500))
                for pid, (name, desc) in enumerate(PRODUCTS, start=1)
            ],
        )
        for oid in range(1, 501):
            lines = [
                (rng.randrange(1, len(PRODUCTS) + 1), rng.randrange(1, 5)) for _ in range(rng.randrange(1, 4))
            ]
            prices = [
                con.execute("SELECT price FROM products WHERE id = ?", (p,)).fetchone()[0] for p, _ in lines
            ]
            total = round(sum(price * qty for price, (_, qty) in zip(prices, lines, strict=True)), 2)
            when = start + timedelta(minutes=rng.randrange(0, 500_000))
            note = rng.choice([None, None, "Gift wrap, please 🎁", "Leave at the door", "Entregar à tarde"])
            con.execute(
                "INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)",
                (
                    oid,
                    rng.randrange(1, 201),
                    rng.choice(STATUSES),
                    total,
                    note,
                    when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                ),
            )
            con.executemany(
                "INSERT INTO order_items VALUES (?, ?, ?, ?, ?)",
                [
                    (oid, n, p, q, price)
                    for n, ((p, q), price) in enumerate(zip(lines, prices, strict=True), start=1)
                ],
            )
        con.commit()
    finally:
        con.close()
    tmp.replace(path)
