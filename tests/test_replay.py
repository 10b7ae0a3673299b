"""`pantheon replay`: the read models at a sequence or a time, against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NATS

from pantheon_es import ids
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.errors import ConflictError, InvalidError, UnknownEventTypeError
from pantheon_es.events import make_event
from pantheon_es.specs import Resources, ShellSpec
from pantheon_es.store import EventStore
from pantheon_es.tasks import TaskSubmitted
from projections.projector import default_models
from tests.conftest import Cluster, python
from tests.test_cli import run
from tools.events import parse_iso as parse_time
from tools.replay import replay, seq_at_time
from tools.verify import read_tables

TABLES = [t for m in default_models() for t in m.tables]


def plain(text: str) -> str:
    """Console text without the error panel's frame and line breaks."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_replay_until_a_sequence_equals_the_live_state_captured_there(
    cluster: Cluster, tmp_path: Path
) -> None:
    client = cluster.client
    store = cluster.node.store
    assert store is not None
    await cluster.add_worker(worker_id="w1")
    first = [(await client.submit_task(f"add-{i}", python("add", a=i, b=1)))["task_id"]
             for i in range(4)]  # fmt: skip
    agent = (await client.submit_task("sleeper", python("sleep", seconds=1.5)))["task_id"]
    await client.send_message(agent, "low one", priority="low")
    await client.send_message(agent, "urgent one", priority="urgent")
    for tid in first:
        await client.wait_for_task(tid, timeout=30)

    # The live read models, checkpoint and rows from one read transaction: the state at S.
    seq, live = await asyncio.to_thread(read_tables, cluster.node.db_path, TABLES)
    assert seq > 0 and len(live["tasks"]) == 5 and len(live["messages"]) == 2

    # Keep running: messages delivered, a workflow, a cancel.
    got = await client.receive_messages(agent, max=2)
    assert [m["body"] for m in got] == ["urgent one", "low one"]
    wf = await client.create_workflow(
        "chain", [{"name": "a", "executor": python("noop")},
                  {"name": "b", "executor": python("noop"), "depends_on": ["a"]}],
    )  # fmt: skip
    await client.wait_for_workflow(wf["workflow_id"], timeout=30)
    late = (await client.submit_task("late", python("sleep", seconds=30)))["task_id"]
    await client.cancel_task(late)
    await client.wait_for_task(agent, timeout=30)
    head = await store.last_seq()
    assert head > seq

    tmp_path = tmp_path / "replays"  # the worker writes beside the node's directory
    tmp_path.mkdir()
    summary = await replay(store, tmp_path / "at-s.db", until_seq=seq)
    assert summary.last_seq == seq and summary.events == seq
    replayed_seq, replayed = await asyncio.to_thread(read_tables, tmp_path / "at-s.db", TABLES)
    assert replayed_seq == seq
    assert replayed == live
    assert listing(tmp_path) == ["at-s.db"]  # no temporary file left beside it

    # The same state by time: the stream's stored time of S, to the microsecond.
    msg = await store.js.get_msg(store.stream, seq=seq, direct=True)
    assert msg.headers is not None
    whole, _, frac = msg.headers["Nats-Time-Stamp"].rstrip("Z").partition(".")
    when = datetime.fromisoformat(f"{whole}.{frac.ljust(9, '0')[:6]}+00:00")
    assert await seq_at_time(store, when) == seq
    by_time = await replay(store, tmp_path / "at-t.db", until=when)
    assert by_time.last_seq == seq
    assert (await asyncio.to_thread(read_tables, tmp_path / "at-t.db", TABLES))[1] == live
    assert await seq_at_time(store, when - timedelta(days=1)) == 0
    assert await seq_at_time(store, when + timedelta(days=1)) == await store.last_seq()


def submitted(task_id: str) -> Any:
    data = TaskSubmitted(name="t", executor=ShellSpec(argv=["true"]), priority=200,
                         resources=Resources(), labels={})  # fmt: skip
    return make_event(data, event_id=ids.new_id(), tenant="default", aggregate_id=task_id,
                      occurred_at=datetime.now(UTC), actor="test", correlation_id="c",
                      causation_id=None)  # fmt: skip


async def log_with_an_unknown_event(store: EventStore) -> int:
    """Two tasks, an event of a type this build does not know, one more task."""
    for _ in range(2):
        await store.append([submitted(ids.new_id())], expected_seq=0)
    subject = store.subjects.aggregate("default", "task", ids.new_id())
    body = {"event_id": ids.new_id(), "type": "TaskTeleported", "schema_version": 1,
            "tenant": "default", "aggregate": "task", "aggregate_id": "x",
            "occurred_at": "2026-11-24T08:00:00Z", "actor": "future", "correlation_id": "c",
            "data": {}}  # fmt: skip
    ack = await store.js.publish(subject, orjson.dumps(body))
    await store.append([submitted(ids.new_id())], expected_seq=0)
    return int(ack.seq)


async def test_unknown_event_type_stops_the_replay_naming_its_sequence(
    store: EventStore, tmp_path: Path
) -> None:
    unknown_seq = await log_with_an_unknown_event(store)
    with pytest.raises(UnknownEventTypeError) as stopped:
        await replay(store, tmp_path / "out.db")
    assert stopped.value.seq == unknown_seq == 3
    assert f"at stream sequence {unknown_seq}" in stopped.value.message
    assert listing(tmp_path) == []  # nothing written, no partial file

    summary = await replay(store, tmp_path / "out.db", skip_unknown=True)
    assert (summary.last_seq, summary.events) == (4, 3)
    assert len((await asyncio.to_thread(read_tables, tmp_path / "out.db", TABLES))[1]["tasks"]) == 3


async def test_replay_refuses_to_overwrite_or_to_go_past_the_log(
    store: EventStore, tmp_path: Path
) -> None:
    await store.append([submitted(ids.new_id())], expected_seq=0)
    out = tmp_path / "out.db"
    out.write_text("precious")
    with pytest.raises(ConflictError):
        await replay(store, out)
    assert out.read_text() == "precious"
    with pytest.raises(InvalidError, match="past the end of the log"):
        await replay(store, tmp_path / "other.db", until_seq=2)
    summary = await replay(store, out, force=True)
    assert summary.last_seq == 1
    assert listing(tmp_path) == ["out.db"]
    assert (await asyncio.to_thread(read_tables, out, TABLES))[0] == 1


def test_parse_time_takes_iso_8601_and_reads_no_offset_as_utc() -> None:
    assert parse_time("2026-11-24T09:30:00Z") == datetime(2026, 11, 24, 9, 30, tzinfo=UTC)
    assert parse_time("2026-11-24T10:30:00+01:00") == datetime(2026, 11, 24, 9, 30, tzinfo=UTC)
    assert parse_time("2026-11-24 09:30") == datetime(2026, 11, 24, 9, 30, tzinfo=UTC)
    with pytest.raises(ValueError, match="not an ISO 8601 time"):
        parse_time("yesterday")


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--until-seq", "3", "--until", "2026-11-24T09:00:00Z"], "not both"),
        (["--until", "last tuesday"], "not an ISO 8601 time"),
        (["--until-seq", "-1"], "greater than or equal to 0"),
    ],
)
def test_replay_cli_bad_arguments_exit_2_and_write_nothing(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = run("replay", "--out", str(tmp_path / "out.db"), *args,
                 data_dir=tmp_path / "d", check=False)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in plain(result.stderr)
    assert listing(tmp_path) == []


def test_replay_cli_refuses_an_existing_out_with_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "out.db"
    out.write_text("precious")
    result = run("replay", "--out", str(out), data_dir=tmp_path / "d", check=False)
    assert result.returncode == 2
    assert "exists; pass --force" in plain(result.stderr)
    assert out.read_text() == "precious" and listing(tmp_path) == ["out.db"]


async def test_replay_cli_builds_the_file_and_prints_a_json_summary(
    nats_server: EmbeddedNats, nc: NATS, store: EventStore, tmp_path: Path
) -> None:
    await log_with_an_unknown_event(store)  # 4 events, the third of an unknown type
    out = tmp_path / "state.db"
    options = ("--nats-url", nats_server.url, "--namespace", store.subjects.root,
               "--out", str(out), "--json")  # fmt: skip
    stopped = await asyncio.to_thread(run, "replay", *options, data_dir=tmp_path / "d",
                                      check=False)  # fmt: skip
    assert stopped.returncode == 1
    assert "at stream sequence 3; pass --skip-unknown" in plain(stopped.stderr)
    assert stopped.stdout == "" and listing(tmp_path) == []

    result = await asyncio.to_thread(run, "replay", *options, "--skip-unknown", "--until-seq",
                                     "4", data_dir=tmp_path / "d")  # fmt: skip
    summary = json.loads(result.stdout)  # the skip's warning went to stderr
    assert summary["out"] == str(out) and summary["last_seq"] == 4 and summary["events"] == 3
    assert set(summary) >= {"out", "last_seq", "events", "seconds"}
    assert "TaskTeleported" in result.stderr or "skipping unknown" in result.stderr
    assert len((await asyncio.to_thread(read_tables, out, TABLES))[1]["tasks"]) == 3
