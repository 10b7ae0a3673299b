"""The pure core: how an aggregate type decides and evolves.

``decide(state, command, ctx) -> Decision`` and ``evolve(state, event) ->
state`` do no I/O; time and new ids come in through :class:`DecideContext`,
so they are tested in microseconds and replay gives the same answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from pantheon_es import ids
from pantheon_es.commands import Command
from pantheon_es.events import Event, EventData

S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class DecideContext:
    """Everything ``decide`` may know besides state and command.

    ``related`` holds read-only states of other aggregates the command names
    (:meth:`Command.related`), e.g. the recipient task of a message.
    """

    tenant: str
    aggregate_id: str
    now: datetime
    related: Mapping[tuple[str, str], Any] = field(default_factory=dict)
    #: Source of new ids (message ids, ...): injected so decide stays deterministic in tests.
    new_id: Callable[[], str] = ids.new_id


@dataclass(frozen=True, slots=True)
class Decision:
    """What a command decided: the events to append and the reply's result."""

    events: Sequence[EventData] = ()
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AggregateType(Generic[S]):
    """One kind of aggregate: its name and its pure functions."""

    name: str
    evolve: Callable[[S | None, Event[Any]], S]
    decide: Callable[[S | None, Command, DecideContext], Decision]

    def fold(self, events: Sequence[Event[Any]], state: S | None = None) -> S | None:
        for event in events:
            state = self.evolve(state, event)
        return state


AGGREGATE_TYPES: dict[str, AggregateType[Any]] = {}


def register(aggregate_type: AggregateType[S]) -> AggregateType[S]:
    AGGREGATE_TYPES[aggregate_type.name] = aggregate_type
    return aggregate_type
