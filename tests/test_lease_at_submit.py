"""A new task's lease appended right behind its submission (docs/decisions.md, "A new
task's lease in its submission's wake"): the store's ``append_after``, the service's
path with a placer, and the node's scheduler placing an idle system's task at once."""

from __future__ import annotations

from typing import Any

import pytest

from pantheon_es import ids
from pantheon_es.errors import ConcurrencyError, ConflictError
from pantheon_es.events import Event
from pantheon_es.specs import PythonSpec, Resources, ShellSpec
from pantheon_es.store import EventStore
from pantheon_es.tasks import TASK, GrantLease, TaskState, TaskSubmitted
from tests.conftest import Cluster, Stack, eventually, history, python
from tools.bench import as_event, cancelled, submitted

SHELL = {"kind": "shell", "argv": ["echo", "hi"]}


async def test_append_after_lands_right_behind_the_named_message(store: EventStore) -> None:
    first = submitted()
    stored = await store.append([first], expected_seq=0)

    result = await store.append_after(cancelled(first.aggregate_id), first.event_id)

    assert result.first_seq == result.last_seq == stored.last_seq + 1
    assert [h.seq for h in await store.read_aggregate("default", "task", first.aggregate_id)] == [
        stored.last_seq,
        stored.last_seq + 1,
    ]


async def test_append_after_a_message_that_is_no_longer_last_appends_nothing(
    store: EventStore,
) -> None:
    first = submitted()
    await store.append([first], expected_seq=0)
    await store.append([submitted()], expected_seq=0)  # something else came after
    before = await store.last_seq()

    with pytest.raises(ConcurrencyError):
        await store.append_after(cancelled(first.aggregate_id), first.event_id)

    assert await store.last_seq() == before


class _Deposed:
    """Leadership as a deposed scheduler's node sees it: its epoch is not current."""

    current_epoch = 2

    def is_current(self, epoch: int | None) -> bool:
        return False


class _Placer:
    """Answers the service like the node's scheduler would, and records what it hears."""

    def __init__(self, worker_id: str = "w1", epoch: int | None = None) -> None:
        self.worker_id = worker_id
        self.epoch = epoch
        self.asked: list[tuple[str, TaskState]] = []
        self.told: list[tuple[tuple[str, str], int | None, dict[str, Any] | None]] = []

    def idle(self) -> bool:
        return True

    def place_new(self, tenant: str, state: Any, submitted: Event[Any]) -> GrantLease | None:
        self.asked.append((tenant, state))
        return GrantLease(
            actor="scheduler",
            task_id=state.task_id,
            lease_id=ids.new_id(),
            worker_id=self.worker_id,
            ttl=30.0,
            epoch=self.epoch,
        )

    def placed_new(
        self, key: tuple[str, str], submitted_seq: int | None, result: dict[str, Any] | None
    ) -> None:
        self.told.append((key, submitted_seq, result))


async def test_service_appends_the_placers_lease_behind_the_submission(stack: Stack) -> None:
    placer = _Placer()
    stack.service.placer = placer

    reply = await stack.client.submit_task("n", SHELL)

    task_id = reply["task_id"]
    await eventually(lambda: _told(placer), timeout=5)
    events = await stack.store.read_aggregate("default", "task", task_id)
    assert [h.event.type for h in events] == ["TaskSubmitted", "LeaseGranted"]
    assert events[1].seq == events[0].seq + 1 == reply["seq"] + 1
    assert events[1].event.data.worker_id == "w1"
    ((key, submitted_seq, result),) = placer.told
    assert key == ("default", task_id) and submitted_seq == reply["seq"]
    assert result is not None
    assert result["seq"] == events[1].seq and result["fencing_token"] == 1
    assert placer.asked[0][1].status == "pending"


async def test_a_lease_refused_at_submission_leaves_the_task_submitted_and_pending(
    stack: Stack,
) -> None:
    # A lease from a scheduler epoch that is not the current leader's is refused by the
    # service: the submission is appended alone and the placer hears "no lease".
    stack.service.leadership = _Deposed()
    placer = _Placer(epoch=1)
    stack.service.placer = placer

    reply = await stack.client.submit_task("n", SHELL)

    events = await stack.store.read_aggregate("default", "task", reply["task_id"])
    assert [h.event.type for h in events] == ["TaskSubmitted"]
    assert placer.told == [(("default", reply["task_id"]), reply["seq"], None)]
    assert (await stack.client.get_task(reply["task_id"]))["status"] == "pending"


async def test_a_chosen_id_that_exists_tells_the_placer_nothing_was_stored(stack: Stack) -> None:
    task_id = ids.new_id()
    await stack.client.submit_task("n", SHELL, task_id=task_id)
    placer = _Placer()
    stack.service.placer = placer
    before = await stack.store.last_seq()

    with pytest.raises(ConflictError):
        await stack.client.submit_task("n", SHELL, task_id=task_id)

    assert (("default", task_id), None, None) in placer.told
    assert await stack.store.last_seq() == before


def _submission(task_id: str, name: str, executor: Any) -> Event[Any]:
    data = TaskSubmitted(name=name, executor=executor, priority=0, resources=Resources(), labels={})
    return as_event(data, task_id, "default")


async def _told(placer: _Placer) -> bool:
    return bool(placer.told)


async def test_an_idle_nodes_scheduler_leases_a_new_task_within_its_submission(
    cluster: Cluster,
) -> None:
    await cluster.add_worker(worker_id="w1")
    scheduler = cluster.node.scheduler
    heard: list[tuple[Any, ...]] = []
    placed_new = scheduler.placed_new

    def spy(key: Any, submitted_seq: Any, result: Any) -> None:
        heard.append((key, submitted_seq, result))
        placed_new(key, submitted_seq, result)

    scheduler.placed_new = spy
    submitted = await cluster.client.submit_task("add", python("add", a=2, b=3))
    task_id = submitted["task_id"]

    done = await cluster.client.wait_for_task(task_id, timeout=20)

    assert done["status"] == "completed" and done["result"] == 5
    events = await history(cluster, task_id)
    assert [e.type for e in events] == ["TaskSubmitted", "LeaseGranted", "TaskCompleted"]
    ((key, submitted_seq, result),) = heard
    assert key == ("default", task_id) and submitted_seq == submitted["seq"]
    assert result is not None and result["seq"] == submitted["seq"] + 1


async def test_a_task_behind_waiting_ones_is_not_placed_at_its_submission(
    cluster: Cluster,
) -> None:
    await cluster.add_worker(worker_id="w1", slots=1)
    scheduler = cluster.node.scheduler
    heard: list[Any] = []
    placed_new = scheduler.placed_new

    def spy(key: Any, submitted_seq: Any, result: Any) -> None:
        heard.append(key[1])
        placed_new(key, submitted_seq, result)

    scheduler.placed_new = spy
    ids_ = [
        (await cluster.client.submit_task(f"s{i}", python("sleep", seconds=0.3)))["task_id"]
        for i in range(3)
    ]

    done = [await cluster.client.wait_for_task(t, timeout=20) for t in ids_]

    # The first found the worker free; the second found it busy and the third found the
    # second waiting: both waited their turn through the feed, first come first served.
    assert heard == [ids_[0]]
    assert all(d["status"] == "completed" for d in done)
    starts = [d["started_at"] for d in done]
    assert starts == sorted(starts)
    for task_id in ids_:
        types = [e.type for e in await history(cluster, task_id)]
        assert types.count("LeaseGranted") == 1


async def test_a_submission_another_service_stored_first_replaces_the_reserved_task(
    cluster: Cluster,
) -> None:
    await cluster.add_worker(worker_id="w1")
    scheduler = cluster.node.scheduler
    assert cluster.node.store is not None

    async def placeable() -> bool:
        return scheduler.ready and scheduler.active and bool(scheduler.workers)

    await eventually(placeable, timeout=10)
    task_id = ids.new_id()
    ours = _submission(task_id, "ours", PythonSpec.model_validate(python("add", a=1, b=1)))
    theirs = _submission(task_id, "theirs", ShellSpec(argv=["true"]))
    key = ("default", ours.aggregate_id)
    assert scheduler.place_new("default", TASK.fold([ours], None), ours) is not None

    # Another service stored a submission of the same (client-chosen) id first: ours
    # will be refused, and the scheduler must hold the stored task, not the one it
    # reserved for.
    await cluster.node.store.append([theirs], expected_seq=0)

    async def dropped() -> bool:  # the reservation, when the feed showed the stored one
        return key not in scheduler._placed_new

    await eventually(dropped, timeout=10)
    scheduler.placed_new(key, None, None)  # our submission's append failed

    done = await cluster.client.wait_for_task(task_id, timeout=20)
    # It ran as stored (a shell command), not as reserved (a python function adding 1 + 1).
    assert (done["name"], done["status"]) == ("theirs", "completed")
    assert done["result"] != 2 and done["result"]["exit_code"] == 0
    types = [e.type for e in await history(cluster, task_id)]
    assert types == ["TaskSubmitted", "LeaseGranted", "TaskCompleted"]
