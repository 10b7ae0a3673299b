"""Workflow files (YAML or JSON) for ``pantheon run``, and the live progress display.

A file holds ``name``, ``failure_policy`` (``fail_fast`` | ``continue``),
``labels`` and ``tasks``: each task has a ``name``, ``depends_on`` and an
executor, written in full (``executor: {kind: python, target: ..., kwargs:
...}``) or short: ``python: pkg.mod:func`` (with ``kwargs:``), ``shell:`` (an
argv list, or a string run by ``sh -c``) or ``agent:`` (a prompt). Every other
task field (priority, resources, retry, timeouts, concurrency and fairness
keys) is as in ``SubmitTask``.

Strings may use ``{workflow_dir}`` (the file's directory), ``{cwd}``,
``{data_dir}`` and ``--var NAME=VALUE`` values; they are replaced before the
workflow is sent, so workers get absolute paths.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import yaml
from rich.console import Group
from rich.padding import Padding
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from pantheon_es.errors import InvalidError

SHORT_FORMS = ("python", "shell", "agent")


def read_document(path: Path) -> Any:
    """A JSON (``.json``) or else YAML file, parsed; ``invalid`` if it cannot be read."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidError(f"cannot read {path}: {exc}") from None
    try:
        return orjson.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, orjson.JSONDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise InvalidError(f"{path} is not valid {kind}: {exc}") from None


def load(path: Path, variables: Mapping[str, str]) -> dict[str, Any]:
    """The CreateWorkflow body a workflow file describes; ``invalid`` if it cannot be read."""
    raw = read_document(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list):
        raise InvalidError(f"{path}: expected a mapping with a list of `tasks`")
    raw = _substitute(raw, variables)
    body: dict[str, Any] = {
        "name": raw.get("name") or path.stem,
        "failure_policy": raw.get("failure_policy", "fail_fast"),
        "tasks": [_task(t, i) for i, t in enumerate(raw["tasks"])],
    }
    if raw.get("labels"):
        body["labels"] = raw["labels"]
    unknown = set(raw) - {"name", "failure_policy", "tasks", "labels", "description"}
    if unknown:
        raise InvalidError(f"{path}: unknown top-level keys {sorted(unknown)}")
    return body


def _substitute(value: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        for name, replacement in variables.items():
            value = value.replace("{" + name + "}", replacement)
        return value
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    return value


def _task(raw: Any, index: int) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidError(f"task #{index + 1} is not a mapping")
    task = dict(raw)
    forms = [k for k in SHORT_FORMS if k in task]
    if len(forms) + ("executor" in task) != 1:
        raise InvalidError(
            f"task {task.get('name', index + 1)!r}: give exactly one of executor, python, shell, "
            "agent"
        )
    if forms:
        kind = forms[0]
        value = task.pop(kind)
        if kind == "python":
            task["executor"] = {"kind": "python", "target": value, "kwargs": task.pop("kwargs", {})}
        elif kind == "shell":
            argv = ["sh", "-c", value] if isinstance(value, str) else value
            task["executor"] = {"kind": "shell", "argv": argv}
            for key in ("env", "cwd"):
                if key in task:
                    task["executor"][key] = task.pop(key)
        else:
            task["executor"] = {"kind": "agent", "prompt": value}
            for key in ("files", "delegates", "template"):
                if key in task:
                    task["executor"][key] = task.pop(key)
    if isinstance(task.get("depends_on"), str):
        task["depends_on"] = [task["depends_on"]]
    return task


# -- live display -----------------------------------------------------------------------------

STYLE = {
    "completed": "green",
    "failed": "red",
    "timed_out": "red",
    "cancelled": "yellow",
    "skipped": "yellow",
    "running": "cyan",
    "leased": "cyan",
    "pending": "dim",
    "not_created": "dim",
}


def progress_view(wf: dict[str, Any], started: float, max_rows: int = 20) -> Group:
    """The workflow's progress: a bar, counts, and the nodes that are running or ended last."""
    nodes = wf.get("nodes") or []
    total = int(wf.get("total") or len(nodes) or 1)
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n["status"]] = counts.get(n["status"], 0) + 1
    finished = sum(counts.get(s, 0) for s in ("completed", "failed", "timed_out", "cancelled",
                                                "skipped"))  # fmt: skip
    head = Text.assemble(
        (f"{wf['name']} ", "bold"),
        (f"{wf['status']}  ", STYLE.get(wf["status"], "bold")),
        f"{finished}/{total} done  ",
        "  ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        f"  {time.monotonic() - started:.1f}s",
        (f"  redriven {wf['redrives']}x" if wf.get("redrives") else "", "dim"),
    )
    table = Table("TASK", "STATUS", "ATTEMPT", "PROGRESS", box=None, pad_edge=False)
    active = [n for n in nodes if n["status"] in ("running", "leased")]
    ended = sorted(
        (n for n in nodes if n.get("finished_at")), key=lambda n: n["finished_at"], reverse=True
    )
    waiting = [n for n in nodes if n["status"] in ("pending", "not_created")]
    for n in [*active, *ended, *waiting][:max_rows]:
        message = n.get("progress_message") or ""
        if n.get("error") and n["status"] != "completed":
            message = f"{n['error'].get('type')}: {n['error'].get('message', '')}"
        table.add_row(
            n["name"],
            Text(n["status"], style=STYLE.get(n["status"], "")),
            str(n.get("attempt") or ""),
            message[:80],
        )
    if len(nodes) > max_rows:
        table.add_row(f"... {len(nodes) - max_rows} more", "", "", "")
    bar = Padding(ProgressBar(total=total, completed=finished, width=60), (0, 0))  # own line
    return Group(head, bar, table)


def leaf_results(wf: dict[str, Any]) -> dict[str, Any]:
    """Results of the nodes nothing depends on (what a workflow produced)."""
    nodes = wf.get("nodes") or []
    needed = {d for n in nodes for d in n.get("depends_on", [])}
    return {n["name"]: n.get("result") for n in nodes if n["task_id"] not in needed}
