"""Event envelope, the registry of event types, the orjson codec and upcasting.

An event type is a frozen pydantic model of its *data*, registered under a
stable name that never changes when the class is renamed or moved::

    class TaskSubmitted(EventData, type_name="TaskSubmitted", version=1):
        name: str

The envelope :class:`Event` carries the typed data (``Event[TaskSubmitted]``).
Old schema versions are upcast on read by functions registered with
:func:`upcaster`; the log itself is never rewritten.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pantheon_es.errors import UnknownEventTypeError


class EventData(BaseModel):
    """Base of every event's data. Subclasses register themselves by name."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_type: ClassVar[str]
    schema_version: ClassVar[int]
    aggregate: ClassVar[str]

    def __init_subclass__(
        cls,
        *,
        type_name: str | None = None,
        version: int = 1,
        aggregate: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if type_name is None:  # an abstract intermediate class
            return
        if aggregate is None:
            raise TypeError(f"event type {type_name} needs aggregate=...")
        cls.event_type = type_name
        cls.schema_version = version
        cls.aggregate = aggregate
        REGISTRY.register(cls)


D = TypeVar("D", bound=EventData)


class Event(BaseModel, Generic[D]):
    """The envelope every event travels in."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: str = Field(description="Unique id; also the JetStream Nats-Msg-Id.")
    type: str = Field(description="Stable registered name of the event type.")
    schema_version: int = Field(ge=1)
    tenant: str
    aggregate: str
    aggregate_id: str
    occurred_at: datetime
    actor: str
    correlation_id: str
    causation_id: str | None = None
    data: D


Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(slots=True)
class _Entry:
    data_cls: type[EventData]
    envelope_cls: type[Event[Any]]
    upcasters: dict[int, Upcaster]


class EventRegistry:
    """Event types by stable name, with their upcasters."""

    def __init__(self) -> None:
        self._types: dict[str, _Entry] = {}

    def register(self, data_cls: type[EventData]) -> None:
        name = data_cls.event_type
        existing = self._types.get(name)
        if existing is not None and existing.data_cls is not data_cls:
            raise TypeError(f"event type name {name!r} is already registered")
        self._types[name] = _Entry(data_cls, Event[data_cls], {})  # type: ignore[valid-type]

    def upcaster(self, type_name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register ``fn(data) -> data`` lifting ``type_name`` from ``from_version``."""

        def deco(fn: Upcaster) -> Upcaster:
            self._types[type_name].upcasters[from_version] = fn
            return fn

        return deco

    def data_class(self, type_name: str) -> type[EventData]:
        entry = self._types.get(type_name)
        if entry is None:
            raise UnknownEventTypeError(type_name)
        return entry.data_cls

    def envelope_class(self, type_name: str) -> type[Event[Any]]:
        entry = self._types.get(type_name)
        if entry is None:
            raise UnknownEventTypeError(type_name)
        return entry.envelope_cls

    def names(self) -> list[str]:
        return sorted(self._types)

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._types

    def upcast(self, raw: dict[str, Any], seq: int | None = None) -> tuple[dict[str, Any], _Entry]:
        """Check the type is known and lift old schema versions to the current one."""
        type_name = raw.get("type")
        entry = self._types.get(type_name) if isinstance(type_name, str) else None
        if entry is None:
            raise UnknownEventTypeError(str(type_name), seq)
        current = entry.data_cls.schema_version
        version = raw.get("schema_version", 1)
        if version != current:
            if not isinstance(version, int) or version > current:
                raise UnknownEventTypeError(f"{type_name} v{version}", seq)
            data = raw.get("data", {})
            while version < current:
                step = entry.upcasters.get(version)
                if step is None:
                    raise UnknownEventTypeError(f"{type_name} v{version} (no upcaster)", seq)
                data = step(data)
                version += 1
            raw = {**raw, "data": data, "schema_version": current}
        return raw, entry

    def from_dict(self, raw: dict[str, Any], seq: int | None = None) -> Event[Any]:
        """Validate a decoded envelope, upcasting old schema versions first."""
        raw, entry = self.upcast(raw, seq)
        return entry.envelope_cls.model_validate(raw)


REGISTRY = EventRegistry()
upcaster = REGISTRY.upcaster


def encode(event: Event[Any]) -> bytes:
    """Serialise an event with orjson (field order as declared, times in UTC with Z).

    The model's own serializer makes the dict (``model_dump`` adds 40% in
    Python-level argument handling on this, the append path).
    """
    return orjson.dumps(
        type(event).__pydantic_serializer__.to_python(event, warnings=False),
        option=orjson.OPT_UTC_Z,
    )


def _json_object(payload: bytes, seq: int | None) -> dict[str, Any]:
    try:
        raw = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"event at sequence {seq} is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"event at sequence {seq} is not a JSON object")
    return raw


def decode(payload: bytes, seq: int | None = None) -> Event[Any]:
    """Deserialise and validate an event; raises UnknownEventTypeError or ValueError."""
    raw = _json_object(payload, seq)
    try:
        return REGISTRY.from_dict(raw, seq)
    except ValidationError as exc:
        raise ValueError(f"event at sequence {seq} does not validate: {exc}") from exc


class EventRecord(NamedTuple):
    """The read side's view of a stored event: envelope fields and the data as JSON.

    The projector folds thousands of events a second; validating each into
    nested pydantic models costs four times the JSON parse. Every event in the
    log was validated by its model when the service appended it, and upcasting
    works on dicts, so read models take records; decide/evolve and the tools
    take typed :class:`Event` objects. (A NamedTuple: one is made per event.)
    """

    seq: int
    event_id: str
    type: str
    schema_version: int  # always the current one: records are upcast
    tenant: str
    aggregate: str
    aggregate_id: str
    occurred_at: str  # ISO 8601, UTC, as stored
    actor: str
    correlation_id: str
    causation_id: str | None
    data: dict[str, Any]


#: The envelope fields of an :class:`EventRecord` after ``seq``, as stored (one C call).
_ENVELOPE = itemgetter(*EventRecord._fields[1:])
_new_record = tuple.__new__


def decode_record(payload: bytes, seq: int) -> EventRecord:
    """Parse an event for the read side (type checked, upcast, not model-validated)."""
    raw = _json_object(payload, seq)
    # Fast path (a replay decodes every event): a known type at its current version,
    # every envelope field present (encode() writes them all, causation_id included).
    name = raw.get("type")
    entry = REGISTRY._types.get(name) if type(name) is str else None
    if entry is None or raw.get("schema_version", 1) != entry.data_cls.schema_version:
        raw, _entry = REGISTRY.upcast(raw, seq)
    try:
        return _new_record(EventRecord, (seq, *_ENVELOPE(raw)))
    except KeyError:
        pass
    try:
        return EventRecord(
            seq,
            raw["event_id"],
            raw["type"],
            raw["schema_version"],
            raw["tenant"],
            raw["aggregate"],
            raw["aggregate_id"],
            raw["occurred_at"],
            raw["actor"],
            raw["correlation_id"],
            raw.get("causation_id"),
            raw["data"],
        )
    except KeyError as exc:
        raise ValueError(f"event at sequence {seq} lacks envelope field {exc}") from None


def make_event(
    data: EventData,
    *,
    event_id: str,
    tenant: str,
    aggregate_id: str,
    occurred_at: datetime,
    actor: str,
    correlation_id: str,
    causation_id: str | None,
) -> Event[Any]:
    """Wrap ``data`` in its envelope (type, version and aggregate from its class).

    Built without re-validation: ``data`` is a validated model and the other
    fields come from the service, never from a client.
    """
    cls = REGISTRY.envelope_class(data.event_type)
    # What ``model_construct`` does, without its per-field loop (half the cost; it runs
    # for every event the service appends). tests/test_store.py checks they agree.
    event = cls.__new__(cls)
    _set(
        event,
        "__dict__",
        {
            "event_id": event_id,
            "type": data.event_type,
            "schema_version": data.schema_version,
            "tenant": tenant,
            "aggregate": data.aggregate,
            "aggregate_id": aggregate_id,
            "occurred_at": occurred_at,
            "actor": actor,
            "correlation_id": correlation_id,
            "causation_id": causation_id,
            "data": data,
        },
    )
    _set(event, "__pydantic_fields_set__", set(_ENVELOPE_FIELDS))
    _set(event, "__pydantic_extra__", None)
    _set(event, "__pydantic_private__", None)
    return event


_set = object.__setattr__
_ENVELOPE_FIELDS = frozenset(Event.model_fields)
