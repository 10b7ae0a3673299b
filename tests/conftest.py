"""Fixtures: one real nats-server per test session (random ports, temporary
store), a fresh namespace (subject root, stream, buckets) per test.

Nothing here mocks NATS or SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from nats.aio.client import Client as NATS

from pantheon_es import connection, logs
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
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[connection.Connection]:
    conn = await connection.connect(
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


def python(target: str, **kwargs: Any) -> dict[str, Any]:
    """A ``python`` executor spec for a function of tests/task_targets.py."""
    return {"kind": "python", "target": f"tests.task_targets:{target}", "kwargs": kwargs}


async def history(cluster: Cluster, task_id: str, tenant: str = "default") -> list[Any]:
    """A task's events, from the log."""
    assert cluster.node.store is not None
    return [h.event for h in await cluster.node.store.read_aggregate(tenant, "task", task_id)]


async def last_seq(cluster: Cluster) -> int:
    """The stream's last sequence (to check that nothing was appended)."""
    assert cluster.node.store is not None
    return int(await cluster.node.store.last_seq())


def quota(**limits: Any) -> Any:
    """A scheduling ``Quota`` for ``@pytest.mark.policy(default_quota=...)``."""
    from pantheon_es.placement import Quota

    return Quota(**limits)


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
    nc: NATS,
    store: EventStore,
    db_path: Path,
    service_config: ServiceConfig | None = None,
    *,
    linger: float = 0.0,
) -> tuple[Stack, asyncio.Task[None]]:
    service = CommandService(nc, store, service_config or ServiceConfig())
    await service.start()
    projector = Projector(store, db_path, batch_size=200, linger=linger)
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


@dataclass
class Cluster:
    """An in-process node (scheduler included) on the session server, plus workers."""

    node: Any
    client: PantheonClient
    url: str
    root: str
    data_dir: Path
    workers: list[Any]
    procs: list[Any]

    async def add_worker(self, **overrides: Any) -> Any:
        from pantheon_es.worker import Worker, WorkerConfig

        config = WorkerConfig(
            nats_url=self.url,
            root=self.root,
            data_dir=self.data_dir,
            ttl=overrides.pop("ttl", 3.0),
            capacity=overrides.pop(
                "capacity", {"cpu": 4.0, "memory_mb": 4096, "gpu": 0, "custom": {}}
            ),
            **overrides,
        )
        worker = Worker(config)
        await worker.start()
        self.workers.append(worker)
        worker._runner = asyncio.create_task(worker.run())  # type: ignore[attr-defined]
        return worker

    def spawn_worker(self, worker_id: str, *extra: str) -> Any:
        """A real `pantheon worker` process."""
        import subprocess
        import sys

        log = open(self.data_dir / f"{worker_id}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pantheon_es.cli",
                "worker",
                "--nats-url",
                self.url,
                "--namespace",
                self.root,
                "--data-dir",
                str(self.data_dir),
                "--worker-id",
                worker_id,
                "--ttl",
                "2",
                "--shutdown-timeout",
                "2",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1],
            env=pythonpath_env(),
        )
        self.procs.append(proc)
        return proc


@pytest.fixture
async def cluster(
    nats_server: EmbeddedNats, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Cluster]:
    from pantheon_es.node import Node, NodeConfig
    from pantheon_es.placement import Policy
    from pantheon_es.scheduler import SchedulerConfig

    marker = request.node.get_closest_marker("policy")
    policy = Policy(**marker.kwargs) if marker else Policy()

    root = f"c{secrets.token_hex(4)}"
    node = Node(
        NodeConfig(
            data_dir=tmp_path / "node",
            nats_url=nats_server.url,
            root=root,
            workers=0,
            scheduler=SchedulerConfig(lease_ttl=2.0, inactivity_timeout=0, policy=policy),
        )
    )
    await node.start()
    runner = asyncio.create_task(node.run())
    assert node.nc is not None
    client = PantheonClient(node.nc, subjects=node.subjects, timeout=15)
    c = Cluster(node, client, nats_server.url, root, tmp_path, [], [])
    try:
        yield c
    finally:
        for proc in c.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        for worker in c.workers:
            worker.request_stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(worker._runner, 15)
        node.request_stop()
        await asyncio.wait_for(runner, 30)


class FailingReads:
    """A scheduler's event store whose ``read_aggregate`` of chosen aggregates fails
    (``unavailable``) a planned number of times (-1: always), then reads the real
    server. :meth:`install` puts it in front of a scheduler's command service."""

    def __init__(self, store: Any, fail: dict[tuple[str, str], int]) -> None:
        self._store = store
        self.fail = fail  # (aggregate, id) -> failures left
        self.reads: list[tuple[str, str, bool]] = []  # (aggregate, id, failed)

    @classmethod
    def install(cls, scheduler: Any, fail: dict[tuple[str, str], int]) -> FailingReads:
        shim = cls(scheduler.service.store, fail)
        scheduler.service = _WithStore(scheduler.service, shim)
        return shim

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def read_aggregate(
        self, tenant: str, aggregate: str, aggregate_id: str, **kwargs: Any
    ) -> Any:
        from pantheon_es.errors import UnavailableError

        left = self.fail.get((aggregate, aggregate_id), 0)
        self.reads.append((aggregate, aggregate_id, left != 0))
        if left != 0:
            self.fail[(aggregate, aggregate_id)] = left - 1 if left > 0 else left
            raise UnavailableError("injected: direct get on the stream timed out")
        return await self._store.read_aggregate(tenant, aggregate, aggregate_id, **kwargs)


class _WithStore:
    """A command service seen through another store (the scheduler's reads only)."""

    def __init__(self, service: Any, store: Any) -> None:
        self._service = service
        self.store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._service, name)
