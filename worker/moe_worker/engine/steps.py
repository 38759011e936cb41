"""What rank 0 sends every rank each step (`StepPlan`) and what each rank sends back (`StepReply`),
and their encoding on the wire: JSON with a fixed schema, decoded with type and bounds checks
(`decode_plan`, `decode_reply` raise `WireError`). Nothing between ranks is pickled: a pickle
can run code in the process that loads it (the remote-code-execution class of DeepSeek-V3#1307
and vLLM's CVE-2025-47277).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MAX_FRAME_BYTES = 256 << 20
"""Largest encoded plan or reply a rank accepts (a step's prompts, at 10 bytes a token, fit many
times over); a longer frame is refused before it is read."""


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
    """Sampling seed (temperature > 0): token i is drawn with `sampling.token_seed(seed, i)`."""
    want_logits: bool = False
    """Keep every position's logits on the rank (the `logits` command; rank 0 only)."""
    drawn: int = 0
    """With `new`: tokens the sequence already generated (a sequence recomputed after a fault
    from prompt + output: its next draw is number `drawn`)."""
    top_p: float = 1.0
    sample: bool = True
    """`tokens` end what the sequence has so far: draw its next token. False: a chunk of a prompt
    prefilled over several steps (chunked prefill), more of it follows."""


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


# ---- the wire -----------------------------------------------------------------------------------


class WireError(ValueError):
    """A frame that is not a valid step plan or reply; the message says what is wrong."""


def encode_plan(plan: StepPlan) -> bytes:
    doc = {
        "step": plan.step, "micro_batches": plan.micro_batches, "switch_to": plan.switch_to,
        "resize": plan.resize, "stop": plan.stop, "release": plan.release,
        "work": [[[w.seq, w.tokens, w.start, w.new, w.max_len, w.temperature, w.seed, w.want_logits, w.drawn,
                   w.top_p, w.sample]
                  for w in ws] for ws in plan.work],
    }
    return _dump(doc)


def decode_plan(data: bytes, world: int) -> StepPlan:
    """A StepPlan for a group of `world` ranks from `encode_plan`'s bytes; WireError otherwise."""
    doc = _load(data, "step plan")
    d = _Fields(doc, "step plan", {"step", "micro_batches", "switch_to", "resize", "stop", "release", "work"})
    work = d.per_rank("work", world)
    release = d.per_rank("release", world)
    return StepPlan(
        step=d.int("step"),
        work=[[_seq_work(item, f"step plan work[{r}][{i}]") for i, item in enumerate(ws)] for r, ws in enumerate(work)],
        release=[[_int(x, f"step plan release[{r}]") for x in rs] for r, rs in enumerate(release)],
        micro_batches=d.int("micro_batches", low=1, high=2),
        switch_to=d.int("switch_to", optional=True),
        resize=d.int("resize", optional=True, low=1),
        stop=d.bool("stop"),
    )


def encode_reply(reply: StepReply) -> bytes:
    doc = {
        "rank": reply.rank, "generation": reply.generation, "staged": list(reply.staged),
        "tokens": [[seq, tok, lsum] for seq, (tok, lsum) in reply.tokens.items()],
        "errors": reply.errors, "failed": [[seq, why] for seq, why in reply.failed.items()],
    }
    return _dump(doc)


def decode_reply(data: bytes, world: int) -> StepReply:
    """A StepReply from one of `world` ranks from `encode_reply`'s bytes; WireError otherwise."""
    doc = _load(data, "step reply")
    d = _Fields(doc, "step reply", {"rank", "generation", "staged", "tokens", "errors", "failed"})
    staged = d.list("staged")
    if len(staged) != 2 or not isinstance(staged[1], str):
        raise WireError(f"step reply staged must be [generation, digest], got {staged!r}")
    tokens = {}
    for i, item in enumerate(d.list("tokens")):
        where = f"step reply tokens[{i}]"
        if not isinstance(item, list) or len(item) != 3:
            raise WireError(f"{where} must be [seq, token, logit sum], got {item!r}")
        tokens[_int(item[0], where)] = (_int(item[1], where), _float(item[2], where))
    failed = {}
    for i, item in enumerate(d.list("failed")):
        where = f"step reply failed[{i}]"
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], str):
            raise WireError(f"{where} must be [seq, reason], got {item!r}")
        failed[_int(item[0], where)] = item[1]
    errors = d.list("errors")
    if not all(isinstance(e, str) for e in errors):
        raise WireError("step reply errors must be strings")
    return StepReply(rank=d.int("rank", low=0, high=world - 1), tokens=tokens,
                     staged=(_int(staged[0], "step reply staged"), staged[1]),
                     generation=d.int("generation"), errors=errors, failed=failed)


def _dump(doc: dict[str, Any]) -> bytes:
    data = json.dumps(doc, separators=(",", ":"), allow_nan=True).encode()
    if len(data) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    return data


def _load(data: bytes, what: str) -> Any:
    if len(data) > MAX_FRAME_BYTES:
        raise WireError(f"{what}: frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WireError(f"{what} is not a JSON frame ({type(e).__name__}: {str(e)[:80]})") from None


def _int(v: Any, where: str, low: int = -(2**63), high: int = 2**63 - 1) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
        raise WireError(f"{where}: expected an integer in {low}..{high}, got {v!r}")
    return v


def _float(v: Any, where: str) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise WireError(f"{where}: expected a number, got {v!r}")
    return float(v)


def _seq_work(item: Any, where: str) -> SeqWork:
    # Every rank decodes every sequence of every step: plain type() checks, one branch for the
    # common case, the detailed message only for a bad item.
    if type(item) is not list or len(item) != 11:
        raise WireError(f"{where} must be [seq, tokens, start, new, max_len, temperature, seed, want_logits, drawn, "
                        f"top_p, sample]")
    seq, tokens, start, new, max_len, temperature, seed, want_logits, drawn, top_p, sample = item
    ok = (type(seq) is int and type(start) is int and type(max_len) is int and type(drawn) is int
          and min(seq, start, max_len, drawn) >= 0 and max(seq, start, max_len, drawn) < 2**63
          and type(new) is bool and type(want_logits) is bool and type(sample) is bool
          and (seed is None or (type(seed) is int and -(2**63) <= seed < 2**63))
          and type(tokens) is list and tokens and all(type(t) is int for t in tokens)
          and min(tokens) >= 0 and max(tokens) < 2**63
          and type(temperature) in (int, float) and math.isfinite(temperature) and temperature >= 0
          and type(top_p) in (int, float) and 0 < top_p <= 1)
    if not ok:
        raise WireError(f"{where} must be [seq >= 0, non-empty tokens (integers >= 0), start >= 0, new (bool), "
                        f"max_len >= 0, temperature (finite, >= 0), seed (integer or null), want_logits (bool), "
                        f"drawn >= 0, top_p in (0, 1], sample (bool)], got {str(item)[:200]}")
    return SeqWork(seq, tokens, start, new, max_len, float(temperature), seed, want_logits, drawn, float(top_p),
                   sample)


class _Fields:
    """The fields of a decoded JSON object, each read with its type checked."""

    def __init__(self, doc: Any, what: str, names: set[str]):
        if not isinstance(doc, dict) or set(doc) != names:
            got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
            raise WireError(f"{what} must be an object with fields {sorted(names)}, got {got}")
        self.doc, self.what = doc, what

    def int(self, name: str, *, optional: bool = False, low: int = -(2**63), high: int = 2**63 - 1) -> Any:
        v = self.doc[name]
        return None if optional and v is None else _int(v, f"{self.what} {name}", low, high)

    def bool(self, name: str) -> bool:
        v = self.doc[name]
        if not isinstance(v, bool):
            raise WireError(f"{self.what} {name}: expected a boolean, got {v!r}")
        return v

    def list(self, name: str) -> list:
        v = self.doc[name]
        if not isinstance(v, list):
            raise WireError(f"{self.what} {name}: expected a list, got {type(v).__name__}")
        return v

    def per_rank(self, name: str, world: int) -> list[list]:
        v = self.list(name)
        if len(v) != world or not all(isinstance(x, list) for x in v):
            raise WireError(f"{self.what} {name}: expected one list per rank ({world})")
        return v
