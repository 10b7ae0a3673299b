"""`pantheon audit`: the fold of attempts and states (pure), and audits of real runs."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pantheon_es import workflow_file
from pantheon_es.errors import NotFoundError
from pantheon_es.events import REGISTRY, Event, make_event
from pantheon_es.store import StoredEvent
from tests.conftest import Cluster, eventually, python
from tests.test_cli import run
from tools.audit import Auditor, AuditReport, fold_task, render, tables

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
TID = "01J00000000000000000000000"


def ev(type_name: str, at: float, cause: str | None = None, **data: Any) -> Event[Any]:
    cls = REGISTRY.data_class(type_name)
    return make_event(
        cls.model_validate(data),
        event_id=f"E{int(at * 1000):025d}",
        tenant="default",
        aggregate_id=TID,
        occurred_at=T0 + timedelta(seconds=at),
        actor="test",
        correlation_id="C",
        causation_id=cause,
    )


def lease(at: float, attempt: int, lease_id: str, worker: str) -> Event[Any]:
    return ev("LeaseGranted", at, lease_id=lease_id, worker_id=worker, attempt=attempt,
              fencing_token=attempt, expires_at=T0, ttl=5.0)  # fmt: skip


def test_fold_gives_each_attempt_and_the_time_in_each_state() -> None:
    fold = fold_task(
        TID,
        [
            ev("TaskSubmitted", 0, name="a", executor={"kind": "shell", "argv": ["true"]},
               priority=0, resources={}, labels={}),
            lease(2, 1, "L1", "w1"),
            ev("TaskStarted", 3, lease_id="L1", started_at=T0 + timedelta(seconds=3)),
            ev("LeaseExpired", 10, lease_id="L1", attempt=1, reason="no heartbeat"),
            lease(11, 2, "L2", "w2"),
            # finished before its start was reported: the start comes with the completion
            ev("TaskCompleted", 20, lease_id="L2", result={"ok": 1},
               started_at=T0 + timedelta(seconds=12)),
        ],
    )  # fmt: skip
    assert fold.name == "a" and fold.status == "completed" and fold.result == {"ok": 1}
    spans = [(s.state, s.attempt, s.row()["seconds"]) for s in fold.states]
    assert spans == [
        ("pending", 0, 2.0),
        ("leased", 1, 1.0),
        ("running", 1, 7.0),
        ("pending", 1, 1.0),
        ("leased", 2, 1.0),
        ("running", 2, 8.0),
        ("completed", 2, None),
    ]
    first, second = (a.row() for a in fold.attempts)
    assert (first["worker_id"], first["outcome"], first["pending_s"], first["running_s"]) == (
        "w1", "expired", 2.0, 7.0)  # fmt: skip
    assert (second["worker_id"], second["outcome"], second["pending_s"]) == ("w2", "completed", 1.0)
    assert (second["leased_s"], second["running_s"], second["result"]) == (1.0, 8.0, {"ok": 1})


def test_causation_ids_resolve_to_events_or_group_one_commands_events() -> None:
    submitted = ev("TaskSubmitted", 0, "K1", name="a", executor={"kind": "shell", "argv": ["x"]},
                   priority=0, resources={}, labels={})  # fmt: skip
    events = [
        submitted,
        lease(1, 1, "L1", "w1"),  # no causation
        ev("TaskStarted", 2, "K2", lease_id="L1", started_at=T0),
        ev("TaskProgressed", 3, "K2", lease_id="L1"),
        ev("TaskProgressed", 4, submitted.event_id, lease_id="L1"),
    ]
    stored = [StoredEvent(10 + i, "s", e) for i, e in enumerate(events)]
    report = AuditReport("default", "task", TID, stored, {TID: fold_task(TID, events)}, [])
    rows = report.event_rows()
    assert [r["caused_by"] for r in rows] == ["", "", "with 13", "with 12", "TaskSubmitted@10"]
    assert [r["task"] for r in rows] == ["a"] * 5


# -- against a real run ---------------------------------------------------------------------------


async def _run_security_audit(cluster: Cluster, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    await cluster.add_worker(worker_id="w1")
    body = workflow_file.load(
        ROOT / "examples" / "security-audit.yaml",
        {"workflow_dir": str(ROOT / "examples"), "data_dir": str(tmp_path), "cwd": str(ROOT)},
    )
    created = await cluster.client.create_workflow(
        body["name"], body["tasks"], failure_policy=body["failure_policy"]
    )
    wf_id = created["workflow_id"]
    final = await cluster.client.wait_for_workflow(wf_id, timeout=120)
    assert final["status"] == "completed", final
    return wf_id, final


def _check_tasks(rows: list[dict[str, Any]], final: dict[str, Any]) -> None:
    """Every task of the workflow: its lease, its attempt and its result, in flat rows."""
    by_section: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_section.setdefault(r["section"], []).append(r)
    nodes = {n["task_id"]: n for n in final["nodes"]}
    assert len(nodes) == 6
    granted = {r["aggregate_id"]: r for r in by_section["event"] if r["type"] == "LeaseGranted"}
    done = {r["aggregate_id"] for r in by_section["event"] if r["type"] == "TaskCompleted"}
    assert set(granted) == set(nodes) and done == set(nodes)
    attempts = {r["aggregate_id"]: r for r in by_section["attempt"]}
    assert set(attempts) == set(nodes)
    for task_id, node in nodes.items():
        a = attempts[task_id]
        assert a["task"] == node["name"] and a["worker_id"] == "w1" and a["outcome"] == "completed"
        assert a["lease_id"] == granted[task_id]["lease_id"] and str(a["attempt"]) == "1"
        assert a["result"] == node["result"]
        assert float(a["running_s"]) >= 0 and float(a["pending_s"]) >= 0
    tasks = {r["aggregate_id"]: r for r in by_section["task"]}
    assert {t: r["state"] for t, r in tasks.items()} == dict.fromkeys(nodes, "completed")
    states = {(r["aggregate_id"], r["state"]) for r in by_section["state"]}
    assert {(t, s) for t in nodes for s in ("pending", "leased", "completed")} <= states
    # Workflow events are in the timeline too, in stream order.
    seqs = [int(r["seq"]) for r in by_section["event"]]
    assert seqs == sorted(seqs)
    types = [r["type"] for r in by_section["event"]]
    assert types[0] == "WorkflowCreated" and "WorkflowFinished" in types


def _parsed_csv(text: str) -> list[dict[str, Any]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    for r in rows:  # JSON cells back to values, empty cells to None
        for k in ("result", "error", "detail"):
            r[k] = json.loads(r[k]) if r[k] else None
    return rows


@pytest.mark.slow
async def test_audit_of_the_security_audit_workflow_shows_every_task_in_all_formats(
    cluster: Cluster, tmp_path: Path
) -> None:
    wf_id, final = await _run_security_audit(cluster, tmp_path)
    report = await Auditor(cluster.client).audit(wf_id)
    assert report.kind == "workflow" and not report.scanned  # aggregates only, no log scan

    doc = json.loads(render(report, "json"))
    assert doc["id"] == wf_id and len(doc["tasks"]) == 6
    for task in doc["tasks"]:
        (attempt,) = task["attempts"]
        node = next(n for n in final["nodes"] if n["task_id"] == task["aggregate_id"])
        assert attempt["result"] == node["result"] and attempt["lease_id"]
    flat = (
        [{k: v for k, v in r.items()} | {"section": "event"} for r in doc["events"]]
        + [
            {"section": "task", **{k: v for k, v in t.items() if k not in ("attempts", "states")}}
            for t in doc["tasks"]
        ]
        + [a for t in doc["tasks"] for a in t["attempts"]]
        + [s for t in doc["tasks"] for s in t["states"]]
    )
    _check_tasks(flat, final)

    lines = render(report, "jsonl").splitlines()
    _check_tasks([json.loads(line) for line in lines], final)

    _check_tasks(_parsed_csv(render(report, "csv")), final)

    # The same through the command line, as a user runs it.
    args = ("--nats-url", cluster.url, "--namespace", cluster.root)
    done = await asyncio.to_thread(
        run, "audit", wf_id, "--format", "csv", *args, data_dir=tmp_path, timeout=60
    )
    _check_tasks(_parsed_csv(done.stdout), final)
    done = await asyncio.to_thread(run, "audit", wf_id, *args, data_dir=tmp_path, timeout=60)
    for node in final["nodes"]:
        assert node["name"] in done.stdout
    assert "attempts" in done.stdout and "time in each state" in done.stdout

    # The worker's audit names every lease it held (a scan of the task events, said so).
    worker = await Auditor(cluster.client).audit("w1")
    assert worker.kind == "worker" and worker.scanned
    held = {a.task_id for f in worker.tasks.values() for a in f.attempts}
    assert held == {n["task_id"] for n in final["nodes"]}
    assert {r["type"] for r in worker.event_rows()} >= {"WorkerRegistered", "LeaseGranted",
                                                        "TaskCompleted"}  # fmt: skip


async def test_audit_shows_messages_sent_and_received_and_unknown_ids_are_not_found(
    cluster: Cluster, tmp_path: Path
) -> None:
    # No worker: both tasks stay pending, which is all messaging needs.
    a = (await cluster.client.submit_task(name="a", executor=python("noop")))["task_id"]
    b = (await cluster.client.submit_task(name="b", executor=python("noop")))["task_id"]
    await cluster.client.send_message(b, "hello b", priority="urgent", sender=a)
    await cluster.client.send_message(b, "again", sender=a)
    got = await cluster.client.receive_messages(b, max=1, ack=True)
    assert [m["body"] for m in got] == ["hello b"]

    async def sent_listed() -> bool:
        page = await cluster.client.list_messages(sender=a)
        return len(page["items"]) == 2

    await eventually(sent_listed)
    sender = await Auditor(cluster.client).audit(a)
    assert [(m["direction"], m["body"], m["recipient"]) for m in sender.messages] == [
        ("sent", "hello b", b),
        ("sent", "again", b),
    ]
    recipient = await Auditor(cluster.client).audit(b)
    got_rows = [(m["direction"], m["body"], m["priority"], m["state"]) for m in recipient.messages]
    assert got_rows == [("received", "hello b", "urgent", "read"),
                        ("received", "again", "medium", "pending")]  # fmt: skip
    types = [r["type"] for r in recipient.event_rows()]
    assert types == ["TaskSubmitted", "MessageSent", "MessageSent", "MessagesDelivered"]
    # Each of these came from a command of its own: nothing else shares its causation id.
    rows = recipient.event_rows()
    assert all(r["causation_id"] and r["caused_by"] == "" for r in rows)
    assert len({r["causation_id"] for r in rows}) == len(rows)
    assert any(t.title and "messages" in str(t.title) for t in tables(recipient))

    with pytest.raises(NotFoundError):
        await Auditor(cluster.client).audit("01J99999999999999999999999")
    args = ("--nats-url", cluster.url, "--namespace", cluster.root)
    done = await asyncio.to_thread(
        run, "audit", "nobody", *args, data_dir=tmp_path, check=False, timeout=60
    )
    assert done.returncode == 1 and "not_found" in done.stderr and done.stdout == ""
    done = await asyncio.to_thread(
        run, "audit", a, "--format", "xml", *args, data_dir=tmp_path, check=False, timeout=60
    )
    assert done.returncode == 2


def test_report_without_tasks_renders_in_every_format() -> None:
    report = AuditReport("default", "worker", "w9", [], {}, [])
    assert json.loads(render(report, "json"))["events"] == []
    assert render(report, "jsonl") == ""
    assert render(report, "csv").startswith("section,seq,time,type")


async def test_audit_of_a_retried_task_has_one_row_per_attempt_with_its_outcome(
    cluster: Cluster, tmp_path: Path
) -> None:
    await cluster.add_worker(worker_id="w1")
    retry = {"max_attempts": 5, "initial_interval": 0.3, "backoff_coefficient": 1.0, "jitter": 0}
    task_id = (
        await cluster.client.submit_task(
            "flaky",
            python("flaky", path=str(tmp_path / "calls"), failures=2),
            options={"retry": retry},
        )
    )["task_id"]
    await cluster.client.wait_for_task(task_id, timeout=30)
    report = await Auditor(cluster.client).audit(task_id)
    assert report.kind == "task"
    attempts = [a.row() for a in report.tasks[task_id].attempts]
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [
        (1, "failed, retry scheduled"), (2, "failed, retry scheduled"), (3, "completed"),
    ]  # fmt: skip
    assert [a["error"]["type"] for a in attempts[:2]] == ["RuntimeError", "RuntimeError"]
    assert attempts[2]["result"] == 3 and len({a["lease_id"] for a in attempts}) == 3
    # The wait between attempts is the retry interval: time pending before attempts 2 and 3.
    assert all(a["pending_s"] >= 0.29 for a in attempts[1:])
    states = [(s.state, s.attempt) for s in report.tasks[task_id].states]
    assert states[0] == ("pending", 0) and states[-1] == ("completed", 3)
    assert states.count(("pending", 1)) == 1 and states.count(("pending", 2)) == 1


async def test_an_agent_is_audited_as_an_agent(cluster: Cluster) -> None:
    spec = {"kind": "agent", "prompt": "review the code"}
    agent = (await cluster.client.submit_task("reviewer", spec))["task_id"]
    report = await Auditor(cluster.client).audit(agent)
    assert report.kind == "agent" and report.tasks[agent].status == "pending"
    assert [r["type"] for r in report.event_rows()] == ["TaskSubmitted"]
