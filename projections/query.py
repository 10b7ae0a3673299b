"""The query service: read models over NATS request/reply.

Subject ``<root>.q.<tenant>.<model>.<verb>`` (queue group ``pantheon-query``),
a JSON body validated by the query's model, a reply shaped like a command's.

Reads are consistent with writes: unless the body names ``min_seq``, a query
first waits (up to ``consistency_timeout``) until the projector has applied
the stream's last sequence as of the request, so a client that submitted a
task and then asks for it sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import ValidationError

from pantheon_es.endpoint import invalid, parse_body, respond, route
from pantheon_es.errors import UnavailableError
from pantheon_es.store import EventStore
from projections import messages, tasks, workers, workflows
from projections.base import Queries
from projections.projector import Projector, connect

log = structlog.get_logger(__name__)

QUEUE_GROUP = "pantheon-query"

#: (model, verb) -> (body model, function), from every read model module
QUERIES: Queries = {
    **tasks.QUERIES,
    **messages.QUERIES,
    **workers.QUERIES,
    **workflows.QUERIES,
}


@dataclass(frozen=True, slots=True)
class QueryConfig:
    max_request_bytes: int = 64 * 1024
    consistency_timeout: float = 5.0


class QueryService:
    """Serves the read models of one projector."""

    def __init__(
        self,
        nc: NATS,
        store: EventStore,
        projector: Projector,
        config: QueryConfig | None = None,
    ) -> None:
        self.nc = nc
        self.store = store
        self.projector = projector
        self.config = config or QueryConfig()
        self.subjects = store.subjects
        self.db: aiosqlite.Connection | None = None
        self._sub: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()

    @property
    def db_path(self) -> Path:
        return self.projector.db_path

    async def __aenter__(self) -> QueryService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    async def start(self) -> None:
        self.db = await connect(self.db_path)
        self._sub = await self.nc.subscribe(
            self.subjects.all_queries, queue=QUEUE_GROUP, cb=self._on_msg
        )

    async def run(self) -> None:
        await self._stopped.wait()

    async def shutdown(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        db, self.db = self.db, None  # a second caller meanwhile finds nothing to close
        if db is not None:
            await db.close()
        self._stopped.set()

    async def _on_msg(self, msg: Msg) -> None:
        task = asyncio.create_task(self._serve(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, msg: Msg) -> None:
        await respond(msg, self.execute_raw(msg.subject, msg.data))

    async def execute_raw(self, subject: str, data: bytes) -> dict[str, Any]:
        parsed = self.subjects.parse_query(subject)
        body = parse_body(data, self.config.max_request_bytes)
        model, fn = route(parsed, QUERIES, "query", subject)
        assert parsed is not None
        try:
            query = model.model_validate(body)
        except ValidationError as exc:
            raise invalid(model.__name__, exc) from None
        min_seq = getattr(query, "min_seq", None)
        if min_seq is None:
            min_seq = await self.store.last_seq()
        if not await self.projector.wait_for(min_seq, self.config.consistency_timeout):
            raise UnavailableError(
                f"read models are behind: applied {self.projector.position}, need {min_seq}",
                retry_after=1.0,
            )
        assert self.db is not None
        return await fn(self.db, parsed.tenant, query)
