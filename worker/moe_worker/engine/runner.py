"""One rank's share of a step (`RankRunner`): its model, KV caches, dispatcher and expert-map switcher."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint
from ..dispatch import DispatchConfig, Dispatcher, interleave
from ..engine_api import SequenceError
from ..expertmap import ExpertMap, MapSwitcher, Staged
from ..fp8 import resolve_impl, set_decode_gemm
from ..model import (
    DecodeRows,
    KVCache,
    MoE,
    PagedLatentCache,
    PagedSeq,
    ParallelContext,
    Segment,
    Transformer,
)
from ..sampling import greedy, sample, token_seed
from .attention_tp import AttentionTP
from .config import DTYPES, EngineConfig, kv_budget, resolve_device, resolve_dtype
from .graphs import DecodeGraphs
from .steps import SeqWork, StepPlan, StepReply

log = logging.getLogger(__name__)


@dataclass
class _Chunk:
    """Part of a sequence's step that one micro-batch runs."""

    seq: int
    tokens: list[int]
    start: int
    cache: KVCache | PagedSeq
    last: bool  # holds the sequence's last new token: produces its next-token logits
    want_logits: bool


@dataclass
class _SeqState:
    cache: KVCache | PagedSeq
    temperature: float
    seed: int
    drawn: int
    """Tokens generated so far (the index of the next draw)."""
    want_logits: bool
    top_p: float = 1.0


class RankRunner:
    """Everything one rank does in a step. `run_step(plan)` -> `StepReply`."""

    def __init__(
        self,
        model: Transformer,
        ckpt: Checkpoint,
        emap: ExpertMap,
        cfg: EngineConfig,
        *,
        ctx: ParallelContext,
        device: torch.device,
        plan_path: str | Path | None = None,
        metrics: Any = None,
        before_step: Callable[[StepPlan, int], None] | None = None,
        resizable: bool = False,
    ):
        self.model = model
        self.ckpt = ckpt
        self.cfg = cfg
        self.ctx = ctx
        self.rank = ctx.rank
        self.device = device
        self.metrics = metrics
        self.before_step = before_step
        self.seqs: dict[int, _SeqState] = {}
        self.pool = new_pool(model, cfg, device)
        """The paged latent cache of every sequence (absorbed attention); None: per-sequence
        KVCaches (the naive reference attention)."""
        self.graphs = new_graphs(model, self.pool, cfg, device)
        """Decode steps' fixed-shape parts as CUDA graphs (or, on the CPU with cuda_graphs="on",
        the same segments eagerly); None: off."""
        self.kept_logits: dict[int, torch.Tensor] = {}
        """seq -> (S, vocab) fp32 logits of `want_logits` sequences (read by rank 0's engine)."""
        self._errors: list[str] = []
        self._rng = torch.Generator(device=device)
        self.switches: list[tuple[int, int]] = []
        """(step, generation) of every switch this rank took."""
        self.dispatcher: Dispatcher | None = None
        self.wait_work: Callable[[Any], None] | None = None
        """How the dispatcher waits for a collective (set by the engine: in slices, watching for a
        broken group); None: plain waits."""
        if ctx.world_size > 1:
            self.dispatcher = Dispatcher(ctx, emap, device=device, config=dispatch_config(model, cfg), metrics=metrics)
        self.tp: AttentionTP | None = None
        """This rank's attention TP group's collectives (None: whole attention on every rank)."""
        self.switcher = MapSwitcher(
            emap, ctx.rank, model.args, plan_path=plan_path, load_experts=self._read_experts,
            poll_interval_s=cfg.map_poll_s, background=cfg.background_load, on_error=self._map_error,
            resizable=resizable,
        )
        if metrics is not None:
            metrics.expert_map_generation.labels(**metrics.lbl()).set(emap.generation)

    @property
    def emap(self) -> ExpertMap:
        return self.switcher.current

    def attach(self, ctx: ParallelContext, wait_work: Callable[[Any], None] | None = None) -> None:
        """Use process group `ctx.group` from now on (it is created after the model is loaded)."""
        self.ctx = ctx
        self.model.ctx = ctx
        self.wait_work = wait_work or self.wait_work
        self.tp = AttentionTP(ctx, self.wait_work, self.device) if ctx.tp > 1 else None
        if self.dispatcher is not None:
            self.dispatcher.ctx = ctx
            self.dispatcher.group = ctx.group
            if self.wait_work is not None:
                self.dispatcher.wait_work = self.wait_work

    def regroup(self, ctx: ParallelContext) -> None:
        """Serve in a process group of a different size from now on (after a resize switch)."""
        self.ctx = ctx
        self.model.ctx = ctx
        self.tp = AttentionTP(ctx, self.wait_work, self.device) if ctx.tp > 1 else None
        self.dispatcher = None
        if ctx.world_size > 1:
            self.dispatcher = Dispatcher(ctx, self.emap, device=self.device,
                                         config=dispatch_config(self.model, self.cfg), metrics=self.metrics)
            if self.wait_work is not None:
                self.dispatcher.wait_work = self.wait_work

    def take_degraded(self, generation: int, lost: frozenset[int]) -> None:
        """Serve on after the group lost ranks `lost`: take `generation` if this rank is behind
        (the step that broke had switched to it), then hold the experts of its degraded map,
        reading the lost ranks' sole copies assigned here (`expertmap.degrade`). Sequences and KV
        caches stay; `regroup` follows once the new process group is formed."""
        if self.emap.generation != generation:
            self._switch(generation, -1)
        if self.ctx.tp > 1 and not lost.isdisjoint(self.ctx.tp_ranks):
            for seq in list(self.seqs):  # its TP group cannot attend: rank 0 recomputes them elsewhere
                self._drop(seq)
        self._hold_exactly(self.switcher.lose(lost), reading="the lost ranks' sole copies")
        log.info("rank %d: serving generation %d without ranks %s", self.rank, generation, sorted(self.emap.lost))

    def adopt(self, emap: ExpertMap) -> None:
        """Serve `emap` in a group a new rank 0 forms (the old one was lost, and with it every
        sequence: their requests were its): drop all sequences, hold exactly `emap`'s experts."""
        for seq in list(self.seqs):
            self._drop(seq)
        self.kept_logits.clear()
        sw = self.switcher
        sw.staged, sw._loading = None, None  # (a background load still running is discarded)
        self._hold_exactly(Staged(emap, {}), reading="the new rank 0's map")
        sw.current = sw.full = emap
        if self.metrics is not None:
            self.metrics.expert_map_generation.labels(**self.metrics.lbl()).set(emap.generation)

    # ---- expert map ----

    def _read_experts(self, added: dict[int, tuple[int, ...]]) -> dict[int, dict[int, Any]]:
        moes = {m.layer_id: m for m in self.model.moe_layers()}
        return {layer: {e: self.ckpt.read_expert(moes[layer], e) for e in ids} for layer, ids in added.items()}

    def _map_error(self, msg: str) -> None:
        self._errors.append(msg)
        if self.metrics is not None:
            self.metrics.expert_map_errors.labels(**self.metrics.lbl()).inc()

    def _switch(self, generation: int, step: int) -> None:
        staged = self.switcher.take(generation)
        self._hold_exactly(staged)
        if self.dispatcher is not None and staged.emap.world_size == self.ctx.world_size:
            self.dispatcher.set_map(staged.emap)  # (a resize builds a new dispatcher in `regroup`)
        self.switches.append((step, generation))
        if self.metrics is not None:
            self.metrics.expert_map_generation.labels(**self.metrics.lbl()).set(generation)
        log.info("rank %d: serving expert map generation %d from step %d", self.rank, generation, step)

    def _hold_exactly(self, staged: Staged, reading: str = "") -> None:
        """Make this rank hold exactly the experts `staged.emap` assigns to it, whatever it held
        before: register the staged modules it lacks, read any still missing now (a generation
        staged against another map; slow, logged), drop the rest, then check."""
        want = staged.emap.owned(self.rank)
        moes = {m.layer_id: m for m in self.model.moe_layers()}
        missing: dict[int, tuple[int, ...]] = {}
        for layer, moe in moes.items():
            need, have = set(want.get(layer, ())), set(moe.local_experts())
            loaded = staged.experts.get(layer, {})
            for e in sorted(need - have):
                if e in loaded:
                    moe.add_expert(e, loaded[e])
            for e in sorted(have - need):
                moe.remove_expert(e)
            lacking = tuple(sorted(need - set(moe.local_experts())))
            if lacking:
                missing[layer] = lacking
        if missing and reading:
            log.info("rank %d: reading experts %s (%s)", self.rank, missing, reading)
        elif missing:
            log.warning("rank %d: generation %d: experts %s were not staged; reading them at the switch",
                        self.rank, staged.emap.generation, missing)
        if missing:
            for layer, modules in self._read_experts(missing).items():
                for e, module in modules.items():
                    moes[layer].add_expert(e, module)
        wrong = {layer: sorted(moe.local_experts()) for layer, moe in moes.items()
                 if set(moe.local_experts()) != set(want.get(layer, ()))}
        if wrong:
            raise RuntimeError(f"rank {self.rank}: after switching to generation {staged.emap.generation} it holds "
                               f"experts {wrong}, the map assigns {dict(want)}")

    # ---- the step ----

    @torch.inference_mode()
    def run_step(self, plan: StepPlan) -> StepReply:
        for seq in plan.release[self.rank]:
            self._drop(seq)
        if plan.switch_to is not None:
            self._switch(plan.switch_to, plan.step)
        if self.before_step is not None:
            self.before_step(plan, self.rank)
        out: dict[int, tuple[int, float]] = {}
        failed: dict[int, str] = {}
        if plan.has_work():
            t0 = time.perf_counter()
            mine = [w for w in plan.work[self.rank] if not (w.new and self._admit(w, failed))]
            if self.tp is not None and any(w.new for w in plan.work[self.rank]):  # (same list on the whole group)
                mine = self._agree_admissions(plan.work[self.rank], mine, failed)
            self._sample_all(self.forward(mine, plan.micro_batches), out, failed)
            if self.dispatcher is not None:
                self.dispatcher.flush_metrics()
            if self.metrics is not None:
                phase = "prefill" if any(w.new for w in mine) else "decode"
                lbl = self.metrics.lbl()
                self.metrics.step_seconds.labels(**lbl, phase=phase).observe(time.perf_counter() - t0)
                cap = kv_budget(self.cfg)
                used = sum(s.cache.max_len for s in self.seqs.values())  # reserved positions
                self.metrics.kv_cache_usage.labels(**lbl).set(used / cap if cap else 0.0)
        self.switcher.poll()
        errors, self._errors = self._errors, []
        for seq in failed:
            self._drop(seq)
            self.kept_logits.pop(seq, None)
        return StepReply(self.rank, out, self.switcher.staged_key(), self.emap.generation, errors, failed)

    def _agree_admissions(self, work: list[SeqWork], mine: list[SeqWork], failed: dict[int, str]) -> list[SeqWork]:
        """Attention TP: a new sequence that another rank of the TP group could not set up is
        dropped here too (the group's ranks must run the same tokens)."""
        news = [w.seq for w in work if w.new]
        for seq, bad in zip(news, self.tp.any_failed([s in failed for s in news]), strict=True):
            if bad and seq not in failed:
                self._drop(seq)
                failed[seq] = f"another rank of rank {self.rank}'s attention TP group could not set the sequence up"
        return [w for w in mine if w.seq not in failed]

    def _sample_all(self, logits: dict[int, torch.Tensor], out: dict[int, tuple[int, float]],
                    failed: dict[int, str]) -> None:
        """Every sequence's next token and logit sum into `out` (a failure into `failed`): the
        greedy ones in one argmax over their rows, the others one draw each."""
        if not logits:
            return
        seqs = list(logits)
        rows = torch.stack([logits[s] for s in seqs])  # (n, vocab)
        sums = rows.sum(dim=-1).tolist()
        greedy_at = [i for i, s in enumerate(seqs) if self.seqs[s].temperature <= 0]
        picks: dict[int, int | SequenceError] = dict(zip(greedy_at, greedy(rows[greedy_at]), strict=True)) if greedy_at else {}
        for i, seq in enumerate(seqs):
            st = self.seqs[seq]
            try:
                pick = picks[i] if i in picks else self._draw(st, rows[i])
            except SequenceError as e:
                pick = e
            if isinstance(pick, SequenceError):
                failed[seq] = str(pick)
                continue
            st.drawn += 1
            out[seq] = pick, sums[i]

    def _draw(self, st: _SeqState, row: torch.Tensor) -> int:
        """A sampled sequence's next token (temperature > 0), seeded by (seed, token index)."""
        self._rng.manual_seed(token_seed(st.seed, st.drawn))
        return sample(row, st.temperature, self._rng, st.top_p)

    def _admit(self, w: SeqWork, failed: dict[int, str]) -> bool:
        """Set up a new sequence (KV cache, sampler); False when it fits, True when it failed
        (recorded in `failed`: its request fails alone, the step runs without it)."""
        self._drop(w.seq)  # a broken step sent again: the first try's pages go back first
        try:
            seed = w.seed if w.seed is not None else int.from_bytes(os.urandom(7), "little")
            self.seqs[w.seq] = _SeqState(self.new_cache(w.max_len), w.temperature, seed, w.drawn,
                                         w.want_logits, w.top_p)
            return False
        except (torch.OutOfMemoryError, MemoryError) as e:
            failed[w.seq] = f"rank {self.rank} has no memory for a KV cache of {w.max_len} positions: {e}"
        except (RuntimeError, ValueError) as e:
            failed[w.seq] = f"rank {self.rank} could not set up the sequence: {type(e).__name__}: {e}"
        log.error("sequence %d: %s", w.seq, failed[w.seq])
        return True

    def new_cache(self, max_len: int) -> KVCache | PagedSeq:
        """A new sequence's cache of `max_len` positions: pages of the pool, or its own KVCache."""
        if self.pool is not None:
            return self.pool.allocate(max_len)
        return self.model.new_cache(1, max_len)

    def _drop(self, seq: int) -> None:
        """Forget a sequence; its pages go back to the pool."""
        st = self.seqs.pop(seq, None)
        if st is not None and isinstance(st.cache, PagedSeq):
            self.pool.release(st.cache)

    def forward(self, work: list[SeqWork], micro_batches: int) -> dict[int, torch.Tensor]:
        """Run this rank's share -> seq -> last-position logits (vocab,) fp32 of the sequences that
        draw a token this step (none on TP ranks other than the group's first)."""
        chunks = [
            _Chunk(w.seq, list(w.tokens), w.start, self.seqs[w.seq].cache, w.sample, self.seqs[w.seq].want_logits)
            for w in work
        ]
        batches = split_micro_batches(chunks, micro_batches)
        results: dict[int, torch.Tensor] = {}
        full: dict[int, list[torch.Tensor]] = {}
        interleave([self._mb_forward(b, results, full, graphs=len(batches) == 1) for b in batches])
        for seq, parts in full.items():
            self.kept_logits[seq] = torch.cat(parts, dim=0)
        return results

    def _graph_layer(self, i: int, block: Any, bucket: Any, rows: int, exchange: Any) -> Iterator[None]:
        """Layer i of a decode batch of `rows` sequences in a `DecodeGraphs` bucket -> its output rows."""
        outs = self.graphs.run(i, bucket, rows)
        if len(outs) == 1:  # a dense layer, whole
            x = outs[0][:rows]
        else:
            h, xn, weights, ids, shared = (t[:rows] if t is not None else None for t in outs)
            y = yield from block.ffn.routed_stages(xn, weights, ids, exchange, (lambda: shared) if shared is not None else None)
            x = h + y
        self.graphs.next_input(bucket, x)
        return x

    def _mb_forward(
        self, chunks: list[_Chunk], results: dict[int, torch.Tensor], full: dict[int, list[torch.Tensor]],
        graphs: bool = False,
    ) -> Iterator[None]:
        """One micro-batch through every layer, its sequences' tokens packed into one (T, D)
        tensor: every layer's projections, norms and feed-forward run once over all of them, and
        attention batches the decode tokens (`MLA.forward_packed`). Yields while its MoE exchanges
        are in flight (three yields per MoE layer on every rank, whatever the token count)."""
        m = self.model
        D = m.args.hidden_size
        dev = self.device
        sizes = [len(c.tokens) for c in chunks]
        if chunks:
            tokens = torch.tensor([t for c in chunks for t in c.tokens], dtype=torch.long, device=dev)
            positions = torch.cat([torch.arange(c.start, c.start + n, device=dev) for c, n in zip(chunks, sizes, strict=True)])
            rope = m.rotary(positions)
            x = m.embed(tokens)  # (T, D)
        else:
            x = torch.zeros(0, D, dtype=m.dtype, device=dev)
        exchange = self.dispatcher.start if self.dispatcher is not None else None
        tp = self.tp if chunks else None
        decoding = [c for c, n in zip(chunks, sizes, strict=True) if n == 1 and isinstance(c.cache, PagedSeq)]
        at = DecodeRows.of([c.cache.slots for c in decoding], [c.start for c in decoding]) if decoding else None
        only_decode = bool(chunks) and len(decoding) == len(chunks)  # then no per-sequence work per layer
        pool = self.pool
        bucket = (self.graphs.bucket(x, rope, at) if graphs and only_decode and tp is None and self.graphs is not None
                  else None)
        for i, block in enumerate(m.layers):
            if bucket is not None:  # the layer's fixed-shape part replayed (DecodeGraphs), the routed experts here
                x = yield from self._graph_layer(i, block, bucket, len(chunks), exchange)
                continue
            if only_decode:
                attn = block.attn.forward_decode(block.attn_norm(x), rope, pool.kv[i], pool.pe[i], at)
            elif chunks:
                segments = [Segment(c.start, n, pool.view(c.cache, i) if isinstance(c.cache, PagedSeq)
                                    else c.cache.layers[i]) for c, n in zip(chunks, sizes, strict=True)]
                attn = block.attn.forward_packed(block.attn_norm(x), rope, segments, m.attn_impl, at)
            elif not isinstance(block.ffn, MoE):
                continue
            if tp is None:
                x = x + attn if chunks else x
                # An MoE layer joins the exchange even with no tokens, so every rank's collectives match.
                x = yield from block.ffn_stages(x, exchange)
            else:  # attention TP: the heads' partial sums reduced onto 1/tp of the rows each, the FFN on those
                rows = tp.rows(len(x))
                if block.attn.o_split:
                    h = x[rows] + tp.reduce_scatter(attn)
                else:  # o_proj is whole here: gather every head's values, project this rank's rows
                    h = x[rows] + block.attn.wo(tp.gather_heads(attn)[rows])
                h = yield from block.ffn_stages(h, exchange)
                x = tp.all_gather(h, len(x))
        if self.tp is not None and self.ctx.tp_rank != 0:
            return  # the TP group's first rank samples (the others hold the same logits)
        last = []
        for c, h in zip(chunks, torch.split(x, sizes), strict=True):
            if c.want_logits:
                lg = m.head(m.norm(h)).float()  # (S, vocab)
                full.setdefault(c.seq, []).append(lg)
                if c.last:
                    results[c.seq] = lg[-1]
            elif c.last:
                last.append((c.seq, h[-1]))
        if last:  # one head GEMM for the last position of every sequence
            rows = m.head(m.norm(torch.stack([r for _, r in last]))).float()  # (n, vocab)
            for (seq, _), row in zip(last, rows, strict=True):
                results[seq] = row


def split_micro_batches(chunks: list[_Chunk], n: int) -> list[list[_Chunk]]:
    """Split a rank's work into `n` (1 or 2) micro-batches of about equal token counts.

    A sequence that straddles the middle is cut in two: its first part runs in micro-batch 0,
    which is always a stage ahead of micro-batch 1, so the second part finds the first part's
    keys in the cache at every layer. The last new token stays in the last part (`last`).
    """
    if n == 1:
        return [chunks]
    total = sum(len(c.tokens) for c in chunks)
    half = (total + 1) // 2
    a: list[_Chunk] = []
    b: list[_Chunk] = []
    seen = 0
    for c in chunks:
        S = len(c.tokens)
        if seen >= half:
            b.append(c)
        elif seen + S <= half:
            a.append(c)
        else:
            cut = half - seen
            a.append(replace(c, tokens=c.tokens[:cut], last=False))
            b.append(replace(c, tokens=c.tokens[cut:], start=c.start + cut))
        seen += S
    return [a, b]


def check_attention_tp(tp: int, world: int, heads: int) -> int:
    """`tp`, when a group of `world` ranks can split `heads` attention heads that way."""
    if world % tp or heads % tp:
        raise ValueError(f"attention TP {tp} (MOE_ATTENTION_TP) must divide the group's {world} ranks and the "
                         f"model's {heads} attention heads")
    return tp


def dispatch_config(model: Transformer, cfg: EngineConfig) -> DispatchConfig:
    fp8 = cfg.dispatch_fp8 == "on"
    if cfg.dispatch_fp8 == "auto":
        fp8 = model.fp8 and resolve_impl(cfg.fp8_impl, model.embed.weight.device) in ("emulate", "scaled_mm")
    combine = None if cfg.combine_dtype == "auto" else DTYPES[cfg.combine_dtype]
    scale_fmt = model.args.quantization.scale_fmt if model.args.quantization else None
    return DispatchConfig(fp8_payload=fp8, combine_dtype=combine, scale_fmt=scale_fmt)


KV_PAGE = 64
"""Positions per page of the paged latent cache (FlashMLA's block size)."""


def new_pool(model: Transformer, cfg: EngineConfig, device: torch.device) -> PagedLatentCache | None:
    """The rank's paged latent cache for absorbed attention: the KV budget's positions, plus a
    page per sequence for rounding each one up to whole pages."""
    if model.attn_impl != "absorb":
        return None
    pages = -(-kv_budget(cfg) // KV_PAGE) + cfg.max_seqs_per_rank
    return PagedLatentCache(model.args, pages, KV_PAGE, model.dtype, device)


def new_graphs(model: Transformer, pool: PagedLatentCache | None, cfg: EngineConfig,
               device: torch.device) -> DecodeGraphs | None:
    """The rank's `DecodeGraphs`: captured on CUDA unless cuda_graphs is "off"; on the CPU only
    with "on", as eager fixed-shape segments (to test them)."""
    cuda = device.type == "cuda"
    if pool is None or cfg.cuda_graphs == "off" or (cfg.cuda_graphs == "auto" and not cuda):
        return None
    if cuda and cfg.fp8_impl == "weight_only":  # (its products read scales on the host: nothing to capture)
        return None
    return DecodeGraphs(model, pool, capture=cuda, max_positions=cfg.max_context)


def build_runner(
    checkpoint: str | Path,
    emap: ExpertMap,
    cfg: EngineConfig,
    *,
    ctx: ParallelContext,
    plan_path: str | Path | None = None,
    metrics: Any = None,
    before_step: Callable[[StepPlan, int], None] | None = None,
    resizable: bool = False,
) -> RankRunner:
    """Build this rank's model with the experts `emap` gives it and load it from `checkpoint`."""
    device = resolve_device(cfg.device, ctx.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ckpt = Checkpoint(checkpoint)
    tp = check_attention_tp(cfg.attention_tp, ctx.world_size, ckpt.args.num_attention_heads)
    fp8 = False if cfg.precision == "bf16" else None
    model = Transformer(
        ckpt.args, dtype=resolve_dtype(cfg.dtype, device), attn_impl=cfg.attn_impl, fp8=fp8,
        fp8_impl=cfg.fp8_impl, owned_experts=emap.owned(ctx.rank), ctx=replace(ctx, tp=tp), device=device,
        attention_tp=(ctx.rank % tp, tp),
    )
    ckpt.load(model)
    set_decode_gemm(cfg.fp8_decode_gemm)
    return RankRunner(model, ckpt, emap, cfg, ctx=ctx, device=device, plan_path=plan_path, metrics=metrics,
                      before_step=before_step, resizable=resizable)
