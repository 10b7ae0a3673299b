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
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import nats.errors
import orjson

from pantheon_es.errors import InvalidError, UnavailableError
from pantheon_es.events import REGISTRY
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
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidError(
            f"time {text!r}: use ISO 8601 (2026-11-24T08:00:00Z) or a span ago (15m, 2h, 1d)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


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
