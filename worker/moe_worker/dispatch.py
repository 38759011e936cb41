"""Expert-parallel dispatch and combine for one MoE layer: tokens to the ranks hosting their experts
and weighted results back, with `torch.distributed` (NCCL on CUDA, gloo on CPU, the same code).

Per MoE layer and micro-batch, on every rank, even with zero tokens (each exchange is collective):

1. Route: each (token, k) pair goes to a rank hosting expert `topk_ids[t, k]`. With replicas,
   the candidates are the replicas on the token's own node if there are any, else all of them;
   pairs of one expert are spread round-robin over the candidates, starting at an offset of the
   sending rank, so every replica gets an equal share (EPLB's load / count assumption).
2. Rows: one row per (token, destination rank), so a token whose experts share a rank is sent
   once. A row is bytes: the activation (in the activation dtype, or e4m3 with one fp32 scale per
   1x128 group when `fp8_payload`), then K int32 expert ids (-1: not on that rank) and K fp32
   routing weights, then a 16-byte header column. Rows are grouped by destination rank.
3. Dispatch, one `all_to_all_single` of uint8 in the common case: every rank pair gets a bucket
   of C rows (the capacity); the header of a bucket's first row says how many rows the bucket
   really holds, plus the sender's largest bucket, tokens and rows. No separate counts exchange.
   When a bucket held more than C rows (every rank sees it: each receives every sender's largest
   bucket), a second `all_to_all_single` moves just the rows past C with exact split sizes.
   C = 1 is the exact-counts protocol (headers first, then the rows).
4. The receiver runs its experts on what arrived (`expert_rows`: grouped per expert, weights
   applied and a row's experts summed in fp32, as `model.run_local_experts`), so each row comes
   back as one partial sum.
5. Combine: the partial sums go back in `combine_dtype` (bf16 in production) with exact splits
   (both ends know every bucket's count from the headers) and the origin adds them per token in fp32.

The capacity of the next exchange of a layer is computed on every rank from the headers of the
last one (largest bucket x (1 + slack) + 1, at most the largest token count of a rank), at the
moment its rows arrive. That moment has the same place in every rank's sequence of collectives,
so all ranks agree on C without a message. When the padding would exceed `max_padding` x the
rows of the exchange (large batches, or many ranks with sparse buckets), the next exchange uses
C = 1 instead. A wrong guess costs one more round, never a wrong result.

`Exchange` does this in stages with asynchronous collectives in between, so a second micro-batch's
compute can run while one's bytes are in flight (`interleave`). `Dispatcher` is a
`model.RoutedExperts`: `moe.routed = dispatcher` runs all stages in one call.

Bytes per row: D * dtype (D + 4 * ceil(D/128) with fp8) + 8K for the metadata (`row_bytes`) +
16 header bytes; the combine row is D * combine dtype. For DeepSeek-V3 (D 7168, K 8) the metadata
and header are 0.5% of a bf16 row. On CPU the exchange's large buffers come from a per-dispatcher
pool: fresh multi-megabyte tensors page-fault on every step, which cost more than the copies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from moe_common.model_args import FP8_BLOCK

from .expertmap import ExpertMap
from .fp8 import FP8_DTYPE, act_quant
from .model import MLP, ParallelContext

HEADER_BYTES = 16
"""Per row: int32 [rows in this bucket, sender's largest bucket, sender's tokens, sender's rows],
meaningful in the first row of each bucket."""


@dataclass(frozen=True)
class DispatchConfig:
    """How tokens travel. Every rank of a group must use the same settings."""

    fp8_payload: bool = False
    """Send activations as e4m3 with 1x128 fp32 scales (DeepSeek's FP8 dispatch), else as they are."""
    combine_dtype: torch.dtype | None = None
    """dtype of the partial sums sent back; None: the activation dtype (bf16 in production)."""
    scale_fmt: str | None = None
    """FP8 activation scale format (ModelArgs.quantization.scale_fmt), so experts re-quantize exactly."""
    capacity: int | None = None
    """Rows per rank pair in the first dispatch all-to-all: None adapts per layer from the last
    exchange; a number fixes it (1: exact counts, always two rounds)."""
    capacity_slack: float = 0.25
    """Adaptive capacity = largest bucket of the last exchange x (1 + slack) + 1."""
    max_padding: float = 3.0
    """Adaptive capacity only while W * W * C <= max_padding x the rows of all ranks; else C = 1."""

    def __post_init__(self) -> None:
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1 row per rank pair, got {self.capacity}")
        if self.capacity_slack < 0 or self.max_padding < 1:
            raise ValueError("capacity_slack must be >= 0 and max_padding >= 1")


@dataclass
class DispatchStats:
    """Counters of what this rank sent, for benchmarks and tests (not exported as metrics)."""

    exchanges: int = 0
    tokens: int = 0
    pairs: int = 0
    """(token, expert) pairs routed from this rank."""
    offrank_pairs: int = 0
    """Pairs whose chosen replica is on another rank."""
    rows: int = 0
    offrank_rows: int = 0
    dispatch_bytes: int = 0
    """Bytes of rows (payload + metadata) sent to other ranks; padding and headers not included."""
    pad_bytes: int = 0
    """Bytes of bucket padding and row headers sent to other ranks (wire = dispatch + pad bytes)."""
    combine_bytes: int = 0
    """Bytes of partial sums sent back to other ranks."""
    count_bytes: int = 0
    """Bytes of separate counts exchanges: 0 (counts travel in the row headers); kept for reports."""
    overflow_rounds: int = 0
    """Exchanges that needed the second round (some bucket held more rows than the capacity)."""
    capacity_rows: int = 0
    """Sum over exchanges of the capacity used (rows per rank pair)."""
    dispatch_s: float = 0.0
    combine_s: float = 0.0

    def reset(self) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, type(getattr(self, f))())


@dataclass
class _Route:
    """This rank's routing table of one layer."""

    cand: torch.Tensor  # (E, C) int64: candidate ranks per logical expert, -1 padded
    ncand: torch.Tensor  # (E,) int64
    dest0: torch.Tensor | None  # (E,) int64 when every expert has exactly one candidate
    hosted: tuple[int, ...]


@dataclass
class _Layout:
    """Byte layout of a dispatch row: [activation | fp8 scales | K ids | K weights | header]."""

    D: int
    K: int
    act_dtype: torch.dtype  # dtype of the activation segment (e4m3 or the activation dtype)
    groups: int  # 1x128 scale groups (fp8 only)
    act_bytes: int  # activation segment incl. padding to 4 bytes
    row_bytes: int = field(init=False)
    """Payload + metadata: what `DispatchStats.dispatch_bytes` counts per row."""
    wire_bytes: int = field(init=False)
    """row_bytes + the header column: the size of a row in the buffers."""

    def __post_init__(self) -> None:
        self.row_bytes = self.act_bytes + 4 * self.groups + 8 * self.K
        self.wire_bytes = self.row_bytes + HEADER_BYTES

    def cols(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, wire_bytes) uint8 -> strided views (act (N, D) act dtype or uint8 for e4m3,
        scales (N, G) fp32 or None, ids (N, K) int32, weights (N, K) fp32, header (N, 4) int32)."""
        o = self.act_bytes
        if self.act_dtype == FP8_DTYPE:
            act = buf[:, : self.D]
        else:
            act = buf[:, : self.act_bytes].view(self.act_dtype)[:, : self.D]
        scales = buf[:, o : o + 4 * self.groups].view(torch.float32) if self.groups else None
        o += 4 * self.groups
        ids = buf[:, o : o + 4 * self.K].view(torch.int32)
        w = buf[:, o + 4 * self.K : o + 8 * self.K].view(torch.float32)
        hdr = buf[:, self.row_bytes :].view(torch.int32)
        return act, scales, ids, w, hdr


class _Pool:
    """Reusable CPU buffers for the exchanges (on CUDA the caching allocator does this already).

    A fresh CPU tensor of a few MB is mmap'ed and page-faults on first touch at every step; with
    many ranks per core that cost more than the copies themselves. Buffers are taken by an
    exchange and given back when it finishes, so two micro-batches in flight never share one.
    """

    MAX_FREE = 48

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = device.type == "cpu"
        self.free: list[torch.Tensor] = []  # flat uint8, ascending size

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, held: list[torch.Tensor]) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        if not self.enabled or n == 0:
            return torch.empty(shape, dtype=dtype, device=self.device)
        for i, b in enumerate(self.free):
            if b.numel() >= n:
                buf = self.free.pop(i)
                break
        else:
            # Round up to 1/8 of a power of two: sizes vary a little from step to step.
            step = max(4096, 1 << max(0, n.bit_length() - 4))
            buf = torch.empty(-(-n // step) * step, dtype=torch.uint8, device=self.device)
        held.append(buf)
        return buf[:n].view(dtype).view(shape)

    def give(self, held: list[torch.Tensor]) -> None:
        if not held:
            return
        self.free.extend(held)
        held.clear()
        self.free.sort(key=torch.Tensor.numel)
        while len(self.free) > self.MAX_FREE:
            self.free.pop(0)


class Dispatcher:
    """The routed-expert step of every MoE layer of one rank, across the EP group.

    ctx: this rank and the process group (None group: a single process, no collectives).
    emap: the expert map; `set_map` swaps it at a step boundary. metrics: a WorkerMetrics or None.
    """

    def __init__(
        self,
        ctx: ParallelContext,
        emap: ExpertMap,
        *,
        device: torch.device | str | None = None,
        config: DispatchConfig | None = None,
        metrics: Any = None,
    ):
        self.ctx = ctx
        self.rank, self.world = ctx.rank, ctx.world_size
        self.group = ctx.group
        self.members = ctx.members
        """The map ranks in the process group (None: all); the others are lost and host nothing,
        so nothing is ever sent to them and their buckets arrive empty."""
        self.wait_work: Callable[[Any], None] = lambda work: work.wait()
        """How to wait for a collective in flight (the engine waits in slices, watching for a
        broken group: `engine.membership._Watch`)."""
        self.device = torch.device(device or "cpu")
        self.config = config or DispatchConfig()
        self.metrics = metrics
        self.stats = DispatchStats()
        self.routes: dict[int, _Route] = {}
        self.emap: ExpertMap | None = None
        self.pool = _Pool(self.device)
        self._arange: torch.Tensor | None = None
        self.capacity: dict[int, int] = {}
        """Per layer: rows per rank pair of its next exchange (agreed by all ranks, see the module doc)."""
        self.set_map(emap)

    # ---- map ----

    def set_map(self, emap: ExpertMap) -> None:
        """Use `emap` from the next exchange on (call between steps only)."""
        if emap.world_size != self.world:
            raise ValueError(f"expert map has {emap.world_size} ranks, the group {self.world}")
        routes = {}
        for layer in emap.moe_layers:
            cand, ncand = emap.route_table(self.rank, layer)
            dest0 = cand[:, 0].contiguous().to(self.device) if bool((ncand == 1).all()) else None
            routes[layer] = _Route(cand.to(self.device), ncand.to(self.device), dest0, emap.owned(self.rank)[layer])
        node = torch.tensor(emap.node_index(), dtype=torch.int64)
        self.same_node = (node == node[self.rank]).to(self.device)  # (W,) bool: rank on my node
        self.routes = routes
        self.emap = emap
        E = emap.n_experts
        # Received (token, expert) pairs per layer, expert and source (0 same node, 1 remote),
        # accumulated on the device and flushed to Prometheus once per step (one sync, not one
        # per layer); only experts this rank hosts can receive any.
        self._layer_index = {layer: i for i, layer in enumerate(routes)}
        self._received = torch.zeros(len(routes), E * 2, dtype=torch.int64, device=self.device)
        self._hosted = [(layer, e) for layer, r in routes.items() for e in r.hosted]
        self._hosted_index = torch.tensor([self._layer_index[layer] * E + e for layer, e in self._hosted],
                                          dtype=torch.int64, device=self.device)
        self.sent_to = {layer: torch.zeros(self.world, dtype=torch.int64, device=self.device) for layer in routes}
        """Per layer: (token, expert) pairs this rank sent to each rank (replica choices)."""
        # The capacities stay: they only change at collective points, so they stay agreed.

    # ---- the RoutedExperts protocol ----

    def __call__(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        experts: Mapping[int, MLP],
        layer_id: int,
    ) -> torch.Tensor:
        ex = self.start(x, topk_ids, topk_weights, experts, layer_id)
        while not ex.advance():
            pass
        return ex.result()

    def start(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        experts: Mapping[int, MLP],
        layer_id: int,
    ) -> Exchange:
        """Route and pack `x` (T, D) and start the dispatch all-to-all; `advance()` the rest."""
        return Exchange(self, x, topk_ids, topk_weights, experts, layer_id)

    def _iota(self, n: int, device: torch.device) -> torch.Tensor:
        """arange(n) as a slice of a cached one (read-only use)."""
        a = self._arange
        if a is None or a.numel() < n or a.device != device:
            a = self._arange = torch.arange(max(n, 1024), device=device)
        return a[:n]

    # ---- capacity ----

    def _capacity(self, layer_id: int) -> int:
        if self.config.capacity is not None:
            return self.config.capacity
        return self.capacity.get(layer_id, 1)

    def _learn(self, layer_id: int, biggest: int, most_tokens: int, all_rows: int) -> None:
        """Capacity of the layer's next exchange from this one's headers (the same on every rank)."""
        if self.config.capacity is not None:
            return
        cap = min(math.ceil(biggest * (1 + self.config.capacity_slack)) + 1, most_tokens)
        if self.world * self.world * cap > self.config.max_padding * max(all_rows, 1):
            cap = 1
        self.capacity[layer_id] = max(1, cap)

    # ---- metrics ----

    def flush_metrics(self) -> None:
        """Add the pairs received since the last flush to `moe_expert_tokens_total` (once per step)."""
        if self.metrics is None or not self._hosted:
            return
        counts = self._received.view(-1, 2)[self._hosted_index].tolist()  # (hosted, 2)
        self._received.zero_()
        for (layer, e), (same, remote) in zip(self._hosted, counts, strict=True):
            if same or remote:
                # The label is the MoE layer index (0-based), as in the plan and the operator.
                self.metrics.count_expert_tokens(self._layer_index[layer], e, same, remote)

    def layout(self, D: int, K: int, dtype: torch.dtype) -> _Layout:
        if self.config.fp8_payload:
            groups = math.ceil(D / FP8_BLOCK)
            return _Layout(D, K, FP8_DTYPE, groups, D + (-D) % 4)
        size = torch.empty((), dtype=dtype).element_size()
        return _Layout(D, K, dtype, 0, D * size + (-(D * size)) % 4)

    def _a2a(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None, in_splits: list[int] | None):
        """Asynchronous all_to_all_single on the group; a local copy for a single process.
        Splits and equal buckets are per map rank; with lost ranks (`members`) only the members'
        parts travel (the lost ranks' are empty: they host no expert and send no token)."""
        if self.world == 1:
            out.copy_(inp)
            return None
        if self.members is None:
            return dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)
        live = self.members
        if out_splits is not None and in_splits is not None:
            return dist.all_to_all_single(out, inp, [out_splits[r] for r in live], [in_splits[r] for r in live],
                                          group=self.group, async_op=True)
        return _MemberBuckets(self, out, inp)


class _MemberBuckets:
    """An equal-bucket all-to-all of a group with lost ranks: sends the members' buckets only and,
    on `wait()`, puts what arrived into the members' buckets of `out`, zeroing the lost ranks'
    (an empty bucket: its header says 0 rows)."""

    def __init__(self, d: Dispatcher, out: torch.Tensor, inp: torch.Tensor):
        W, M = d.world, len(d.members)
        self.out = out.view(W, out.shape[0] // W, *out.shape[1:])
        self.idx = torch.tensor(d.members, dtype=torch.int64, device=out.device)
        self.lost = torch.tensor([r for r in range(W) if r not in d.members], dtype=torch.int64, device=out.device)
        send = inp.view(W, inp.shape[0] // W, *inp.shape[1:])[self.idx].reshape(-1, *inp.shape[1:])
        self.recv = torch.empty((M * self.out.shape[1], *out.shape[1:]), dtype=out.dtype, device=out.device)
        self.work = dist.all_to_all_single(self.recv, send, None, None, group=d.group, async_op=True)

    def wait(self, timeout: Any = None) -> bool:
        if timeout is None:
            self.work.wait()
        else:
            self.work.wait(timeout=timeout)
        self.out[self.idx] = self.recv.view(len(self.idx), *self.out.shape[1:])
        self.out[self.lost] = 0
        return True


def _segments(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenated ranges [starts[i], starts[i] + lengths[i]) as one int64 index."""
    total = int(lengths.sum())
    offs = torch.cumsum(lengths, 0) - lengths  # (n,) where each range begins in the output
    return torch.arange(total, device=starts.device) + torch.repeat_interleave(starts - offs, lengths, output_size=total)


class Exchange:
    """Dispatch -> expert compute -> combine of one layer for one micro-batch, in three stages.

    Construction routes and packs and starts the dispatch all-to-all. Each `advance()` waits for
    the collective in flight, does the next piece of work and starts the next collective:
    1: rows arrived -> run experts, start the partial sums back (or, when a bucket overflowed, start
    the rows past the capacity); 2: sums arrived -> add per token (or: the rest of the rows arrived
    -> experts, sums back); 3: nothing (or: sums arrived -> add per token). Returns True after the
    third; then `result()`. Every rank must create and advance its exchanges in the same order.
    """

    def __init__(
        self,
        d: Dispatcher,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        experts: Mapping[int, MLP],
        layer_id: int,
    ):
        self.d = d
        self.x = x
        self.experts = experts
        self.layer_id = layer_id
        self.stage = 0
        self._held: list[torch.Tensor] = []
        self._t0 = time.perf_counter()
        route = d.routes.get(layer_id)
        if route is None:
            raise KeyError(f"layer {layer_id} is not an MoE layer of the expert map")
        T, K = topk_ids.shape
        D = x.shape[-1]
        W = d.world
        dev = x.device
        self.T, self.D = T, D
        self.layout = lay = d.layout(D, K, x.dtype)

        flat = topk_ids.reshape(-1)  # (P,) logical expert of each (token, k) pair
        P = flat.numel()
        if route.dest0 is not None:
            dest = route.dest0[flat]  # (P,)
        else:
            dest = choose_replicas(flat, route.cand, route.ncand, d.rank)
        pair = d._iota(P, dev)
        tok, slot = pair // K, pair % K
        # One row per (destination, token), sorted by destination then token.
        key = dest * max(T, 1) + tok
        ukey, inv = torch.unique(key, sorted=True, return_inverse=True)  # (R,), (P,)
        R = ukey.numel()
        self.row_tok = ukey % max(T, 1)  # (R,) origin token of each row
        row_dest = ukey // max(T, 1)
        counts_t = torch.bincount(row_dest, minlength=W)  # (W,) rows per destination
        self.send_counts = counts = counts_t.tolist()
        biggest = max(counts)
        self.C = C = d._capacity(layer_id)

        # Where each row goes: slot `row_dest * C + index in its bucket` of the capacity buffer,
        # or, past C, the overflow buffer (same order, grouped by destination).
        within = d._iota(R, dev) - (torch.cumsum(counts_t, 0) - counts_t)[row_dest]  # (R,)
        in_cap = within < C
        self.overflow = biggest > C
        ids_r = torch.full((R, K), -1, dtype=torch.int32, device=dev)
        ids_r[inv, slot] = flat.to(torch.int32)
        w_r = torch.zeros(R, K, dtype=torch.float32, device=dev)
        w_r[inv, slot] = topk_weights.reshape(-1).float()
        if d.config.fp8_payload and T:
            q, s = act_quant(x, d.config.scale_fmt)  # (T, D) e4m3, (T, G) fp32: once per token
            src = (q.view(torch.uint8), s)
        else:
            src = (x, None)

        self.send_buf = buf = d.pool.take((W * C, lay.wire_bytes), torch.uint8, self._held)
        act, scales, ids, w, hdr = lay.cols(buf)
        if self.overflow:
            cap_rows = in_cap.nonzero().squeeze(1)
            pos = row_dest[cap_rows] * C + within[cap_rows]
        else:
            cap_rows, pos = None, row_dest * C + within
        slot_tok = torch.zeros(W * C, dtype=torch.int64, device=dev)  # padding slots copy token 0
        slot_tok[pos] = self.row_tok if cap_rows is None else self.row_tok[cap_rows]
        if T:
            torch.index_select(src[0], 0, slot_tok, out=act)
            if scales is not None:
                torch.index_select(src[1], 0, slot_tok, out=scales)
        ids[pos] = ids_r if cap_rows is None else ids_r[cap_rows]
        w[pos] = w_r if cap_rows is None else w_r[cap_rows]
        head = torch.tensor([[n, biggest, T, R] for n in counts], dtype=torch.int32, device=dev)
        hdr[::C] = head  # (W, 4): the first row of each bucket

        if self.overflow:
            ov_rows = (~in_cap).nonzero().squeeze(1)
            self.ov_send = ob = d.pool.take((ov_rows.numel(), lay.wire_bytes), torch.uint8, self._held)
            o_act, o_scales, o_ids, o_w, _ = lay.cols(ob)
            o_tok = self.row_tok[ov_rows]
            torch.index_select(src[0], 0, o_tok, out=o_act)
            if o_scales is not None:
                torch.index_select(src[1], 0, o_tok, out=o_scales)
            o_ids.copy_(ids_r[ov_rows])
            o_w.copy_(w_r[ov_rows])
            self.ov_send_counts = [max(0, n - C) for n in counts]

        self.recv_buf = d.pool.take((W * C, lay.wire_bytes), torch.uint8, self._held)
        self._work = d._a2a(self.recv_buf, buf, None, None)

        st = d.stats
        st.exchanges += 1
        st.tokens += T
        st.pairs += P
        st.rows += R
        st.capacity_rows += C
        if W > 1:
            off_rows = R - counts[d.rank]
            st.offrank_rows += off_rows
            st.dispatch_bytes += off_rows * lay.row_bytes
            ov_off = sum(self.ov_send_counts) - self.ov_send_counts[d.rank] if self.overflow else 0
            st.pad_bytes += ((W - 1) * C + ov_off) * lay.wire_bytes - off_rows * lay.row_bytes
        pairs_to = torch.bincount(dest, minlength=W)  # (W,)
        d.sent_to[layer_id] += pairs_to
        if W > 1:
            st.offrank_pairs += P - int(pairs_to[d.rank])

    def advance(self) -> bool:
        if self._work is not None:
            self.d.wait_work(self._work)
            self._work = None
        if self.stage == 0:  # bucket rows arrived
            self._headers()
            if self.overflow_any:
                self._send_overflow()
            else:
                self._experts_and_send_back()
        elif self.stage == 1:
            if self.overflow_any:  # the rows past the capacity arrived
                self._experts_and_send_back()
            else:
                self._add_up()
        elif self.stage == 2:
            if self.overflow_any:
                self._add_up()
        else:
            raise RuntimeError("exchange already finished")
        self.stage += 1
        return self.stage == 3

    def result(self) -> torch.Tensor:
        """(T, D) in the activation dtype: sum_k w[t, k] * expert_{ids[t, k]}(x[t])."""
        if self.stage != 3:
            raise RuntimeError("exchange not finished: advance() it first")
        return self._out

    # ---- stages ----

    def _headers(self) -> None:
        """Read the first row's header of every bucket: rows per source, and what the next
        exchange's capacity is learnt from (every rank reads the same maxima)."""
        d, C = self.d, self.C
        _, _, _, _, hdr = self.layout.cols(self.recv_buf)
        head = hdr[::C].tolist()  # (W, 4)
        self.recv_counts = [h[0] for h in head]
        biggest = max(h[1] for h in head)
        self.overflow_any = biggest > C
        d._learn(self.layer_id, biggest, max(h[2] for h in head), sum(h[3] for h in head))
        if self.overflow_any:
            d.stats.overflow_rounds += 1

    def _send_overflow(self) -> None:
        d, C, lay = self.d, self.C, self.layout
        recv_ov = [max(0, n - C) for n in self.recv_counts]
        send_ov = self.ov_send_counts if self.overflow else [0] * d.world
        if not self.overflow:
            self.ov_send = torch.empty(0, lay.wire_bytes, dtype=torch.uint8, device=self.x.device)
        self.ov_recv = d.pool.take((sum(recv_ov), lay.wire_bytes), torch.uint8, self._held)
        self._work = d._a2a(self.ov_recv, self.ov_send, recv_ov, send_ov)

    def _experts_and_send_back(self) -> None:
        d, C, lay, dev = self.d, self.C, self.layout, self.x.device
        t = time.perf_counter()
        self._observe("dispatch", t - self._t0)
        # The received rows, grouped by source in the sender's order: each source's first
        # min(n, C) rows from its bucket, then (overflow) the rest from the second round.
        n = torch.tensor(self.recv_counts, dtype=torch.int64, device=dev)  # (W,)
        src_rank = torch.arange(d.world, device=dev)
        in_cap = n.clamp(max=C)
        Rr = sum(self.recv_counts)
        if not self.overflow_any and Rr == d.world * C:
            rows = self.recv_buf  # every bucket exactly full: no gather
        else:
            if self.overflow_any:
                ov = n - in_cap
                src = torch.cat([self.recv_buf, self.ov_recv])
                starts = torch.stack([src_rank * C, d.world * C + torch.cumsum(ov, 0) - ov], 1).flatten()
                idx = _segments(starts, torch.stack([in_cap, ov], 1).flatten())
            else:
                src, idx = self.recv_buf, _segments(src_rank * C, in_cap)
            rows = d.pool.take((Rr, lay.wire_bytes), torch.uint8, self._held)
            torch.index_select(src, 0, idx, out=rows)
        # (rows received, D) in the combine dtype, grouped by source, for the collective.
        self.back_send = y = self._compute(rows)
        self.back_recv = d.pool.take((sum(self.send_counts), self.D), y.dtype, self._held)
        self._t1 = time.perf_counter()
        self._work = d._a2a(self.back_recv, y, self.send_counts, self.recv_counts)
        d.stats.combine_bytes += (Rr - self.recv_counts[d.rank]) * self.D * y.element_size()

    def _add_up(self) -> None:
        d = self.d
        self._observe("combine", time.perf_counter() - self._t1)
        back = self.back_recv
        acc = d.pool.take((self.T, self.D), torch.float32, self._held)
        acc.zero_()
        if back.dtype != torch.float32:
            back = d.pool.take(tuple(back.shape), torch.float32, self._held).copy_(back)
        acc.index_add_(0, self.row_tok, back)
        self._out = torch.empty(self.T, self.D, dtype=self.x.dtype, device=self.x.device).copy_(acc)
        # Drop the views of pooled buffers before the buffers go back.
        self.send_buf = self.recv_buf = self.back_send = self.back_recv = None
        self.ov_send = self.ov_recv = None
        d.pool.give(self._held)

    def _observe(self, what: str, seconds: float) -> None:
        d = self.d
        if what == "dispatch":
            d.stats.dispatch_s += seconds
        else:
            d.stats.combine_s += seconds
        if d.metrics is not None:
            hist = d.metrics.dispatch_seconds if what == "dispatch" else d.metrics.combine_seconds
            hist.labels(**d.metrics.lbl()).observe(seconds)

    def _compute(self, rows: torch.Tensor) -> torch.Tensor:
        """Run this rank's experts on the received rows (Rr, wire_bytes) -> (Rr, D) weighted partial
        sums in the combine dtype."""
        d = self.d
        act, scales, ids32, w, _ = self.layout.cols(rows)
        if d.config.fp8_payload:
            xin = _dequant_rows(act.contiguous().view(FP8_DTYPE), scales).to(self.x.dtype)
        else:
            xin = act  # (Rr, D) strided view of the rows
        ids = ids32.long()  # (Rr, K), -1: another rank's
        if rows.shape[0] and d.metrics is not None:
            self._count_received(ids)
        dtype = d.config.combine_dtype or self.x.dtype
        out = d.pool.take((rows.shape[0], self.D), dtype, self._held)
        scratch = d.pool.take((rows.shape[0], self.D), torch.float32, self._held)
        try:
            return expert_rows(xin, ids, w, self.experts, self.layer_id, dtype, out=out, scratch=scratch)
        except KeyError as e:
            raise RuntimeError(
                f"rank {d.rank}: {e.args[0]} (the ranks of the group disagree on the expert map)"
            ) from None

    def _count_received(self, ids: torch.Tensor) -> None:
        d = self.d
        src = torch.repeat_interleave(
            torch.arange(d.world, device=ids.device), torch.tensor(self.recv_counts, device=ids.device)
        )  # (Rr,) source rank of each row
        remote = (~d.same_node[src]).long()[:, None].expand_as(ids)  # (Rr, K)
        valid = ids >= 0
        key = ids[valid] * 2 + remote[valid]
        acc = d._received[d._layer_index[self.layer_id]]  # (E * 2,) view
        acc += torch.bincount(key, minlength=acc.numel())


def expert_rows(
    x: torch.Tensor,
    ids: torch.Tensor,
    w: torch.Tensor,
    experts: Mapping[int, MLP],
    layer_id: int,
    out_dtype: torch.dtype,
    *,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Received rows through this rank's experts: x (R, D), ids (R, K) logical ids or -1 (a slot
    another rank serves), w (R, K) -> (R, D) `out_dtype` = sum_k w * expert_k(x).

    Rows are grouped per expert as in `model.run_local_experts` and products are summed in fp32,
    rounded once to `out_dtype`. Every row has at least one slot here (it was sent for one); when
    each has exactly one (one expert per rank, the large-EP case) results are written in place,
    without the fp32 accumulator. `out`: an (R, D) `out_dtype` tensor to write into (contiguous);
    `scratch`: an (R, D) fp32 work buffer (both to reuse memory across steps).
    """
    R, K = ids.shape
    D = x.shape[-1]
    row, slot = (ids >= 0).nonzero(as_tuple=True)  # row-major: rows ascending
    eid = ids[row, slot]
    wt = w[row, slot]
    single = row.numel() == R
    if out is None:
        out = torch.empty(R, D, dtype=out_dtype, device=x.device)
    acc = None if single else torch.zeros(R, D, dtype=torch.float32, device=x.device)
    order = torch.argsort(eid, stable=True)
    uniq, counts = torch.unique_consecutive(eid[order], return_counts=True)
    start = 0
    for e, n in zip(uniq.tolist(), counts.tolist(), strict=True):
        sel = order[start : start + n]
        start += n
        expert = experts.get(e)
        if expert is None:
            raise KeyError(f"layer {layer_id}: tokens routed to expert {e}, which this rank does not hold")
        if single and n == R:  # one expert got every row, in row order: no gather, no scatter
            # Products in fp32, rounded once. A promoting multiply on a strided bf16 view is ~5x
            # slower on CPU than converting into a contiguous fp32 buffer and scaling in place.
            h = expert(x)
            f = scratch if scratch is not None else torch.empty(R, D, dtype=torch.float32, device=x.device)
            out.copy_(f.copy_(h).mul_(wt[:, None]))
            continue
        r = row[sel]
        h = torch.mul(expert(x.index_select(0, r)), wt[sel, None])  # (n, D) fp32
        if acc is not None:
            acc.index_add_(0, r, h)
        else:
            out[r] = h.to(out_dtype)
    if acc is not None:
        out.copy_(acc)
    return out


def choose_replicas(flat: torch.Tensor, cand: torch.Tensor, ncand: torch.Tensor, rank: int) -> torch.Tensor:
    """Destination rank of each (token, k) pair: round-robin over its expert's candidates.

    flat (P,) logical expert ids; cand (E, C) candidate ranks (-1 padded), ncand (E,) how many.
    The i-th pair of expert e (in token order) goes to cand[e, (i + rank) % ncand[e]]: each
    candidate gets within one pair of an equal share, and the offset by the sending rank spreads
    the remainders of different senders over different replicas.
    """
    P = flat.numel()
    E = cand.shape[0]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    start = torch.cumsum(counts, 0) - counts  # (E,) first slot of each expert in `order`
    pos = torch.empty(P, dtype=torch.int64, device=flat.device)
    pos[order] = torch.arange(P, device=flat.device) - start[flat[order]]  # index of the pair within its expert
    return cand[flat, (pos + rank) % ncand[flat]]


def _dequant_rows(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """e4m3 rows (R, D) with 1x128 scales (R, G) -> fp32 (R, D), exactly q * s."""
    R, D = q.shape
    G = s.shape[1]
    qf = q.float()
    if D != G * FP8_BLOCK:
        qf = torch.nn.functional.pad(qf, (0, G * FP8_BLOCK - D))
    return (qf.view(R, G, FP8_BLOCK) * s[:, :, None]).flatten(1)[:, :D]


def interleave(stages: Iterable[Iterator[Any]]) -> None:
    """Advance generators round-robin, one stage (up to its next `yield`) each, until all finish.

    Each generator is one micro-batch's forward, yielding while a collective is in flight. Every
    rank must pass the same number of generators with the same yield structure, so collectives
    are issued in the same order everywhere.
    """
    active = list(stages)
    while active:
        for g in list(active):
            try:
                next(g)
            except StopIteration:
                active.remove(g)


__all__ = ["DispatchConfig", "DispatchStats", "Dispatcher", "Exchange", "choose_replicas", "expert_rows", "interleave"]
