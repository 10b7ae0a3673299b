"""Filters of ``pantheon events``: which subject to read, from where, which types to keep.

* ``--aggregate`` and ``--id`` narrow the consumer's filter subject on the
  server (``<root>.ev.<tenant>.<aggregate>.<id>``, ``*`` for what is not given).
* ``--since TIME`` starts at the first event stored at or after TIME: one
  direct get (``start_time`` + ``next_by_subj``) turns the time into a stream
  sequence, then the feed starts there (the time is the server's stored
  time, which follows the event's ``occurred_at`` by the append's latency).
* ``--type`` is filtered by the client: appends carry no header naming the
  type and subjects do not contain it, so the server cannot filter on it. A
  cheap byte test (``"type":"X"``) skips other events before any decoding.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import nats.errors
import orjson

from pantheon_es.errors import InternalError, InvalidError, UnavailableError, UnknownEventTypeError
from pantheon_es.events import REGISTRY, EventRecord, decode_record
from pantheon_es.store import EventStore
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


async def read_records(
    store: EventStore,
    from_seq: int,
    to_seq: int,
    *,
    skip_unknown: bool = False,
    timeout: float = 30.0,
) -> AsyncGenerator[tuple[list[EventRecord], int], None]:
    """The decoded events ``from_seq..to_seq`` of the whole log, batch by batch, each with
    the sequence reached (for progress). Read-only: an ordered consumer.

    An event type this build does not know raises :class:`UnknownEventTypeError` unless
    ``skip_unknown``; bytes that are no event are an ``internal`` error naming the
    sequence; a log that stops delivering before ``to_seq`` is ``unavailable``.
    """
    if from_seq > to_seq:
        return
    async with store.feed(from_seq=from_seq) as feed:
        position = from_seq - 1
        while position < to_seq:
            batch = await feed.next_batch(2000, timeout=timeout)
            if not batch:
                raise UnavailableError(
                    f"the log stopped delivering after sequence {position} (wanted {to_seq})"
                )
            records: list[EventRecord] = []
            for raw in batch:
                if raw.seq <= position or raw.seq > to_seq:
                    continue
                try:
                    records.append(decode_record(raw.data, raw.seq))
                except UnknownEventTypeError:
                    if not skip_unknown:
                        raise
                except ValueError as exc:  # not JSON, or no envelope
                    raise InternalError(str(exc), details={"seq": raw.seq}) from None
            position = min(max(position, batch[-1].seq), to_seq)
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
    """The sequence of the first event on ``subject`` stored at or after ``when``."""
    request = orjson.dumps(
        {"start_time": when.astimezone(UTC).isoformat().replace("+00:00", "Z"),
         "next_by_subj": subject}
    )  # fmt: skip
    try:
        msg = await store.nc.request(
            f"$JS.API.DIRECT.GET.{store.stream}", request, timeout=store.config.ack_timeout
        )
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise UnavailableError(f"direct get on {store.stream} failed: {exc!r}") from None
    headers = msg.headers or {}
    if headers.get("Status") == "404":
        return None
    if "Nats-Sequence" not in headers:
        raise UnavailableError(f"direct get on {store.stream} answered {headers}")
    return int(headers["Nats-Sequence"])
