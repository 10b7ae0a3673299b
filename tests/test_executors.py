"""Executors with real subprocesses, and the offline agent (pure parts, a process, real NATS).

The TaskContext callbacks here are the worker's side (progress, inbox, send):
they record calls in lists; nothing mocks NATS. The offline agent's own NATS
traffic runs against the session's real nats-server (``stack`` fixture).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from pantheon_es import ids
from pantheon_es.embedded import EmbeddedNats
from pantheon_es.executors import (
    OFFLINE_TEMPLATE,
    AgentExecutor,
    ContextClosedError,
    ExecutionError,
    PythonExecutor,
    PythonTaskContext,
    ShellExecutor,
    TaskContext,
    _LastMarkedLine,
    default_executors,
    expand_template,
)
from pantheon_es.offline_agent import (
    AgentFailure,
    DirectiveError,
    Fail,
    Identity,
    OfflineAgent,
    Progress,
    Recv,
    Send,
    SetResult,
    Sleep,
    analyze_file,
    analyze_files,
    build_parser,
    default_result,
    needs_nats,
    parse_prompt,
)
from pantheon_es.service import CommandService, ServiceConfig
from pantheon_es.specs import AgentSpec, PythonSpec, ShellSpec
from pantheon_es.tasks import GrantLease
from tests import executor_targets
from tests.conftest import Stack, eventually

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]


# -- a TaskContext whose callbacks record ------------------------------------------------------


@dataclass
class Calls:
    progress: list[tuple[float | None, str, str]] = field(default_factory=list)
    heartbeats: int = 0
    inbox: list[tuple[int, float | None]] = field(default_factory=list)
    sent: list[tuple[str, str, str, str]] = field(default_factory=list)
    activity: int = 0
    pids: list[int] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)


def make_ctx(tmp_path: Path, calls: Calls, **extra_env: str) -> TaskContext:
    async def progress(fraction: float | None, message: str, state: str) -> None:
        calls.progress.append((fraction, message, state))

    async def heartbeat() -> None:
        calls.heartbeats += 1

    async def inbox(max: int, wait: float | None) -> list[dict[str, Any]]:
        calls.inbox.append((max, wait))
        taken, calls.pending[:max] = calls.pending[:max], []
        return taken

    async def send(to: str, body: str, priority: str, type: str) -> str:
        calls.sent.append((to, body, priority, type))
        return f"msg-{len(calls.sent)}"

    def mark_activity() -> None:
        calls.activity += 1

    return TaskContext(
        task_id="01TASK",
        tenant="acme",
        attempt=2,
        lease_id="L1",
        fencing_token=2,
        name="test",
        output_dir=tmp_path / "out",
        nats_url="nats://127.0.0.1:1",
        namespace="pns",
        progress=progress,
        heartbeat=heartbeat,
        inbox=inbox,
        send=send,
        mark_activity=mark_activity,
        add_pid=calls.pids.append,
        extra_env=extra_env,
    )


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def ctx(tmp_path: Path, calls: Calls) -> TaskContext:
    return make_ctx(tmp_path, calls)


def gone(pid: int) -> bool:
    """The process has ended (a zombie waiting for its parent to reap it has, too)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def read(path: str | Path) -> str:
    """A small local file's text (sync: tests read logs after the run)."""
    return Path(path).read_text()


def python_argv(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


# -- shell ---------------------------------------------------------------------------------------


async def test_shell_success_returns_tails_and_writes_full_logs(
    ctx: TaskContext, calls: Calls
) -> None:
    spec = ShellSpec(argv=python_argv("import sys; print('out'); print('err', file=sys.stderr)"))
    result = await ShellExecutor().run(spec, ctx)
    assert result["exit_code"] == 0
    assert result["stdout_tail"] == "out\n" and result["stderr_tail"] == "err\n"
    assert result["truncated"] is False and result["duration_s"] >= 0
    assert read(result["stdout_path"]) == "out\n"
    assert Path(result["stderr_path"]) == ctx.output_dir / "stderr.log"
    assert read(result["stderr_path"]) == "err\n"
    assert len(calls.pids) == 1 and gone(calls.pids[0])
    assert calls.activity >= 2
    orjson.dumps(result)  # JSON as it is


async def test_shell_accepts_the_spec_as_json(ctx: TaskContext) -> None:
    result = await ShellExecutor().run({"kind": "shell", "argv": ["true"]}, ctx)
    assert result["exit_code"] == 0


async def test_shell_invalid_spec_fails_with_invalid_spec(ctx: TaskContext) -> None:
    with pytest.raises(ExecutionError) as info:
        await ShellExecutor().run({"kind": "shell", "argv": []}, ctx)
    assert info.value.type == "InvalidSpec"


async def test_shell_large_output_keeps_a_bounded_tail_and_the_whole_file(
    ctx: TaskContext,
) -> None:
    code = """
        import sys
        for i in range(16):
            sys.stdout.write(str(i % 10) * 65536)
        sys.stdout.write("END")
    """
    result = await ShellExecutor(tail_bytes=1000).run(ShellSpec(argv=python_argv(code)), ctx)
    assert len(result["stdout_tail"]) == 1000 and result["stdout_tail"].endswith("5" * 997 + "END")
    assert result["truncated"] is True
    assert len(read(result["stdout_path"])) == 16 * 65536 + 3
    assert result["stderr_tail"] == ""


async def test_shell_nonzero_exit_raises_with_the_result_in_details(ctx: TaskContext) -> None:
    spec = ShellSpec(argv=python_argv("import sys; print('bad', file=sys.stderr); sys.exit(3)"))
    with pytest.raises(ExecutionError) as info:
        await ShellExecutor().run(spec, ctx)
    assert info.value.type == "ExitCode"
    assert info.value.message == "exited with code 3"
    assert info.value.details["exit_code"] == 3
    assert info.value.details["stderr_tail"] == "bad\n"


async def test_shell_killed_by_signal_names_it(ctx: TaskContext) -> None:
    spec = ShellSpec(argv=python_argv("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    with pytest.raises(ExecutionError) as info:
        await ShellExecutor().run(spec, ctx)
    assert info.value.details["exit_code"] == -9
    assert "SIGKILL" in info.value.message


@pytest.mark.parametrize("program", ["pantheon-no-such-program", "/nonexistent/program"])
async def test_shell_missing_executable_fails_with_executable_not_found(
    ctx: TaskContext, program: str
) -> None:
    with pytest.raises(ExecutionError) as info:
        await ShellExecutor().run(ShellSpec(argv=[program, "x"]), ctx)
    assert info.value.type == "ExecutableNotFound"
    assert program in info.value.message


async def test_shell_missing_cwd_fails_with_invalid_working_directory(
    ctx: TaskContext, tmp_path: Path
) -> None:
    spec = ShellSpec(argv=["true"], cwd=str(tmp_path / "nowhere"))
    with pytest.raises(ExecutionError) as info:
        await ShellExecutor().run(spec, ctx)
    assert info.value.type == "InvalidWorkingDirectory"


async def test_shell_child_gets_pantheon_env_then_spec_env_and_cwd(
    tmp_path: Path, calls: Calls
) -> None:
    ctx = make_ctx(tmp_path, calls, EXTRA="from-worker")
    code = """
        import json, os
        keys = ["PANTHEON_TASK_ID", "PANTHEON_NAMESPACE", "PANTHEON_FENCING_TOKEN",
                "PANTHEON_TENANT", "EXTRA", "FOO", "PATH"]
        print(json.dumps({"env": {k: os.environ.get(k) for k in keys}, "cwd": os.getcwd()}))
    """
    spec = ShellSpec(
        argv=python_argv(code), env={"FOO": "bar", "PANTHEON_TENANT": "spec"}, cwd=str(tmp_path)
    )
    seen = orjson.loads((await ShellExecutor().run(spec, ctx))["stdout_tail"])
    assert seen["env"] == {
        "PANTHEON_TASK_ID": "01TASK",
        "PANTHEON_NAMESPACE": "pns",
        "PANTHEON_FENCING_TOKEN": "2",
        "PANTHEON_TENANT": "spec",  # spec.env wins over the context's
        "EXTRA": "from-worker",
        "FOO": "bar",
        "PATH": os.environ["PATH"],
    }
    assert seen["cwd"] == str(tmp_path)


async def test_shell_cancel_kills_the_whole_process_group(
    ctx: TaskContext, calls: Calls, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    spec = ShellSpec(argv=["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"])
    run = asyncio.create_task(ShellExecutor(kill_grace=2).run(spec, ctx))
    await until(lambda: pid_file.exists() and pid_file.read_text().strip())
    leader, child = calls.pids[0], int(pid_file.read_text())
    assert not gone(leader) and not gone(child)
    started = time.monotonic()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert time.monotonic() - started < 1.5  # SIGTERM was enough: no grace period spent
    await until(lambda: gone(leader) and gone(child))


async def test_shell_cancel_kills_processes_that_ignore_sigterm_after_the_grace(
    ctx: TaskContext, calls: Calls, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    # An ignored SIGTERM is inherited: neither the shell nor its sleep will stop for it.
    script = f"trap '' TERM; sleep 60 & echo $! > {pid_file}; wait; wait"
    run = asyncio.create_task(
        ShellExecutor(kill_grace=0.3).run(ShellSpec(argv=["sh", "-c", script]), ctx)
    )
    await until(lambda: pid_file.exists() and pid_file.read_text().strip())
    leader, child = calls.pids[0], int(pid_file.read_text())
    started = time.monotonic()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert 0.25 <= time.monotonic() - started < 3
    await until(lambda: gone(leader) and gone(child))


async def test_shell_stops_children_left_behind_when_the_command_exits(
    ctx: TaskContext, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    script = f"sleep 60 > /dev/null 2>&1 & echo $! > {pid_file}"
    result = await ShellExecutor().run(ShellSpec(argv=["sh", "-c", script]), ctx)
    assert result["exit_code"] == 0
    await until(lambda: gone(int(pid_file.read_text())))


async def test_shell_does_not_wait_for_a_leftover_holding_the_output_pipe(
    ctx: TaskContext, tmp_path: Path
) -> None:
    # The leftover keeps stdout open; it is stopped, so the pipe closes at once.
    started = time.monotonic()
    result = await ShellExecutor().run(ShellSpec(argv=["sh", "-c", "sleep 60 & echo hi"]), ctx)
    assert result["stdout_tail"] == "hi\n"
    assert time.monotonic() - started < 3


# -- the result-line scanner ----------------------------------------------------------------------


def test_marked_line_scanner_keeps_the_last_marked_line_across_chunks() -> None:
    scanner = _LastMarkedLine(b"PANTHEON_RESULT ", limit=100)
    stream = (
        b'noise\nPANTHEON_RESULT {"a": 1}\nPANTHEON_RES no\n'
        b"xx PANTHEON_RESULT {}\nPANTHEON_RESULT [2]\r\ntail"
    )
    for i in range(0, len(stream), 3):
        scanner.feed(stream[i : i + 3])
    scanner.finish()
    assert scanner.last == b"PANTHEON_RESULT [2]" and not scanner.too_large


def test_marked_line_scanner_counts_a_last_line_without_newline() -> None:
    scanner = _LastMarkedLine(b"M ", limit=100)
    scanner.feed(b"M 1\nM 2")
    scanner.finish()
    assert scanner.last == b"M 2"


def test_marked_line_scanner_flags_an_oversized_last_marked_line() -> None:
    scanner = _LastMarkedLine(b"M ", limit=10)
    scanner.feed(b"M ok\nM " + b"x" * 50 + b"\nother\n")
    scanner.finish()
    assert scanner.last is None and scanner.too_large
    scanner.feed(b"M fine\n")
    assert scanner.last == b"M fine" and not scanner.too_large


# -- python --------------------------------------------------------------------------------------


def pyspec(name: str, **kwargs: Any) -> PythonSpec:
    return PythonSpec(target=f"tests.executor_targets:{name}", kwargs=kwargs)


async def test_python_sync_function_runs_on_a_reused_daemon_thread_named_after_the_task(
    ctx: TaskContext,
) -> None:
    executor = PythonExecutor()
    assert await executor.run(pyspec("add", a=2, b=3), ctx) == 5
    first = await executor.run(pyspec("thread_info"), ctx)
    threads = {t.ident for t in threading.enumerate()}
    second = await executor.run(pyspec("thread_info"), ctx)
    assert first["name"] == "pantheon-task-01TASK" and first["daemon"] is True
    # No new thread per call: an idle one takes it (the pool is the process's, so
    # earlier tests may have left more than one idle thread).
    assert second["ident"] in threads
    assert {t.ident for t in threading.enumerate()} <= threads
    assert first["ident"] != threading.get_ident()


async def test_workflow_inputs_reach_a_function_as_argument_without_files(
    ctx: TaskContext,
) -> None:
    ctx.inputs = {"fetch": {"rows": 3}, "parse": "ok"}
    assert await PythonExecutor().run(pyspec("echo_inputs"), ctx) == ctx.inputs
    assert not ctx.output_dir.exists()  # a function needs no inputs file


def test_workflow_inputs_reach_a_process_as_a_file_and_variables(ctx: TaskContext) -> None:
    big = "x" * 9000
    ctx.inputs = {"fetch-db": {"rows": 3}, "big": big}
    env = ctx.env()
    path = Path(env["PANTHEON_INPUTS_FILE"])
    assert path.parent == ctx.output_dir
    assert orjson.loads(path.read_bytes()) == ctx.inputs
    assert orjson.loads(env["PANTHEON_INPUT_FETCH_DB"]) == {"rows": 3}
    assert "PANTHEON_INPUT_BIG" not in env  # over 8 KiB: in the file only
    assert env["PANTHEON_TASK_ID"] == "01TASK"


async def test_python_async_function_is_awaited(ctx: TaskContext) -> None:
    assert await PythonExecutor().run(pyspec("async_add", a=2, b=3), ctx) == 5


async def test_python_result_is_made_plain_json(ctx: TaskContext) -> None:
    assert await PythonExecutor().run(pyspec("as_tuple", a=1), ctx) == [1, 1]


async def test_python_sync_function_gets_a_context_with_sync_twins(
    ctx: TaskContext, calls: Calls
) -> None:
    calls.pending = [{"message_id": "m1", "body": "hey"}]
    result = await PythonExecutor().run(pyspec("sync_with_ctx", to="01OTHER"), ctx)
    assert result == {
        "task_id": "01TASK",
        "attempt": 2,
        "tenant": "acme",
        "messages": [{"message_id": "m1", "body": "hey"}],
        "sent": "msg-1",
    }
    assert calls.progress == [(0.5, "half way", "active")]
    assert calls.heartbeats == 1
    assert calls.inbox == [(5, 1.5)]
    assert calls.sent == [("01OTHER", "hello", "high", "query")]


async def test_python_async_function_gets_a_context(ctx: TaskContext, calls: Calls) -> None:
    result = await PythonExecutor().run(pyspec("async_with_ctx", to="01OTHER"), ctx)
    assert result == {"messages": [], "sent": "msg-1", "task_id": "01TASK"}
    assert calls.progress == [(0.25, "quarter", "waiting_for_input")]
    assert calls.heartbeats == 1 and calls.inbox == [(10, None)]
    assert calls.sent == [("01OTHER", "hi", "medium", "update")]


async def test_python_sync_twin_in_async_code_is_refused(ctx: TaskContext) -> None:
    with pytest.raises(ExecutionError) as info:
        await PythonExecutor().run(pyspec("async_calls_sync_twin"), ctx)
    assert info.value.type == "RuntimeError" and "await" in info.value.message


@pytest.mark.parametrize(
    ("name", "error_type"), [("boom", "ValueError"), ("async_boom", "KeyError")]
)
async def test_python_exception_fails_with_its_type_and_traceback(
    ctx: TaskContext, name: str, error_type: str
) -> None:
    with pytest.raises(ExecutionError) as info:
        await PythonExecutor().run(pyspec(name, message="it broke"), ctx)
    assert info.value.type == error_type
    assert "it broke" in info.value.message
    assert f"{error_type}: " in info.value.details["traceback"]
    assert "executor_targets.py" in info.value.details["traceback"]


async def test_python_long_traceback_is_capped(ctx: TaskContext) -> None:
    with pytest.raises(ExecutionError) as info:
        await PythonExecutor().run(pyspec("boom", message="x" * 50_000), ctx)
    assert len(info.value.details["traceback"]) == 20_000
    assert len(info.value.message) == 20_000


async def test_python_execution_error_from_the_task_is_kept(ctx: TaskContext) -> None:
    with pytest.raises(ExecutionError) as info:
        await PythonExecutor().run(pyspec("raises_execution_error"), ctx)
    assert (info.value.type, info.value.details) == ("Custom", {"k": 1})


async def test_python_system_exit_is_a_failure_not_an_exit(ctx: TaskContext) -> None:
    with pytest.raises(ExecutionError) as info:
        await PythonExecutor().run(pyspec("exits"), ctx)
    assert info.value.type == "SystemExit"


@pytest.mark.parametrize(
    ("target", "error_type"),
    [
        ("tests.no_such_module:f", "ImportError"),
        ("tests.executor_targets:no_such_function", "AttributeError"),
        ("tests.executor_targets:not_callable", "TypeError"),
    ],
)
async def test_python_bad_target_fails_clearly(
    ctx: TaskContext, target: str, error_type: str
) -> None:
    with pytest.raises(ExecutionError) as info:
        await PythonExecutor().run(PythonSpec(target=target), ctx)
    assert info.value.type == error_type


async def test_python_module_failing_at_import_is_an_import_error(
    ctx: TaskContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pantheon_broken_mod.py").write_text("raise RuntimeError('no import for you')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ExecutionError) as info:
        await PythonExecutor().run(PythonSpec(target="pantheon_broken_mod:f"), ctx)
    assert info.value.type == "ImportError"
    assert info.value.details["cause"] == "RuntimeError"


async def test_python_wrong_kwargs_fail_with_type_error(ctx: TaskContext) -> None:
    with pytest.raises(ExecutionError) as info:
        await PythonExecutor().run(pyspec("add", a=1), ctx)
    assert info.value.type == "TypeError"


async def test_python_non_json_result_fails_with_result_not_json(ctx: TaskContext) -> None:
    with pytest.raises(ExecutionError) as info:
        await PythonExecutor().run(pyspec("not_json"), ctx)
    assert info.value.type == "ResultNotJSON"


async def test_python_cancelled_error_raised_by_the_function_is_a_failure(
    ctx: TaskContext,
) -> None:
    with pytest.raises(ExecutionError) as info:
        await PythonExecutor().run(pyspec("raises_cancelled"), ctx)
    assert info.value.type == "CancelledError"


async def test_python_ctx_in_kwargs_of_a_function_taking_ctx_is_invalid(ctx: TaskContext) -> None:
    with pytest.raises(ExecutionError) as info:
        await PythonExecutor().run(pyspec("async_with_ctx", to="x", ctx=1), ctx)
    assert info.value.type == "InvalidSpec"


async def test_python_cancel_stops_an_async_function(ctx: TaskContext) -> None:
    run = asyncio.create_task(PythonExecutor().run(pyspec("sleeps", seconds=60), ctx))
    await asyncio.sleep(0.05)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, 2)


async def test_python_cancel_of_a_sync_function_returns_and_closes_its_context(
    ctx: TaskContext, calls: Calls
) -> None:
    for flag in (
        executor_targets.SYNC_STARTED,
        executor_targets.SYNC_NOTICED,
        executor_targets.SYNC_REFUSED,
    ):
        flag.clear()
    run = asyncio.create_task(PythonExecutor().run(pyspec("runs_until_cancelled"), ctx))
    await until(executor_targets.SYNC_STARTED.is_set)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(run, 2)
    # The thread runs on; it sees the cancel and its calls on the context are refused.
    await until(executor_targets.SYNC_REFUSED.is_set)
    assert executor_targets.SYNC_NOTICED.is_set() and calls.heartbeats == 0


async def test_python_context_refuses_calls_after_close(ctx: TaskContext) -> None:
    task_ctx = PythonTaskContext(ctx)
    task_ctx.close()
    assert task_ctx.cancelled
    with pytest.raises(ContextClosedError):
        await task_ctx.heartbeat()
    with pytest.raises(ContextClosedError):
        await asyncio.to_thread(task_ctx.progress_sync, 0.1)


# -- agent ---------------------------------------------------------------------------------------


def test_expand_template_expands_whole_items_and_joins_inline() -> None:
    argv = expand_template(
        [
            "{python}",
            "run",
            "--prompt={prompt}",
            "{files}",
            "--to",
            "{delegates}",
            "@{task_id}",
            "in:{files}",
            "{x}",
            '{"json": 1}',
        ],
        prompt="fix {files} now",
        files=["a.py", "b.py"],
        delegates=["d1"],
        task_id="T1",
        python="/usr/bin/py",
    )
    assert argv == [
        "/usr/bin/py", "run", "--prompt=fix {files} now", "a.py", "b.py", "--to", "d1", "@T1",
        "in:a.py,b.py", "{x}", '{"json": 1}',
    ]  # fmt: skip


def test_expand_template_offline_without_files_or_delegates() -> None:
    argv = expand_template(OFFLINE_TEMPLATE, prompt="hello")
    assert argv == [PY, "-m", "pantheon_es.offline_agent", "--prompt", "hello", "--files",
                    "--delegates"]  # fmt: skip
    args = build_parser().parse_args(argv[3:])
    assert (args.prompt, args.files, args.delegates) == ("hello", [], [])
    args = build_parser().parse_args(
        expand_template(OFFLINE_TEMPLATE, prompt="p", files=["a", "b"], delegates=["x"])[3:]
    )
    assert (args.files, args.delegates) == (["a", "b"], ["x"])


async def test_agent_custom_template_result_is_the_last_result_line(ctx: TaskContext) -> None:
    code = """
        import json, sys
        print("PANTHEON_RESULT " + json.dumps({"first": True}))
        print("working...")
        print("PANTHEON_RESULT " + json.dumps({"argv": sys.argv[1:]}))
        print("bye")
    """
    executor = AgentExecutor(
        {"echo": ["{python}", "-c", textwrap.dedent(code), "{prompt}", "{files}"]}
    )
    spec = AgentSpec(prompt="do it", files=["x.py", "y.py"], template="echo")
    assert await executor.run(spec, ctx) == {"argv": ["do it", "x.py", "y.py"]}


async def test_agent_without_result_line_returns_the_shell_result(ctx: TaskContext) -> None:
    executor = AgentExecutor({"plain": ["echo", "{prompt}"]})
    result = await executor.run(AgentSpec(prompt="hi there", template="plain"), ctx)
    assert result["exit_code"] == 0 and result["stdout_tail"] == "hi there\n"


async def test_agent_unknown_template_fails(ctx: TaskContext) -> None:
    with pytest.raises(ExecutionError) as info:
        await AgentExecutor().run(AgentSpec(prompt="x", template="claude"), ctx)
    assert info.value.type == "UnknownTemplate"
    assert info.value.details["known"] == ["offline"]


async def test_agent_nonzero_exit_fails_like_shell(ctx: TaskContext) -> None:
    executor = AgentExecutor({"bad": ["{python}", "-c", "import sys; sys.exit(4)"]})
    with pytest.raises(ExecutionError) as info:
        await executor.run(AgentSpec(prompt="x", template="bad"), ctx)
    assert info.value.type == "ExitCode" and info.value.details["exit_code"] == 4


async def test_agent_bad_result_lines_fail(ctx: TaskContext) -> None:
    executor = AgentExecutor(
        {
            "garbled": ["{python}", "-c", "print('PANTHEON_RESULT {nope')"],
            "huge": ["{python}", "-c", "print('PANTHEON_RESULT ' + '1' * 500)"],
        },
        max_result_bytes=100,
    )
    with pytest.raises(ExecutionError) as info:
        await executor.run(AgentSpec(prompt="x", template="garbled"), ctx)
    assert info.value.type == "ResultNotJSON"
    with pytest.raises(ExecutionError) as info:
        await executor.run(AgentSpec(prompt="x", template="huge"), ctx)
    assert info.value.type == "ResultTooLarge"


def test_agent_templates_must_be_lists() -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        AgentExecutor({"bad": "claude -p {prompt}"})


async def test_agent_offline_template_runs_the_offline_agent(ctx: TaskContext) -> None:
    spec = AgentSpec(prompt='just a result\n/result {"a": 1}')
    assert await AgentExecutor().run(spec, ctx) == {"a": 1}


def test_default_executors_by_kind() -> None:
    executors = default_executors({"x": ["echo"]})
    assert sorted(executors) == ["agent", "python", "shell"]
    assert all(kind == e.kind for kind, e in executors.items())
    agent = executors["agent"]
    assert isinstance(agent, AgentExecutor) and "x" in agent.templates


# -- offline agent: pure parts -----------------------------------------------------------------


def test_parse_prompt_reads_directives_in_order_and_skips_text() -> None:
    prompt = """Please look at /etc/hosts for me.
/progress 50 half way there
/send @delegates high instruction do the   thing
/recv 2
/recv 1 0.5
/sleep 0.1
/result {"a": [1, 2]}
/fail enough
"""
    assert parse_prompt(prompt) == [
        Progress(0.5, "half way there"),
        Send("@delegates", "high", "instruction", "do the   thing"),
        Recv(2, 30.0),
        Recv(1, 0.5),
        Sleep(0.1),
        SetResult({"a": [1, 2]}),
        Fail("enough"),
    ]
    assert parse_prompt("no directives here\n  /etc/passwd too") == []


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("/progress 150 too much", "percent"),
        ("/progress", "usage"),
        ("/send x loud update hi", "priority"),
        ("/send x low chat hi", "type"),
        ("/send x low update", "usage"),
        ("/recv 0", "n must be"),
        ("/recv 1 soon", "timeout"),
        ("/sleep", "usage"),
        ("/result {bad", "not JSON"),
        ("/prgress 10 x", "unknown directive"),
    ],
)
def test_parse_prompt_rejects_a_bad_directive_with_its_line(line: str, problem: str) -> None:
    with pytest.raises(DirectiveError, match=problem) as info:
        parse_prompt(f"text\n{line}")
    assert info.value.line_number == 2


def test_needs_nats_only_for_directives_that_talk_to_pantheon() -> None:
    assert needs_nats([])  # the default run reports progress and reads messages
    assert not needs_nats(parse_prompt("/result 1\n/sleep 0\n/fail x"))
    assert needs_nats(parse_prompt("/result 1\n/progress 10"))


def test_analyze_files_counts_lines_and_bytes_and_records_missing(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"one\ntwo\n")
    (tmp_path / "b.txt").write_bytes(b"one\ntwo")
    (tmp_path / "empty").write_bytes(b"")
    paths = [str(tmp_path / n) for n in ("a.txt", "b.txt", "empty", "nope")]
    assert analyze_files(paths) == {
        paths[0]: {"lines": 2, "bytes": 8},
        paths[1]: {"lines": 2, "bytes": 7},
        paths[2]: {"lines": 0, "bytes": 0},
        paths[3]: {"missing": True},
    }
    assert "error" in analyze_file(tmp_path)  # a directory


def test_default_result_shape() -> None:
    assert default_result("two words", {"f": {"missing": True}}, ["d"], [{"body": "x"}]) == {
        "prompt_words": 2,
        "files": {"f": {"missing": True}},
        "delegates": ["d"],
        "messages": [{"body": "x"}],
    }


def test_identity_from_environ_defaults_and_bad_token() -> None:
    assert Identity.from_environ({}) == Identity()
    identity = Identity.from_environ({"PANTHEON_FENCING_TOKEN": "3", "PANTHEON_NAMESPACE": "t1"})
    assert (identity.fencing_token, identity.namespace, identity.tenant) == (3, "t1", "default")
    with pytest.raises(AgentFailure):
        Identity.from_environ({"PANTHEON_FENCING_TOKEN": "x"})


# -- offline agent: as a process -------------------------------------------------------------------


def run_agent(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PANTHEON_")}
    return subprocess.run(
        [PY, "-m", "pantheon_es.offline_agent", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def test_offline_agent_result_only_never_connects() -> None:
    done = run_agent(
        "--prompt", '/result {"a": 1}', "--files", PANTHEON_NATS_URL="nats://127.0.0.1:1"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == 'PANTHEON_RESULT {"a":1}'


def test_offline_agent_fail_exits_1_with_the_message() -> None:
    done = run_agent("--prompt", "/sleep 0\n/fail it went wrong\n/result 1")
    assert done.returncode == 1
    assert "it went wrong" in done.stderr and "PANTHEON_RESULT" not in done.stdout


def test_offline_agent_bad_prompt_exits_2() -> None:
    done = run_agent("--prompt", "/progress lots")
    assert done.returncode == 2 and "line 1" in done.stderr


def test_offline_agent_without_nats_url_fails_cleanly_when_it_needs_nats() -> None:
    done = run_agent("--prompt", "/send 01X low update hi")
    assert done.returncode == 1
    assert "PANTHEON_NATS_URL is not set" in done.stderr and "Traceback" not in done.stderr


# -- offline agent: against real NATS ------------------------------------------------------------


async def leased_agent(stack: Stack, prompt: str = "agent") -> Identity:
    """An agent task with a live lease, granted as the scheduler would."""
    task_id = (await stack.client.spawn_agent(prompt))["task_id"]
    lease_id = ids.new_id()
    granted = await stack.service.execute(
        "default", GrantLease(task_id=task_id, lease_id=lease_id, worker_id="w-test", ttl=60)
    )
    return Identity(
        nats_url=None,
        namespace=stack.store.subjects.root,
        task_id=task_id,
        lease_id=lease_id,
        fencing_token=granted["fencing_token"],
    )


async def test_offline_agent_default_run_through_the_agent_executor(
    stack: Stack, nats_server: EmbeddedNats, tmp_path: Path, calls: Calls
) -> None:
    me = await leased_agent(stack)
    sent = await stack.client.send_message(me.task_id or "", "welcome", sender="tester")
    (tmp_path / "a.py").write_text("x = 1\ny = 2\n")
    ctx = replace(
        make_ctx(tmp_path, calls),
        tenant=me.tenant,
        task_id=me.task_id or "",
        lease_id=me.lease_id or "",
        fencing_token=me.fencing_token or 0,
        nats_url=nats_server.url,
        namespace=me.namespace,
    )
    spec = AgentSpec(
        prompt="look at these files",
        files=[str(tmp_path / "a.py"), str(tmp_path / "gone.py")],
        delegates=["01D"],
    )
    result = await AgentExecutor().run(spec, ctx)
    assert result["prompt_words"] == 4
    assert result["files"] == {
        str(tmp_path / "a.py"): {"lines": 2, "bytes": 12},
        str(tmp_path / "gone.py"): {"missing": True},
    }
    assert result["delegates"] == ["01D"]
    assert [m["message_id"] for m in result["messages"]] == [sent["message_id"]]

    async def reported_done() -> bool:
        task = await stack.client.get_task(me.task_id or "")
        return bool(task["progress"] == 1.0 and task["progress_message"] == "done")

    await eventually(reported_done)
    log = read(ctx.output_dir / "stdout.log")
    assert f'"message_id":"{sent["message_id"]}"' in log.splitlines()[0]
    assert log.startswith("MESSAGE ")


async def test_offline_agents_send_and_receive_messages(
    stack: Stack, nats_server: EmbeddedNats
) -> None:
    alice, bob = await leased_agent(stack, "alice"), await leased_agent(stack, "bob")
    bob_run = asyncio.create_task(
        OfflineAgent(
            "wait for alice",
            parse_prompt("/recv 2 10\n/progress 90 got them"),
            identity=replace(bob, nats_url=nats_server.url),
        ).run()
    )
    alice_agent = OfflineAgent(
        "talk to bob",
        parse_prompt("/send @delegates urgent instruction start\n/send @delegates low update fyi"),
        delegates=[bob.task_id or ""],
        identity=replace(alice, nats_url=nats_server.url),
    )
    alice_result = await alice_agent.run()
    assert len(alice_result["sent"]) == 2 and alice_result["messages"] == []
    bob_result = await asyncio.wait_for(bob_run, 15)
    assert [m["body"] for m in bob_result["messages"]] == ["start", "fyi"]
    assert [m["message_id"] for m in bob_result["messages"]] == alice_result["sent"]
    assert bob_result["messages"][0]["sender"] == alice.task_id


async def test_offline_agent_recv_timeout_fails(stack: Stack, nats_server: EmbeddedNats) -> None:
    me = await leased_agent(stack)
    agent = OfflineAgent(
        "x",
        parse_prompt("/recv 1 0.2"),
        identity=replace(me, nats_url=nats_server.url),
    )
    with pytest.raises(AgentFailure, match="received 0 of 1"):
        await agent.run()


async def test_offline_agent_rides_out_a_command_service_restart(
    stack: Stack, nats_server: EmbeddedNats, capsys: pytest.CaptureFixture[str]
) -> None:
    me, peer = await leased_agent(stack, "me"), await leased_agent(stack, "peer")
    await stack.service.shutdown()  # nothing serves commands now: `unavailable`
    agent = OfflineAgent(
        "x",
        parse_prompt(f"/send {peer.task_id} high update still here\n/progress 50 half"),
        identity=replace(me, nats_url=nats_server.url),
        retry_for=20,
    )
    run = asyncio.create_task(agent.run())
    seen = ""

    def retrying() -> bool:
        nonlocal seen
        seen += capsys.readouterr().err
        return "unavailable" in seen and "retrying" in seen

    await until(retrying)  # it met the outage and did not give up
    assert not run.done()
    stack.service = CommandService(stack.nc, stack.store, ServiceConfig())
    await stack.service.start()
    result = await asyncio.wait_for(run, 15)
    taken = await stack.client.receive_messages(peer.task_id or "", max=10)
    assert [m["message_id"] for m in taken] == result["sent"]  # sent once, despite the retries
