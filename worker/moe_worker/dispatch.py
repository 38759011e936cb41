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
   routing weights. Rows are grouped by destination rank.
3. Exchange the per-destination row counts (`all_to_all_single` of W int64), then the rows in
   one `all_to_all_single` of uint8 with those split sizes: one message per rank pair, never one
   per token.
4. The receiver runs its experts on what arrived (`expert_rows`: grouped per expert, weights
   applied and a row's experts summed in fp32, as `model.run_local_experts`), so each row comes
   back as one partial sum.
5. Combine: the partial sums go back along the reverse splits in `combine_dtype` (bf16 in
   production) and the origin adds them per token in fp32.

`Exchange` does this in four stages with asynchronous collectives in between, so a second
micro-batch's compute can run while one's bytes are in flight (`interleave`). `Dispatcher` is a
`model.RoutedExperts`: `moe.routed = dispatcher` runs all four stages in one call.

Bytes per row: D * dtype (D + 4 * ceil(D/128) with fp8) + 8K for the metadata; the combine row is
D * combine dtype. For DeepSeek-V3 (D 7168, K 8) the metadata is 0.4% of a bf16 row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .config import FP8_BLOCK
from .expertmap import ExpertMap
from .fp8 import FP8_DTYPE, act_quant
from .model import MLP, ParallelContext


@dataclass(frozen=True)
class DispatchConfig:
    """How tokens travel. Every rank of a group must use the same settings."""

    fp8_payload: bool = False
    """Send activations as e4m3 with 1x128 fp32 scales (DeepSeek's FP8 dispatch), else as they are."""
    combine_dtype: torch.dtype | None = None
    """dtype of the partial sums sent back; None: the activation dtype (bf16 in production)."""
    scale_fmt: str | None = None
    """FP8 activation scale format (ModelArgs.quantization.scale_fmt), so experts re-quantize exactly."""


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
    """Bytes of rows sent to other ranks (payload + metadata), counts exchange not included."""
    combine_bytes: int = 0
    """Bytes of partial sums sent back to other ranks."""
    count_bytes: int = 0
    """Bytes of the counts exchanges sent to other ranks."""
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
    """Byte layout of a dispatch row."""

    D: int
    K: int
    act_dtype: torch.dtype  # dtype of the activation segment (e4m3 or the activation dtype)
    groups: int  # 1x128 scale groups (fp8 only)
    act_bytes: int  # activation segment incl. padding to 4 bytes
    row_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.row_bytes = self.act_bytes + 4 * self.groups + 8 * self.K


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """(R, n) tensor -> (R, n * itemsize) uint8 view."""
    R, n = t.shape
    return t.contiguous().view(torch.uint8).view(R, n * t.element_size())


def _from_bytes(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, n) uint8 column slice of a row buffer -> (R, n / itemsize) `dtype`, a view when the
    slice is aligned (rows and segments are multiples of 4 bytes), else a copy."""
    R, n = b.shape
    size = torch.empty((), dtype=dtype).element_size()
    try:
        return b.view(dtype)
    except RuntimeError:
        return b.contiguous().view(dtype).view(R, n // size)


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
        self.device = torch.device(device or "cpu")
        self.config = config or DispatchConfig()
        self.metrics = metrics
        self.stats = DispatchStats()
        self.routes: dict[int, _Route] = {}
        self.emap: ExpertMap | None = None
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
        """Route and pack `x` (T, D) and start the counts exchange; `advance()` the rest."""
        return Exchange(self, x, topk_ids, topk_weights, experts, layer_id)

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
        """Asynchronous all_to_all_single on the group; a local copy for a single process."""
        if self.world == 1:
            out.copy_(inp)
            return None
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=True)


class Exchange:
    """Dispatch -> expert compute -> combine of one layer for one micro-batch, in stages.

    Construction routes and packs and starts the counts exchange. Each `advance()` waits for the
    collective in flight, does the next piece of work and starts the next collective:
    1: counts arrived -> start the rows; 2: rows arrived -> run experts, start the partial sums
    back; 3: sums arrived -> add per token. Returns True after stage 3; then `result()`.
    Every rank must create and advance its exchanges in the same order.
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
        tok = torch.arange(P, device=dev) // K  # (P,)
        slot = torch.arange(P, device=dev) % K
        # One row per (destination, token), sorted by destination then token.
        key = dest * max(T, 1) + tok
        ukey, inv = torch.unique(key, sorted=True, return_inverse=True)  # (R,), (P,)
        R = ukey.numel()
        self.row_tok = ukey % max(T, 1)  # (R,) origin token of each row
        row_dest = ukey // max(T, 1)
        send_counts = torch.bincount(row_dest, minlength=W)  # (W,)
        # Counts first: their exchange is in flight while the rows are packed.
        self.send_counts_t = send_counts
        self.recv_counts_t = torch.empty_like(send_counts)
        self._work = d._a2a(self.recv_counts_t, send_counts, None, None)

        ids = torch.full((R, K), -1, dtype=torch.int32, device=dev)
        ids[inv, slot] = flat.to(torch.int32)
        w = torch.zeros(R, K, dtype=torch.float32, device=dev)
        w[inv, slot] = topk_weights.reshape(-1).float()

        if R:
            xr = x.index_select(0, self.row_tok)  # (R, D)
            parts = []
            if d.config.fp8_payload:
                q, s = act_quant(xr, d.config.scale_fmt)  # (R, D) e4m3, (R, G) fp32
                parts.append(_as_bytes(q))
                if lay.act_bytes > D:
                    parts.append(torch.zeros(R, lay.act_bytes - D, dtype=torch.uint8, device=dev))
                parts.append(_as_bytes(s))
            else:
                parts.append(_as_bytes(xr))
                pad = lay.act_bytes - D * x.element_size()
                if pad:
                    parts.append(torch.zeros(R, pad, dtype=torch.uint8, device=dev))
            parts += [_as_bytes(ids), _as_bytes(w)]
            self.send_buf = torch.cat(parts, dim=1)  # (R, row_bytes), grouped by destination
        else:
            self.send_buf = torch.empty(0, lay.row_bytes, dtype=torch.uint8, device=dev)

        st = d.stats
        st.exchanges += 1
        st.tokens += T
        st.pairs += P
        if d.world > 1:
            off = dest != d.rank
            st.offrank_pairs += int(off.sum())
            st.count_bytes += 8 * (W - 1)
        d.sent_to[layer_id] += torch.bincount(dest, minlength=W)

    def advance(self) -> bool:
        d = self.d
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self.stage == 0:  # counts arrived: send rows
            self.send_counts = self.send_counts_t.tolist()
            self.recv_counts = self.recv_counts_t.tolist()
            lay = self.layout
            self.recv_buf = torch.empty(sum(self.recv_counts), lay.row_bytes, dtype=torch.uint8, device=self.x.device)
            self._work = d._a2a(self.recv_buf, self.send_buf, self.recv_counts, self.send_counts)
            st = d.stats
            off_rows = sum(self.send_counts) - self.send_counts[d.rank]
            st.rows += sum(self.send_counts)
            st.offrank_rows += off_rows
            st.dispatch_bytes += off_rows * lay.row_bytes
        elif self.stage == 1:  # rows arrived: experts, send partial sums back
            t = time.perf_counter()
            self._observe("dispatch", t - self._t0)
            # (rows received, D) in the combine dtype; contiguous for the collective (FP8 linears on
            # CPU return transposed views, and the weight multiply keeps their layout).
            self.back_send = y = self._compute().contiguous()
            self.back_recv = torch.empty(sum(self.send_counts), self.D, dtype=y.dtype, device=self.x.device)
            self._t1 = time.perf_counter()
            self._work = d._a2a(self.back_recv, self.back_send, self.send_counts, self.recv_counts)
            d.stats.combine_bytes += (sum(self.recv_counts) - self.recv_counts[d.rank]) * self.D * self.back_send.element_size()
        elif self.stage == 2:  # partial sums arrived: add per token
            self._observe("combine", time.perf_counter() - self._t1)
            out = torch.zeros(self.T, self.D, dtype=torch.float32, device=self.x.device)
            out.index_add_(0, self.row_tok, self.back_recv.float())
            self._out = out.to(self.x.dtype)
        else:
            raise RuntimeError("exchange already finished")
        self.stage += 1
        return self.stage == 3

    def result(self) -> torch.Tensor:
        """(T, D) in the activation dtype: sum_k w[t, k] * expert_{ids[t, k]}(x[t])."""
        if self.stage != 3:
            raise RuntimeError("exchange not finished: advance() it first")
        return self._out

    def _observe(self, what: str, seconds: float) -> None:
        d = self.d
        if what == "dispatch":
            d.stats.dispatch_s += seconds
        else:
            d.stats.combine_s += seconds
        if d.metrics is not None:
            hist = d.metrics.dispatch_seconds if what == "dispatch" else d.metrics.combine_seconds
            hist.labels(**d.metrics.lbl()).observe(seconds)

    def _compute(self) -> torch.Tensor:
        """Run this rank's experts on the received rows -> (rows, D) weighted partial sums."""
        d, lay = self.d, self.layout
        buf = self.recv_buf
        Rr = buf.shape[0]
        D, K = lay.D, lay.K
        o = lay.act_bytes
        if d.config.fp8_payload:
            q = buf[:, :D].contiguous().view(FP8_DTYPE)  # (Rr, D)
            s = _from_bytes(buf[:, o : o + 4 * lay.groups], torch.float32)  # (Rr, G)
            xin = _dequant_rows(q, s).to(self.x.dtype)
            o += 4 * lay.groups
        else:
            xin = _from_bytes(buf[:, : D * self.x.element_size()], self.x.dtype)  # (Rr, D)
        ids = _from_bytes(buf[:, o : o + 4 * K], torch.int32).long()  # (Rr, K), -1: another rank's
        w = _from_bytes(buf[:, o + 4 * K : o + 8 * K], torch.float32)  # (Rr, K)
        if Rr and d.metrics is not None:
            self._count_received(ids)
        try:
            return expert_rows(xin, ids, w, self.experts, self.layer_id, d.config.combine_dtype or self.x.dtype)
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
) -> torch.Tensor:
    """Received rows through this rank's experts: x (R, D), ids (R, K) logical ids or -1 (a slot
    another rank serves), w (R, K) -> (R, D) `out_dtype` = sum_k w * expert_k(x).

    Rows are grouped per expert as in `model.run_local_experts` and products are summed in fp32,
    rounded once to `out_dtype`. Every row has at least one slot here (it was sent for one); when
    each has exactly one (one expert per rank, the large-EP case) results are written in place,
    without the fp32 accumulator.
    """
    R, K = ids.shape
    D = x.shape[-1]
    row, slot = (ids >= 0).nonzero(as_tuple=True)  # row-major: rows ascending
    eid = ids[row, slot]
    wt = w[row, slot]
    single = row.numel() == R
    out = torch.empty(R, D, dtype=out_dtype, device=x.device) if single else None
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
        r = row[sel]
        # (n, D) fp32: the multiply promotes, so the expert output is not copied to fp32 first.
        h = torch.mul(expert(x.index_select(0, r)), wt[sel, None])
        if out is None:
            acc.index_add_(0, r, h)
        elif n == R:  # one expert got every row, in row order
            out = h.to(out_dtype)
        else:
            out[r] = h.to(out_dtype)
    return out if out is not None else acc.to(out_dtype)


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
