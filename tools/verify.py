"""`pantheon verify`: the live read models against a rebuild, and the history's invariants.

1. The live read-model database is copied with SQLite's online backup in one
   read transaction (its checkpoint and rows agree), the log is folded into a
   temporary database up to that checkpoint, and the two are compared table
   by table, streaming both in key order: a checksum per table and, where
   they differ, every differing row named by its key (``missing``: in the
   rebuild, not live; ``extra``: live only; ``changed``: the columns that
   differ).
2. The same read of the log, continued to its last sequence, goes through
   :class:`tools.invariants.InvariantChecker`, which names every event that
   breaks an invariant.

With a tenant, both read that tenant's events only: its rows are compared (the
live database's rows of other tenants are left out, not reported missing), and
the invariants that need every tenant's events (:data:`NEEDS_EVERY_TENANT`) are
reported as not checked. Nothing is written anywhere but a temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pantheon_es.errors import (
    ConflictError,
    NotFoundError,
)
from pantheon_es.store import EventStore
from projections.base import Table
from projections.projector import default_models, schema_digest
from tools.events import read_records
from tools.invariants import INVARIANTS, InvariantChecker, Violation
from tools.replay import Progress, build_read_models, check_tenant, head_seq

#: The live projector's checkpoint row (projections.projector.Projector's default name).
CHECKPOINT_NAME = "main"

Rows = list[tuple[Any, ...]]

#: Invariants that one tenant's events cannot judge, and why (``verify --tenant``).
NEEDS_EVERY_TENANT: dict[str, str] = {
    "worker_capacity": (
        "workers are shared between tenants: a worker's commitments include other "
        "tenants' leases, and a tenant's tasks run on workers registered in other "
        "tenants; verify without --tenant checks it"
    ),
}


@dataclass(slots=True)
class TableDiff:
    """One read-model table, live against rebuilt."""

    table: str
    live_rows: int
    rebuilt_rows: int
    live_checksum: str
    rebuilt_checksum: str
    key: tuple[str, ...]
    missing: list[list[Any]] = field(default_factory=list)  # keys in the rebuild only
    extra: list[list[Any]] = field(default_factory=list)  # keys in the live table only
    changed: list[dict[str, Any]] = field(default_factory=list)  # key + {column: [live, rebuilt]}

    @property
    def equal(self) -> bool:
        return self.live_checksum == self.rebuilt_checksum

    def to_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "equal": self.equal,
            "key": list(self.key),
            "live_rows": self.live_rows,
            "rebuilt_rows": self.rebuilt_rows,
            "live_checksum": self.live_checksum,
            "rebuilt_checksum": self.rebuilt_checksum,
            "missing": self.missing,
            "extra": self.extra,
            "changed": self.changed,
        }


@dataclass(slots=True)
class VerifyReport:
    """Everything verify found."""

    db: str
    checkpoint: int
    last_seq: int
    events: int
    seconds: float
    tables: list[TableDiff]
    violations: list[Violation]
    #: violations per invariant checked (a not-checked one has no entry)
    counts: dict[str, int]
    #: the one tenant verified (None: every tenant)
    tenant: str | None = None
    #: invariant -> why it was not checked (a one-tenant verify)
    not_checked: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations and all(t.equal for t in self.tables)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "tenant": self.tenant,
            "db": self.db,
            "checkpoint": self.checkpoint,
            "last_seq": self.last_seq,
            "events": self.events,
            "seconds": round(self.seconds, 3),
            "tables": [t.to_dict() for t in self.tables],
            "invariants": [
                {
                    "name": name,
                    "description": text,
                    "checked": name not in self.not_checked,
                    "violations": self.counts.get(name),  # None: not checked
                    "not_checked_because": self.not_checked.get(name),
                }
                for name, text in INVARIANTS.items()
            ],
            "violations": [v.to_dict() for v in self.violations],
        }


def _open_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise NotFoundError(f"no read-model database at {path} (see --db)")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    db.execute("PRAGMA busy_timeout=5000")
    return db


def _checkpoint(db: sqlite3.Connection, path: Path, tables: list[Table]) -> int:
    """The database's checkpoint, once its read-model schema is known to be this build's."""
    try:
        row = db.execute(
            "SELECT last_seq FROM projector_checkpoint WHERE name = ?", (CHECKPOINT_NAME,)
        ).fetchone()
        digest = db.execute(
            "SELECT digest FROM projector_schema WHERE name = ?", (CHECKPOINT_NAME,)
        ).fetchone()
    except sqlite3.OperationalError as exc:
        raise NotFoundError(f"{path} is not a read-model database ({exc})") from None
    if digest is not None and digest[0] != schema_digest(tables):
        raise ConflictError(
            f"{path} holds read models of another schema than this build's; "
            "restart its projector (it rebuilds them) and verify again"
        )
    return int(row[0]) if row else 0


def _rows(
    db: sqlite3.Connection, table: Table, tenant: str | None = None
) -> Iterator[tuple[Any, ...]]:
    """A table's rows in key order (of one tenant: every read-model table has the column)."""
    cols, order = ", ".join(table.columns), ", ".join(table.key)
    if tenant is None:
        cursor = db.execute(f"SELECT {cols} FROM {table.name} ORDER BY {order}")
    else:
        cursor = db.execute(
            f"SELECT {cols} FROM {table.name} WHERE tenant = ? ORDER BY {order}", (tenant,)
        )
    return (tuple(r) for r in cursor)


def read_tables(db_path: Path | str, tables: list[Table]) -> tuple[int, dict[str, Rows]]:
    """(checkpoint, rows of every table in key order), read in one transaction.

    Raises:
        NotFoundError: no read-model database at ``db_path``.
        ConflictError: its tables were made by a build with other read-model schemas.
    """
    path = Path(db_path)
    db = _open_read_only(path)
    try:
        db.execute("BEGIN")  # one snapshot while the live projector goes on writing
        checkpoint = _checkpoint(db, path, tables)
        rows = {table.name: list(_rows(db, table)) for table in tables}
        db.execute("COMMIT")
    finally:
        db.close()
    return checkpoint, rows


def snapshot(db_path: Path | str, dest: Path, tables: list[Table]) -> int:
    """Copy the live database as it is at one moment to ``dest``; returns its checkpoint.

    SQLite's online backup in one step holds a single read transaction, so
    the copy is consistent while the live projector goes on writing, and the
    comparison then streams both files without holding the live one open.
    """
    path = Path(db_path)
    src = _open_read_only(path)
    dst = sqlite3.connect(dest, isolation_level=None)
    try:
        src.backup(dst)
        return _checkpoint(dst, path, tables)
    finally:
        dst.close()
        src.close()


def compare_table(
    table: Table, live: Iterable[tuple[Any, ...]], rebuilt: Iterable[tuple[Any, ...]]
) -> TableDiff:
    """Checksums of both, and every differing row named by its key.

    Both sides come in key order (``ORDER BY`` the key, which for text is the
    code-point order Python compares by); they are merged in one pass, so only
    the differences are held in memory.
    """
    positions = [table.columns.index(k) for k in table.key]
    hashes = {"live": hashlib.sha256(), "rebuilt": hashlib.sha256()}
    counts = {"live": 0, "rebuilt": 0}
    missing: list[list[Any]] = []
    extra: list[list[Any]] = []
    changed: list[dict[str, Any]] = []
    sides = {"live": iter(live), "rebuilt": iter(rebuilt)}

    def take(side: str) -> tuple[Any, ...] | None:
        row = next(sides[side], None)
        if row is not None:
            hashes[side].update(orjson.dumps(row) + b"\n")
            counts[side] += 1
        return row

    lv, rv = take("live"), take("rebuilt")
    while lv is not None or rv is not None:
        lk = tuple(lv[i] for i in positions) if lv is not None else None
        rk = tuple(rv[i] for i in positions) if rv is not None else None
        if rk is None or (lk is not None and lk < rk):
            extra.append(list(lk or ()))
            lv = take("live")
        elif lk is None or rk < lk:
            missing.append(list(rk))
            rv = take("rebuilt")
        else:
            if lv != rv:
                assert lv is not None and rv is not None
                columns = {c: [a, b] for c, a, b in zip(table.columns, lv, rv, strict=True)
                           if a != b}  # fmt: skip
                changed.append({"key": list(lk), "columns": columns})
            lv, rv = take("live"), take("rebuilt")
    return TableDiff(
        table.name, counts["live"], counts["rebuilt"], hashes["live"].hexdigest(),
        hashes["rebuilt"].hexdigest(), table.key, missing, extra, changed,
    )  # fmt: skip


def compare_databases(
    live: Path, rebuilt: Path, tables: list[Table], tenant: str | None = None
) -> list[TableDiff]:
    """Every table of two read-model databases, compared (one tenant's rows, if given)."""
    a, b = _open_read_only(live), _open_read_only(rebuilt)
    try:
        return [compare_table(t, _rows(a, t, tenant), _rows(b, t, tenant)) for t in tables]
    finally:
        a.close()
        b.close()


async def check_log(
    store: EventStore,
    checker: InvariantChecker,
    from_seq: int,
    to_seq: int,
    *,
    subject: str | None = None,
    skip_unknown: bool = False,
    progress: Progress | None = None,
) -> None:
    """Feed the checker the events ``from_seq..to_seq`` (the part no rebuild read), of
    ``subject`` only if given."""
    records = read_records(
        store, from_seq, to_seq, subject=subject, skip_unknown=skip_unknown, timeout=10
    )
    async with contextlib.aclosing(records):
        async for batch, position in records:
            checker.feed(batch)
            if progress is not None:
                progress(position, to_seq)


async def verify(
    store: EventStore,
    db_path: Path | str,
    *,
    tenant: str | None = None,
    skip_unknown: bool = False,
    progress: Progress | None = None,
) -> VerifyReport:
    """Compare the live read models with a rebuild and check the whole history.

    With ``tenant``: that tenant's events, rows and invariants only; the invariants of
    :data:`NEEDS_EVERY_TENANT` are reported as not checked (their violations left out).

    Raises:
        InvalidError: ``tenant`` is not a subject-safe tenant.
        NotFoundError: no read-model database at ``db_path``, or no event stream.
        ConflictError: the database is ahead of the log (another deployment's?).
        UnknownEventTypeError: an unknown event type, unless ``skip_unknown``.
    """
    check_tenant(tenant)
    started = time.perf_counter()
    tables = [t for m in default_models() for t in m.tables]
    checker = InvariantChecker()
    try:
        subject = store.subjects.events(tenant) if tenant is not None else None
        with tempfile.TemporaryDirectory(prefix="pantheon-verify-") as tmp:
            live = Path(tmp) / "live.db"
            checkpoint = await asyncio.to_thread(snapshot, db_path, live, tables)
            head = await head_seq(store, subject)
            if checkpoint > head:
                raise ConflictError(
                    f"{db_path} stands at sequence {checkpoint}, past the log's end {head}: "
                    "is it another deployment's database (--namespace, --nats-url)?"
                )

            def whole_log(position: int, _target: int) -> None:
                if progress is not None:
                    progress(position, head)

            rebuilt = Path(tmp) / "rebuilt.db"
            await build_read_models(
                store, rebuilt, checkpoint, tenant=tenant, skip_unknown=skip_unknown,
                progress=whole_log, sinks=[checker.feed],
            )  # fmt: skip
            diffs = await asyncio.to_thread(compare_databases, live, rebuilt, tables, tenant)
        await check_log(
            store, checker, checkpoint + 1, head, subject=subject, skip_unknown=skip_unknown,
            progress=whole_log,
        )  # fmt: skip
        not_checked = dict(NEEDS_EVERY_TENANT) if tenant is not None else {}
        counts = {k: n for k, n in checker.counts().items() if k not in not_checked}
        return VerifyReport(
            db=str(db_path),
            checkpoint=checkpoint,
            last_seq=head,
            events=checker.events,
            seconds=time.perf_counter() - started,
            tables=diffs,
            violations=[v for v in checker.violations if v.invariant not in not_checked],
            counts=counts,
            tenant=tenant,
            not_checked=not_checked,
        )
    finally:
        checker.close()  # its temporary file of finished tasks
