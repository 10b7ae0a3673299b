"""The wire contract as an AsyncAPI 3.0 document, generated from the models.

``pantheon schema --asyncapi`` prints :func:`export_asyncapi`. Nothing in it is
written by hand: request, reply, event and work-offer payloads are the JSON
Schemas of the pydantic models (lifted once into ``components/schemas`` and
referenced with ``$ref``), the state bucket's values are derived from the read
models' table declarations, and the subjects come from :class:`Subjects`.

The document describes the Pantheon-ES *service*: it receives commands and
queries (and replies), and sends events, notices, state and work offers. A
client does the opposite of each operation (docs/other-languages.md).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

import pantheon_es
from pantheon_es import aggregates
from pantheon_es.errors import ErrorCode
from pantheon_es.schema import ErrorReply, OkReply, WhyTask, WorkOffer, WorkOffers, WorkStop
from pantheon_es.subjects import Subjects, check_token

if TYPE_CHECKING:
    from projections.base import Table

ASYNCAPI_VERSION = "3.0.0"
NATS_BINDING_VERSION = "0.1.0"
COMMAND_QUEUE = "pantheon-cmd"  # pantheon_es.service.QUEUE_GROUP (kept import-light)
QUERY_QUEUE = "pantheon-query"  # projections.query.QUEUE_GROUP
SCHEDULER_QUEUE = "pantheon-scheduler"  # pantheon_es.node

_SCHEMAS = "#/components/schemas/"
_MESSAGES = "#/components/messages/"
_PARAMETERS = "#/components/parameters/"
_SQL_TYPES = {"TEXT": "string", "INTEGER": "integer", "REAL": "number"}
_COLUMN = re.compile(r"^\s*(\w+)\s+(TEXT|INTEGER|REAL|BLOB)\b(.*)$", re.IGNORECASE | re.MULTILINE)

_PARAMETER_DOCS = {
    "tenant": "Tenant: a subject-safe token (1-128 letters, digits, '_' or '-'); 'default' "
    "unless the deployment uses others. The tenant of a command comes from here, never "
    "from the body.",
    "id": "Id of one aggregate instance or entity (time-sortable, subject-safe).",
    "worker_id": "Id of the worker the offer is for.",
}


class _UniqueDict(dict[str, Any]):
    """A dict that refuses to overwrite a key: two models of one name would shadow each other."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self:
            raise TypeError(f"two {self.kind}s named {key!r} in the AsyncAPI document")
        super().__setitem__(key, value)


def _ref(target: str) -> dict[str, str]:
    return {"$ref": target}


def _to_asyncapi_schema(node: Any) -> Any:
    """Adapt pydantic's JSON Schema (2020-12) to the AsyncAPI Schema Object (draft-07 based).

    ``discriminator`` is a property name there (OpenAPI's mapping form is not allowed), and
    tuples use the draft-07 array form of ``items`` instead of ``prefixItems``.
    """
    if isinstance(node, list):
        return [_to_asyncapi_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_asyncapi_schema(v) for k, v in node.items()}
    disc = out.get("discriminator")
    if isinstance(disc, dict):
        out["discriminator"] = disc["propertyName"]
    if "prefixItems" in out:
        out["items"] = out.pop("prefixItems")
    return out


def _model_schemas(
    models: list[tuple[type[BaseModel], JsonSchemaMode]],
) -> tuple[dict[type[BaseModel], str], dict[str, Any]]:
    """JSON Schemas of ``models`` as one set of components: (model -> name, name -> schema)."""
    keys, top = models_json_schema(models, ref_template=_SCHEMAS + "{model}")
    names = {model: keys[(model, mode)]["$ref"].removeprefix(_SCHEMAS) for model, mode in models}
    return names, _to_asyncapi_schema(top.get("$defs", {}))


def _row_schema(table: Table, model: str) -> dict[str, Any]:
    """The JSON Schema of one read-model row (a KV value), from its table declaration."""
    declared = {m.group(1): (m.group(2).upper(), m.group(3)) for m in _COLUMN.finditer(table.ddl)}
    properties: dict[str, Any] = {}
    required = []
    for column in table.columns:
        sql_type, rest = declared.get(column, ("", ""))
        not_null = "NOT NULL" in rest.upper()
        if column in table.json_columns:
            prop: dict[str, Any] = {"description": "Any JSON value (a JSON column)."}
        else:
            json_type = _SQL_TYPES.get(sql_type, "string")
            prop = {"type": json_type if not_null else [json_type, "null"]}
        properties[column] = prop
        if not_null:
            required.append(column)
    return {
        "title": f"{model} state",
        "description": f"Current state of one {model}: its row in the read model table "
        f"{table.name!r}, as JSON.",
        "type": "object",
        "properties": properties,
        "required": required,
    }


def _message(
    name: str,
    schema: str,
    summary: str,
    *,
    headers: dict[str, Any] | None = None,
    content_type: str | None = None,
) -> dict[str, Any]:
    msg: dict[str, Any] = {"name": name, "title": name, "summary": summary}
    if content_type:
        msg["contentType"] = content_type
    if headers is not None:
        msg["headers"] = headers
    msg["payload"] = _ref(_SCHEMAS + schema)
    return msg


def _summary(cls: type) -> str:
    return (cls.__doc__ or cls.__name__).strip().splitlines()[0]


def _channel(
    address: str, messages: list[str], description: str, params: list[str]
) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "address": address,
        "description": description,
        "messages": {m: _ref(_MESSAGES + m) for m in messages},
    }
    if params:
        channel["parameters"] = {p: _ref(_PARAMETERS + p) for p in params}
    return channel


def _operation(
    action: str,
    channel: str,
    messages: list[str],
    summary: str,
    *,
    reply: bool = False,
    queue: str | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "action": action,
        "channel": _ref(f"#/channels/{channel}"),
        "summary": summary,
        "messages": [_ref(f"#/channels/{channel}/messages/{m}") for m in messages],
    }
    if reply:
        op["reply"] = {
            "channel": _ref("#/channels/reply"),
            "messages": [
                _ref("#/channels/reply/messages/OkReply"),
                _ref("#/channels/reply/messages/ErrorReply"),
            ],
        }
    if queue:
        op["bindings"] = {"nats": {"queue": queue, "bindingVersion": NATS_BINDING_VERSION}}
    return op


def _servers(nats_url: str | None) -> dict[str, Any]:
    """``servers`` from a NATS URL list (``nats://h1:4222,nats://h2:4222``)."""
    if not nats_url:
        return {
            "local": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "A NATS server with JetStream (`pantheon up` prints its URL).",
            }
        }
    servers = {}
    for i, url in enumerate(u.strip() for u in nats_url.split(",") if u.strip()):
        scheme, sep, rest = url.partition("://")
        host = rest if sep else url
        host = host.rsplit("@", 1)[-1].rstrip("/")  # never copy credentials into a document
        servers[f"nats-{i}"] = {
            "host": host,
            "protocol": "nats",
            "description": f"NATS server{' (TLS)' if scheme == 'tls' else ''}.",
        }
    return servers


def export_asyncapi(
    subjects: Subjects | None = None, *, nats_url: str | None = None, tenant: str = "default"
) -> dict[str, Any]:
    """The whole wire contract as one AsyncAPI 3.0.0 document (a JSON-able dict).

    Args:
        subjects: the namespace (subject root) to describe; the default root ``pantheon``.
        nats_url: server URL(s) for ``servers``; a local placeholder when ``None``.
        tenant: the default value of every ``{tenant}`` parameter.

    Raises:
        ValueError: ``tenant`` is not a subject-safe token.
    """
    check_token("tenant", tenant)
    from projections.projector import default_models  # the read side's tables and KV models
    from projections.query import QUERIES

    s = subjects or Subjects()
    root = s.root
    commands = sorted(aggregates.COMMANDS.items())
    queries = sorted(QUERIES.items())
    event_names = aggregates.REGISTRY.names()
    envelopes = [aggregates.REGISTRY.envelope_class(n) for n in event_names]

    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        *((cls, "validation") for _, cls in commands),
        *((body, "validation") for _, (body, _fn) in queries),
        *((env, "serialization") for env in envelopes),
        (WhyTask, "validation"),
        *((cls, "serialization") for cls in (OkReply, ErrorReply, WorkOffer, WorkOffers, WorkStop)),
    ]
    names, schemas = _model_schemas(models)
    # The envelope's constant fields, from the registry: a reader can dispatch on "type".
    for name, env in zip(event_names, envelopes, strict=True):
        data_cls = aggregates.REGISTRY.data_class(name)
        props = schemas[names[env]]["properties"]
        props["type"] = {**props["type"], "const": name}
        props["aggregate"] = {**props["aggregate"], "const": data_cls.aggregate}
        props["schema_version"] = {**props["schema_version"], "const": data_cls.schema_version}

    messages = _UniqueDict("message")
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    # -- replies (one channel: the requester's reply subject) --------------------------------------
    for reply in (OkReply, ErrorReply):
        messages[reply.__name__] = _message(reply.__name__, names[reply], _summary(reply))
    channels["reply"] = {
        "address": None,
        "description": "The reply subject of the request (a NATS inbox the requester "
        "chose). Every command and query gets exactly one reply: "
        '{"ok": true, "result": {...}} or {"ok": false, "error": {"code", "message", '
        '"details", "retry_after"}}; error codes are the closed set ' + ", ".join(ErrorCode) + ".",
        "messages": {m: _ref(_MESSAGES + m) for m in ("OkReply", "ErrorReply")},
    }

    def request_reply(
        key: str, address: str, model: type[BaseModel], about: str, queue: str
    ) -> None:
        """A request/reply subject: its channel, request message and receive operation."""
        name = model.__name__
        messages[name] = _message(name, names[model], _summary(model))
        channels[key] = _channel(address, [name], about, ["tenant"])
        operations[key] = _operation(
            "receive", key, [name], _summary(model), reply=True, queue=queue
        )

    # -- commands and queries -----------------------------------------------------------------
    for (aggregate, verb), cls in commands:
        request_reply(
            f"cmd-{aggregate}-{verb}",
            f"{root}.cmd.{{tenant}}.{aggregate}.{verb}",
            cls,
            f"Command {cls.__name__}: core NATS request/reply with a JSON body "
            f"(at most 1 MiB). {_summary(cls)}",
            COMMAND_QUEUE,
        )
    for (model, verb), (body, _fn) in queries:
        request_reply(
            f"q-{model}-{verb}",
            f"{root}.q.{{tenant}}.{model}.{verb}",
            body,
            f"Read-model query {model}.{verb}: request/reply (at most 64 KiB). It waits "
            "until the read models have applied the stream's last sequence (or min_seq).",
            QUERY_QUEUE,
        )
    request_reply(
        "sched-why",
        f"{root}.sched.{{tenant}}.why",
        WhyTask,
        "The scheduler's live view of one task: state ready/parked/placed, reason, "
        "effective_priority, ahead_in_group, reserved_worker, not_before. Answered by the "
        "active scheduler from memory, not by the read models.",
        SCHEDULER_QUEUE,
    )

    # -- events ----------------------------------------------------------------------------------
    event_headers = {
        "type": "object",
        "properties": {
            "Nats-Msg-Id": {"type": "string", "description": "The event_id."},
            "Nats-Sequence": {
                "type": "string",
                "description": "Stream sequence (on the republished notice only).",
            },
            "Nats-Subject": {
                "type": "string",
                "description": "The event's stream subject (on the notice only).",
            },
        },
        "required": ["Nats-Msg-Id"],
    }
    by_aggregate: dict[str, list[str]] = {}
    for name, env in zip(event_names, envelopes, strict=True):
        data_cls = aggregates.REGISTRY.data_class(name)
        by_aggregate.setdefault(data_cls.aggregate, []).append(name)
        messages[name] = _message(name, names[env], _summary(data_cls), headers=dict(event_headers))
    for aggregate, types in sorted(by_aggregate.items()):
        channels[f"ev-{aggregate}"] = _channel(
            f"{root}.ev.{{tenant}}.{aggregate}.{{id}}",
            types,
            f"Events of one {aggregate}, stored in the JetStream stream {s.stream} "
            f"(subjects {s.all_events}), one subject per aggregate instance, in order. "
            "Read with any JetStream consumer: filter "
            f"{root}.ev.<tenant>.> for a tenant, {root}.ev.*.{aggregate}.* for every "
            f"{aggregate}, {root}.ev.<tenant>.{aggregate}.<id> for one; deliver from any "
            "sequence or start time. The events of one decision are stored contiguously "
            "(one atomic batch). Old schema versions are upcast on read by Pantheon-ES "
            "readers; a reader in another language checks schema_version.",
            ["tenant", "id"],
        )
        operations[f"ev-{aggregate}"] = _operation(
            "send", f"ev-{aggregate}", types, f"Append the events of one {aggregate}."
        )
        channels[f"changed-{aggregate}"] = _channel(
            f"{root}.changed.{{tenant}}.{aggregate}.{{id}}",
            types,
            f"Notice of a committed {aggregate} event: the stream republishes each stored "
            "event on core NATS (live only, at most once; headers Nats-Sequence and "
            "Nats-Subject). Subscribe, read the state once, then wait for a notice.",
            ["tenant", "id"],
        )
        operations[f"changed-{aggregate}"] = _operation(
            "send", f"changed-{aggregate}", types, f"Republish each stored {aggregate} event."
        )

    # -- the state bucket --------------------------------------------------------------------------
    schemas["StateDeleted"] = {
        "title": "state deleted",
        "description": "Empty body: the entity was removed (e.g. an archived agent).",
        "type": "string",
        "maxLength": 0,
    }
    messages["StateDeleted"] = _message(
        "StateDeleted",
        "StateDeleted",
        "The entity's key was deleted or purged.",
        headers={
            "type": "object",
            "properties": {"KV-Operation": {"type": "string", "enum": ["DEL", "PURGE"]}},
            "required": ["KV-Operation"],
        },
        content_type="application/octet-stream",
    )
    for read_model in default_models():
        for table, model in read_model.kv_tables():
            schema_name = f"{model.capitalize()}State"
            schemas[schema_name] = _row_schema(table, model)
            messages[schema_name] = _message(
                schema_name, schema_name, f"The current state of one {model}."
            )
            key = f"state-{model}"
            channels[key] = _channel(
                f"$KV.{s.state_bucket}.{{tenant}}.{model}.{{id}}",
                [schema_name, "StateDeleted"],
                f"JetStream KV bucket {s.state_bucket!r}, key <tenant>.{model}.<id>: the "
                f"current state of every {model}, written by the projector after each "
                "committed batch (history 1: only the latest value is kept). A KV watch "
                f"of '<tenant>.{model}.>' gives every current value, then each change, in "
                "order per entity; a get reads one. Derived state: it may trail the event "
                "log by one batch, never leads it.",
                ["tenant", "id"],
            )
            operations[key] = _operation(
                "send",
                key,
                [schema_name, "StateDeleted"],
                f"Put the current state of a {model} into the KV bucket.",
            )

    # -- work offers -------------------------------------------------------------------------------
    for work in (WorkOffer, WorkOffers, WorkStop):
        messages[work.__name__] = _message(work.__name__, names[work], _summary(work))
    channels["work"] = _channel(
        f"{root}.work.{{tenant}}.{{worker_id}}",
        ["WorkOffer", "WorkOffers", "WorkStop"],
        "Work offers from the scheduler to one worker (core NATS). A worker in another "
        "language registers (worker.register), subscribes here, and reports with the "
        "lease commands (task.start, task.heartbeat, task.complete, task.fail, ...) "
        "carrying lease_id and fencing_token.",
        ["tenant", "worker_id"],
    )
    operations["work"] = _operation(
        "send",
        "work",
        ["WorkOffer", "WorkOffers", "WorkStop"],
        "Offer a granted lease (or several) to a worker.",
    )

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Pantheon-ES",
            "version": pantheon_es.__version__,
            "description": "Event-sourced orchestration of AI agents and tasks on NATS "
            "JetStream. This document describes the Pantheon-ES service: it receives "
            "commands and queries (request/reply) and sends events, committed-event "
            "notices, current state (KV) and work offers; a client does the opposite. "
            "Generated from the models by `pantheon schema --asyncapi`.",
        },
        "defaultContentType": "application/json",
        "servers": _servers(nats_url),
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "messages": dict(sorted(messages.items())),
            "parameters": {
                k: {"description": v, **({"default": tenant} if k == "tenant" else {})}
                for k, v in _PARAMETER_DOCS.items()
            },
        },
    }
