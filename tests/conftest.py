"""Fixtures: one real nats-server per test session (random ports, temporary
store), a fresh namespace (subject root, stream, buckets) per test.

Nothing here mocks NATS or SQLite.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest
from nats.aio.client import Client as NATS

from pantheon_es import logs
from pantheon_es.client import PantheonClient
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.service import CommandService, ServiceConfig
from pantheon_es.store import EventStore, StoreConfig
from pantheon_es.subjects import Subjects
from projections.projector import Projector
from projections.query import QueryService

T = TypeVar("T")


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    with server:
        yield server


@pytest.fixture
def subjects() -> Subjects:
    """A namespace of its own for each test: t<hex>.ev.>, T<HEX>_EVENTS, ..."""
    return Subjects(root=f"t{secrets.token_hex(4)}")


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[NATS]:
    conn = await nats.connect(
        nats_server.url, max_reconnect_attempts=2, pending_size=64 * 1024 * 1024
    )
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def store(nc: NATS, subjects: Subjects) -> EventStore:
    es = EventStore(nc, subjects, StoreConfig())
    await es.provision()
    return es


async def eventually(
    check: Callable[[], Awaitable[T]], *, timeout: float = 10.0, interval: float = 0.02
) -> T:
    """Await ``check()`` until it returns a truthy value or raises no AssertionError."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            result = await check()
            if result:
                return result
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(interval)


def pythonpath_env(extra: dict[str, str] | None = None) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(extra or {})
    env.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    return env


@dataclass
class Stack:
    """Command service + projector + query service on one namespace, in-process."""

    nc: NATS
    store: EventStore
    service: CommandService
    projector: Projector
    query: QueryService
    client: PantheonClient
    db_path: Path


async def start_stack(
    nc: NATS, store: EventStore, db_path: Path, service_config: ServiceConfig | None = None
) -> tuple[Stack, asyncio.Task[None]]:
    service = CommandService(nc, store, service_config or ServiceConfig())
    await service.start()
    projector = Projector(store, db_path, batch_size=200)
    await projector.open()
    run = asyncio.create_task(projector.run())
    query = QueryService(nc, store, projector)
    await query.start()
    client = PantheonClient(nc, subjects=store.subjects, timeout=10)
    return Stack(nc, store, service, projector, query, client, db_path), run


async def stop_stack(stack: Stack, run: asyncio.Task[None]) -> None:
    await stack.service.shutdown()
    await stack.query.shutdown()
    await stack.projector.shutdown()
    await asyncio.wait_for(run, 10)


@pytest.fixture
async def stack(nc: NATS, store: EventStore, tmp_path: Path) -> AsyncIterator[Stack]:
    s, run = await start_stack(nc, store, tmp_path / "projections.db")
    try:
        yield s
    finally:
        await stop_stack(s, run)


logs.configure("info", json=False)
