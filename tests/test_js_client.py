"""The JavaScript example (examples/js) against a real cluster, and the AsyncAPI document
checked by the official parser (@asyncapi/parser).

Needs ``node`` and ``npm`` on PATH (skipped otherwise). The packages are installed
with ``npm ci`` from the committed lockfile into a cache directory keyed by the
lockfile's hash, so only the first run on a machine pays for the install.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest

from pantheon_es.asyncapi import export_asyncapi
from pantheon_es.schema import WorkOffer
from tests.conftest import Cluster, history

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "js"
SCRIPTS = ("pantheon.mjs", "validate-asyncapi.mjs")

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or shutil.which("npm") is None,
    reason="node and npm are not on PATH: the JavaScript client example cannot run",
)


@pytest.fixture(scope="session")
def js_dir(request: pytest.FixtureRequest) -> Path:
    """examples/js with its node_modules installed by ``npm ci``, cached by lockfile hash."""
    manifests = b"".join((EXAMPLE / n).read_bytes() for n in ("package.json", "package-lock.json"))
    digest = hashlib.sha256(manifests).hexdigest()[:16]
    cache = getattr(request.config, "cache", None)
    base = cache.mkdir("js-example") if cache is not None else Path(tempfile.gettempdir())
    target = Path(base) / f"pantheon-js-{digest}"
    if not (target / "node_modules" / ".package-lock.json").exists():
        staging = Path(tempfile.mkdtemp(prefix="pantheon-js-", dir=base))
        for name in ("package.json", "package-lock.json", ".npmrc"):
            shutil.copy2(EXAMPLE / name, staging / name)
        done = subprocess.run(
            ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=staging,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            pytest.fail(f"npm ci failed ({done.returncode}):\n{done.stderr[-2000:]}")
        if target.exists():  # a half-made directory from an interrupted run
            shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:  # another session installed it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    for name in SCRIPTS:  # the scripts under test are always the checkout's
        shutil.copy2(EXAMPLE / name, target / name)
    return target


async def node(js_dir: Path, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``node ARGS`` in ``js_dir`` without blocking the event loop (the cluster runs on it)."""
    proc = await asyncio.create_subprocess_exec(
        "node",
        *args,
        cwd=js_dir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("PANTHEON_")},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def lines(stdout: str) -> list[tuple[str, Any]]:
    """The example's output: ``<what> <json>`` per line."""
    out = []
    for line in stdout.splitlines():
        what, _, value = line.partition(" ")
        out.append((what, json.loads(value)))
    return out


async def test_js_example_submits_watches_state_and_follows_events(
    cluster: Cluster, js_dir: Path
) -> None:
    await cluster.add_worker()
    assert cluster.node.nc is not None
    offers: list[dict[str, Any]] = []

    async def on_offer(msg: Any) -> None:
        offers.append(orjson.loads(msg.data))

    sub = await cluster.node.nc.subscribe(f"{cluster.root}.work.>", cb=on_offer)
    try:
        code, stdout, stderr = await node(
            js_dir,
            "pantheon.mjs",
            "--server",
            cluster.url,
            "--namespace",
            cluster.root,
            "--name",
            "from-js",
            "--argv",
            "echo hello from js",
            "--timeout",
            "45",
        )
    finally:
        await sub.unsubscribe()
    assert code == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    out = lines(stdout)

    reply = next(v for w, v in out if w == "reply")
    assert reply["ok"] is True and reply["result"]["status"] == "pending"
    task_id = reply["result"]["task_id"]
    assert ("task_id", task_id) in out

    statuses = [v["status"] for w, v in out if w == "state"]
    assert statuses[-1] == "completed"
    assert len(statuses) == len(set(statuses))  # each change printed once, in order

    logged = await history(cluster, task_id)
    seen = [v for w, v in out if w == "event"]
    assert [e["type"] for e in seen] == [e.type for e in logged]
    assert [e["msg_id"] for e in seen] == [e.event_id for e in logged]
    assert seen[0]["type"] == "TaskSubmitted" and seen[-1]["type"] == "TaskCompleted"
    assert seen[0]["actor"] == "js:pantheon-example"
    assert [e["seq"] for e in seen] == sorted(e["seq"] for e in seen)

    final = next(v for w, v in out if w == "final")
    assert final["status"] == "completed" and final["task_id"] == task_id

    task = await cluster.client.get_task(task_id)  # the read model agrees
    assert task["status"] == "completed" and task["name"] == "from-js"
    assert task["labels"] == {"client": "js"}
    assert "hello from js" in json.dumps(task["result"])

    # the offer the scheduler really sent matches the contract's WorkOffer
    mine = [o for o in offers if o.get("task_id") == task_id]
    assert mine, offers
    offer = WorkOffer.model_validate(mine[0])
    assert offer.name == "from-js" and offer.executor.kind == "shell"


async def test_js_example_reports_a_refused_command(cluster: Cluster, js_dir: Path) -> None:
    # an empty argv does not validate: the example prints the typed error and exits 1
    code, stdout, stderr = await node(
        js_dir, "pantheon.mjs", "--server", cluster.url, "--namespace", cluster.root,
        "--argv", " ",
    )  # fmt: skip
    assert code == 1
    reply = dict(lines(stdout))["reply"]
    assert reply["ok"] is False and reply["error"]["code"] == "invalid"
    assert "error: invalid:" in stderr
    assert (await cluster.client.list_tasks())["total"] == 0  # nothing was appended


async def test_asyncapi_document_is_valid_for_the_official_parser(
    tmp_path: Path, js_dir: Path
) -> None:
    doc = export_asyncapi()
    good = tmp_path / "asyncapi.json"
    good.write_bytes(orjson.dumps(doc))
    code, stdout, stderr = await node(js_dir, "validate-asyncapi.mjs", str(good))
    summary = json.loads(stdout)
    assert code == 0, summary["errors"] or stderr
    assert summary["valid"] is True and summary["version"] == "3.0.0"
    assert summary["errors"] == [] and summary["warnings"] == []
    assert summary["channels"] == len(doc["channels"])
    assert summary["operations"] == len(doc["operations"])
    assert summary["messages"] == len(doc["components"]["messages"])

    # the parser does reject a broken document: an operation naming another channel's message
    op = doc["operations"]["cmd-task-submit"]
    op["messages"] = [{"$ref": "#/channels/cmd-task-cancel/messages/CancelTask"}]
    bad = tmp_path / "bad.json"
    bad.write_bytes(orjson.dumps(doc))
    code, stdout, _ = await node(js_dir, "validate-asyncapi.mjs", str(bad))
    assert code == 1
    assert any(
        "operation-messages-from-referred-channel" in e for e in json.loads(stdout)["errors"]
    )
