"""The embedded nats-server: the shipped config file, random ports, no leftovers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pantheon_es.embedded import CONFIG_FILE, EmbeddedNats, config_text

ROOT = Path(__file__).resolve().parents[1]


def varz(server: EmbeddedNats) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.monitor_url}/varz", timeout=5) as resp:
        return dict(json.load(resp))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for every purpose here.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_server_loads_the_shipped_config_file(nats_server: EmbeddedNats) -> None:
    v = varz(nats_server)
    assert nats_server.config_file == CONFIG_FILE
    assert f"Using configuration file: {CONFIG_FILE}" in nats_server.log_file.read_text()
    assert v["max_payload"] == 8 * 1024 * 1024
    assert v["jetstream"]["config"]["sync_interval"] == 120 * 10**9  # "2m", explicit in the file
    assert v["jetstream"]["config"].get("sync_always", False) is False  # omitted when false
    assert v["jetstream"]["config"]["max_memory"] == 1024**3
    assert v["host"] == "127.0.0.1"
    assert nats_server.monitor_url.startswith("http://127.0.0.1:")


def test_sync_interval_override_changes_only_that_setting(tmp_path: Path) -> None:
    with EmbeddedNats(tmp_path / "a", sync_interval="always") as server:
        v = varz(server)
    assert v["jetstream"]["config"]["sync_always"] is True
    assert v["max_payload"] == 8 * 1024 * 1024
    assert v["jetstream"]["config"]["max_memory"] == 1024**3
    shipped, changed = CONFIG_FILE.read_text().splitlines(), config_text("always").splitlines()
    assert [(a, b) for a, b in zip(shipped, changed, strict=True) if a != b] == [
        ('  sync_interval: "2m"', '  sync_interval: "always"')
    ]


def test_bad_sync_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="sync interval"):
        config_text("sometimes")


def test_two_servers_get_different_random_ports_and_stop_leaves_nothing(tmp_path: Path) -> None:
    a = EmbeddedNats(tmp_path / "a").start()
    b = EmbeddedNats(tmp_path / "b").start()
    pids = [a.pid, b.pid]
    try:
        assert a.url != b.url and a.monitor_url != b.monitor_url
    finally:
        a.stop()
        b.stop()
        a.stop()  # idempotent
    assert all(pid is not None and wait_dead(pid) for pid in pids)


def test_server_dies_with_a_parent_killed_by_sigkill(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from pantheon_es.embedded import EmbeddedNats\n"
        f"s = EmbeddedNats({str(tmp_path / 'n')!r}).start()\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT, text=True
    )
    try:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        assert alive(server_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        assert wait_dead(server_pid), "nats-server outlived its parent"
    finally:
        parent.kill()


def test_compose_file_mounts_the_config_file_the_tests_load() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "./pantheon_es/conf/nats.conf:/etc/nats/pantheon.conf:ro" in compose
    assert '"-c", "/etc/nats/pantheon.conf"' in compose
    assert "healthz?js-enabled-only=true" in compose


@pytest.mark.slow
def test_children_of_a_killed_node_exit_even_when_the_nats_server_is_gone(tmp_path: Path) -> None:
    """Parent killed with -9 and its NATS server stopped: the read side and the workers
    get their parent-death signal and must not wait for ever on a server that is gone."""
    import psutil

    from tests.conftest import pythonpath_env

    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    data = tmp_path / "node"
    data.mkdir()
    up = subprocess.Popen(
        [sys.executable, "-m", "pantheon_es.cli", "up", "--nats-url", server.url,
         "--data-dir", str(data), "--workers", "1", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=pythonpath_env(),
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (data / "pantheon.json").exists():
            assert up.poll() is None and time.monotonic() < deadline, "pantheon up did not start"
            time.sleep(0.05)
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 2  # the read side and one worker
        server.stop()
        up.kill()
        up.wait(10)
        _gone, alive = psutil.wait_procs(children, timeout=40)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "pantheon_es.cli" in " ".join(p.cmdline()):
                    p.kill()
        server.stop()


def test_read_side_process_stops_on_sigterm_while_it_cannot_reach_nats(tmp_path: Path) -> None:
    """SIGTERM (what its parent's death sends it) during start-up against a server that is
    gone: it exits within its grace period instead of reconnecting for ever."""
    from tests.conftest import pythonpath_env

    with EmbeddedNats(tmp_path / "nats") as server:
        url = server.url
    proc = subprocess.Popen(
        [sys.executable, "-m", "pantheon_es.cli", "projector", "--nats-url", url,
         "--data-dir", str(tmp_path / "node")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=pythonpath_env(),
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    try:
        time.sleep(3)  # imported, signal handlers installed, trying to connect
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
