"""The `pantheon` command line, run as a user would: separate processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_embedded import alive, wait_dead

ROOT = Path(__file__).resolve().parents[1]


def pantheon_argv() -> list[str]:
    script = Path(sys.executable).parent / "pantheon"
    if script.exists():
        return [str(script)]
    found = shutil.which("pantheon")
    return [found] if found else [sys.executable, "-m", "pantheon_es.cli"]


def run(
    command: str, *args: str, data_dir: Path, check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``pantheon COMMAND --data-dir D ARGS...`` in a fresh process, without PANTHEON_* env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANTHEON_")}
    options = [] if command == "schema" else ["--data-dir", str(data_dir)]
    result = subprocess.run(
        [*pantheon_argv(), command, *options, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"pantheon {command} {' '.join(args)} -> {result.returncode}\n{result.stderr}"
        )
    return result


class Up:
    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.log = data_dir.parent / f"{data_dir.name}-up.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(self) -> Up:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PANTHEON_")}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*pantheon_argv(), "up", "--data-dir", str(self.data_dir), *self.extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )
        discovery = self.data_dir / "pantheon.json"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pantheon up exited early:\n{self.log.read_text()}")
            if discovery.exists():
                self.info = json.loads(discovery.read_text())
                return self
            time.sleep(0.05)
        raise AssertionError(f"pantheon up not ready:\n{self.log.read_text()}")

    def interrupt(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    # No workers: these tests are about commands and projections; tasks stay pending.
    node = Up(tmp_path / "node", "--workers", "0").start()
    try:
        yield node
    finally:
        node.kill()


@pytest.mark.slow
def test_up_answers_submit_and_status_from_other_processes_and_sigint_leaves_no_server(
    up: Up,
) -> None:
    server_pid = up.info["nats_server_pid"]
    assert alive(server_pid)

    submitted = run(
        "submit", "hello", "--label", "team=core", "--", "echo", "hi", data_dir=up.data_dir
    )
    task_id = submitted.stdout.strip()
    assert len(task_id) == 26 and submitted.stderr == ""

    status = run("status", task_id, "--json", data_dir=up.data_dir)
    task = json.loads(status.stdout)
    assert (task["id"], task["status"], task["labels"]) == (task_id, "pending", {"team": "core"})
    assert task["executor"] == {"kind": "shell", "argv": ["echo", "hi"], "env": {}, "cwd": None}

    human = run("status", task_id, data_dir=up.data_dir)
    assert "pending" in human.stdout and task_id in human.stdout

    assert up.interrupt() == 0
    assert wait_dead(server_pid), "nats-server left behind after SIGINT"
    assert not (up.data_dir / "pantheon.json").exists()


@pytest.mark.slow
def test_cli_round_trip_list_cancel_events_and_json_everywhere(up: Up) -> None:
    d = up.data_dir
    a = json.loads(
        run("submit", "a", "--json", "--priority", "urgent", "--", "true", data_dir=d).stdout
    )["id"]
    b = run(
        "submit", "b", "--python", "pkg.mod:fn", "--kwargs", '{"n": 1}', "--cpu", "0.5", data_dir=d
    ).stdout.strip()
    same = run("submit", "b2", "--idempotency-key", "k1", "--", "true", data_dir=d).stdout.strip()
    again = run("submit", "b2", "--idempotency-key", "k1", "--", "true", data_dir=d).stdout.strip()
    assert same == again

    listed = json.loads(run("list", "--json", "--limit", "2", data_dir=d).stdout)
    assert [t["id"] for t in listed["items"]] == [same, b]
    assert (listed["total"], listed["has_more"], listed["total_pages"]) == (3, True, 2)
    table = run("list", data_dir=d).stdout
    assert a in table and "urgent" in table and "page 1 of 1, 3 task(s)" in table

    cancelled = json.loads(run("cancel", a, "--reason", "done", "--json", data_dir=d).stdout)
    assert cancelled["status"] == "cancelled" and cancelled["changed"] is True
    assert json.loads(run("status", a, "--json", data_dir=d).stdout)["cancel_reason"] == "done"
    only = json.loads(run("list", "--status", "cancelled", "--json", data_dir=d).stdout)
    assert [t["id"] for t in only["items"]] == [a]

    events = json.loads(run("events", "--json", data_dir=d).stdout)
    assert [e["type"] for e in events] == ["TaskSubmitted"] * 3 + ["TaskCancelled"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    tail = json.loads(run("events", "--json", "--from-seq", "4", data_dir=d).stdout)
    assert [e["seq"] for e in tail] == [4]
    text = run("events", data_dir=d).stdout
    assert "TaskCancelled" in text and a in text


@pytest.mark.slow
def test_cli_errors_have_typed_codes_and_exit_codes(up: Up) -> None:
    d = up.data_dir
    missing = run("status", "01J00000000000000000000000", data_dir=d, check=False)
    assert missing.returncode == 1 and "not_found" in missing.stderr and missing.stdout == ""

    invalid = run(
        "submit", "x", "--executor", '{"kind": "shell", "argv": []}', data_dir=d, check=False
    )
    assert invalid.returncode == 1 and "invalid" in invalid.stderr

    usage = run("submit", "x", data_dir=d, check=False)
    assert usage.returncode == 2

    assert json.loads(run("list", "--json", data_dir=d).stdout)["total"] == 0


def test_client_without_a_running_node_says_how_to_start_one(tmp_path: Path) -> None:
    result = run("list", data_dir=tmp_path / "nothing", check=False)
    assert result.returncode == 1
    assert "pantheon up" in result.stderr and "--nats-url" in result.stderr


def test_schema_prints_every_command_event_and_reply(tmp_path: Path) -> None:
    doc = json.loads(run("schema", data_dir=tmp_path).stdout)
    assert {"task.submit", "task.cancel"} <= set(doc["commands"])
    assert {"TaskSubmitted", "TaskCancelled"} <= set(doc["events"])
    assert doc["commands"]["task.submit"]["subject"] == "pantheon.cmd.{tenant}.task.submit"
    submitted = doc["events"]["TaskSubmitted"]["schema"]
    assert {"event_id", "type", "schema_version", "occurred_at", "data"} <= set(
        submitted["properties"]
    )
    assert set(doc["replies"]) == {"ok", "error"}
    assert "overloaded" in doc["error_codes"]


def test_help_explains_every_command(tmp_path: Path) -> None:
    result = subprocess.run([*pantheon_argv(), "--help"], capture_output=True, text=True, cwd=ROOT)
    for command in ("up", "submit", "cancel", "status", "list", "events", "schema"):
        assert command in result.stdout


@pytest.mark.slow
def test_demo_runs_end_to_end_and_cleans_up(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PANTHEON_")}
    result = subprocess.run(
        [*pantheon_argv(), "demo", "--data-dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "identical to the live tables" in result.stdout
    assert "stream last sequence unchanged: True" in result.stdout
    assert "workers, services and nats-server are down" in result.stdout
    assert "lead              completed" in result.stdout  # agents coordinated by message
    assert "now cancelled" in result.stdout
    assert not (tmp_path / "demo" / "pantheon.json").exists()


@pytest.mark.slow
def test_up_with_nats_url_joins_an_existing_server_and_leaves_it_running(tmp_path: Path) -> None:
    from pantheon_es.embedded import EmbeddedNats

    with EmbeddedNats(tmp_path / "external") as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PANTHEON_")}
        env["PANTHEON_NATS_URL"] = server.url
        data_dir = tmp_path / "node"
        with open(tmp_path / "up.log", "wb") as log:
            proc = subprocess.Popen(
                [*pantheon_argv(), "up", "--data-dir", str(data_dir)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )
        try:
            deadline = time.monotonic() + 30
            while not (data_dir / "pantheon.json").exists():
                assert proc.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "up.log"
                ).read_text()
                time.sleep(0.05)
            info = json.loads((data_dir / "pantheon.json").read_text())
            assert info["nats_url"] == server.url and info["embedded"] is False

            def cli(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [*pantheon_argv(), *args], capture_output=True, text=True, cwd=ROOT, env=env
                )

            task_id = cli("submit", "joined", "--", "true").stdout.strip()
            assert json.loads(cli("status", task_id, "--json").stdout)["name"] == "joined"

            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
            assert alive(server.pid or 0), "pantheon up stopped a server it did not start"
            # The log outlives the node: a new node on the same server sees the task.
            assert cli("events", "--json").returncode == 0
            assert task_id in cli("events", "--json").stdout
        finally:
            proc.kill()


def test_up_hands_read_linger_to_its_read_side(tmp_path: Path) -> None:
    import psutil

    node = Up(tmp_path / "node", "--workers", "0", "--read-linger", "0.5").start()
    try:
        assert node.proc is not None
        children = psutil.Process(node.proc.pid).children(recursive=True)
        read_side = [c.cmdline() for c in children if "projector" in c.cmdline()]
        assert len(read_side) == 1, [c.cmdline() for c in children]
        argv = read_side[0]
        assert argv[argv.index("--linger") + 1] == "0.5"
        # A status right after a submit waits for that read side (which then stops lingering).
        task_id = run("submit", "lingered", "--", "true", data_dir=node.data_dir).stdout.strip()
        shown = json.loads(run("status", task_id, "--json", data_dir=node.data_dir).stdout)
        assert shown["name"] == "lingered"
    finally:
        node.kill()
