"""The contract between the serving front end (`server`) and whatever generates tokens (`engine`).

The front rank's KServe v2 server turns requests into `GenerationRequest`s and awaits results from
an `Engine`: the EP group's `engine.GroupEngine` (rank 0 schedules every step across the
data-parallel attention ranks; the MoE layers exchange tokens with all-to-all), which is also the
single-process engine at world size 1. The server never sees ranks, collectives or the model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


class EngineError(RuntimeError):
    """The engine cannot serve (the EP group lost a rank, the model failed); maps to HTTP 503."""


class RequestError(ValueError):
    """The request itself is invalid (too long, bad parameters); maps to HTTP 400 / INVALID_ARGUMENT."""


class SequenceError(RuntimeError):
    """This request failed inside a step (non-finite logits, no memory for its KV cache); the
    engine goes on serving the others. Maps to HTTP 500 / INTERNAL."""


class OverloadedError(RuntimeError):
    """The engine's queue is full; retry later. Maps to HTTP 429 / RESOURCE_EXHAUSTED."""


class DeadlineError(RuntimeError):
    """The request did not finish within the server's deadline and was cancelled. Maps to HTTP 504
    / DEADLINE_EXCEEDED."""


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    seed: int | None = None  # for temperature > 0; None: nondeterministic
    stop_ids: tuple[int, ...] = ()
    top_p: float = 1.0  # nucleus sampling (temperature > 0): draw among the most likely tokens holding this mass


@dataclass
class GenerationResult:
    request_id: str
    output_ids: list[int]
    finish_reason: str  # "length" | "stop"
    prompt_tokens: int
    time_to_first_token_s: float = 0.0
    duration_s: float = 0.0
    # Per output token: sum of the fp32 logits row (greedy checks compare these across engines).
    logit_sums: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    vocab_size: int
    max_context: int  # prompt + generated tokens per request
    max_new_tokens: int
    eos_token_id: int | None = None
    platform: str = "pytorch"
    version: str = "1"


class Engine(Protocol):
    info: ModelInfo

    def ready(self) -> bool:
        """True when every rank of the group is up and the model is loaded."""

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        """Run one request to completion (the engine batches concurrent calls)."""

    def stream(self, req: GenerationRequest) -> AsyncIterator[int]:
        """Yield output token ids as they are produced."""

    def queue_depth(self) -> int:
        """Requests waiting to be scheduled."""
