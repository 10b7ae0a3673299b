"""The AgentOrchestrator parity list, through the `pantheon` CLI as a user types it."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.test_cli import ROOT, Up, pantheon_argv, run


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Up]:
    up = Up(tmp_path / "node").start()  # embedded NATS, 2 local workers
    try:
        yield up
    finally:
        up.interrupt()
        up.kill()


def wait_status(d: Path, agent: str, wanted: set[str], timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        state = json.loads(run("status", agent, "--json", data_dir=d).stdout)
        if state["status"] in wanted:
            return dict(state)
        assert time.monotonic() < deadline, state
        time.sleep(0.2)


@pytest.mark.slow
def test_agent_parity_through_the_cli(node: Up, tmp_path: Path) -> None:
    d = node.data_dir
    notes = tmp_path / "notes.txt"
    notes.write_text("alpha\nbeta\n")

    # spawn: prompt, files, delegates -> the agent's id, nothing else
    worker_agent = run("spawn", "Review the notes", "--file", str(notes), data_dir=d).stdout.strip()
    assert len(worker_agent) == 26
    lead = run(
        "spawn", "/recv 1 60\n/result {\"led\": true}", "--delegate", worker_agent,
        "--name", "lead", data_dir=d,
    ).stdout.strip()  # fmt: skip
    sleeper = run("spawn", "/sleep 30", "--name", "sleeper", data_dir=d).stdout.strip()

    # status of one agent; a missing id is a typed not_found error
    done = wait_status(d, worker_agent, {"completed", "failed"})
    assert done["status"] == "completed", done
    assert done["result"]["files"][str(notes)]["lines"] == 2  # type: ignore[index]
    missing = run("status", "01J00000000000000000000000", data_dir=d, check=False)
    assert missing.returncode == 1 and "not_found" in missing.stderr

    # send with priority and type; a message to a finished agent is a typed error
    wait_status(d, lead, {"running"})
    message_id = run(
        "send", lead, "go ahead", "--priority", "urgent", "--type", "instruction", data_dir=d
    ).stdout.strip()
    assert len(message_id) == 26
    late = run("send", worker_agent, "too late", data_dir=d, check=False)
    assert late.returncode == 1 and "conflict" in late.stderr
    led = wait_status(d, lead, {"completed", "failed"})
    assert led["result"] == {"led": True}

    # inbox: pending messages come out highest priority first; --wait blocks for one
    wait_status(d, sleeper, {"running"})
    for priority in ("low", "urgent", "medium"):
        run("send", sleeper, f"{priority} news", "--priority", priority, data_dir=d)
    got = json.loads(run("inbox", sleeper, "--json", data_dir=d).stdout)
    assert [m["body"] for m in got] == ["urgent news", "medium news", "low news"]
    waiting = subprocess.Popen(
        [
            *pantheon_argv(),
            "inbox",
            sleeper,
            "--data-dir",
            str(d),
            "--wait",
            "--timeout",
            "20",
            "--json",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    time.sleep(1.0)  # let it block first
    run("send", sleeper, "wake up", "--type", "status_request", data_dir=d)
    out, _ = waiting.communicate(timeout=30)
    assert [(m["body"], m["type"]) for m in json.loads(out)] == [("wake up", "status_request")]

    # monitor: totals by status; per agent its task, status, start and last activity, duration
    view = json.loads(run("monitor", "--json", data_dir=d).stdout)
    assert view["totals"]["completed"] == 2 and view["totals"]["running"] == 1
    row = next(a for a in view["agents"] if a["agent_id"] == worker_agent)
    assert row["task"] == "Review the notes" and row["status"] == "completed"
    for stamp in (row["started_at"], row["last_activity_at"]):
        datetime.fromisoformat(stamp)  # ISO 8601
    assert row["duration_s"] >= 0
    assert "sleeper" not in run("monitor", data_dir=d, check=False).stderr

    # list with pagination and the summary by activity
    page = json.loads(
        run("list", "--kind", "agent", "--limit", "2", "--offset", "0", "--json", data_dir=d).stdout
    )
    assert (page["total"], page["has_more"], page["current_page"], page["total_pages"]) == (
        3,
        True,
        1,
        2,
    )
    assert set(page["summary"]) == {"active", "waiting_for_input", "idle"}
    assert sum(page["summary"].values()) == 1  # only the sleeper is live
    second = json.loads(run("list", "--limit", "2", "--offset", "2", "--json", data_dir=d).stdout)
    assert second["current_page"] == 2 and second["has_more"] is False

    # cleanup: finished agents leave the read models; the log keeps their history
    run("cancel", sleeper, data_dir=d)
    cleaned = json.loads(run("cleanup", "--older-than", "0", "--json", data_dir=d).stdout)
    assert cleaned["archived"] == 3
    assert run("status", worker_agent, data_dir=d, check=False).returncode == 1
    assert json.loads(run("list", "--json", data_dir=d).stdout)["total"] == 0
    history = json.loads(run("events", "--json", data_dir=d).stdout)
    archived = [e for e in history if e["type"] == "TaskArchived"]
    assert {e["aggregate_id"] for e in archived} == {worker_agent, lead, sleeper}


@pytest.mark.slow
def test_inactivity_timeout_through_the_cli(node: Up) -> None:
    d = node.data_dir
    agent = run("spawn", "/sleep 60", "--inactivity-timeout", "0.02", data_dir=d).stdout.strip()
    state = wait_status(d, agent, {"timed_out", "completed", "failed"}, timeout=30)
    assert state["status"] == "timed_out"
    assert state["error"]["type"] == "InactivityTimeout"  # type: ignore[index]


@pytest.mark.slow
def test_workers_command_shows_the_local_pool(node: Up) -> None:
    deadline = time.monotonic() + 30
    while True:  # the pool's processes register a moment after the node is up
        page = json.loads(run("workers", "--json", data_dir=node.data_dir).stdout)
        if page["total"] == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert page["total"] == 2 and {w["status"] for w in page["items"]} == {"active"}
    assert all(w["capacity"]["cpu"] > 0 and w["slots"] == 16 for w in page["items"])
    table = run("workers", data_dir=node.data_dir).stdout
    assert all(w["id"] in table for w in page["items"])


def test_the_local_pool_serves_other_tenants_when_told(tmp_path: Path) -> None:
    bad = subprocess.run(
        [*pantheon_argv(), "up", "--data-dir", str(tmp_path / "bad"),
         "--worker-serve-tenant", "no.dots"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert bad.returncode == 2 and "--worker-serve-tenant" in bad.stderr
    assert not (tmp_path / "bad" / "pantheon.json").exists()

    up = Up(tmp_path / "node", "--workers", "1", "--worker-serve-tenant", "*").start()
    try:
        done = run("submit", "t", "--tenant", "other", "--wait", "--json", "--", "echo", "hi",
                   data_dir=up.data_dir, timeout=60)  # fmt: skip
        task = json.loads(done.stdout)
        assert task["status"] == "completed" and task["tenant"] == "other"
        workers = json.loads(run("workers", "--json", data_dir=up.data_dir).stdout)
        assert [w["tenants"] for w in workers["items"]] == [["*"]]
    finally:
        up.interrupt()
        up.kill()
