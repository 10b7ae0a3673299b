"""What every read model is made of: tables, handlers, and a unit of work.

A read model declares its tables and one handler per event type::

    class TasksModel(ReadModel):
        name = "tasks"
        tables = (TASKS,)

        @handles(TaskCancelled, load=aggregate_row(TASKS))
        def cancelled(self, uow: Batch, ev: EventRecord) -> None: ...

Handlers receive :class:`~pantheon_es.events.EventRecord` (envelope fields and
the data as JSON, already upcast; the event class named in ``handles``
documents its fields). They are synchronous and do no I/O: the projector first loads every row
the batch's handlers declared (one ``SELECT ... IN`` per table), then runs the
handlers against the :class:`Batch`, then writes all changed rows with one
``executemany`` per table, in the same transaction as its checkpoint.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from operator import itemgetter
from typing import Any, ClassVar

import aiosqlite
import orjson
from pydantic import BaseModel

from pantheon_es.events import EventData, EventRecord

Key = tuple[Any, ...]
Row = dict[str, Any]


class RawJson:
    """A JSON column's text as stored, in a row loaded for handlers that never look
    into that column (``Table.opaque_json``): writing the row back binds the text as
    it is, and the KV bucket gets it through :func:`json_default`, so the column is
    neither parsed on load nor serialised again on write."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"RawJson({self.text!r})"


def json_default(value: Any) -> Any:
    """``orjson.dumps(..., default=json_default)`` for rows that may hold :class:`RawJson`."""
    if type(value) is RawJson:
        return orjson.Fragment(value.text)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


@dataclass(frozen=True, eq=False)
class Table:
    """One SQLite table of a read model."""

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    ddl: str  # CREATE TABLE and CREATE INDEX statements
    json_columns: frozenset[str] = frozenset()
    #: JSON columns no handler reads or changes in place (it may replace them): rows
    #: loaded for handlers keep them as :class:`RawJson` (docs/decisions.md).
    opaque_json: frozenset[str] = frozenset()

    @property
    def upsert_sql(self) -> str:
        cols = ", ".join(self.columns)
        marks = ", ".join("?" for _ in self.columns)
        return f"INSERT OR REPLACE INTO {self.name} ({cols}) VALUES ({marks})"

    @property
    def delete_sql(self) -> str:
        cond = " AND ".join(f"{k} = ?" for k in self.key)
        return f"DELETE FROM {self.name} WHERE {cond}"

    def select_sql(self, count: int) -> str:
        """Rows sharing all key columns but the last, whose last key column is one of ``count``.

        (A row-value ``(a, b) IN (VALUES ...)`` would scan the whole table.)
        """
        cols = ", ".join(self.columns)
        prefix = "".join(f"{k} = ? AND " for k in self.key[:-1])
        marks = ", ".join("?" for _ in range(count))
        return f"SELECT {cols} FROM {self.name} WHERE {prefix}{self.key[-1]} IN ({marks})"

    @cached_property
    def _values(self) -> Callable[[Row], tuple[Any, ...]]:
        return itemgetter(*self.columns)

    @cached_property
    def _json_positions(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.columns) if c in self.json_columns)

    @cached_property
    def _key_fn(self) -> Callable[[Row], Key]:
        if len(self.key) > 1:
            return itemgetter(*self.key)  # already a tuple
        column = self.key[0]
        return lambda row: (row[column],)

    def key_of(self, row: Row) -> Key:
        return self._key_fn(row)

    @cached_property
    def _parsed_json(self) -> tuple[str, ...]:
        parsed = self.json_columns - self.opaque_json
        return tuple(c for c in self.columns if c in parsed)

    @cached_property
    def _opaque_json(self) -> tuple[str, ...]:
        return tuple(c for c in self.columns if c in self.opaque_json)

    def to_params(self, row: Row) -> list[Any]:
        """The row as statement parameters, JSON columns as text (the projector's hot path)."""
        values = list(self._values(row))
        for i in self._json_positions:
            value = values[i]
            if value is not None:
                values[i] = value.text if type(value) is RawJson else orjson.dumps(value).decode()
        return values

    def for_handlers(self, values: Sequence[Any]) -> Row:
        """A stored row as handlers get it: like :meth:`from_db`, but the
        ``opaque_json`` columns stay text (:class:`RawJson`)."""
        row = dict(zip(self.columns, values, strict=True))
        for c in self._parsed_json:
            if row[c] is not None:
                row[c] = orjson.loads(row[c])
        for c in self._opaque_json:
            if row[c] is not None:
                row[c] = RawJson(row[c])
        return row

    def from_db(self, values: Sequence[Any]) -> Row:
        row = dict(zip(self.columns, values, strict=True))
        for c in self.json_columns:
            if row[c] is not None:
                row[c] = orjson.loads(row[c])
        return row


@dataclass(slots=True)
class Batch:
    """The unit of work of one projector batch."""

    rows: dict[tuple[str, Key], Row | None] = field(default_factory=dict)
    dirty: dict[tuple[str, Key], Table] = field(default_factory=dict)
    #: (tenant, model, id) -> current state for the KV bucket, or None when removed
    changed: dict[tuple[str, str, str], Row | None] = field(default_factory=dict)
    #: False when nobody reads ``changed`` (rebuilds, KV disabled)
    track_changes: bool = True
    #: set-based statements (e.g. delete an archived agent's messages), run after the rows
    statements: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    def get(self, table: Table, key: Key) -> Row | None:
        """A row loaded for this batch (or written earlier in it)."""
        try:
            return self.rows[(table.name, key)]
        except KeyError:
            raise KeyError(
                f"{table.name}{key} was not loaded: declare it in the handler's load="
            ) from None

    def put(self, table: Table, row: Row) -> None:
        """Write ``row`` (it may be the very dict :meth:`get` returned, changed in place:
        rows belong to their batch, each batch loads its own)."""
        k = (table.name, table._key_fn(row))
        self.rows[k] = row
        self.dirty[k] = table

    def delete(self, table: Table, key: Key) -> None:
        k = (table.name, key)
        self.rows[k] = None
        self.dirty[k] = table

    def execute(self, sql: str, params: tuple[Any, ...]) -> None:
        """A statement for the batch's transaction, run after its row writes.

        Rows this batch already loaded or wrote are not updated by it: use it only
        for rows no later event of the batch reads.
        """
        self.statements.append((sql, params))

    def publish(self, tenant: str, model: str, entity_id: str, state: Row | None) -> None:
        """Mark an entity's current state for the KV bucket (last write in a batch wins)."""
        if self.track_changes:
            self.changed[(tenant, model, entity_id)] = state


Handler = Callable[[Any, Batch, EventRecord], None]
#: A read-model query: (read-only connection, tenant, validated body) -> result
QueryFn = Callable[[aiosqlite.Connection, str, Any], Awaitable[dict[str, Any]]]
Queries = dict[tuple[str, str], tuple[type[BaseModel], QueryFn]]
Loader = Callable[[EventRecord], Iterable[tuple[Table, Key]]]
BoundHandler = Callable[[Batch, EventRecord], None]


@dataclass(frozen=True, slots=True)
class _Binding:
    event_type: type[EventData]
    fn: Handler
    load: Loader | None
    creates: Loader | None


def handles(
    event_type: type[EventData], *, load: Loader | None = None, creates: Loader | None = None
) -> Callable[[Handler], Handler]:
    """Mark a method as the handler of ``event_type``; ``load`` names the rows it reads.

    ``creates`` names the rows it always writes whole, reading nothing of them (a new
    aggregate's row): a later event of the same batch that loads one of them gets the
    batch's row, and the projector does not look for it in SQLite.
    """

    def deco(fn: Handler) -> Handler:
        binding = _Binding(event_type, fn, load, creates)
        fn.__pantheon_binding__ = binding  # type: ignore[attr-defined]
        return fn

    return deco


def aggregate_row(table: Table) -> Loader:
    """Loader of the row keyed by the event's (tenant, aggregate id)."""

    def load(event: EventRecord) -> Iterable[tuple[Table, Key]]:
        return ((table, (event.tenant, event.aggregate_id)),)

    return load


def page(items: list[Row], total: int, limit: int, offset: int) -> dict[str, Any]:
    """A page of results with the pagination facts a UI needs."""
    total_pages = max(1, -(-total // limit))
    return {
        "items": items,
        "total": total,
        "limit": limit,
        "offset": offset,
        "has_more": offset + len(items) < total,
        "current_page": offset // limit + 1,
        "total_pages": total_pages,
    }


async def paged(
    db: aiosqlite.Connection,
    table: Table,
    cond: str,
    params: list[Any],
    *,
    order: str,
    limit: int,
    offset: int,
    source: str | None = None,
) -> dict[str, Any]:
    """``page()`` of the rows of ``table`` matching ``cond``: a count, then one page.

    ``source``: the FROM clause when not just the table (e.g. naming an index).
    """
    source = source or table.name
    async with db.execute(f"SELECT count(*) FROM {source} WHERE {cond}", params) as cur:
        row = await cur.fetchone()
        total = int(row[0]) if row else 0
    cols = ", ".join(table.columns)
    async with db.execute(
        f"SELECT {cols} FROM {source} WHERE {cond} ORDER BY {order} LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ) as cur:
        rows = [table.from_db(r) for r in await cur.fetchall()]
    return page(rows, total, limit, offset)


class ReadModel:
    """Base of every read model module's model class."""

    name: ClassVar[str]
    tables: ClassVar[tuple[Table, ...]]
    #: (table, KV model) pairs whose rows are entity states in the KV bucket;
    #: such tables have ``tenant``, ``id`` and ``last_seq`` columns.
    kv_models: ClassVar[tuple[tuple[Table, str], ...]] = ()
    _bindings: ClassVar[dict[str, _Binding]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        bindings: dict[str, _Binding] = {}
        for attr in vars(cls).values():
            binding = getattr(attr, "__pantheon_binding__", None)
            if binding is not None:
                bindings[binding.event_type.event_type] = binding
        cls._bindings = bindings

    def kv_tables(self) -> tuple[tuple[Table, str], ...]:
        return self.kv_models

    def handled_types(self) -> frozenset[str]:
        return frozenset(self._bindings)

    def loads(self, event: EventRecord) -> Iterable[tuple[Table, Key]]:
        binding = self._bindings.get(event.type)
        if binding is None or binding.load is None:
            return ()
        return binding.load(event)

    def apply(self, uow: Batch, event: EventRecord) -> None:
        binding = self._bindings.get(event.type)
        if binding is not None:
            binding.fn(self, uow, event)

    def route(self, event_type: str) -> tuple[Loader | None, BoundHandler | None, Loader | None]:
        """This model's loader, handler (bound) and creator of ``event_type`` (the
        projector's hot path: it looks them up once per type, not once per event and model)."""
        binding = self._bindings.get(event_type)
        if binding is None:
            return None, None, None
        return binding.load, binding.fn.__get__(self), binding.creates
