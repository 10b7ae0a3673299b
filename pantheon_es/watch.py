"""Subscribe to current state: the ``<root>-state`` KV bucket, as values then changes.

The projector writes the state of every task, workflow, worker and mailbox
to the bucket after each commit (key ``<tenant>.<model>.<id>``, the value the
read model's row as JSON; an archived entity's key is deleted). A
:class:`StateWatch` reads it with one ordered consumer on the bucket's stream,
filtered to the tenant's keys (the bucket keeps one revision per key, so from
its first message on it delivers the last value per key, then every later
write), so a subscriber gets the current values and then every change, in
order per entity::

    async with StateWatch(nc, tenant="default", model="task") as watch:
        current = await watch.initial()          # the current values
        async for change in watch:               # then every change
            print(change.op, change.key, change.value)

``watch.state`` is the subscriber's map ``key -> value``, kept current.
``filters`` keep entities whose value's fields equal the given text (one of
several values separated by commas); an entity that stops matching is
reported once with op ``leave`` and leaves the map.

The consumer is the event feed's (:class:`pantheon_es.store.EventFeed`), created
through the API subject that carries its filter (``$KV.<bucket>.<tenant>.>``): a
NATS user held to one tenant can watch that tenant's keys and no other's. nats-py's
``kv.watch`` could not be so held: it asks for the bucket's stream info and creates
its consumer through an API subject without the filter (docs/decisions.md,
"Commands and queries of a tenant's user").
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import nats.js.errors
import orjson
from nats.aio.client import Client as NATS

from pantheon_es import ids
from pantheon_es.connection import Connection
from pantheon_es.errors import InvalidError, NotFoundError
from pantheon_es.store import EventFeed, RawEvent, create_consumer
from pantheon_es.subjects import Subjects, check_token

#: The entity models in the bucket, and ``agent`` (a task whose executor is an agent).
MODELS = ("task", "agent", "workflow", "worker", "mailbox")


@dataclass(frozen=True, slots=True)
class StateChange:
    """One write to the state bucket, as a subscriber sees it."""

    key: str
    tenant: str
    model: str
    id: str
    op: str  # put | delete | leave (no longer matches the filters)
    revision: int  # the write's sequence in the bucket's stream
    value: dict[str, Any] | None
    initial: bool  # one of the current values at subscription time

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "model": self.model,
            "id": self.id,
            "op": self.op,
            "revision": self.revision,
            "value": self.value,
        }


def parse_filters(pairs: Mapping[str, str]) -> dict[str, frozenset[str]]:
    """``{"status": "pending,leased"}`` -> ``{"status": {"pending", "leased"}}``."""
    out = {}
    for key, text in pairs.items():
        if not key:
            raise InvalidError("a filter needs a field name: FIELD=VALUE")
        out[key] = frozenset(text.split(","))
    return out


def matches(value: Mapping[str, Any], filters: Mapping[str, frozenset[str]]) -> bool:
    for key, wanted in filters.items():
        have = value.get(key)
        text = (
            "" if have is None else have if isinstance(have, str) else orjson.dumps(have).decode()
        )
        if text not in wanted:
            return False
    return True


@dataclass
class StateWatch:
    """Current values, then every change, of one tenant's entities (optionally one model)."""

    nc: NATS
    tenant: str = "default"
    model: str | None = None
    filters: Mapping[str, str] = field(default_factory=dict)
    subjects: Subjects = field(default_factory=Subjects)
    #: the subscriber's map: key -> current value (of the entities matching the filters)
    state: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            check_token("tenant", self.tenant)
        except ValueError as exc:
            raise InvalidError(str(exc)) from None
        if self.model is not None and self.model not in MODELS:
            raise InvalidError(f"unknown model {self.model!r}: one of {', '.join(MODELS)}")
        self._filters = parse_filters(self.filters)
        self._kv_model = self.model
        if self.model == "agent":
            self._kv_model = "task"
            self._filters = {**self._filters, "executor_kind": frozenset({"agent"})}
        self._feed: EventFeed | None = None
        self._received: collections.deque[RawEvent] = collections.deque()
        self._initial_done = False  # the end of the current values was reported
        self._initial_end = False  # the last of the current values was taken

    @property
    def pattern(self) -> str:
        """The keys watched: ``<tenant>.<model>.*`` or ``<tenant>.>``."""
        if self._kv_model is None:
            return f"{self.tenant}.>"
        return f"{self.tenant}.{self._kv_model}.*"

    async def __aenter__(self) -> StateWatch:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Subscribe: a consumer on the bucket's stream, filtered to :attr:`pattern`.

        Raises:
            NotFoundError: no state bucket.
            ForbiddenError: NATS permissions do not let this user read those keys.
        """
        bucket = self.subjects.state_bucket
        stream = f"KV_{bucket}"
        subject = self.subjects.state_bucket_subject(self.pattern)
        feed = EventFeed(self.nc, self.nc.jetstream(), stream, subject, 1, 10_000)
        try:
            # A plain nats-py client's feed does not count what it will deliver: count
            # first, so that a write landing meanwhile is a change, never a current value.
            counted = (
                None if isinstance(self.nc, Connection) else await _count(self.nc, stream, subject)
            )
            await feed.start()
            pending = feed.initial_pending if counted is None else counted
        except nats.js.errors.NotFoundError:
            await feed.stop()
            raise NotFoundError(f"no state bucket {bucket!r}: has a projector run here?") from None
        except BaseException:
            await feed.stop()
            raise
        self._feed = feed
        self._initial_end = pending == 0

    async def stop(self) -> None:
        feed, self._feed = self._feed, None
        if feed is not None:
            await feed.stop()

    @property
    def closed(self) -> bool:
        """True once stopped (or before start)."""
        return self._feed is None

    async def initial(self) -> list[StateChange]:
        """The current values (deleted keys are left out); call before iterating."""
        out = []
        while not self._initial_done and self._feed is not None:
            change = await self.next()
            if change is not None and change.op == "put":
                out.append(change)
        return out

    async def next(self, timeout: float | None = None) -> StateChange | None:
        """The next change; ``None`` once when the current values are all delivered, or on
        timeout. Entities that do not match the filters are skipped.

        Raises:
            ForbiddenError: the server refused what the consumer needs to go on.
        """
        while True:
            feed = self._feed
            if feed is None:
                return None
            if self._initial_end and not self._initial_done:
                self._initial_done = True
                return None
            if not self._received:
                batch = await feed.next_batch(1000, timeout=timeout)
                if not batch:
                    return None  # timeout, or stopped
                self._received.extend(batch)
            raw = self._received.popleft()
            if not self._initial_done and raw.pending == 0:
                self._initial_end = True  # nothing more of the values at subscription
            change = self._apply(raw)
            if change is not None:
                return change

    def _apply(self, raw: RawEvent) -> StateChange | None:
        key = raw.subject.split(".", 2)[2]  # $KV.<bucket>.<key>
        tenant, model, entity_id = Subjects.parse_state_key(key)
        # A delete or purge is a message with an empty body (and a KV-Operation header);
        # a state is never empty.
        value = orjson.loads(raw.data) if raw.data else None
        initial = not self._initial_done
        known = key in self.state
        if value is not None and matches(value, self._filters):
            op = "put"
            self.state[key] = value
        elif known:
            op = "delete" if value is None else "leave"
            del self.state[key]
        else:
            return None  # neither shown before nor now
        if self.model == "agent":
            model = "agent"
        return StateChange(key, tenant, model, entity_id, op, raw.seq, value, initial)

    async def __aiter__(self) -> AsyncIterator[StateChange]:
        while self._feed is not None:
            change = await self.next()
            if change is not None:
                yield change


async def _count(nc: NATS, stream: str, subject: str) -> int:
    """How many messages of ``stream`` match ``subject`` now: a consumer's create reply
    counts them (a pull consumer never read, deleted by the server after a second)."""
    reply = await create_consumer(
        nc,
        stream,
        {
            "name": ids.new_id(),
            "filter_subject": subject,
            "deliver_policy": "all",
            "ack_policy": "none",
            "inactive_threshold": 1_000_000_000,  # ns
            "mem_storage": True,
            "num_replicas": 1,
        },
        timeout=5.0,
    )
    return int(reply.get("num_pending") or 0)
