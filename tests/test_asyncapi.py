"""The AsyncAPI document: its structure, checked without a server.

(Its validity against the AsyncAPI 3.0 specification is checked by the official
JS parser in tests/test_js_client.py.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from pantheon_es import aggregates
from pantheon_es.asyncapi import export_asyncapi
from pantheon_es.errors import ErrorCode
from pantheon_es.subjects import Subjects
from projections.query import QUERIES
from projections.tasks import TASKS
from tests.conftest import Cluster, python
from tests.test_cli import run


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return export_asyncapi()


def refs(node: Any, path: str = "#") -> Iterator[tuple[str, str]]:
    """(where, target) of every ``$ref`` in ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield path, value
            else:
                yield from refs(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from refs(value, f"{path}/{i}")


def resolve(doc: dict[str, Any], pointer: str) -> Any:
    assert pointer.startswith("#/"), pointer
    node: Any = doc
    for part in pointer[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{pointer}: no {part!r}"
        node = node[part]
    return node


def payload_schema(doc: dict[str, Any], message_ref: dict[str, str]) -> str:
    """The components/schemas name of a channel message's payload."""
    message = resolve(doc, message_ref["$ref"])
    while "$ref" in message:  # an operation refers to a channel message, which refers on
        message = resolve(doc, message["$ref"])
    return str(message["payload"]["$ref"]).removeprefix("#/components/schemas/")


def test_asyncapi_every_ref_resolves_and_schemas_are_shared_not_copied(
    doc: dict[str, Any],
) -> None:
    found = list(refs(doc))
    assert len(found) > 200
    for where, target in found:
        assert resolve(doc, target) is not None, where
    # no pydantic-local "$defs" left anywhere: every shared schema lives in components
    assert "$defs" not in json.dumps(doc)
    schema_refs = {t for _, t in found if t.startswith("#/components/schemas/")}
    assert "#/components/schemas/ShellSpec" in schema_refs  # nested models are referenced


def test_asyncapi_has_every_command_with_request_and_reply(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == "3.0.0"
    assert aggregates.COMMANDS
    for (aggregate, verb), cls in aggregates.COMMANDS.items():
        key = f"cmd-{aggregate}-{verb}"
        channel = doc["channels"][key]
        assert channel["address"] == f"pantheon.cmd.{{tenant}}.{aggregate}.{verb}"
        assert set(channel["parameters"]) == {"tenant"}
        assert payload_schema(doc, channel["messages"][cls.__name__]) == cls.__name__
        assert doc["components"]["schemas"][cls.__name__]["properties"].keys() == (
            cls.model_json_schema()["properties"].keys()
        )
        op = doc["operations"][key]
        assert op["action"] == "receive" and op["channel"] == {"$ref": f"#/channels/{key}"}
        replies = [payload_schema(doc, m) for m in op["reply"]["messages"]]
        assert replies == ["OkReply", "ErrorReply"]
        assert op["bindings"]["nats"]["queue"] == "pantheon-cmd"


def test_asyncapi_has_every_query(doc: dict[str, Any]) -> None:
    assert QUERIES
    for (model, verb), (body, _fn) in QUERIES.items():
        channel = doc["channels"][f"q-{model}-{verb}"]
        assert channel["address"] == f"pantheon.q.{{tenant}}.{model}.{verb}"
        assert payload_schema(doc, channel["messages"][body.__name__]) == body.__name__
        assert doc["operations"][f"q-{model}-{verb}"]["reply"]


def test_asyncapi_error_reply_carries_the_closed_set_of_codes(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    error_ref = schemas["ErrorReply"]["properties"]["error"]["$ref"]
    body = resolve(doc, error_ref)
    codes = resolve(doc, body["properties"]["code"]["$ref"])
    assert set(codes["enum"]) == {c.value for c in ErrorCode}
    assert schemas["OkReply"]["properties"]["ok"]["const"] is True
    assert schemas["ErrorReply"]["properties"]["ok"]["const"] is False


def test_asyncapi_has_every_event_type_on_its_aggregate_subject(doc: dict[str, Any]) -> None:
    names = aggregates.REGISTRY.names()
    assert "TaskSubmitted" in names and "LeaseGranted" in names
    for name in names:
        data_cls = aggregates.REGISTRY.data_class(name)
        channel = doc["channels"][f"ev-{data_cls.aggregate}"]
        assert channel["address"] == f"pantheon.ev.{{tenant}}.{data_cls.aggregate}.{{id}}"
        envelope = doc["components"]["schemas"][payload_schema(doc, channel["messages"][name])]
        props = envelope["properties"]
        assert props["type"]["const"] == name
        assert props["aggregate"]["const"] == data_cls.aggregate
        assert props["schema_version"]["const"] == data_cls.schema_version
        # the typed data is the event type's own schema, by reference
        data = resolve(doc, props["data"]["$ref"])
        assert set(data.get("properties", {})) == set(data_cls.model_fields)
        message = resolve(doc, channel["messages"][name]["$ref"])
        assert message["headers"]["required"] == ["Nats-Msg-Id"]
        assert name in doc["channels"][f"changed-{data_cls.aggregate}"]["messages"]


def test_asyncapi_state_bucket_values_follow_the_read_model_tables(doc: dict[str, Any]) -> None:
    channel = doc["channels"]["state-task"]
    assert channel["address"] == "$KV.pantheon-state.{tenant}.task.{id}"
    assert set(channel["messages"]) == {"TaskState", "StateDeleted"}
    state = doc["components"]["schemas"]["TaskState"]
    assert list(state["properties"]) == list(TASKS.columns)
    assert state["properties"]["status"] == {"type": "string"}  # TEXT NOT NULL
    assert state["properties"]["priority"] == {"type": "integer"}  # INTEGER NOT NULL
    assert "type" not in state["properties"]["result"]  # a JSON column: any value
    assert "status" in state["required"] and "result" not in state["required"]
    assert {"state-worker", "state-workflow"} <= set(doc["channels"])
    work = doc["channels"]["work"]
    assert work["address"] == "pantheon.work.{tenant}.{worker_id}"
    assert set(work["messages"]) == {"WorkOffer", "WorkOffers", "WorkStop"}


def test_asyncapi_operations_send_only_messages_of_their_own_channel(
    doc: dict[str, Any],
) -> None:
    for key, op in doc["operations"].items():
        channel_ref = op["channel"]["$ref"]
        for message in op["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), key


def test_asyncapi_follows_namespace_tenant_and_server() -> None:
    doc = export_asyncapi(Subjects("acme"), nats_url="nats://user:pw@h1:4222,h2:4223", tenant="t1")
    assert doc["channels"]["cmd-task-submit"]["address"] == "acme.cmd.{tenant}.task.submit"
    assert doc["channels"]["state-task"]["address"] == "$KV.acme-state.{tenant}.task.{id}"
    assert doc["components"]["parameters"]["tenant"]["default"] == "t1"
    assert [s["host"] for s in doc["servers"].values()] == ["h1:4222", "h2:4223"]
    assert "pw" not in json.dumps(doc["servers"])
    with pytest.raises(ValueError, match="not subject-safe"):
        export_asyncapi(tenant="a.b")


def test_cli_schema_asyncapi_writes_the_document(tmp_path: Path) -> None:
    out = tmp_path / "asyncapi.json"
    # --data-dir: no `pantheon up` there, so no server is discovered into the document
    options = ("--data-dir", str(tmp_path))
    run("schema", "--asyncapi", "--out", str(out), "--tenant", "acme", *options, data_dir=tmp_path)
    written = json.loads(out.read_text())
    assert written == export_asyncapi(tenant="acme")
    printed = json.loads(run("schema", "--asyncapi", *options, data_dir=tmp_path).stdout)
    assert printed["asyncapi"] == "3.0.0" and "cmd-task-submit" in printed["channels"]


def test_cli_schema_asyncapi_with_bad_tenant_is_bad_usage(tmp_path: Path) -> None:
    result = run("schema", "--asyncapi", "--tenant", "a.b", data_dir=tmp_path, check=False)
    assert result.returncode == 2
    assert "not subject-safe" in result.stderr
    assert result.stdout == ""


def test_asyncapi_has_the_scheduler_question(doc: dict[str, Any]) -> None:
    channel = doc["channels"]["sched-why"]
    assert channel["address"] == "pantheon.sched.{tenant}.why"
    assert payload_schema(doc, channel["messages"]["WhyTask"]) == "WhyTask"
    assert doc["operations"]["sched-why"]["bindings"]["nats"]["queue"] == "pantheon-scheduler"


async def test_scheduler_question_is_validated_by_its_contract_model(cluster: Cluster) -> None:
    assert cluster.node.nc is not None
    subject = cluster.node.subjects.scheduler("default", "why")
    reply = orjson.loads((await cluster.node.nc.request(subject, b'{"task_id": "x"}', 5)).data)
    assert reply["ok"] is False and reply["error"]["code"] == "invalid"
    assert reply["error"]["message"].startswith("WhyTask is not valid: task_id")
    task_id = (await cluster.client.submit_task("n", python("noop")))["task_id"]
    reply = orjson.loads(
        (await cluster.node.nc.request(subject, orjson.dumps({"task_id": task_id}), 5)).data
    )
    assert reply["ok"] is True and "state" in reply["result"]
