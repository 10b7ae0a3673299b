"""Subscribe to current state: the ``<root>-state`` KV bucket, as values then changes.

The projector writes the state of every task, workflow, worker and mailbox
to the bucket after each commit (key ``<tenant>.<model>.<id>``, the value the
read model's row as JSON; an archived entity's key is deleted). A
:class:`StateWatch` reads it with one ordered consumer (nats-py
``kv.watch``, last value per key first, then every later write), so a
subscriber gets the current values and then every change, in order per
entity::

    async with StateWatch(nc, tenant="default", model="task") as watch:
        current = await watch.initial()          # the current values
        async for change in watch:               # then every change
            print(change.op, change.key, change.value)

``watch.state`` is the subscriber's map ``key -> value``, kept current.
``filters`` keep entities whose value's fields equal the given text (one of
several values separated by commas); an entity that stops matching is
reported once with op ``leave`` and leaves the map.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATS
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from pantheon_es.errors import InvalidError, NotFoundError
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
        self._watcher: Any = None
        self._initial_done = False

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
        try:
            kv: KeyValue = await self.nc.jetstream().key_value(self.subjects.state_bucket)
        except nats.js.errors.BucketNotFoundError:
            raise NotFoundError(
                f"no state bucket {self.subjects.state_bucket!r}: has a projector run here?"
            ) from None
        self._watcher = await kv.watch(self.pattern, include_history=False)

    async def stop(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
            self._watcher = None

    @property
    def closed(self) -> bool:
        """True once stopped (or before start)."""
        return self._watcher is None

    async def initial(self) -> list[StateChange]:
        """The current values (deleted keys are left out); call before iterating."""
        out = []
        while not self._initial_done:
            change = await self.next()
            if change is not None and change.op == "put":
                out.append(change)
        return out

    async def next(self, timeout: float | None = None) -> StateChange | None:
        """The next change; ``None`` once when the current values are all delivered, or on
        timeout. Entities that do not match the filters are skipped."""
        while True:
            if self._watcher is None:
                return None
            try:
                entry = await self._watcher.updates(1e9 if timeout is None else timeout)
            except nats.errors.TimeoutError:
                return None
            if entry is KeyValue.KeyWatcher.STOP_ITER:
                self._watcher = None
                return None
            if entry is None:
                self._initial_done = True
                return None
            change = self._apply(entry)
            if change is not None:
                return change

    def _apply(self, entry: Any) -> StateChange | None:
        key = entry.key
        tenant, model, entity_id = Subjects.parse_state_key(key)
        deleted = entry.operation in (KV_DEL, KV_PURGE)
        value = None if deleted or not entry.value else orjson.loads(entry.value)
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
        return StateChange(key, tenant, model, entity_id, op, entry.revision, value, initial)

    async def __aiter__(self) -> AsyncIterator[StateChange]:
        while self._watcher is not None:
            change = await self.next()
            if change is not None:
                yield change
