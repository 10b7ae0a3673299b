"""NATS permissions hold a user to one tenant's events: a real nats-server loads
examples/nats-tenant-users.conf as shipped (users ``admin`` and ``acme``), and ``acme``
runs ``replay``, ``events`` and ``verify`` for tenant acme as ``admin`` would, while the
server refuses it tenant globex's events and the whole log, which the tools then say
(``forbidden``, exit 1, no output file)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pantheon_es import connection
from pantheon_es.client import PantheonClient
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.errors import ForbiddenError
from pantheon_es.store import EventStore
from pantheon_es.subjects import Subjects
from projections.projector import default_models
from tests.conftest import python, start_stack, stop_stack
from tests.test_cli import ROOT, pantheon_argv
from tools.replay import replay
from tools.verify import read_tables

EXAMPLE = ROOT / "examples" / "nats-tenant-users.conf"
PASSWORDS = {"admin": "admin-secret", "acme": "acme-secret"}


def start_secured(store_dir: Path) -> EmbeddedNats:
    """A nats-server loading examples/nats-tenant-users.conf as shipped (admin and acme)."""
    with pytest.MonkeyPatch.context() as env:  # NATS reads the passwords from its env
        env.setenv("PANTHEON_ADMIN_PASSWORD", PASSWORDS["admin"])
        env.setenv("PANTHEON_ACME_PASSWORD", PASSWORDS["acme"])
        return EmbeddedNats(store_dir, config=EXAMPLE).start()


TABLES = [t for m in default_models() for t in m.tables]
TASKS_TENANT = next(t for t in TABLES if t.name == "tasks").columns.index("tenant")


@dataclass
class Secured:
    """The server of the example config, with a log of tenants acme and globex."""

    host: str  # host:port
    db: Path  # the read models of the log, as a node keeps them
    middle: str  # a time between the two halves of the log (ISO 8601)

    def url(self, user: str, password: str | None = None) -> str:
        return f"nats://{user}:{password or PASSWORDS[user]}@{self.host}"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    base = tmp_path_factory.mktemp("secured")
    server = start_secured(base / "nats")
    try:
        host = server.url.removeprefix("nats://")
        db = base / "projections.db"
        middle = asyncio.run(_seed(f"nats://admin:{PASSWORDS['admin']}@{host}", db))
        yield Secured(host, db, middle)
    finally:
        server.stop()


async def _seed(admin_url: str, db: Path) -> str:
    """As admin: 1,000 of acme's tasks with 6 KB of arguments each (enough events for
    the feed's flow control to ask for replies), globex's tasks and workflow, in two
    halves; the read models kept in ``db``. Returns a time between the halves."""
    nc = await connection.connect(admin_url)
    store = EventStore(nc, Subjects())
    await store.provision()
    stack, run = await start_stack(nc, store, db)
    try:
        acme = PantheonClient(nc, tenant="acme", timeout=15)
        globex = PantheonClient(nc, tenant="globex", timeout=15)
        blob = "x" * 6000
        middle = ""
        for half in range(2):
            for start in range(half * 500, half * 500 + 500, 100):
                await asyncio.gather(*(
                    acme.submit_task(f"bulk-{i}", python("add", a=i, b=1, blob=blob))
                    for i in range(start, start + 100)
                ))  # fmt: skip
            made = [(await globex.submit_task(f"g-{half}-{i}", python("noop")))["task_id"]
                    for i in range(5)]  # fmt: skip
            await globex.cancel_task(made[0])
            await globex.create_workflow(
                f"chain-{half}", [{"name": "x", "executor": python("noop")}]
            )
            if half == 0:  # stored (server's clock, this host's) after the first half's acks
                middle = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        await acme.cancel_task((await acme.submit_task("last", python("noop")))["task_id"])
        assert await stack.projector.wait_for(await store.last_seq(), timeout=30)
    finally:
        await stop_stack(stack, run)
        await nc.close()
    return middle


def pantheon(
    secured: Secured, user: str, command: str, *args: str, password: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``pantheon COMMAND ARGS`` as ``user``: credentials in PANTHEON_NATS_URL, and acme's
    inbox prefix (the one its permissions let it subscribe to)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANTHEON_")}
    env["PANTHEON_NATS_URL"] = secured.url(user, password)
    if user == "acme":
        env["PANTHEON_INBOX_PREFIX"] = "_INBOX_acme"
    return subprocess.run(
        [*pantheon_argv(), command, "--data-dir", str(secured.db.parent / "nowhere"), *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip


def refused(result: subprocess.CompletedProcess[str], what: str) -> None:
    """Exit 1 with a typed ``forbidden`` error naming what may not be read: no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    text = " ".join(result.stderr.split())
    assert "error forbidden: NATS permissions do not let this user read" in text, text
    assert f"read {what} of stream PANTHEON_EVENTS" in text, text
    assert "Traceback" not in result.stderr and PASSWORDS["acme"] not in result.stderr


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_a_tenant_user_replays_its_tenant_as_the_admin_does(
    secured: Secured, tmp_path: Path
) -> None:
    admin = await connection.connect(secured.url("admin"))
    flow_control: list[str] = []

    async def replied(msg: Any) -> None:
        flow_control.append(msg.subject)

    await admin.subscribe("$JS.FC.PANTHEON_EVENTS.>", cb=replied)
    await admin.flush()
    try:
        for until in ((), ("--until", secured.middle)):
            runs = {}
            for user in ("admin", "acme"):
                out = tmp_path / f"{user}{len(until)}.db"
                result = await asyncio.to_thread(
                    pantheon, secured, user, "replay", "--tenant", "acme", "--out", str(out),
                    "--json", *until,
                )  # fmt: skip
                assert result.returncode == 0, result.stderr
                runs[user] = (json.loads(result.stdout), read_tables(out, TABLES))
            (admin_doc, admin_rows), (acme_doc, acme_rows) = runs["admin"], runs["acme"]
            assert acme_rows == admin_rows  # every row
            assert {k: v for k, v in acme_doc.items() if k not in ("out", "seconds")} == {
                k: v for k, v in admin_doc.items() if k not in ("out", "seconds")
            }  # the checkpoint (last_seq) too
            assert acme_doc["tenant"] == "acme"
            tasks = acme_rows[1]["tasks"]
            assert {r[TASKS_TENANT] for r in tasks} == {"acme"}
            assert len(tasks) == (1001 if not until else 500)
        # acme's feed answered the server's flow control (its permissions allow it)
        assert flow_control, "no flow control asked for: too few bytes of events?"
    finally:
        await admin.close()


async def test_a_tenant_user_reads_its_events_and_verifies_its_tenant(secured: Secured) -> None:
    counts = []
    for since in ((), ("--since", secured.middle)):
        shown = {}
        for user in ("admin", "acme"):
            result = await asyncio.to_thread(
                pantheon, secured, user, "events", "--tenant", "acme", "--json", *since
            )
            assert result.returncode == 0, result.stderr
            shown[user] = json.loads(result.stdout)
        assert shown["acme"] == shown["admin"]
        assert {e["tenant"] for e in shown["acme"]} == {"acme"}
        counts.append(len(shown["acme"]))
    every, since_middle = counts
    assert every > 1000 and since_middle == every - 500  # acme's first half: 500 events

    # verify also reads the node's database file, which NATS permissions do not guard
    checked = await asyncio.to_thread(
        pantheon, secured, "acme", "verify", "--tenant", "acme", "--db", str(secured.db), "--json"
    )
    assert checked.returncode == 0, checked.stderr
    doc = json.loads(checked.stdout)
    assert doc["ok"] is True and doc["tenant"] == "acme" and doc["events"] == every


async def test_the_server_refuses_a_tenant_user_other_tenants_and_the_whole_log(
    secured: Secured, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    cases = {
        "globex": ("replay", "--tenant", "globex", "--out", str(out / "globex.db")),
        "every tenant": ("replay", "--tenant", "*", "--out", str(out / "all.db")),
        "by default": ("replay", "--out", str(out / "default.db")),
        "events": ("events", "--tenant", "globex"),
        "verify": ("verify", "--tenant", "globex", "--db", str(secured.db)),
        "verify all": ("verify", "--db", str(secured.db)),
    }
    started = time.monotonic()
    results = await asyncio.gather(*(
        asyncio.to_thread(pantheon, secured, "acme", *args) for args in cases.values()
    ))  # fmt: skip
    took = time.monotonic() - started
    done = dict(zip(cases, results, strict=True))
    for case in ("globex", "events", "verify"):
        refused(done[case], "pantheon.ev.globex.>")
    for case in ("every tenant", "by default", "verify all"):
        refused(done[case], "pantheon.ev.>")
    assert files(out) == []  # no file, not even a partial one
    assert took < 45  # refused at once, not after the requests' timeouts

    # the library says the same, at once
    nc = await connection.connect(secured.url("acme"), inbox_prefix="_INBOX_acme")
    try:
        store = EventStore(nc, Subjects())
        started = time.monotonic()
        with pytest.raises(ForbiddenError, match=r"read pantheon\.ev\.globex\.> of stream"):
            await replay(store, out / "lib.db", tenant="globex")
        assert time.monotonic() - started < 2
        with pytest.raises(ForbiddenError, match=r"read pantheon\.ev\.globex\.> of stream"):
            await store.first_seq("pantheon.ev.globex.>", start_seq=1)
        assert await store.first_seq("pantheon.ev.acme.>", start_seq=1) == 1
        assert files(out) == []
    finally:
        await nc.close()


async def test_a_user_without_its_inbox_prefix_or_password_is_told_why(secured: Secured) -> None:
    no_prefix = await connection.connect(secured.url("acme"))  # replies to _INBOX.*: refused
    try:
        with pytest.raises(ForbiddenError, match="subscription to _INBOX") as caught:
            await EventStore(no_prefix, Subjects()).stream_last_seq("pantheon.ev.acme.>")
        assert "PANTHEON_INBOX_PREFIX" in caught.value.message
    finally:
        await no_prefix.close()

    wrong = await asyncio.to_thread(
        pantheon, secured, "acme", "events", "--tenant", "acme", password="wrong-secret"
    )
    assert wrong.returncode == 1
    text = " ".join(wrong.stderr.split())
    assert "error forbidden" in text and "refused the credentials" in text, text
    assert "nats://acme:***@" in text and "wrong-secret" not in text
    assert "Traceback" not in wrong.stderr
