"""The projector: folds the event log into SQLite read models and the KV bucket.

One batch of events = one SQLite transaction holding the rows it changed *and*
the checkpoint (the last applied stream sequence). After a crash the
projector resumes at checkpoint + 1; nothing is applied twice and nothing is
skipped. The stream is read with an ordered push consumer.

After each commit the entities the batch changed are written to the KV bucket
``<root>-state`` (latest state per entity, last write in a batch wins). Those
writes are pipelined: every put but the batch's last is a plain publish into
the bucket's stream and the last one waits for its JetStream ack; the server
stores one connection's messages in order, so that ack covers the batch. The
KV bucket is derived state: ``kv_seq`` in the checkpoint row records how far
it is confirmed, and a restart re-puts every entity changed after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import nats.js.errors
import orjson
import structlog
from nats.js.api import KeyValueConfig, StorageType

from pantheon_es.errors import UnknownEventTypeError
from pantheon_es.events import EventRecord, decode_record
from pantheon_es.store import EventFeed, EventStore, RawEvent
from projections.base import Batch, BoundHandler, Loader, ReadModel, Row, Table, json_default
from projections.messages import MessagesModel
from projections.snapshots import (
    DEFAULT_RESTORE_GAP,
    SnapshotInfo,
    remove_database,
    restore_snapshot,
)
from projections.tasks import TasksModel
from projections.workers import WorkersModel
from projections.workflows import WorkflowsModel

log = structlog.get_logger(__name__)


def _null(value: None) -> None:
    return None


# The sqlite3 module binds None through its adaptation protocol, the slow path of any
# type that is not exactly int, float, str or bytes: about 0.5 us a parameter, against
# 0.2 us with an adapter registered (measured here). A task row binds some 25 NULLs,
# so this saves a third of a row write (docs/decisions.md). Binding is unchanged:
# the adapter returns None, which is bound as NULL. The registry is process-wide.
sqlite3.register_adapter(type(None), _null)

CHECKPOINT_DDL = """
CREATE TABLE IF NOT EXISTS projector_checkpoint (
    name TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    kv_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS projector_schema (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL
);
-- KV deletions not yet confirmed by the bucket: a restart re-does them (rows are gone).
CREATE TABLE IF NOT EXISTS projector_kv_deleted (
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (tenant, model, id)
);
"""


def schema_digest(tables: Sequence[Table]) -> str:
    """A fingerprint of every read-model table's definition."""
    text = "\n".join(f"{t.name}|{','.join(t.columns)}|{t.ddl}" for t in tables)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_models() -> list[ReadModel]:
    """Every read model, in the order they are applied."""
    return [TasksModel(), MessagesModel(), WorkersModel(), WorkflowsModel()]


def current_digest() -> str:
    """The schema digest of the default read models (what snapshots are matched on)."""
    return schema_digest([t for m in default_models() for t in m.tables])


#: Rows written per executemany call; the loop gets a turn between chunks.
WRITE_CHUNK = 256
#: WAL pages before an automatic checkpoint: SQLite's default live, more in catch_up.
WAL_PAGES = 1000
BULK_WAL_PAGES = 20_000


async def connect(db_path: Path | str) -> aiosqlite.Connection:
    """A read-only aiosqlite connection to a read-model database (queries, tools)."""
    db = await aiosqlite.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    await db.execute("PRAGMA busy_timeout=5000")
    return db


def open_writer(db_path: Path | str) -> sqlite3.Connection:
    """The projector's own connection, used on the event-loop thread (docs/decisions.md).

    Why not aiosqlite here: with the loop thread busy parsing deliveries, a
    worker thread running ``executemany`` gives the GIL away around every
    row's ``sqlite3_step`` and waits for it back (a convoy): 399 us/row in
    that thread against 13.5 us/row on the loop thread, measured here. Writes
    go in chunks of WRITE_CHUNK rows with a loop turn between them.
    """
    Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(db_path, isolation_level=None)
    # WAL: readers never block the projector. synchronous=NORMAL: a power loss
    # may roll back the newest batches, but always together with their checkpoint.
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    # 32 MiB of page cache (default 2 MiB): a replay of a long log keeps the B-tree
    # pages its inserts and loads touch in memory rather than re-reading them.
    db.execute("PRAGMA cache_size=-32768")
    return db


class Projector:
    """Applies the log to the read models, batch by batch."""

    def __init__(
        self,
        store: EventStore,
        db_path: Path | str,
        *,
        models: Sequence[ReadModel] | None = None,
        name: str = "main",
        kv: bool = True,
        batch_size: int = 2000,
        skip_unknown: bool = False,
        snapshots: bool = False,
        restore_gap: int = DEFAULT_RESTORE_GAP,
        linger: float = 0.0,
    ) -> None:
        self.store = store
        self.db_path = Path(db_path)
        self.models = list(models if models is not None else default_models())
        self.name = name
        self.kv_enabled = kv
        self.batch_size = batch_size
        self.skip_unknown = skip_unknown
        #: Restore the newest snapshot at open() when the database is missing or far behind.
        self.snapshots = snapshots
        self.restore_gap = restore_gap
        #: Live, a batch smaller than ``batch_size`` waits up to this many seconds for more
        #: events unless a reader waits for them (docs/decisions.md, "The read side lingers").
        self.linger = linger
        self._hurry = asyncio.Event()
        self._urgent = 0  # readers in wait_for(..., hurry=True)
        #: The snapshot open() restored, if any.
        self.restored: SnapshotInfo | None = None
        self.position = 0  # last applied stream sequence
        self.kv_position = 0  # last sequence whose KV writes are acknowledged
        self.db: sqlite3.Connection | None = None
        self._advanced = asyncio.Event()
        self._stopping = False
        self._feed: Any = None
        self._kv_pending: asyncio.Task[int] | None = None
        #: Called with each decoded batch before it is written (the scheduler listens here,
        #: so the process reads and decodes the log once for both).
        self.sinks: list[Callable[[list[EventRecord]], None]] = []
        self._run_finished = asyncio.Event()
        self._run_finished.set()
        self._tables: list[Table] = [t for m in self.models for t in m.tables]
        #: event type -> (loaders, handlers, creators) of every model, in model order
        self._routes: dict[str, _Route] = {}

    # -- life cycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> Projector:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def open(self) -> None:
        if self.snapshots:
            self.restored = await restore_snapshot(
                self.store,
                self.db_path,
                digest=schema_digest(self._tables),
                name=self.name,
                min_gap=self.restore_gap,
            )
        self.db = open_writer(self.db_path)
        self.db.executescript(CHECKPOINT_DDL)
        self._migrate(self.db)
        for table in self._tables:
            self.db.executescript(table.ddl)
        row = self.db.execute(
            "SELECT last_seq, kv_seq FROM projector_checkpoint WHERE name = ?", (self.name,)
        ).fetchone()
        self.position, self.kv_position = (int(row[0]), int(row[1])) if row else (0, 0)
        if self.kv_enabled:
            await self._provision_bucket()
            await self._resync_kv()

    def set_position(self, seq: int) -> None:
        """Record that the read models stand at ``seq`` without applying an event (a
        one-tenant rebuild that read past other tenants' events up to it)."""
        assert self.db is not None, "open() first"
        self.db.execute(
            "INSERT INTO projector_checkpoint (name, last_seq, kv_seq) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET last_seq = excluded.last_seq",
            (self.name, seq, self.kv_position),
        )
        self.position = seq

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Read models whose tables changed shape are rebuilt from the log (docs/decisions.md)."""
        digest = schema_digest(self._tables)
        row = db.execute(
            "SELECT digest FROM projector_schema WHERE name = ?", (self.name,)
        ).fetchone()
        if row is not None and row[0] == digest:
            return
        if row is not None:
            log.warning("read-model schema changed: rebuilding from the log", db=str(self.db_path))
        db.execute("BEGIN IMMEDIATE")
        for table in self._tables:
            db.execute(f"DROP TABLE IF EXISTS {table.name}")
        db.execute("DELETE FROM projector_checkpoint WHERE name = ?", (self.name,))
        db.execute(
            "INSERT OR REPLACE INTO projector_schema (name, digest) VALUES (?, ?)",
            (self.name, digest),
        )
        db.execute("COMMIT")

    async def run(self) -> None:
        """Apply the log from the checkpoint on, live, until :meth:`shutdown`."""
        self._run_finished.clear()
        try:
            async with self.store.feed(from_seq=self.position + 1) as feed:
                self._feed = feed
                log.info("projector running", from_seq=self.position + 1, db=str(self.db_path))
                while not self._stopping:
                    batch = await feed.next_batch(self.batch_size)
                    if self.linger and len(batch) < self.batch_size:
                        batch += await self._linger(feed, self.batch_size - len(batch))
                    if batch and not self._stopping:
                        await self.apply(batch)
        finally:
            self._run_finished.set()

    async def _linger(self, feed: EventFeed, room: int) -> list[RawEvent]:
        """Wait up to ``linger`` for more events, unless a reader waits (then at once)."""
        if self._urgent or self._stopping:
            return []
        self._hurry.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.linger):
                await self._hurry.wait()
        return await feed.take(room)

    async def catch_up(self, until_seq: int | None = None, progress: Any = None) -> int:
        """Apply the log up to ``until_seq`` (default: the stream's last sequence now)."""
        target = until_seq if until_seq is not None else await self.store.last_seq()
        if self.position >= target:
            return self.position
        assert self.db is not None, "Projector.open() first"
        # A bulk load: let the WAL grow to BULK_WAL_PAGES before it is checkpointed into
        # the database, so pages written over and over are copied once (docs/decisions.md).
        self.db.execute(f"PRAGMA wal_autocheckpoint={BULK_WAL_PAGES}")
        try:
            async with self.store.feed(from_seq=self.position + 1) as feed:
                while self.position < target:
                    batch = await feed.next_batch(self.batch_size, timeout=10)
                    if not batch:
                        raise TimeoutError(f"no events after {self.position} (target {target})")
                    if batch and batch[-1].seq > target:
                        batch = [r for r in batch if r.seq <= target]
                    if batch:
                        await self.apply(batch)
                    if progress is not None:
                        progress(self.position, target)
        finally:
            if self.db is not None:
                self.db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
        return self.position

    async def shutdown(self) -> None:
        """Finish the batch in hand, flush KV writes, close the database. Idempotent."""
        self._stopping = True
        self._hurry.set()
        if self._feed is not None:
            await self._feed.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._run_finished.wait(), 30)
        if self._kv_pending is not None:
            with contextlib.suppress(Exception):
                await self._kv_pending
            self._kv_pending = None
        if self.db is not None:
            with contextlib.suppress(Exception):
                self.db.close()
            self.db = None

    async def wait_for(self, seq: int, timeout: float = 5.0, *, hurry: bool = True) -> bool:
        """Wait until events up to ``seq`` are applied; False on timeout.

        ``hurry``: the projector stops lingering until then (a reader is waiting).
        """
        if self.position >= seq:
            return True
        deadline = time.monotonic() + timeout
        if hurry:
            self._urgent += 1
            self._hurry.set()
        try:
            while self.position < seq:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._advanced.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._advanced.wait(), remaining)
            return True
        finally:
            if hurry:
                self._urgent -= 1

    # -- applying --------------------------------------------------------------------------------
    def _decode(self, raw: Sequence[RawEvent]) -> list[EventRecord]:
        out = []
        for r in raw:
            if r.seq <= self.position:
                continue  # an ordered-consumer reset may redeliver what we already have
            try:
                out.append(decode_record(r.data, r.seq))
            except UnknownEventTypeError:
                if not self.skip_unknown:
                    raise
                log.warning("skipping unknown event type", stream_seq=r.seq)
        return out

    async def apply(self, raw: Sequence[RawEvent]) -> None:
        """Apply one batch in one transaction, checkpoint included."""
        assert self.db is not None, "Projector.open() first"
        events = self._decode(raw)
        last_seq = max((r.seq for r in raw), default=self.position)
        if last_seq <= self.position:
            return
        for sink in self.sinks:
            sink(events)
        uow = Batch(track_changes=self.kv_enabled)
        await self._load(uow, events)
        routes = self._routes
        for event in events:
            route = routes.get(event.type) or self._route(event.type)
            for handle in route[1]:
                handle(uow, event)
        await self._write(uow, last_seq)
        self.position = last_seq
        self._advanced.set()
        structlog.contextvars.bind_contextvars(stream_seq=last_seq)
        if self.kv_enabled and uow.changed:
            await self._publish_kv(uow.changed, last_seq)
        elif self.kv_enabled and self._kv_pending is None:
            self.kv_position = last_seq

    def _route(self, event_type: str) -> _Route:
        loaders: list[Loader] = []
        handlers: list[BoundHandler] = []
        creators: list[Loader] = []
        for model in self.models:
            load, handle, creates = model.route(event_type)
            if load is not None:
                loaders.append(load)
            if handle is not None:
                handlers.append(handle)
            if creates is not None:
                creators.append(creates)
        route = self._routes[event_type] = (tuple(loaders), tuple(handlers), tuple(creators))
        return route

    async def _load(self, uow: Batch, events: list[EventRecord]) -> None:
        wanted: dict[Table, set[Any]] = {}
        #: rows an earlier event of the batch creates whole: nothing to look for in SQLite
        created: set[tuple[str, Any]] = set()
        routes = self._routes
        for event in events:
            route = routes.get(event.type) or self._route(event.type)
            for load in route[0]:
                for table, key in load(event):
                    if (table.name, key) in created:
                        continue
                    keys = wanted.get(table)
                    if keys is None:
                        keys = wanted[table] = set()
                    keys.add(key)
            for create in route[2]:
                for table, key in create(event):
                    created.add((table.name, key))
        assert self.db is not None
        for table, keys in wanted.items():
            by_prefix: dict[tuple[Any, ...], list[Any]] = {}
            for key in keys:
                uow.rows[(table.name, key)] = None
                by_prefix.setdefault(key[:-1], []).append(key[-1])
            for prefix, lasts in by_prefix.items():
                for i in range(0, len(lasts), WRITE_CHUNK):
                    chunk = lasts[i : i + WRITE_CHUNK]
                    sql = table.select_sql(len(chunk))
                    for values in self.db.execute(sql, [*prefix, *chunk]).fetchall():
                        row = table.for_handlers(values)
                        uow.rows[(table.name, table.key_of(row))] = row
                    await asyncio.sleep(0)

    async def _write(self, uow: Batch, last_seq: int) -> None:
        db = self.db
        assert db is not None
        upserts: dict[str, tuple[Table, list[list[Any]]]] = {}
        deletes: dict[str, tuple[Table, list[tuple[Any, ...]]]] = {}
        for (tname, key), table in uow.dirty.items():
            row = uow.rows[(tname, key)]
            if row is None:
                deletes.setdefault(tname, (table, []))[1].append(key)
            else:
                upserts.setdefault(tname, (table, []))[1].append(table.to_params(row))
        db.execute("BEGIN IMMEDIATE")
        try:
            for table, keys in deletes.values():
                db.executemany(table.delete_sql, keys)
            for table, params in upserts.values():
                for i in range(0, len(params), WRITE_CHUNK):
                    db.executemany(table.upsert_sql, params[i : i + WRITE_CHUNK])
                    await asyncio.sleep(0)
            for sql, stmt_params in uow.statements:
                db.execute(sql, stmt_params)
            if uow.changed:
                self._record_kv_deletes(db, uow.changed, last_seq)
            db.execute(
                "INSERT OR REPLACE INTO projector_checkpoint (name, last_seq, kv_seq)"
                " VALUES (?, ?, ?)",
                (self.name, last_seq, self.kv_position),
            )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                db.execute("ROLLBACK")
            raise

    def _record_kv_deletes(
        self, db: sqlite3.Connection, changed: dict[tuple[str, str, str], Row | None], seq: int
    ) -> None:
        """Note this batch's KV deletions in its transaction, and forget confirmed ones."""
        gone = [(*key, seq) for key, row in changed.items() if row is None]
        if gone:
            db.execute("DELETE FROM projector_kv_deleted WHERE seq <= ?", (self.kv_position,))
            db.executemany("INSERT OR REPLACE INTO projector_kv_deleted VALUES (?, ?, ?, ?)", gone)

    # -- the KV bucket -----------------------------------------------------------------------------
    async def _provision_bucket(self) -> None:
        js = self.store.js
        bucket = self.store.subjects.state_bucket
        try:
            await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    description="Pantheon-ES current state of every entity",
                    history=1,
                    storage=StorageType.FILE,
                    replicas=self.store.config.replicas,
                )
            )

    async def _publish_kv(self, changed: dict[tuple[str, str, str], Row | None], seq: int) -> None:
        # Keep one batch of KV writes in flight: wait for the previous one first.
        if self._kv_pending is not None:
            await self._kv_pending
        self._kv_pending = asyncio.create_task(self._put_states(list(changed.items()), seq))
        self._kv_pending.add_done_callback(self._kv_done)

    def _kv_done(self, task: asyncio.Task[int]) -> None:
        if task is self._kv_pending:
            self._kv_pending = None
        if not task.cancelled() and task.exception() is None:
            self.kv_position = max(self.kv_position, task.result())
        elif not task.cancelled():
            log.warning("KV state writes failed; re-put at restart", error=repr(task.exception()))

    async def _put_states(
        self, items: list[tuple[tuple[str, str, str], Row | None]], seq: int
    ) -> int:
        subjects = self.store.subjects
        nc = self.store.nc
        last = len(items) - 1
        for i, ((tenant, model, entity_id), row) in enumerate(items):
            subject = subjects.state_bucket_subject(subjects.state_key(tenant, model, entity_id))
            if row is None:
                payload, headers = b"", {"KV-Operation": "DEL"}
            else:
                payload, headers = orjson.dumps(row, default=json_default), None
            if i < last:
                await nc.publish(subject, payload, headers=headers)
            else:
                await self.store.js.publish(subject, payload, headers=headers)
        return seq

    async def _resync_kv(self) -> None:
        """Re-put every entity changed, and re-delete every one deleted, after the last
        confirmed KV write."""
        if self.kv_position >= self.position:
            return
        assert self.db is not None
        changed: dict[tuple[str, str, str], Row | None] = {
            (tenant, model, entity_id): None
            for tenant, model, entity_id in self.db.execute(
                "SELECT tenant, model, id FROM projector_kv_deleted WHERE seq > ?",
                (self.kv_position,),
            )
        }
        for model in self.models:
            for tenant, kv_model, entity_id, row in model_states_since(
                self.db, model, self.kv_position
            ):
                changed[(tenant, kv_model, entity_id)] = row
        if changed:
            self.kv_position = await self._put_states(list(changed.items()), self.position)
        else:
            self.kv_position = self.position
        log.info("KV state resynced", entities=len(changed), through_seq=self.position)


#: An event type's (loaders, bound handlers, creators) over every model.
_Route = tuple[tuple[Loader, ...], tuple[BoundHandler, ...], tuple[Loader, ...]]


def model_states_since(
    db: sqlite3.Connection, model: ReadModel, seq: int
) -> list[tuple[str, str, str, Row]]:
    """(tenant, kv model, id, row) of entities of ``model`` changed after ``seq``."""
    out = []
    for table, kv_model in model.kv_tables():
        cols = ", ".join(table.columns)
        for values in db.execute(f"SELECT {cols} FROM {table.name} WHERE last_seq > ?", (seq,)):
            row = table.from_db(values)
            out.append((row["tenant"], kv_model, row["id"], row))
    return out


async def dump_tables(
    db_path: Path | str, models: Sequence[ReadModel] | None = None
) -> dict[str, list[tuple[Any, ...]]]:
    """Every read-model table's rows in key order (for comparing two databases)."""
    db = await connect(db_path)
    try:
        out: dict[str, list[tuple[Any, ...]]] = {}
        for model in models if models is not None else default_models():
            for table in model.tables:
                cols = ", ".join(table.columns)
                order = ", ".join(table.key)
                async with db.execute(f"SELECT {cols} FROM {table.name} ORDER BY {order}") as cur:
                    out[table.name] = [tuple(r) for r in await cur.fetchall()]
        return out
    finally:
        await db.close()


async def rebuild(
    store: EventStore,
    db_path: Path | str,
    *,
    until_seq: int | None = None,
    skip_unknown: bool = False,
    progress: Any = None,
) -> int:
    """Build every read model into a new database from sequence 1; returns the last seq applied."""
    path = Path(db_path)
    remove_database(path)
    projector = Projector(store, path, kv=False, skip_unknown=skip_unknown)
    await projector.open()
    try:
        return await projector.catch_up(until_seq, progress=progress)
    finally:
        await projector.shutdown()
