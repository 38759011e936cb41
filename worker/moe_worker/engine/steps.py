"""What rank 0 sends every rank each step (`StepPlan`) and what each rank sends back (`StepReply`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SeqWork:
    """One sequence's share of a step: `tokens` at positions start.. of sequence `seq`."""

    seq: int
    tokens: list[int]
    start: int
    new: bool = False
    """First step of this sequence: allocate its KV cache of `max_len` positions."""
    max_len: int = 0
    temperature: float = 0.0
    seed: int | None = None
    want_logits: bool = False
    """Keep every position's logits on the rank (the `logits` command; rank 0 only)."""


@dataclass
class StepPlan:
    step: int
    work: list[list[SeqWork]]
    """Per rank: the sequences it runs this step."""
    release: list[list[int]]
    """Per rank: sequences whose KV caches to free before the step."""
    micro_batches: int = 1
    switch_to: int | None = None
    """Expert-map generation every rank takes before running this step."""
    resize: int | None = None
    """With `switch_to`: the new generation has this many ranks. The step has no work; every rank
    takes the switch, leaves the old process group and joins the new one (ranks beyond it leave)."""
    stop: bool = False

    def has_work(self) -> bool:
        return any(self.work)


@dataclass
class StepReply:
    rank: int
    tokens: dict[int, tuple[int, float]]
    """seq -> (next token, sum of its fp32 logits row)."""
    staged: tuple[int, str]
    """(generation, digest) this rank could switch to now."""
    generation: int
    """Generation served in this step."""
    errors: list[str] = field(default_factory=list)
    """Expert-map errors since the last reply."""
    failed: dict[int, str] = field(default_factory=dict)
    """seq -> why it failed in this step on this rank (its request fails; the group goes on)."""
