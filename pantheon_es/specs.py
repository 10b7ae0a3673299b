"""Value types shared by commands, events and read models.

Priority, resource requests, labels and executor specs are data: they are
validated here once, travel in commands and events unchanged, and the read
models store them as JSON.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from pantheon_es.subjects import is_token

# -- priority ------------------------------------------------------------------

#: Named priority levels and their place on the numeric scale 0..1000.
PRIORITY_LEVELS: Final[dict[str, int]] = {"low": 100, "medium": 200, "high": 300, "urgent": 400}
PRIORITY_MAX: Final = 1000


def _priority_number(value: str | int) -> int:
    return PRIORITY_LEVELS[value] if isinstance(value, str) else value


Priority = Annotated[
    Literal["low", "medium", "high", "urgent"] | Annotated[int, Field(ge=0, le=PRIORITY_MAX)],
    AfterValidator(_priority_number),
    Field(
        description=(
            "low|medium|high|urgent, or a number 0..1000 (low=100, medium=200, "
            "high=300, urgent=400); higher runs first. Stored as the number."
        )
    ),
]


def priority_name(value: int) -> str:
    """The highest named level at or below ``value`` (``low`` below 100)."""
    name = "low"
    for level, number in PRIORITY_LEVELS.items():
        if value >= number:
            name = level
    return name


# -- small constrained strings ----------------------------------------------------


def _token(value: str) -> str:
    if not is_token(value):
        raise ValueError("must be 1-128 letters, digits, '_' or '-'")
    return value


Token = Annotated[str, AfterValidator(_token)]
LabelKey = Annotated[
    str, StringConstraints(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9_.\-/]+$")
]
LabelValue = Annotated[str, StringConstraints(max_length=256)]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=64)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# -- resources -----------------------------------------------------------------


class Resources(Frozen):
    """What a task needs of a worker while it runs."""

    cpu: float = Field(1.0, ge=0, le=4096, description="CPU cores (fractions allowed).")
    memory_mb: int = Field(0, ge=0, le=16 * 1024 * 1024)
    gpu: int = Field(0, ge=0, le=1024)
    custom: Annotated[dict[Token, Annotated[float, Field(ge=0)]], Field(max_length=32)] = Field(
        default_factory=dict, description="Named custom resources, e.g. {'license': 1}."
    )


# -- executor specs ----------------------------------------------------------------


class ShellSpec(Frozen):
    """Run an argv (no shell interpolation) with an environment and working directory."""

    kind: Literal["shell"] = "shell"
    argv: Annotated[list[Annotated[str, StringConstraints(max_length=65536)]], Field(min_length=1)]
    env: dict[Annotated[str, StringConstraints(min_length=1, max_length=256)], str] = Field(
        default_factory=dict
    )
    cwd: str | None = None


class PythonSpec(Frozen):
    """Call ``package.module:function`` (sync or async) with keyword arguments."""

    kind: Literal["python"] = "python"
    target: Annotated[
        str,
        StringConstraints(
            pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
        ),
    ] = Field(description="'package.module:function'")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class AgentSpec(Frozen):
    """Run a coding-agent CLI from a command template with a prompt, files and delegates."""

    kind: Literal["agent"] = "agent"
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=200_000)]
    files: list[str] = Field(default_factory=list, max_length=1000)
    delegates: list[str] = Field(default_factory=list, max_length=100)
    template: str | None = Field(
        None,
        description="Name of a configured agent command template; default: the built-in agent.",
    )


ExecutorSpec = Annotated[ShellSpec | PythonSpec | AgentSpec, Field(discriminator="kind")]


# -- what workers report --------------------------------------------------------------------------


class Usage(Frozen):
    """Measured use of what a task runs (psutil), as reported by its worker."""

    cpu_percent: float = Field(
        0.0, ge=0, description="Percent of one core, averaged since the last report."
    )
    memory_mb: float = Field(0.0, ge=0, description="Resident memory of the process tree, MiB.")


class ErrorInfo(Frozen):
    """Why a task failed."""

    type: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    message: Annotated[str, StringConstraints(max_length=20_000)] = ""
    details: dict[str, Any] = Field(default_factory=dict)


#: Seconds, as sent by clients (fractions allowed).
Seconds = Annotated[float, Field(ge=0, le=365 * 24 * 3600)]


# -- scheduling options ----------------------------------------------------------------------------


class RetryPolicy(Frozen):
    """How a task that fails is retried (attempt n waits
    ``min(initial_interval * backoff_coefficient**(n-1), max_interval)``, +/- jitter)."""

    initial_interval: Seconds = 1.0
    backoff_coefficient: float = Field(2.0, ge=1.0, le=100.0)
    max_interval: Seconds = 100.0
    max_attempts: int = Field(3, ge=1, le=100, description="Attempts in all, the first included.")
    non_retryable: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] = Field(
        default_factory=list,
        max_length=100,
        description="Error types (ErrorInfo.type) that fail the task at once.",
    )
    jitter: float = Field(
        0.1, ge=0.0, le=1.0, description="Each delay varies by up to this fraction either way."
    )

    def delay(self, attempt: int, unit: float) -> float:
        """Seconds before the attempt after ``attempt``; ``unit`` in [0, 1) picks the jitter."""
        base = min(
            self.initial_interval * self.backoff_coefficient ** max(attempt - 1, 0),
            self.max_interval,
        )
        return max(0.0, base * (1.0 + self.jitter * (2.0 * unit - 1.0)))


class SchedulingOptions(Frozen):
    """Per-task scheduling options (flat fields of SubmitTask, SpawnAgent and TaskSubmitted)."""

    fairness_key: Token | None = Field(
        None, description="Tasks of one tenant share fairly across these keys (e.g. a customer)."
    )
    concurrency_key: Token | None = Field(
        None, description="At most concurrency_limit (or the node's limit for the key) run at once."
    )
    concurrency_limit: int | None = Field(None, ge=1, le=1_000_000)
    retry: RetryPolicy | None = Field(
        None, description="Retry failures with backoff; default: a failure is final."
    )
    schedule_to_start_timeout: Seconds | None = Field(
        None, description="Time out if not started this long after it became ready."
    )
    start_to_close_timeout: Seconds | None = Field(
        None, description="Time out (or retry) an attempt running longer than this."
    )
    heartbeat_timeout: Annotated[float, Field(gt=0, le=24 * 3600)] | None = Field(
        None, description="The lease expires this long after the last heartbeat (default: node's)."
    )

    def options(self) -> SchedulingOptions:
        """Just the scheduling options of a model that has them among other fields."""
        values = {k: getattr(self, k) for k in OPTION_FIELDS}
        if all(v is None for v in values.values()):
            return _NO_OPTIONS  # most tasks: one shared frozen instance, no validation
        return SchedulingOptions.model_validate(values)


_NO_OPTIONS = SchedulingOptions()
#: The scheduling option names, once: ``Model.model_fields`` read on the class goes
#: through a pydantic descriptor that costs microseconds per access (a hot path here).
OPTION_FIELDS: tuple[str, ...] = tuple(SchedulingOptions.model_fields)
