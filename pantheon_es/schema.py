"""JSON Schema of every command, query, event and reply, generated from the models.

``pantheon schema`` prints :func:`export`; a client in any language can
validate what it publishes and what it reads against it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pantheon_es import aggregates
from pantheon_es.errors import ErrorCode
from pantheon_es.specs import ExecutorSpec
from pantheon_es.subjects import Subjects
from pantheon_es.tasks import TaskId


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: ErrorCode
    message: str
    details: Any = None
    retry_after: float | None = Field(None, description="Seconds to wait before retrying.")


class OkReply(BaseModel):
    """Reply to a command or query that succeeded."""

    model_config = ConfigDict(extra="forbid")
    ok: Literal[True]
    result: dict[str, Any]


class ErrorReply(BaseModel):
    """Reply to a command or query that failed; nothing was appended."""

    model_config = ConfigDict(extra="forbid")
    ok: Literal[False]
    error: ErrorBody


class WorkOffer(BaseModel):
    """A lease offered to a worker; sent after the LeaseGranted event is stored.

    The scheduler builds it as a dict; this model is its contract (the JS client test
    validates the offers a real scheduler sends against it).
    """

    model_config = ConfigDict(extra="forbid")
    type: Literal["offer"]
    tenant: str = Field(description="The task's tenant: the worker reports there.")
    task_id: str
    lease_id: str
    fencing_token: int = Field(ge=1, description="Carry it on every report of this lease.")
    attempt: int = Field(ge=1)
    ttl: float = Field(gt=0, description="Lease time to live in seconds; renew by heartbeat.")
    name: str
    executor: ExecutorSpec
    labels: dict[str, str]
    inputs: dict[str, Any] | None = Field(
        None, description="A workflow task's dependencies' results, by node name."
    )


class WorkOffers(BaseModel):
    """Several offers for one worker decided together, sent only to a worker that
    registered with ``offer_batches``; each is taken as if it had come alone."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["offers"]
    offers: list[WorkOffer] = Field(min_length=2)


class WorkStop(BaseModel):
    """Stop a running task: it was cancelled, timed out or ran past its start-to-close timeout."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["stop"]
    task_id: str
    lease_id: str
    reason: str


class WhyTask(BaseModel):
    """Ask the scheduler's live view of one task (placement state, reason, timers)."""

    model_config = ConfigDict(extra="forbid")
    task_id: TaskId


def export(subjects: Subjects | None = None) -> dict[str, Any]:
    """The whole contract as one JSON document."""
    from projections.query import QUERIES  # the read side registers its queries there

    s = subjects or Subjects()
    commands = {
        f"{aggregate}.{verb}": {
            "name": cls.__name__,
            "subject": s.command("TENANT", aggregate, verb).replace("TENANT", "{tenant}"),
            "request": cls.model_json_schema(),
            "description": (cls.__doc__ or "").strip(),
        }
        for (aggregate, verb), cls in sorted(aggregates.COMMANDS.items())
    }
    queries = {
        f"{model}.{verb}": {
            "name": body.__name__,
            "subject": s.query("TENANT", model, verb).replace("TENANT", "{tenant}"),
            "request": body.model_json_schema(),
        }
        for (model, verb), (body, _fn) in sorted(QUERIES.items())
    }
    events = {}
    for name in aggregates.REGISTRY.names():
        data_cls = aggregates.REGISTRY.data_class(name)
        envelope = aggregates.REGISTRY.envelope_class(name)
        events[name] = {
            "aggregate": data_cls.aggregate,
            "schema_version": data_cls.schema_version,
            "subject": f"{s.root}.ev.{{tenant}}.{data_cls.aggregate}.{{id}}",
            "schema": envelope.model_json_schema(),
        }
    return {
        "title": "Pantheon-ES contract",
        "stream": s.stream,
        "state_bucket": {"bucket": s.state_bucket, "key": "{tenant}.{model}.{id}"},
        "commands": commands,
        "queries": queries,
        "events": events,
        "replies": {"ok": OkReply.model_json_schema(), "error": ErrorReply.model_json_schema()},
        "error_codes": [c.value for c in ErrorCode],
    }
