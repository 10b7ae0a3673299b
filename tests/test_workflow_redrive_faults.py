"""A workflow redrive meets faults: its bring-back appends and its history read-backs
fail for a while (retried with a growing pause), fail for good (logged, left to the next
start, which finishes it), or meet a node archived since it ended.

The faults are injected into the scheduler's own view of the command service (a shim
around its ``execute`` and its store's ``read_aggregate``), in front of the real server
of the fixtures; the pauses between tries are shortened (``scheduler._RETRY_DELAYS``).
(A server stopped and started again during a bring-back was tried too: the command
service's own append retry and the feed's watchdog carry it, in about 20 s, without the
scheduler's retries; too slow to keep for what it shows.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from pantheon_es import scheduler as scheduler_module
from pantheon_es.client import PantheonClient
from pantheon_es.errors import ConcurrencyError, UnavailableError
from pantheon_es.node import Node
from pantheon_es.tasks import RedriveWorkflowTask
from pantheon_es.workflows import FAIL_FAST_REASON
from tests.conftest import Cluster, eventually, history, python
from tests.test_workflow_redrive import _ended_again, _failed_chain, _log, _workflow

#: Short pauses between tries (the real ones add up to about 19 s).
FAST = (0.05, 0.1, 0.2)


class FlakyStore:
    """The scheduler's event store: ``read_aggregate`` of a chosen aggregate fails
    (``unavailable``: the direct get erred) or answers a history one event short
    (``behind``: a replica that lags), as planned, then reads the real server."""

    def __init__(self, store: Any) -> None:
        self._store = store
        #: (aggregate, id) -> the faults of its next reads, in order
        self.plan: dict[tuple[str, str], list[str]] = {}
        #: (aggregate, id) -> the fault of every read from now on
        self.always: dict[tuple[str, str], str] = {}
        self.reads: list[tuple[str, str, str]] = []  # (aggregate, id, fault or "ok")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def read_aggregate(
        self, tenant: str, aggregate: str, aggregate_id: str, **kwargs: Any
    ) -> Any:
        key = (aggregate, aggregate_id)
        planned = self.plan.get(key)
        fault = self.always.get(key) or (planned.pop(0) if planned else None)
        self.reads.append((aggregate, aggregate_id, fault or "ok"))
        if fault == "unavailable":
            raise UnavailableError("injected: direct get on the stream timed out")
        found = await self._store.read_aggregate(tenant, aggregate, aggregate_id, **kwargs)
        return found[:-1] if fault == "behind" else found


class FlakyService:
    """The scheduler's command service: a node's bring-back (``RedriveWorkflowTask``)
    fails as planned: ``unavailable`` (no ack, nothing stored), ``conflict`` (a
    concurrent writer), ``lost_ack`` (stored on the real server, its reply lost);
    everything else goes through."""

    def __init__(self, service: Any) -> None:
        self._service = service
        self.store = FlakyStore(service.store)
        #: task id -> the faults of its next bring-backs, in order
        self.plan: dict[str, list[str]] = {}
        #: task ids whose every bring-back fails (``unavailable``)
        self.always: set[str] = set()
        self.calls: list[tuple[str, str]] = []  # (task id, fault or "ok")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._service, name)

    async def execute(self, tenant: str, command: Any, **kwargs: Any) -> dict[str, Any]:
        if not isinstance(command, RedriveWorkflowTask):
            return await self._service.execute(tenant, command, **kwargs)  # type: ignore[no-any-return]
        planned = self.plan.get(command.task_id)
        fault = "unavailable" if command.task_id in self.always else None
        fault = fault or (planned.pop(0) if planned else None)
        self.calls.append((command.task_id, fault or "ok"))
        if fault == "unavailable":
            raise UnavailableError("injected: the append was not acknowledged")
        if fault == "conflict":
            raise ConcurrencyError("injected: a concurrent writer")
        result = await self._service.execute(tenant, command, **kwargs)
        if fault == "lost_ack":
            raise UnavailableError("injected: appended, but the reply was lost")
        return result  # type: ignore[no-any-return]


class LogRecorder:
    """The scheduler's logger, recording every call on its way through."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.entries: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., Any]:
        real = getattr(self._inner, level)

        def record(event: str, *args: Any, **kw: Any) -> Any:
            self.entries.append((level, event, kw))
            return real(event, *args, **kw)

        return record

    def named(self, level: str, event: str) -> list[dict[str, Any]]:
        return [kw for lv, ev, kw in self.entries if lv == level and ev == event]


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> LogRecorder:
    """Short pauses between tries, and the scheduler's log recorded."""
    monkeypatch.setattr(scheduler_module, "_RETRY_DELAYS", FAST)
    recorder = LogRecorder(scheduler_module.log)
    monkeypatch.setattr(scheduler_module, "log", recorder)
    return recorder


@contextlib.contextmanager
def flaky(cluster: Cluster) -> Any:
    """The node's scheduler talks to a FlakyService until the block ends."""
    scheduler = cluster.node.scheduler
    original = scheduler.service
    shim = FlakyService(original)
    scheduler.service = shim
    try:
        yield shim
    finally:
        scheduler.service = original


async def _redrivens(cluster: Cluster, task_id: str) -> list[Any]:
    return [e for e in await history(cluster, task_id) if e.type == "TaskRedriven"]


async def _exactly_once_each(cluster: Cluster, tasks: dict[str, str], wf_id: str) -> None:
    """b and c brought back once each, a not at all; the workflow finished twice."""
    for name, task_id in tasks.items():
        assert len(await _redrivens(cluster, task_id)) == (0 if name == "a" else 1), name
    workflow_types = [r.type for r in await _log(cluster) if r.aggregate_id == wf_id]
    assert workflow_types == ["WorkflowCreated", "WorkflowStarted", "WorkflowFinished",
                              "WorkflowRedriven", "WorkflowFinished"]  # fmt: skip


def _arm(shim: FlakyService, kind: str, wf_id: str, tasks: dict[str, str], *, always: bool) -> None:
    """Plan the faults of one path of the redrive: every try fails (``always``), or the
    first few."""
    a, b, c = tasks["a"], tasks["b"], tasks["c"]
    if kind == "bring-back":
        if always:
            shim.always.add(c)  # b comes back; c never does
        else:
            # after the lost ack, b may be seen back before it is tried again
            shim.plan[b] = ["unavailable", "conflict", "lost_ack"]
            shim.plan[c] = ["conflict", "unavailable"]
    elif kind == "workflow read-back":
        key = ("workflow", wf_id)
        if always:
            shim.store.always[key] = "unavailable"
        else:
            shim.store.plan[key] = ["unavailable", "unavailable", "unavailable"]
    elif kind == "result read-back":  # a's TaskCompleted, whose result b is handed
        key = ("task", a)
        if always:
            shim.store.always[key] = "unavailable"
        else:
            shim.store.plan[key] = ["unavailable", "unavailable"]
    else:  # task read-back: b's TaskRedriven is stored, its history is not read back
        key = ("task", b)
        if always:
            shim.store.always[key] = "unavailable"
        else:
            # a history behind the feed for longer than one round of reads (50), then errs
            shim.store.plan[key] = ["behind"] * 60 + ["unavailable"]


PATHS = ["bring-back", "workflow read-back", "result read-back", "task read-back"]


@pytest.mark.parametrize("kind", PATHS)
async def test_a_redrive_whose_tries_fail_a_few_times_completes_once(
    cluster: Cluster, tmp_path: Path, logged: LogRecorder, kind: str
) -> None:
    await cluster.add_worker(worker_id="w1")
    created = await _failed_chain(cluster, tmp_path)
    wf_id, tasks = created["workflow_id"], created["tasks"]

    with flaky(cluster) as shim:
        _arm(shim, kind, wf_id, tasks, always=False)
        await cluster.client.redrive_workflow(wf_id, reason="fixed b")
        done = await _ended_again(cluster, wf_id, "completed")
        # every planned fault was met, and none was the last word
        assert not any(shim.plan.values()) and not any(shim.store.plan.values())

    assert {n["name"]: n["status"] for n in done["nodes"]} == dict.fromkeys("abc", "completed")
    assert {n["name"]: n["attempt"] for n in done["nodes"]} == {"a": 1, "b": 2, "c": 1}
    await _exactly_once_each(cluster, tasks, wf_id)
    retrying = {"bring-back": "workflow node not brought back yet; retrying"}.get(
        kind, "history not read back yet; retrying"
    )
    assert logged.named("warning", retrying)
    assert [e for e in logged.entries if e[0] == "error"] == []


@pytest.mark.parametrize("kind", PATHS)
async def test_a_redrive_whose_tries_keep_failing_is_logged_and_finished_by_the_next_start(
    cluster: Cluster, tmp_path: Path, logged: LogRecorder, kind: str
) -> None:
    await cluster.add_worker(worker_id="w1")
    created = await _failed_chain(cluster, tmp_path)
    wf_id, tasks = created["workflow_id"], created["tasks"]
    a, b, c = tasks["a"], tasks["b"], tasks["c"]

    with flaky(cluster) as shim:
        _arm(shim, kind, wf_id, tasks, always=True)
        reply = await cluster.client.redrive_workflow(wf_id, reason="fixed b")
        error, gave_up_on = {
            "bring-back": ("workflow node not brought back: left to the next start", c),
            "workflow read-back": ("history not read back: left to the next start", wf_id),
            "result read-back": ("history not read back: left to the next start", a),
            "task read-back": ("history not read back: left to the next start", b),
        }[kind]

        async def gave_up() -> list[dict[str, Any]]:
            return logged.named("error", error)

        (entry,) = await eventually(gave_up, timeout=15)
        assert gave_up_on in entry.values()
        if kind == "bring-back":  # b came back and ran again; c did not come back
            assert (await cluster.client.wait_for_task(b, timeout=30))["status"] == "completed"
            # tried once and after each pause, then given up
            assert [t for t, _ in shim.calls].count(c) == len(FAST) + 1
        elif kind == "workflow read-back":
            reads = [r for r in shim.store.reads if r[1] == wf_id]
            assert reads == [("workflow", wf_id, "unavailable")] * (len(FAST) + 1)

    # The workflow stays as the log says: running again, with what came back of it.
    expected = {
        "bring-back": {"a": "completed", "b": "completed", "c": "skipped"},
        "workflow read-back": {"a": "completed", "b": "failed", "c": "skipped"},
        "result read-back": {"a": "completed", "b": "failed", "c": "skipped"},
        # b is back in the log (pending), and c behind it, waiting for b
        "task read-back": {"a": "completed", "b": "pending", "c": "pending"},
    }[kind]

    async def settled() -> dict[str, Any]:
        wf = await _workflow(cluster, wf_id, reply["seq"])
        return wf if {n["name"]: n["status"] for n in wf["nodes"]} == expected else {}

    mid = await eventually(settled)
    assert mid["status"] == "running" and mid["redrives"] == 1
    assert mid["last_redrive"]["tasks"] == [b, c]
    back = {"bring-back": {b}, "task read-back": {b, c}}.get(kind, set())
    for task_id in (a, b, c):
        assert len(await _redrivens(cluster, task_id)) == (task_id in back)

    # The next start (a new node on the same data directory) finishes the redrive.
    async with _restarted(cluster):
        done = await _ended_again(cluster, wf_id, "completed")
        assert {n["name"]: n["attempt"] for n in done["nodes"]} == {"a": 1, "b": 2, "c": 1}
        await _exactly_once_each(cluster, tasks, wf_id)


@contextlib.asynccontextmanager
async def _restarted(cluster: Cluster) -> AsyncIterator[Node]:
    """Stop the cluster's node and start a new one on its data directory and namespace
    (``cluster.node`` and ``cluster.client`` are the new one's until the block ends;
    the fixture then stops the old one, already stopped)."""
    old, old_client = cluster.node, cluster.client
    old.request_stop()  # its runner (the fixture's) shuts it down; then it is no longer started

    async def stopped() -> bool:
        return not old._started

    await eventually(stopped, timeout=30)
    node = Node(old.config)
    await node.start()
    runner = asyncio.create_task(node.run())
    assert node.nc is not None
    cluster.node = node
    cluster.client = PantheonClient(node.nc, subjects=node.subjects, timeout=15)
    try:
        yield node
    finally:
        cluster.node, cluster.client = old, old_client
        node.request_stop()
        await asyncio.wait_for(runner, 30)


async def test_an_archived_node_of_a_fail_fast_workflow_fails_its_redrive_at_once(
    cluster: Cluster,
) -> None:
    """x fails, y (running) is cancelled by fail_fast, z (after x) skipped; x is archived.
    The redrive leaves x as it ended, which fails the redrive at once: y is brought back
    and cancelled again without running, z skipped again."""
    worker = await cluster.add_worker(worker_id="w1")
    created = await cluster.client.create_workflow(
        "ff",
        [
            {"name": "x", "executor": python("fail")},
            {"name": "y", "executor": python("sleep", seconds=30)},
            {"name": "z", "executor": python("noop"), "depends_on": ["x"]},
        ],
        failure_policy="fail_fast",
    )
    wf_id, tasks = created["workflow_id"], created["tasks"]
    x, y, z = tasks["x"], tasks["y"], tasks["z"]
    failed = await cluster.client.wait_for_workflow(wf_id, timeout=30)
    assert failed["status"] == "failed"
    assert {n["name"]: n["status"] for n in failed["nodes"]} == {
        "x": "failed", "y": "cancelled", "z": "skipped",
    }  # fmt: skip
    worker.request_stop()  # nothing may run after the redrive
    await asyncio.wait_for(worker._runner, 15)
    await cluster.client.archive_task(x, reason="cleanup")

    reply = await cluster.client.redrive_workflow(wf_id, reason="try again")
    assert reply["tasks"] == {"x": x, "y": y, "z": z}
    again = await _ended_again(cluster, wf_id, "failed")
    assert again["counts"] == {"failed": 1, "cancelled": 1, "skipped": 1}
    # (x's row is archived: the read model has no status of its own for it)
    statuses = {n["name"]: n["status"] for n in again["nodes"]}
    assert (statuses["y"], statuses["z"]) == ("cancelled", "skipped")

    assert await _redrivens(cluster, x) == []  # it stays as it ended
    assert [e.type for e in await history(cluster, x)][-1] == "TaskArchived"
    # y and z came back once and ended again without a lease (y may have been marked
    # blocked for want of a worker before x's outcome came back).
    y_events = await history(cluster, y)
    y_after = [e.type for e in y_events][[e.type for e in y_events].index("TaskRedriven") :]
    assert y_after[0] == "TaskRedriven" and y_after[-1] == "TaskCancelled"
    assert set(y_after[1:-1]) <= {"TaskBlocked"}
    assert y_events[-1].data.reason == FAIL_FAST_REASON
    z_types = [e.type for e in await history(cluster, z)]
    assert z_types == ["TaskSubmitted", "TaskSkipped", "TaskRedriven", "TaskSkipped"]
    workflow_types = [r.type for r in await _log(cluster) if r.aggregate_id == wf_id]
    assert workflow_types[-2:] == ["WorkflowRedriven", "WorkflowFinished"]


async def test_a_shutdown_cuts_a_retry_pause_short_and_logs_no_give_up(
    cluster: Cluster, tmp_path: Path, logged: LogRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node stopping while a bring-back waits to be tried again stops at once (it used
    to wait out the pause, up to the scheduler's 10 s for work in flight), and does not
    call it given up: the next start brings the node back."""
    monkeypatch.setattr(scheduler_module, "_RETRY_DELAYS", (30.0,))
    await cluster.add_worker(worker_id="w1")
    created = await _failed_chain(cluster, tmp_path)
    wf_id, tasks = created["workflow_id"], created["tasks"]
    node = cluster.node
    with flaky(cluster) as shim:
        shim.always.add(tasks["b"])
        await cluster.client.redrive_workflow(wf_id)

        async def pausing() -> list[dict[str, Any]]:
            return logged.named("warning", "workflow node not brought back yet; retrying")

        await eventually(pausing)
        loop = asyncio.get_running_loop()
        started = loop.time()
        node.request_stop()

        async def stopped() -> bool:
            return not node._started

        await eventually(stopped, timeout=30)
        assert loop.time() - started < 5
    assert [e for e in logged.entries if e[0] == "error"] == []
    assert [t for t, _ in shim.calls].count(tasks["b"]) == 1
