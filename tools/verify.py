"""`pantheon verify`: the live read models against a rebuild, and the history's invariants.

1. The live read-model database is read in one SQLite read transaction (its
   checkpoint and rows agree), the log is folded into a temporary database up
   to that checkpoint, and the two are compared table by table: a checksum per
   table and, where they differ, every differing row named by its key
   (``missing``: in the rebuild, not live; ``extra``: live only; ``changed``:
   the columns that differ).
2. The same read of the log, continued to its last sequence, goes through
   :class:`tools.invariants.InvariantChecker`, which names every event that
   breaks an invariant.

Nothing is written anywhere but the temporary database.
"""

from __future__ import annotations

import hashlib
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pantheon_es.errors import (
    ConflictError,
    InternalError,
    NotFoundError,
    UnavailableError,
    UnknownEventTypeError,
)
from pantheon_es.events import EventRecord, decode_record
from pantheon_es.store import EventStore
from projections.base import Table
from projections.projector import default_models, schema_digest
from tools.invariants import INVARIANTS, InvariantChecker, Violation
from tools.replay import Progress, build_read_models, head_seq

#: The live projector's checkpoint row (projections.projector.Projector's default name).
CHECKPOINT_NAME = "main"

Rows = list[tuple[Any, ...]]


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
    counts: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.violations and all(t.equal for t in self.tables)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "db": self.db,
            "checkpoint": self.checkpoint,
            "last_seq": self.last_seq,
            "events": self.events,
            "seconds": round(self.seconds, 3),
            "tables": [t.to_dict() for t in self.tables],
            "invariants": [
                {"name": name, "description": text, "violations": self.counts.get(name, 0)}
                for name, text in INVARIANTS.items()
            ],
            "violations": [v.to_dict() for v in self.violations],
        }


def read_tables(db_path: Path | str, tables: list[Table]) -> tuple[int, dict[str, Rows]]:
    """(checkpoint, rows of every table in key order), read in one transaction.

    Raises:
        NotFoundError: no read-model database at ``db_path``.
        ConflictError: its tables were made by a build with other read-model schemas.
    """
    path = Path(db_path)
    if not path.is_file():
        raise NotFoundError(f"no read-model database at {path} (see --db)")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("BEGIN")  # one snapshot while the live projector goes on writing
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
        rows: dict[str, Rows] = {}
        for table in tables:
            cols = ", ".join(table.columns)
            order = ", ".join(table.key)
            rows[table.name] = [
                tuple(r) for r in db.execute(f"SELECT {cols} FROM {table.name} ORDER BY {order}")
            ]
        db.execute("COMMIT")
    finally:
        db.close()
    return (int(row[0]) if row else 0), rows


def checksum(rows: Rows) -> str:
    """sha256 of a table's rows in key order."""
    digest = hashlib.sha256()
    for r in rows:
        digest.update(orjson.dumps(r))
        digest.update(b"\n")
    return digest.hexdigest()


def compare_table(table: Table, live: Rows, rebuilt: Rows) -> TableDiff:
    """Checksums of both, and every differing row named by its key."""
    diff = TableDiff(
        table.name, len(live), len(rebuilt), checksum(live), checksum(rebuilt), table.key
    )
    if diff.equal:
        return diff
    positions = [table.columns.index(k) for k in table.key]

    def keyed(rows: Rows) -> dict[tuple[Any, ...], tuple[Any, ...]]:
        return {tuple(r[i] for i in positions): r for r in rows}

    live_by_key, rebuilt_by_key = keyed(live), keyed(rebuilt)
    for key, row in rebuilt_by_key.items():
        other = live_by_key.get(key)
        if other is None:
            diff.missing.append(list(key))
        elif other != row:
            columns = {
                c: [lv, rv] for c, lv, rv in zip(table.columns, other, row, strict=True) if lv != rv
            }
            diff.changed.append({"key": list(key), "columns": columns})
    diff.extra = [list(k) for k in live_by_key if k not in rebuilt_by_key]
    return diff


async def check_log(
    store: EventStore,
    checker: InvariantChecker,
    from_seq: int,
    to_seq: int,
    *,
    skip_unknown: bool = False,
    progress: Progress | None = None,
) -> None:
    """Feed the checker the events ``from_seq..to_seq`` (the part no rebuild read)."""
    if from_seq > to_seq:
        return
    async with store.feed(from_seq=from_seq) as feed:
        position = from_seq - 1
        while position < to_seq:
            batch = await feed.next_batch(2000, timeout=10)
            if not batch:
                raise UnavailableError(f"the log stopped delivering after {position}")
            records: list[EventRecord] = []
            for raw in batch:
                if raw.seq <= position or raw.seq > to_seq:
                    continue
                try:
                    records.append(decode_record(raw.data, raw.seq))
                except UnknownEventTypeError:
                    if not skip_unknown:
                        raise
                except ValueError as exc:
                    raise InternalError(str(exc)) from exc
            checker.feed(records)
            position = max(position, batch[-1].seq)
            if progress is not None:
                progress(min(position, to_seq), to_seq)


async def verify(
    store: EventStore,
    db_path: Path | str,
    *,
    skip_unknown: bool = False,
    progress: Progress | None = None,
) -> VerifyReport:
    """Compare the live read models with a rebuild and check the whole history.

    Raises:
        NotFoundError: no read-model database at ``db_path``, or no event stream.
        ConflictError: the database is ahead of the log (another deployment's?).
        UnknownEventTypeError: an unknown event type, unless ``skip_unknown``.
    """
    started = time.perf_counter()
    tables = [t for m in default_models() for t in m.tables]
    checkpoint, live = read_tables(db_path, tables)
    head = await head_seq(store)
    if checkpoint > head:
        raise ConflictError(
            f"{db_path} stands at sequence {checkpoint}, past the log's end {head}: "
            "is it another deployment's database (--namespace, --nats-url)?"
        )
    checker = InvariantChecker()

    def whole_log(position: int, _target: int) -> None:
        if progress is not None:
            progress(position, head)

    with tempfile.TemporaryDirectory(prefix="pantheon-verify-") as tmp:
        rebuilt_path = Path(tmp) / "rebuilt.db"
        await build_read_models(
            store,
            rebuilt_path,
            checkpoint,
            skip_unknown=skip_unknown,
            progress=whole_log,
            sinks=[checker.feed],
        )
        _, rebuilt = read_tables(rebuilt_path, tables)
    await check_log(
        store, checker, checkpoint + 1, head, skip_unknown=skip_unknown, progress=whole_log
    )
    diffs = [compare_table(t, live[t.name], rebuilt[t.name]) for t in tables]
    return VerifyReport(
        db=str(db_path),
        checkpoint=checkpoint,
        last_seq=head,
        events=checker.events,
        seconds=time.perf_counter() - started,
        tables=diffs,
        violations=checker.violations,
        counts=checker.counts(),
    )
