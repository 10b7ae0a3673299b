"""A tenant's user does its everyday work under NATS permissions that name only its
tenant's subjects: a real nats-server loads examples/nats-tenant-users.conf as shipped,
a node (`pantheon up`) and a worker of tenant acme run as ``admin``, and ``acme`` runs
the client commands (submit, spawn, status, list, monitor, why, workers, send, inbox
--wait, cancel), ``audit`` and ``watch`` for tenant acme with the admin's results. For
tenant globex the server refuses it each of them: a typed ``forbidden`` error at once
(exit 1), and nothing appended."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest

from pantheon_es import connection
from pantheon_es.client import PantheonClient
from pantheon_es.errors import ForbiddenError
from pantheon_es.store import EventStore
from pantheon_es.subjects import Subjects
from pantheon_es.watch import StateWatch
from tests.conftest import eventually
from tests.test_cli import ROOT, pantheon_argv
from tests.test_tenant_permissions import PASSWORDS, start_secured
from tools.audit import Auditor

pytestmark = pytest.mark.slow  # a server, a node and a worker in processes of their own


@dataclass
class Deployment:
    """The server of the example config with a node and a worker of tenant acme."""

    host: str  # host:port
    base: Path
    globex_task: str  # a task of globex, left pending (no worker serves globex)

    def url(self, user: str) -> str:
        return f"nats://{user}:{PASSWORDS[user]}@{self.host}"

    async def admin(self, tenant: str) -> PantheonClient:
        return await PantheonClient.connect(self.url("admin"), tenant=tenant, timeout=15)

    async def acme(self, tenant: str) -> PantheonClient:
        """A client of user acme, with its inbox prefix, acting for ``tenant``."""
        return await PantheonClient.connect(
            self.url("acme"), tenant=tenant, inbox_prefix="_INBOX_acme", timeout=10
        )


def _env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANTHEON_")}
    env.setdefault("PYTHONPATH", str(ROOT))
    return {**env, "PANTHEON_NATS_URL": url, **extra}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    base = tmp_path_factory.mktemp("tenant-users")
    server = start_secured(base / "nats")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        host = server.url.removeprefix("nats://")
        admin_url = f"nats://admin:{PASSWORDS['admin']}@{host}"
        node = base / "node"
        node.mkdir()

        def start(name: str, *args: str) -> None:
            with open(base / f"{name}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [*pantheon_argv(), *args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                    env=_env(admin_url),
                ))  # fmt: skip

        start("up", "up", "--data-dir", str(node), "--workers", "0", "--lease-ttl", "5")
        deadline = time.monotonic() + 60
        while not (node / "pantheon.json").exists():
            assert procs[0].poll() is None and time.monotonic() < deadline, (
                base / "up.log"
            ).read_text()
            time.sleep(0.05)
        start(
            "worker", "worker", "--tenant", "acme", "--worker-id", "acme-w1", "--data-dir",
            str(base / "worker"), "--ttl", "5", "--shutdown-timeout", "2", "--slots", "4",
        )  # fmt: skip
        globex_task = asyncio.run(_seed(Deployment(host, base, "")))
        yield Deployment(host, base, globex_task)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        server.stop()


async def _seed(dep: Deployment) -> str:
    """As admin: globex's pending task with a message; acme's worker registered."""
    acme, globex = await dep.admin("acme"), await dep.admin("globex")
    try:

        async def registered() -> bool:
            return int((await acme.list_workers(status=["active"]))["total"]) == 1

        await eventually(registered, timeout=60, interval=0.2)
        task = (await globex.submit_task("secret", {"kind": "shell", "argv": ["true"]}))["task_id"]
        await globex.send_message(task, "for globex only", sender="someone")
        return str(task)
    finally:
        await acme.close()
        await globex.close()


def pantheon(
    dep: Deployment, user: str, command: str, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``pantheon COMMAND ARGS`` as ``user`` (acme with its inbox prefix); ``command`` may
    be two words (``workflow list``)."""
    extra = {"PANTHEON_INBOX_PREFIX": "_INBOX_acme"} if user == "acme" else {}
    return subprocess.run(
        [*pantheon_argv(), *command.split(), "--data-dir", str(dep.base / "nowhere"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env=_env(dep.url(user), **extra),
    )  # fmt: skip


def ok(result: subprocess.CompletedProcess[str]) -> Any:
    """The JSON a successful command printed."""
    assert result.returncode == 0, (result.args, result.stderr)
    return json.loads(result.stdout) if result.stdout.strip() else None


def refused(result: subprocess.CompletedProcess[str]) -> None:
    """Exit 1 with a typed ``forbidden`` error saying the permissions stopped it."""
    assert result.returncode == 1, (result.args, result.stdout, result.stderr)
    text = " ".join(result.stderr.split())
    assert "error forbidden: NATS permissions do not let this user" in text, (result.args, text)
    assert "Traceback" not in result.stderr and PASSWORDS["acme"] not in result.stderr


def timeless(value: Any) -> Any:
    """``value`` without ``idle_s`` (seconds since the last activity: it grows)."""
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items() if k != "idle_s"}
    if isinstance(value, list):
        return [timeless(v) for v in value]
    return value


async def in_threads(*calls: Callable[[], Any]) -> list[Any]:
    return list(await asyncio.gather(*(asyncio.to_thread(c) for c in calls)))


async def globex_last_seq(dep: Deployment) -> int:
    """The last sequence of globex's events (acme's worker goes on appending renewals)."""
    nc = await connection.connect(dep.url("admin"))
    try:
        return int(await EventStore(nc, Subjects()).subject_last_seq("pantheon.ev.globex.>"))
    finally:
        await nc.close()


async def test_a_tenant_user_runs_its_everyday_commands_for_its_tenant(
    deployment: Deployment,
) -> None:
    dep = deployment

    def acme(command: str, *args: str) -> subprocess.CompletedProcess[str]:
        return pantheon(dep, "acme", command, "--tenant", "acme", *args)

    # submit --wait listens to the task's notices; spawn; a task that keeps running
    done, agent, sleeper = await in_threads(
        lambda: acme("submit", "hello", "--wait", "--json", "--", "echo", "hi"),
        lambda: acme("spawn", '/result {"ok": true}', "--name", "helper", "--json"),
        lambda: acme("submit", "sleeper", "--json", "--", "sleep", "60"),
    )
    finished = ok(done)
    assert (finished["status"], finished["tenant"]) == ("completed", "acme")
    agent_id, sleeper_id = ok(agent)["id"], ok(sleeper)["id"]

    def status_of(task_id: str) -> Callable[[], Awaitable[str]]:
        async def status() -> str:
            return str(ok(await asyncio.to_thread(acme, "status", task_id, "--json"))["status"])

        return status

    async def sleeper_running() -> bool:
        return await status_of(sleeper_id)() == "running"

    async def agent_done() -> bool:
        return await status_of(agent_id)() == "completed"

    await eventually(sleeper_running, timeout=60, interval=0.3)
    await eventually(agent_done, timeout=60, interval=0.3)

    # inbox --wait is woken by the mailbox's notice when the message comes
    waiting = asyncio.create_task(
        asyncio.to_thread(acme, "inbox", sleeper_id, "--wait", "--timeout", "60", "--json")
    )
    await asyncio.sleep(1.5)  # let it start waiting (it would find the message anyway)
    sent = ok(await asyncio.to_thread(acme, "send", sleeper_id, "hello sleeper", "--json"))
    (message,) = ok(await waiting)
    assert (message["message_id"], message["body"]) == (sent["message_id"], "hello sleeper")

    status, listed, monitor, why, workers = await in_threads(
        lambda: acme("status", finished["id"], "--json"),
        lambda: acme("list", "--json", "--limit", "100"),
        lambda: acme("monitor", "--json"),
        lambda: acme("why", sleeper_id, "--json"),
        lambda: acme("workers", "--json"),
    )
    assert ok(status)["result"] == finished["result"]
    ids = {t["id"] for t in ok(listed)["items"]}
    assert {finished["id"], agent_id, sleeper_id} <= ids and dep.globex_task not in ids
    assert agent_id in {a["agent_id"] for a in ok(monitor)["agents"]}
    assert ok(why)["status"] == "running" and ok(why)["scheduler"]["live"] is True
    assert [w["id"] for w in ok(workers)["items"]] == ["acme-w1"]

    cancelled = ok(await asyncio.to_thread(acme, "cancel", sleeper_id, "--json"))
    assert cancelled["status"] == "cancelled"

    # The admin reads the same (but for the seconds since the last activity, which grow).
    admin_status, admin_list, acme_list = await in_threads(
        lambda: pantheon(dep, "admin", "status", finished["id"], "--tenant", "acme", "--json"),
        lambda: pantheon(
            dep, "admin", "list", "--tenant", "acme", "--status", "completed", "--json"
        ),
        lambda: acme("list", "--status", "completed", "--json"),
    )
    assert timeless(ok(admin_status)) == timeless(ok(status))
    assert timeless(ok(admin_list)) == timeless(ok(acme_list))


async def test_the_server_refuses_a_tenant_user_another_tenants_commands_at_once(
    deployment: Deployment,
) -> None:
    dep = deployment
    task = dep.globex_task
    before = await globex_last_seq(dep)
    cases: dict[str, tuple[str, ...]] = {
        "submit": ("submit", "x", "--", "true"),
        "submit --wait": ("submit", "x", "--wait", "--", "true"),
        "spawn": ("spawn", "/result {}"),
        "status": ("status", task),
        "list": ("list",),
        "monitor": ("monitor",),
        "why": ("why", task),
        "workers": ("workers",),
        "send": ("send", task, "hi"),
        "inbox": ("inbox", task, "--wait", "--timeout", "30"),
        "cancel": ("cancel", task),
        "workflow list": ("workflow list",),
        "audit": ("audit", task),
        "watch": ("watch", "--once", "--json"),
    }
    started = time.monotonic()
    results = await in_threads(*(
        (lambda args=args: pantheon(dep, "acme", *args[:1], "--tenant", "globex", *args[1:]))
        for args in cases.values()
    ))  # fmt: skip
    took = time.monotonic() - started
    for result in results:
        refused(result)
    assert took < 45  # the library checks below time each refusal (at once, not after 10 s)
    assert await globex_last_seq(dep) == before  # nothing appended

    # The library says the same, each at once (the client's timeout is 10 s).
    client = await dep.acme("globex")
    try:
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "submit": lambda: client.submit_task("x", {"kind": "shell", "argv": ["true"]}),
            "spawn": lambda: client.spawn_agent("/result {}"),
            "get": lambda: client.get_task(task),
            "list": lambda: client.list_tasks(),
            "monitor": lambda: client.monitor(),
            "why": lambda: client.why(task),
            "send": lambda: client.send_message(task, "hi"),
            "inbox": lambda: client.receive_messages(task, wait=30),
            "cancel": lambda: client.cancel_task(task),
            "wait": lambda: client.wait_for_task(task, timeout=30),
            "audit": lambda: Auditor(client).audit(task),
        }
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(ForbiddenError, match="NATS permissions do not let this user"):
                await call()
            assert time.monotonic() - started < 2, name
        started = time.monotonic()
        with pytest.raises(ForbiddenError, match=r"\$KV\.pantheon-state\.globex\.>"):
            await StateWatch(client.nc, tenant="globex").start()
        # a wait's notices refused on their own (the query allowed) is forbidden too
        acme = PantheonClient(client.nc, tenant="acme", timeout=10)
        with pytest.raises(ForbiddenError, match=r"notices on pantheon\.changed\.globex"):
            await acme._wait_on_notices(
                ["pantheon.changed.globex.task.*"],
                lambda: acme.list_tasks(limit=1),
                lambda _state: False,
                "globex's tasks",
                30,
            )
        assert time.monotonic() - started < 4
    finally:
        await client.close()
    assert await globex_last_seq(dep) == before
    admin = await dep.admin("globex")
    try:
        state = await admin.get_task(task)
        assert state["status"] == "pending" and state["pending_messages"] == 1
    finally:
        await admin.close()


async def test_audit_and_watch_as_a_tenant_user_equal_the_admins(deployment: Deployment) -> None:
    dep = deployment
    client = await dep.acme("acme")
    try:
        done = await client.submit_task("audited", {"kind": "shell", "argv": ["sleep", "60"]})
        task = done["task_id"]
        await client.send_message(task, "before its end", sender="me")
        await client.wait_for_task(task, timeout=60, statuses=frozenset({"running"}))
        await client.cancel_task(task, "audited")
        await client.wait_for_task(task, timeout=60)
        agent = (await client.spawn_agent('/result {"a": 1}', name="audited-agent"))["agent_id"]
        await client.wait_for_task(agent, timeout=60)

        # watch, live, as acme: the current values, then a change
        async with StateWatch(client.nc, tenant="acme", model="task") as watch:
            initial = {c.key for c in await watch.initial()}
            assert {f"acme.task.{task}", f"acme.task.{agent}"} <= initial
            new = (await client.submit_task("watched", {"kind": "shell", "argv": ["true"]}))[
                "task_id"
            ]
            while True:
                change = await asyncio.wait_for(watch.next(), 30)
                if change is not None and change.id == new:
                    break
            assert change.op == "put" and not change.initial and change.tenant == "acme"
        await client.wait_for_task(new, timeout=60)
    finally:
        await client.close()

    # The CLI: acme's output equals the admin's, byte for byte.
    async def settled() -> bool:  # the state bucket has caught up with the last task
        shown = await asyncio.to_thread(
            pantheon, dep, "admin", "watch", "task", "--once", "--json", "--tenant", "acme"
        )
        return any(json.loads(x)["id"] == new and json.loads(x)["value"]["status"] == "completed"
                   for x in shown.stdout.splitlines())  # fmt: skip

    await eventually(settled, timeout=30, interval=0.5)
    commands = [
        ("audit", task, "--json"),
        ("audit", task, "--format", "csv"),
        ("audit", agent, "--json"),
        ("audit", "acme-w1", "--json"),
        ("watch", "task", "--once", "--json"),
    ]
    results = await in_threads(*(
        (lambda user=user, args=args: pantheon(dep, user, *args[:1], "--tenant", "acme", *args[1:]))
        for args in commands for user in ("admin", "acme")
    ))  # fmt: skip
    for i, args in enumerate(commands):
        admin, acme = results[2 * i], results[2 * i + 1]
        assert admin.returncode == 0 and acme.returncode == 0, (args, admin.stderr, acme.stderr)
        if args[1] == "acme-w1":  # it goes on renewing its registration: those may differ
            assert _without_renewals(acme.stdout) == _without_renewals(admin.stdout)
        else:
            assert acme.stdout == admin.stdout, args
    worker = json.loads(results[6].stdout)
    assert worker["scanned"] == [
        f"pantheon.ev.acme.task.* from seq {worker['events'][0]['seq']} (leases granted to acme-w1)"
    ]
    assert {task, agent} <= {t["aggregate_id"] for t in worker["tasks"]}
    watched = [json.loads(line) for line in results[8].stdout.splitlines()]
    assert {d["id"] for d in watched} >= {task, agent, new}
    assert all(d["key"].startswith("acme.task.") for d in watched)


def _without_renewals(audit_json: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(audit_json)
    doc["events"] = [e for e in doc["events"] if e["type"] != "WorkerRenewed"]
    return doc


async def test_a_watch_on_a_plain_nats_py_client_gives_the_same_current_values(
    deployment: Deployment,
) -> None:
    dep = deployment
    plain = await nats.connect(dep.url("admin"))
    ours = await connection.connect(dep.url("admin"))
    try:
        seen = []
        for nc in (plain, ours):
            async with StateWatch(nc, tenant="acme") as watch:
                # the worker's key changes with its heartbeats: only tasks' revisions stay
                seen.append({c.key: c.revision if c.model == "task" else 0
                             for c in await watch.initial()})  # fmt: skip
        assert seen[0] == seen[1] and "acme.worker.acme-w1" in seen[0]
        async with StateWatch(plain, tenant="nobody") as empty:
            assert await empty.initial() == [] and await empty.next(timeout=0.2) is None
    finally:
        with contextlib.suppress(Exception):
            await plain.close()
        await ours.close()
