"""Filters of ``pantheon events``: which subject to read, from where, which types to keep.

* ``--aggregate`` and ``--id`` narrow the consumer's filter subject on the
  server (``<root>.ev.<tenant>.<aggregate>.<id>``, ``*`` for what is not given).
* ``--since TIME`` starts at the first event stored at or after TIME: a consumer on
  the filter subject with deliver policy by start time turns the time into a stream
  sequence (:meth:`EventStore.first_seq`), then the feed starts there (the time is
  the server's stored time, which follows the event's ``occurred_at`` by the
  append's latency).
* ``--type`` is filtered by the client: appends carry no header naming the
  type and subjects do not contain it, so the server cannot filter on it. A
  cheap byte test (``"type":"X"``) skips other events before any decoding.

It also holds the bounded reads of the operator tools (:func:`raw_batches`,
:func:`read_records`): a stretch of the log, whole or of one filter subject
(one tenant's events for ``replay``/``verify --tenant``).

Every read here names its filter subject in the JetStream API subject it uses (no
direct get with a subject in its body), so a NATS user whose permissions cover one
tenant's events can run them for that tenant (docs/decisions.md, "NATS permissions
for one tenant").
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson

from pantheon_es.errors import InternalError, InvalidError, UnavailableError, UnknownEventTypeError
from pantheon_es.events import REGISTRY, EventRecord, decode_record
from pantheon_es.store import EventStore, RawEvent
from pantheon_es.subjects import AGGREGATES, Subjects

_AGO = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (``2026-11-24T08:00:00Z``; no zone = UTC) or a span ago (``90s``, ``15m``,
    ``2h``, ``1d``)."""
    ago = _AGO.match(text.strip())
    if ago:
        return (now or datetime.now(UTC)) - timedelta(
            seconds=float(ago.group(1)) * _UNITS[ago.group(2)]
        )
    try:
        return parse_iso(text)
    except ValueError:
        raise InvalidError(
            f"time {text!r}: use ISO 8601 (2026-11-24T08:00:00Z) or a span ago (15m, 2h, 1d)"
        ) from None


def parse_iso(text: str) -> datetime:
    """An ISO 8601 time as an aware UTC datetime; a time without an offset is UTC.

    Raises:
        ValueError: ``text`` is not an ISO 8601 date or time.
    """
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO 8601 time (e.g. 2026-11-24T09:30:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


async def raw_batches(
    store: EventStore,
    from_seq: int,
    to_seq: int,
    *,
    subject: str | None = None,
    batch_size: int = 2000,
    timeout: float = 30.0,
) -> AsyncGenerator[tuple[list[RawEvent], int], None]:
    """The stored messages ``from_seq..to_seq`` of the log, or of those of it on ``subject``
    (a filter such as one tenant's ``<root>.ev.T.>``), batch by batch, each batch with the
    stream sequence reached (for progress; ``to_seq`` with the last batch). Read-only: an
    ordered consumer filtered on the server.

    Sequences are the stream's, shared by every subject, so a filtered read cannot wait
    for ``to_seq`` itself, which may be another subject's: it ends with the first message
    at or past ``to_seq`` or the first with nothing matching after it (its ``pending`` is
    0; anything stored later is past ``to_seq``, which was at most the head). Whether
    anything matches at all is counted by the consumer's create reply, so a subject
    without messages in the stretch ends at once instead of waiting for the timeout.
    A log that stops delivering before the end is ``unavailable``; a server that
    refuses the read (NATS permissions) is ``forbidden``.
    """
    if from_seq > to_seq:
        return
    whole = subject is None or subject == store.subjects.all_events
    async with store.feed(from_seq=from_seq, subject=subject) as feed:
        if not whole:
            assert subject is not None
            # Whether anything matches at all: the consumer's create reply counts it
            # (a feed on a plain nats-py client does not: one lookup then).
            pending = feed.initial_pending
            if pending is None:
                pending = int(await store.first_seq(subject, start_seq=from_seq) is not None)
            if pending == 0:
                yield [], to_seq
                return
        position = from_seq - 1
        while position < to_seq:
            batch = await feed.next_batch(batch_size, timeout=timeout)
            if not batch:
                raise UnavailableError(
                    f"the log stopped delivering after sequence {position} (wanted {to_seq})"
                )
            kept = [raw for raw in batch if position < raw.seq <= to_seq]
            if whole:
                position = min(max(position, batch[-1].seq), to_seq)
            elif any(raw.seq >= to_seq or raw.pending == 0 for raw in batch):
                position = to_seq
            else:
                position = max(position, batch[-1].seq)
            yield kept, position


async def read_records(
    store: EventStore,
    from_seq: int,
    to_seq: int,
    *,
    subject: str | None = None,
    skip_unknown: bool = False,
    timeout: float = 30.0,
) -> AsyncGenerator[tuple[list[EventRecord], int], None]:
    """The decoded events ``from_seq..to_seq`` of the whole log (or of ``subject``, see
    :func:`raw_batches`), batch by batch, each with the sequence reached (for progress).
    Read-only: an ordered consumer.

    An event type this build does not know raises :class:`UnknownEventTypeError` unless
    ``skip_unknown``; bytes that are no event are an ``internal`` error naming the
    sequence; a log that stops delivering before ``to_seq`` is ``unavailable``.
    """
    batches = raw_batches(store, from_seq, to_seq, subject=subject, timeout=timeout)
    async with contextlib.aclosing(batches):
        async for batch, position in batches:
            records: list[EventRecord] = []
            for raw in batch:
                try:
                    records.append(decode_record(raw.data, raw.seq))
                except UnknownEventTypeError:
                    if not skip_unknown:
                        raise
                except ValueError as exc:  # not JSON, or no envelope
                    raise InternalError(str(exc), details={"seq": raw.seq}) from None
            yield records, position


@dataclass(frozen=True, slots=True)
class EventFilter:
    """What ``pantheon events`` keeps."""

    tenant: str
    aggregate: str | None = None
    aggregate_id: str | None = None
    types: frozenset[str] = frozenset()
    since: datetime | None = None

    def __post_init__(self) -> None:
        if self.aggregate is not None and self.aggregate not in AGGREGATES:
            raise InvalidError(
                f"unknown aggregate {self.aggregate!r}: one of {', '.join(sorted(AGGREGATES))}"
            )
        unknown = sorted(t for t in self.types if t not in REGISTRY)
        if unknown:
            raise InvalidError(
                f"unknown event type {', '.join(unknown)}: one of {', '.join(REGISTRY.names())}"
            )

    def subject(self, subjects: Subjects) -> str:
        """The server-side filter subject."""
        try:
            return subjects.events(self.tenant, self.aggregate, self.aggregate_id)
        except ValueError as exc:
            raise InvalidError(str(exc)) from None

    def needles(self) -> tuple[bytes, ...]:
        return tuple(orjson.dumps({"type": t})[1:-1] for t in self.types)

    def keep(self, payload: bytes, needles: Iterable[bytes]) -> bool:
        """The byte test of ``--type`` (no type filter: keep everything)."""
        needles = tuple(needles)
        return not needles or any(n in payload for n in needles)


async def seq_at(store: EventStore, subject: str, when: datetime) -> int | None:
    """The sequence of the first event on ``subject`` stored at or after ``when`` (None:
    none yet), by a consumer's deliver policy by start time (:meth:`EventStore.first_seq`):
    a read of ``subject`` alone, which a user held to one tenant may do."""
    return await store.first_seq(subject, start_time=when)
