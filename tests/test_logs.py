"""structlog: JSON lines off a terminal, request context bound through contextvars."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from pantheon_es.embedded import EmbeddedNats

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import asyncio, io, sys
    import nats
    from pantheon_es import logs
    from pantheon_es.service import CommandService
    from pantheon_es.store import EventStore
    from pantheon_es.subjects import Subjects
    from pantheon_es.tasks import SubmitTask

    logs.configure("debug")  # stderr is a pipe here: JSON lines

    async def main(url):
        nc = await nats.connect(url)
        store = EventStore(nc, Subjects("logtest"))
        await store.provision()
        service = CommandService(nc, store)
        await service.start()
        await service.execute(
            "acme", SubmitTask(name="x", executor={"kind": "shell", "argv": ["true"]},
                               correlation_id="corr-42"))
        await service.shutdown()
        await nc.close()

    asyncio.run(main(sys.argv[1]))
    """
)


def test_logs_are_json_lines_with_tenant_correlation_and_stream_seq(
    nats_server: EmbeddedNats,
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, nats_server.url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    appended = [line for line in lines if line["event"] == "events appended"]
    assert len(appended) == 1
    entry = appended[0]
    assert entry["tenant"] == "acme"
    assert entry["correlation_id"] == "corr-42"
    assert entry["stream_seq"] >= 1
    assert entry["level"] == "debug" and "timestamp" in entry
