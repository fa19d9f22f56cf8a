"""What a run reports: per-stage counts (`StageStats`), the run's result (`RunResult`), and the
`Progress` interface the CLI draws. Plain data, shared by the engine, the CLI and the API."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StageStats:
    name: str
    kind: str
    rows_in: int = 0
    rows_out: int = 0
    calls_needed: int = 0  # samples this stage needs (cached or not)
    cache_hits: int = 0
    calls_made: int = 0  # samples completed by a backend in this run
    failures: int = 0
    parse_errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    est_prompt_tokens: int = 0  # plan: tokens the missing calls will send
    seconds: float = 0.0
    error: str | None = None
    metrics: dict[str, float] | None = None  # what a Python stage returned as a dict (also in `metrics`)
    reused_from: int | None = None  # the run that built this stage's rows, reused as they are (same fingerprint)
    model: str | None = None  # model stages: the pipeline's name for the model
    est_completion_tokens: int = 0  # plan: completion tokens the missing calls will produce
    completion_basis: str | None = None  # plan: where that estimate comes from (history, max_tokens, a default)
    cost_usd: float | None = None  # run: USD of the calls made; plan: estimated USD of the calls to make
    template: str | None = None  # prompt stages: SHA-256 of the template and all it includes (export manifests)
    parser: str | None = None  # prompt stages: SHA-256 of the parser's identity (export manifests)

    completed: int = 0  # samples whose row slot is settled (hit, call, shared in-flight call, or failure)

    @property
    def done(self) -> int:
        return self.completed


@dataclass
class RunResult:
    run_id: int | None
    pipeline: str
    db_path: str
    stages: list[StageStats] = field(default_factory=list)
    seconds: float = 0.0
    status: str = "ok"
    up_to_date: bool = False  # nothing changed since run `run_id`: no new run was made (see Runner._up_to_date)
    # table → [fingerprint, content digest], for the input and every model stage that can be reused
    fingerprints: dict[str, list[str]] = field(default_factory=dict)
    input: dict[str, Any] | None = None  # the input file read: path, sha256 of its bytes, limit (export manifests)

    @property
    def failures(self) -> int:
        return sum(s.failures for s in self.stages) + sum(1 for s in self.stages if s.error)

    @property
    def cost_usd(self) -> float | None:
        """USD of the calls made (a plan: of the calls to make); None when a stage that spends has no price."""
        spending = [s for s in self.stages if s.model and (s.calls_made or s.calls_needed - s.cache_hits)]
        if any(s.cost_usd is None for s in spending):
            return None
        return sum(s.cost_usd or 0.0 for s in spending)

    def totals(self) -> dict[str, int]:
        keys = ("calls_needed", "cache_hits", "calls_made", "failures", "parse_errors", "prompt_tokens",
                "completion_tokens")
        return {k: sum(getattr(s, k) for s in self.stages) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "pipeline": self.pipeline, "db_path": self.db_path,
                "seconds": round(self.seconds, 3), "status": self.status, "up_to_date": self.up_to_date,
                **self.totals(), "cost_usd": self.cost_usd, "stages": [asdict(s) for s in self.stages],
                "fingerprints": self.fingerprints,
                "input": self.input}


class Progress:
    """What the runner reports as it goes; the CLI draws it with rich."""

    def stage_started(self, stats: StageStats, total: int | None) -> None: ...
    def advance(self, stats: StageStats) -> None: ...
    def stage_finished(self, stats: StageStats) -> None: ...
    def waiting(self, stats: StageStats, seconds: float, reason: str) -> None:
        """A call of this stage waits `seconds` (at least LONG_WAIT) before its retry, because of `reason`."""
