"""One active scheduler: the leadership lease, deposed leaders refused, failover under load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS

from pantheon_es.client import PantheonClient
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.errors import ForbiddenError
from pantheon_es.events import decode_record
from pantheon_es.leader import KEY, Leadership
from pantheon_es.service import CommandService
from pantheon_es.store import EventStore
from pantheon_es.subjects import Subjects
from pantheon_es.tasks import GrantLease, SubmitTask
from tests.conftest import eventually, pythonpath_env
from tests.test_agents import ROOT, UpProcess, _active_workers


async def _leading(*parts: Leadership) -> Leadership:
    async def check() -> Leadership | None:
        leaders = [p for p in parts if p.is_leader]
        assert len(leaders) <= 1, "two leaders at once"
        return leaders[0] if leaders else None

    return await eventually(check, timeout=15)


async def test_one_leader_at_a_time_and_a_standby_takes_over_when_it_resigns(
    nc: NATS, subjects: Subjects
) -> None:
    a = Leadership(nc.jetstream(), subjects, ttl=1.5, node_id="a")
    b = Leadership(nc.jetstream(), subjects, ttl=1.5, node_id="b")
    await a.start()
    await b.start()
    runs = [asyncio.create_task(a.run())]
    try:
        first = await _leading(a, b)
        assert first is a
        runs.append(asyncio.create_task(b.run()))
        await asyncio.sleep(1.0)
        assert not b.is_leader and b.leader == "a" and b.current_epoch == a.epoch
        epoch_a = a.epoch
        assert epoch_a is not None
        await a.shutdown()  # resigns: deletes the key
        second = await _leading(a, b)
        assert second is b and b.epoch is not None and b.epoch > epoch_a
    finally:
        for part in (a, b):
            await part.shutdown()
        for run in runs:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(run, 5)


async def test_a_deposed_leaders_decisions_are_refused_and_append_nothing(
    nc: NATS, subjects: Subjects, store: EventStore
) -> None:
    old = Leadership(nc.jetstream(), subjects, ttl=1.0, node_id="old")
    new = Leadership(nc.jetstream(), subjects, ttl=1.0, node_id="new")
    await old.start()
    await new.start()
    old_run = asyncio.create_task(old.run())
    await _leading(old)
    old_epoch = old.epoch
    old_run.cancel()  # it stalls: no more renewals, but it still believes it leads
    with contextlib.suppress(asyncio.CancelledError):
        await old_run
    old._valid_until = float("inf")  # as if its clock said the lease still held
    new_run = asyncio.create_task(new.run())
    try:
        await _leading(new)  # the key aged out; the standby won a newer epoch
        assert new.epoch is not None and old_epoch is not None and new.epoch > old_epoch

        service = CommandService(nc, store)
        await service.start()
        try:
            submitted = await service.execute(
                "default", SubmitTask(name="t", executor={"kind": "shell", "argv": ["true"]})
            )
            service.leadership = old  # the stalled node's view: it learns of the new epoch
            await eventually(lambda: _knows(old, new), timeout=5)
            before = await store.last_seq()
            grant = GrantLease(task_id=submitted["task_id"], lease_id="L1", worker_id="w", ttl=5)
            with pytest.raises(ForbiddenError) as refused:
                await service.execute("default", grant, epoch=old_epoch)
            assert refused.value.details["current_epoch"] == new.epoch
            assert await store.last_seq() == before
            service.leadership = new  # the current leader's decision goes through
            result = await service.execute("default", grant, epoch=new.epoch)
            assert result["fencing_token"] == 1
        finally:
            await service.shutdown()
    finally:
        await new.shutdown()
        await asyncio.wait_for(new_run, 5)


async def _knows(old: Leadership, new: Leadership) -> bool:
    # The deposed node's watcher saw the newer epoch (it is not running its campaign).
    if old._kv is None:
        return False
    entry = await old._kv.get(KEY)
    info = orjson.loads(entry.value or b"{}")
    old.current_epoch = max(old.current_epoch, int(info.get("epoch") or entry.revision or 0))
    return old.current_epoch == new.epoch


@pytest.mark.slow
async def test_leader_killed_under_load_standby_takes_over_nothing_lost_or_run_twice(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    root = f"l{secrets.token_hex(4)}"
    extra = ("--leader-ttl", "2")
    first = UpProcess(nats_server.url, root, tmp_path / "a", *extra)
    second = UpProcess(nats_server.url, root, tmp_path / "b", *extra)
    for up in (first, second):
        up.data_dir.mkdir()
        up.start()
    workers = [
        subprocess.Popen(  # noqa: ASYNC220 - real worker processes, started once
            [
                sys.executable,
                "-m",
                "pantheon_es.cli",
                "worker",
                "--nats-url",
                nats_server.url,
                "--namespace",
                root,
                "--data-dir",
                str(tmp_path),
                "--worker-id",
                f"fw{i}",
                "--ttl",
                "10",
                "--slots",
                "8",
            ],
            stdout=open(tmp_path / f"fw{i}.log", "wb"),  # noqa: SIM115, ASYNC230 - closed with it
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=pythonpath_env(),
        )
        for i in (1, 2)
    ]
    nc = await nats.connect(nats_server.url)
    client = PantheonClient(nc, subjects=Subjects(root), timeout=15, retry_for=30)
    try:
        await eventually(lambda: _active_workers(client, 2), timeout=30)
        leader_pid = await _leader_pid(nc, root)
        leader, standby = (first, second) if first.proc and first.proc.pid == leader_pid else (
            second, first)  # fmt: skip
        assert leader.proc is not None and leader.proc.pid == leader_pid
        spec = {"kind": "python", "target": "tests.task_targets:sleep", "kwargs": {"seconds": 0.2}}
        ids = [
            (await client.submit_task(f"t{i}", spec, resources={"cpu": 0.1}))["task_id"]
            for i in range(60)
        ]
        await eventually(lambda: _completed_at_least(client, 10), timeout=30)
        leader.kill9()  # under load: tasks pending, leased and running
        ids += [
            (await client.submit_task(f"u{i}", spec, resources={"cpu": 0.1}))["task_id"]
            for i in range(20)
        ]
        for task_id in ids:
            done = await client.wait_for_task(task_id, timeout=60)
            assert done["status"] == "completed", done
        assert await _leader_pid(nc, root) == (standby.proc.pid if standby.proc else None)
        await _check_log(nc, root, set(ids))
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(15)
            except subprocess.TimeoutExpired:
                w.kill()
        for up in (first, second):
            if up.proc and up.proc.poll() is None:
                up.proc.send_signal(signal.SIGINT)
                try:
                    up.proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.kill(up.proc.pid, signal.SIGKILL)
        await nc.close()


async def _leader_pid(nc: NATS, root: str) -> int | None:
    kv = await nc.jetstream().key_value(f"{root}-leader")

    async def read() -> int:
        entry = await kv.get(KEY)
        node = orjson.loads(entry.value or b"{}")["node"]
        return int(node.split("-")[-2])  # <host>-<pid>-<suffix>

    return await eventually(read, timeout=20)


async def _completed_at_least(client: PantheonClient, n: int) -> bool:
    return int((await client.list_tasks(status=["completed"], limit=1))["total"]) >= n


async def _check_log(nc: NATS, root: str, ids: set[str]) -> None:
    """From the log: one completion per task, never two live leases, two leaders' epochs."""
    store = EventStore(nc, Subjects(root))
    completions: dict[str, int] = {}
    live: dict[str, bool] = {}
    epochs: set[Any] = set()
    last = await store.last_seq()
    async with store.feed(from_seq=1) as feed:
        seen = 0
        while seen < last:
            for raw in await feed.next_batch(1000, timeout=10):
                seen = raw.seq
                r = decode_record(raw.data, raw.seq)
                if r.aggregate != "task":
                    continue
                t = r.aggregate_id
                if r.type == "LeaseGranted":
                    assert not live.get(t), f"second live lease on {t} at seq {r.seq}"
                    live[t] = True
                    epochs.add(r.data.get("epoch"))
                elif r.type in ("LeaseExpired", "LeaseReleased", "TaskCompleted", "TaskFailed"):
                    live[t] = False
                    if r.type == "TaskCompleted":
                        completions[t] = completions.get(t, 0) + 1
    assert {t: completions.get(t, 0) for t in ids} == dict.fromkeys(ids, 1)
    assert len(epochs - {None}) >= 2  # grants under the first leader and under the second
