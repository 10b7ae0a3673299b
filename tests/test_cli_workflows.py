"""`pantheon run` and workflow files, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pantheon_es.errors import InvalidError
from pantheon_es.workflow_file import leaf_results, load
from tests.test_cli import run


def test_workflow_file_short_forms_and_variables_become_a_create_workflow_body(
    tmp_path: Path,
) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(
        "name: demo\n"
        "failure_policy: continue\n"
        "tasks:\n"
        "  - name: a\n"
        "    python: pkg.mod:fn\n"
        "    kwargs: {root: '{workflow_dir}/src', n: 3}\n"
        "  - name: b\n"
        "    shell: echo {greeting}\n"
        "    depends_on: a\n"
        "    retry: {max_attempts: 2}\n"
        "  - name: c\n"
        "    agent: review {workflow_dir}\n"
        "    files: [x.py]\n"
        "    depends_on: [a, b]\n"
    )
    body = load(path, {"workflow_dir": "/w", "greeting": "hi"})
    assert body["name"] == "demo" and body["failure_policy"] == "continue"
    a, b, c = body["tasks"]
    assert a["executor"] == {"kind": "python", "target": "pkg.mod:fn",
                             "kwargs": {"root": "/w/src", "n": 3}}  # fmt: skip
    assert b["executor"] == {"kind": "shell", "argv": ["sh", "-c", "echo hi"]}
    assert b["depends_on"] == ["a"] and b["retry"] == {"max_attempts": 2}
    assert c["executor"] == {"kind": "agent", "prompt": "review /w", "files": ["x.py"]}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tasks: [", "not valid YAML"),
        ("name: x\n", "list of `tasks`"),
        ("tasks:\n  - name: a\n", "exactly one of executor"),
        ("tasks:\n  - name: a\n    shell: x\n    python: y\n", "exactly one of executor"),
        ("tasks: []\nbogus: 1\n", "unknown top-level keys ['bogus']"),
    ],
)
def test_bad_workflow_files_are_refused_with_the_reason(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InvalidError) as refused:
        load(path, {})
    assert message in refused.value.message


def test_leaf_results_are_the_results_nothing_depends_on() -> None:
    wf = {"nodes": [
        {"name": "a", "task_id": "A", "depends_on": [], "result": 1},
        {"name": "b", "task_id": "B", "depends_on": ["A"], "result": 2},
        {"name": "c", "task_id": "C", "depends_on": ["A"], "result": 3},
    ]}  # fmt: skip
    assert leaf_results(wf) == {"b": 2, "c": 3}


@pytest.mark.slow
def test_pantheon_run_security_audit_on_an_embedded_node_writes_the_report(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "state"
    done = run("run", "examples/security-audit.yaml", "--json", data_dir=data_dir, timeout=180)
    final = json.loads(done.stdout)
    assert final["status"] == "completed" and final["counts"] == {"completed": 6}
    report = {n["name"]: n for n in final["nodes"]}["report"]["result"]
    path = Path(report["report"])
    assert path == (data_dir / "reports" / "security-audit.md").resolve()
    text = path.read_text()
    assert text.startswith("# Security audit")
    analyzed = {n["name"]: n for n in final["nodes"]}["analyze"]["result"]
    assert f"**{analyzed['total']} findings**" in text
    assert analyzed["files"] > 50  # it read the real tree: the package, projections, tools, tests
    assert "no running `pantheon up`" in done.stderr  # it started and stopped its own node
    assert not (data_dir / "pantheon.json").exists()

    # With the node gone, the read-only tools still read its log from the data dir.
    before = json.loads(run("events", "--json", data_dir=data_dir).stdout)
    audited = run("audit", final["id"], "--format", "json", data_dir=data_dir, timeout=60)
    assert "reading its log through a nats-server started for this command" in audited.stderr
    doc = json.loads(audited.stdout)
    assert doc["kind"] == "workflow" and len(doc["tasks"]) == 6
    assert all(t["attempts"][-1]["outcome"] == "completed" for t in doc["tasks"])
    checked = run("verify", "--json", data_dir=data_dir, timeout=60)
    assert json.loads(checked.stdout)["ok"] is True
    after = json.loads(run("events", "--json", data_dir=data_dir).stdout)
    assert after == before  # nothing appended
    assert "WorkflowFinished" in {e["type"] for e in before}
    assert not (data_dir / "pantheon.json").exists()


def test_pantheon_run_refuses_a_cycle_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text(
        "tasks:\n"
        "  - {name: a, shell: 'true', depends_on: [b]}\n"
        "  - {name: b, shell: 'true', depends_on: [a]}\n"
    )
    done = run("run", str(path), data_dir=tmp_path / "state", check=False, timeout=120)
    assert done.returncode == 1
    assert "invalid" in done.stderr and "a -> b -> a" in done.stderr
