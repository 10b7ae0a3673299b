"""`pantheon replay`: every read model rebuilt from the log into a new SQLite file.

"The state of the system at time T" is such a file: the read models after
every event the stream stored at or before T (or up to a stream sequence).
The replay reads the log through :class:`projections.projector.Projector`
(``kv=False``: no KV bucket, no live database) and writes into a temporary
file beside ``--out`` that is renamed over it only once complete, so a
failed or interrupted replay leaves nothing behind. The live log, database
and KV bucket are only read. With a tenant, only that tenant's events are read
(the consumer's filter subject ``<root>.ev.<tenant>.>``) and the file holds that
tenant's rows. Choices are recorded in docs/decisions.md and explained for
users in docs/operations.md ("Replay and verify").
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors

from pantheon_es.errors import (
    ConflictError,
    InternalError,
    InvalidError,
    NotFoundError,
    UnavailableError,
)
from pantheon_es.events import EventRecord
from pantheon_es.store import EventStore
from pantheon_es.subjects import check_token
from projections.projector import BULK_WAL_PAGES, WAL_PAGES, Projector
from tools.events import raw_batches, seq_at

#: progress(position, target) as the projector calls it
Progress = Callable[[int, int], None]
Sink = Callable[[list[EventRecord]], None]


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    """What a replay built (``--json`` prints it)."""

    out: str
    last_seq: int
    events: int
    seconds: float
    until_seq: int | None = None
    until: str | None = None
    #: the one tenant replayed (None: every tenant)
    tenant: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "last_seq": self.last_seq,
            "events": self.events,
            "seconds": round(self.seconds, 3),
            "until_seq": self.until_seq,
            "until": self.until,
            "tenant": self.tenant,
        }


def checkpoint_name(tenant: str | None) -> str:
    """The checkpoint row of a replayed file: ``main`` as a node's, ``tenant:T`` for one
    tenant, so that a node given such a file never goes on from it (no ``main`` row: it
    rebuilds the file from the log) and the file says what it holds."""
    return "main" if tenant is None else f"tenant:{tenant}"


async def head_seq(store: EventStore, subject: str | None = None) -> int:
    """The stream's last sequence; a typed error when there is no stream.

    With a filter ``subject`` (one tenant's), asked through it
    (:meth:`EventStore.stream_last_seq`): a user held to that tenant by NATS permissions
    may not ask for the stream's info.
    """
    try:
        return await store.stream_last_seq(subject)
    except nats.js.errors.NotFoundError:
        raise NotFoundError(
            f"no event stream {store.stream} on this server (wrong --namespace or --nats-url?)"
        ) from None
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise UnavailableError(f"JetStream did not answer: {exc!r}") from exc


async def seq_at_time(store: EventStore, when: datetime, subject: str | None = None) -> int:
    """The last stream sequence stored at or before ``when``, to the microsecond (0 if none).

    "At or before" is "before ``when`` plus one microsecond": the stream's stored
    time (the server's clock when it stored the message) has nanoseconds, a
    TIME has microseconds. The stored time grows with the sequence, unlike
    ``occurred_at``, which comes from the clocks of several service replicas.

    With a filter ``subject`` (one tenant's), the sequence before the first message *on
    it* stored after ``when`` (or the head): the same messages of ``subject`` lie at or
    before it, and a user held to that tenant can ask (docs/decisions.md, "NATS
    permissions for one tenant"); other tenants' events stored after ``when`` may lie
    before it too.
    """
    head = await head_seq(store, subject)
    after = await seq_at(
        store, subject or store.subjects.all_events, when + timedelta(microseconds=1)
    )
    return head if after is None else min(head, after - 1)


def check_tenant(tenant: str | None) -> None:
    """``invalid`` unless ``tenant`` is None (every tenant) or one subject-safe tenant."""
    if tenant is not None:
        try:
            check_token("tenant", tenant)
        except ValueError as exc:
            raise InvalidError(str(exc), details={"tenant": tenant}) from None


def remove_database(path: Path) -> None:
    """Delete an SQLite file and its WAL companions, if present."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()


async def build_read_models(
    store: EventStore,
    path: Path,
    until_seq: int,
    *,
    tenant: str | None = None,
    skip_unknown: bool = False,
    progress: Progress | None = None,
    sinks: Sequence[Sink] = (),
) -> int:
    """Fold the log from sequence 1 to ``until_seq`` into a fresh database at ``path``.

    With ``tenant``, only that tenant's events (``<root>.ev.<tenant>.>``, filtered by the
    server): the result is that tenant's rows of the whole rebuild, as no read-model
    handler writes a row of another tenant than its event's, and its checkpoint row
    (named by :func:`checkpoint_name`) says ``until_seq``. ``sinks`` see every decoded
    batch, in order (the verifier's invariant fold). Returns the last sequence applied
    (``until_seq`` for a tenant).
    """
    remove_database(path)
    name = checkpoint_name(tenant)
    projector = Projector(store, path, kv=False, skip_unknown=skip_unknown, name=name)
    projector.sinks.extend(sinks)
    await projector.open()
    try:
        if tenant is None:
            return await projector.catch_up(until_seq, progress=progress)
        return await _catch_up_tenant(projector, tenant, until_seq, progress)
    except TimeoutError as exc:
        raise UnavailableError(f"the log stopped delivering: {exc}") from exc
    except ValueError as exc:  # an event that is not JSON or lacks envelope fields
        raise InternalError(str(exc)) from exc
    finally:
        await projector.shutdown()


async def _catch_up_tenant(
    projector: Projector, tenant: str, until_seq: int, progress: Progress | None
) -> int:
    """:meth:`Projector.catch_up` for one tenant's subjects.

    The stream's sequences are shared by every tenant, so the read ends by
    :func:`tools.events.raw_batches`'s rule rather than on reaching ``until_seq``;
    progress is reported in stream sequences (a bar over the whole log that jumps over
    the other tenants' events).
    """
    db = projector.db
    assert db is not None, "Projector.open() first"
    subject = projector.store.subjects.events(tenant)
    db.execute(f"PRAGMA wal_autocheckpoint={BULK_WAL_PAGES}")  # a bulk load, as catch_up
    try:
        batches = raw_batches(
            projector.store, projector.position + 1, until_seq, subject=subject,
            batch_size=projector.batch_size, timeout=10,
        )  # fmt: skip
        async with contextlib.aclosing(batches):
            async for batch, position in batches:
                if batch:
                    await projector.apply(batch)
                if progress is not None:
                    progress(position, until_seq)
        # The state after until_seq, whether or not its last event was this tenant's.
        projector.set_position(until_seq)
    finally:
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
    return until_seq


def _install(partial: Path, out: Path) -> None:
    """Make the finished file the database at ``out`` in one rename."""
    db = sqlite3.connect(partial)
    try:
        db.execute("PRAGMA journal_mode=DELETE")  # fold the WAL in: the file alone is the DB
    finally:
        db.close()
    for suffix in ("-wal", "-shm", "-journal"):  # an overwritten database's, never ours
        with contextlib.suppress(FileNotFoundError):
            Path(f"{out}{suffix}").unlink()
    os.replace(partial, out)


async def replay(
    store: EventStore,
    out: Path | str,
    *,
    until_seq: int | None = None,
    until: datetime | None = None,
    skip_unknown: bool = False,
    force: bool = False,
    tenant: str | None = None,
    progress: Progress | None = None,
) -> ReplaySummary:
    """Rebuild every read model into ``out`` from the log, up to a sequence or a time.

    With ``tenant``, from that tenant's events only: its rows of every read model (workers
    are in the tenant they registered in), checkpoint row ``tenant:<tenant>``.

    Raises:
        InvalidError: both ``until_seq`` and ``until``, or ``until_seq`` past the log's end.
        ConflictError: ``out`` exists and ``force`` is not set.
        InvalidError: ``out`` cannot be written (permissions, disk full).
        UnknownEventTypeError: an event type this build does not know (naming its
            sequence), unless ``skip_unknown``.
    """
    out = Path(out)
    if until_seq is not None and until is not None:
        raise InvalidError("give --until-seq or --until, not both")
    check_tenant(tenant)
    if out.exists() and not force:
        raise ConflictError(
            f"{out} exists; pass --force to overwrite it", details={"out": str(out)}
        )
    started = time.perf_counter()
    subject = store.subjects.events(tenant) if tenant is not None else None
    head = await head_seq(store, subject)
    if until is not None:
        target = await seq_at_time(store, until, subject)
    elif until_seq is not None:
        if until_seq > head:
            raise InvalidError(
                f"--until-seq {until_seq} is past the end of the log (last sequence {head})",
                details={"until_seq": until_seq, "last_seq": head},
            )
        target = until_seq
    else:
        target = head
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    counted = [0]

    def count(events: list[EventRecord]) -> None:
        counted[0] += len(events)

    try:
        last = await build_read_models(
            store, partial, target, tenant=tenant, skip_unknown=skip_unknown,
            progress=progress, sinks=[count],
        )  # fmt: skip
        _install(partial, out)
    except BaseException as exc:
        remove_database(partial)
        if isinstance(exc, OSError | sqlite3.Error):
            raise InvalidError(f"cannot write {out}: {exc}", details={"out": str(out)}) from exc
        raise
    return ReplaySummary(
        out=str(out),
        last_seq=last,
        events=counted[0],
        seconds=time.perf_counter() - started,
        until_seq=until_seq,
        until=until.isoformat().replace("+00:00", "Z") if until is not None else None,
        tenant=tenant,
    )
