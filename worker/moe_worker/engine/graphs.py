"""Decode steps as CUDA graphs: each layer's fixed-shape part captured once per batch bucket.

A decode step launches ~30 small kernels per layer for attention and the gate alone; at decode
sizes the GPU waits on those launches, not on the work. A graph replays them as one launch. What
a graph holds must have the same shapes and addresses at every replay, so a decode batch runs in a
bucket: B sequences padded to Bp (a power of two) rows, their keys padded to Tp (a power of two,
at least one page) positions, every per-step input copied into the bucket's own buffers:

- the hidden rows `x` (Bp, D), the RoPE rotation (Bp, R/2), and the paged-cache rows: where each
  new latent goes (Bp,), each sequence's key rows (Bp, Tp) and the padding mask (Bp, Tp);
- padding rows write and read the cache's scratch row (`PagedLatentCache.scratch_row`) and attend
  to it alone (so no -inf-only softmax), and their x stays finite: their results are dropped.

Per layer the graph is the layer's fixed-shape part: a dense layer whole; an MoE layer up to its
gate and the shared expert (`_segment`). The routed experts stay outside, eager: their grouping is
data-dependent (`.tolist()`), and with expert parallelism the all-to-all's split sizes are too.
The embedding, the final norm and the head also stay eager.

All graphs of a rank share one memory pool (see `DecodeGraphs.pool`), and every segment copies its
results into buffers that all layers of all buckets with the same Bp share (`_into`): what a rank
holds for its graphs is then about one segment's temporaries at the largest bucket, not one set
per bucket and layer. A segment is captured the first
time its bucket is used, after a warm-up run on a side stream (Triton compiles, cuBLAS picks its
kernels); the first replay is compared with that run, and a failure or a mismatch leaves that
bucket eager (logged) rather than serve different numbers.

On the CPU (`cuda_graphs="on"`, tests) the same fixed-shape segments run eagerly: the bucketing,
the padding and the buffers are then checked against the plain decode path without a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..model import DecodeRows, MoE, PagedLatentCache, Transformer, run_stages

log = logging.getLogger(__name__)

MAX_BATCH = 64
"""Largest decode batch that runs in a bucket (more sequences: the eager path)."""
MAX_POSITIONS = 4096
"""Longest keys a bucket holds (longer: the eager path). A bucket's attention temporaries grow with
rows x positions (about 2 KB per row per position for DeepSeek-V3) and stay reserved for its
graphs, and past a few thousand positions the attention's own work outweighs the launches saved."""


@dataclass
class _Bucket:
    """The fixed-size inputs of one (Bp, Tp) bucket and its captured segments."""

    rows: int
    positions: int
    x: torch.Tensor
    rope: torch.Tensor
    decode: DecodeRows
    graphs: dict[int, tuple[object, tuple[torch.Tensor, ...]]] = field(default_factory=dict)
    broken: bool = False
    """A capture failed or differed: this bucket runs eagerly from now on."""


def bucket_sizes(batch: int, longest: int, page: int) -> tuple[int, int]:
    """(Bp, Tp): `batch` rows and `longest` key positions rounded up to powers of two (Tp at
    least one page)."""
    return 1 << (batch - 1).bit_length(), max(page, 1 << (longest - 1).bit_length())


class DecodeGraphs:
    """One rank's decode-step segments, per bucket. `run(i, bucket)` gives layer i's outputs."""

    def __init__(self, model: Transformer, cache: PagedLatentCache, *, capture: bool, max_positions: int):
        self.model = model
        self.cache = cache
        self.capture = capture
        """True: CUDA graphs; False: the same segments, run eagerly (CPU)."""
        self.max_positions = min(max_positions, MAX_POSITIONS)
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        """One memory pool for every graph of the rank. Graphs run one after another on one stream
        and copy their results out of the pool (`_into`), so a block one graph only needs during
        its replay may serve as another's as well."""
        self._outputs: dict[tuple[int, int], tuple[torch.Tensor | None, ...]] = {}
        """(Bp, number of outputs) -> the buffers a segment's results go to (`_into`)."""
        self._kept: list[torch.Tensor] = []
        """fp8's scratch buffers that captured graphs use (they belong to the capturing thread)."""

    def bucket(self, x: torch.Tensor, rope: torch.Tensor, rows: DecodeRows) -> _Bucket | None:
        """The bucket of this decode batch (x (B, D), rope (B, R/2), its cache rows), loaded with
        them; None when none fits (more than MAX_BATCH sequences or MAX_POSITIONS keys) or its
        bucket is broken."""
        B, T = rows.keys.shape
        Bp, Tp = bucket_sizes(B, T, self.cache.page_size)
        if Bp > MAX_BATCH or Tp > max(self.max_positions, self.cache.page_size):
            return None
        b = self._buckets.get((Bp, Tp))
        if b is None:
            b = self._buckets[(Bp, Tp)] = self._new_bucket(Bp, Tp, x, rope)
        if b.broken:
            return None
        self._load(b, x, rope, rows)
        return b

    @property
    def captured(self) -> int:
        """Graphs captured so far (all buckets)."""
        return sum(len(b.graphs) for b in self._buckets.values())

    def _new_bucket(self, Bp: int, Tp: int, x: torch.Tensor, rope: torch.Tensor) -> _Bucket:
        dev, scratch = x.device, self.cache.scratch_row
        pad = torch.ones(Bp, Tp, dtype=torch.bool, device=dev)
        pad[:, 0] = False
        decode = DecodeRows(torch.full((Bp,), scratch, dtype=torch.long, device=dev),
                            torch.full((Bp, Tp), scratch, dtype=torch.long, device=dev), pad)
        return _Bucket(Bp, Tp, torch.zeros(Bp, x.shape[1], dtype=x.dtype, device=dev),
                       torch.zeros(Bp, rope.shape[1], dtype=rope.dtype, device=dev), decode)

    def _load(self, b: _Bucket, x: torch.Tensor, rope: torch.Tensor, rows: DecodeRows) -> None:
        """This step's rows into the bucket's buffers; every padding row back to the scratch row
        (a row a larger batch used last step must not write into a sequence's cache now)."""
        B, T = rows.keys.shape
        d = b.decode
        b.x[:B] = x
        b.rope[:B] = rope
        d.new[:B] = rows.new
        d.new[B:] = self.cache.scratch_row
        d.keys[:B, :T] = rows.keys
        d.keys[B:] = self.cache.scratch_row
        d.keys[:B, T:] = self.cache.scratch_row
        if rows.pad is None:
            d.pad[:B, :T] = False
        else:
            d.pad[:B, :T] = rows.pad
        d.pad[:B, T:] = True
        d.pad[B:] = True
        d.pad[B:, 0] = False

    def next_input(self, b: _Bucket, x: torch.Tensor) -> None:
        """The next layer's input rows (B, D) into the bucket."""
        b.x[: x.shape[0]] = x

    def run(self, i: int, b: _Bucket, rows: int) -> tuple[torch.Tensor, ...]:
        """Layer i's fixed-shape part on the bucket's buffers (`rows` of them this step's
        sequences): (x out,) for a dense layer, (h, xn, weights, ids, shared or None) for an MoE
        layer, each with Bp rows."""
        if not self.capture or b.broken:
            return self._into(i, b)
        entry = b.graphs.get(i)
        if entry is None:
            entry = self._capture(i, b, rows)
            if entry is None:  # (this bucket is broken now)
                return self._into(i, b)
            b.graphs[i] = entry
            return entry[1]  # the capture's check replayed it: this step's outputs
        graph, outs = entry
        graph.replay()
        return outs

    def _into(self, i: int, b: _Bucket) -> tuple[torch.Tensor, ...]:
        """`_segment`, its results copied into the outputs every layer of every bucket with Bp rows
        shares (valid until the next segment runs): a graph's own results are then temporaries of
        the shared pool, not memory held per bucket and layer."""
        outs = self._segment(i, b)
        held = self._outputs.get((b.rows, len(outs)))
        if held is None:
            with torch.inference_mode(False):  # plain tensors, written in and out of inference mode
                held = self._outputs[(b.rows, len(outs))] = tuple(
                    torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else None for t in outs)
        for h, t in zip(held, outs, strict=True):
            if h is not None:
                h.copy_(t)
        return held

    def _segment(self, i: int, b: _Bucket) -> tuple[torch.Tensor, ...]:
        block = self.model.layers[i]
        c = self.cache
        h = b.x + block.attn.forward_decode(block.attn_norm(b.x), b.rope, c.kv[i], c.pe[i], b.decode)
        if not isinstance(block.ffn, MoE):
            return (run_stages(block.ffn_stages(h)),)  # (a dense FFN never yields)
        xn = block.ffn_norm(h)
        weights, ids = block.ffn.gate(xn)
        shared = block.ffn.shared_experts(xn) if block.ffn.shared_experts is not None else None
        return h, xn, weights, ids, shared

    def _capture(self, i: int, b: _Bucket, rows: int):
        """Warm up layer i's segment on a side stream, capture it into the rank's pool, replay it
        once and compare this step's rows with the warm-up; None on any failure or mismatch (the
        bucket then runs eagerly, logged)."""
        from .. import fp8

        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                ref = [t[:rows].clone() if t is not None else None for t in self._into(i, b)]
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            capture = torch.cuda.Stream()
            with torch.cuda.stream(capture):  # (left even when the capture fails: the stream is restored)
                # thread_local: CUDA calls of other threads (a background expert load) do not void it
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    outs = self._into(i, b)
                finally:
                    graph.capture_end()
            torch.cuda.current_stream().wait_stream(capture)
            graph.replay()
            for r, o in zip(ref, outs, strict=True):
                if r is not None and r.is_floating_point() and not torch.allclose(
                        o[:rows].float(), r.float(), rtol=1e-3, atol=1e-3 * float(r.float().abs().max()), equal_nan=True):
                    raise RuntimeError(f"layer {i}: a replay differs from the same segment run eagerly")
            self._kept = fp8.scratch_buffers()
            return graph, outs
        except Exception as e:  # noqa: BLE001 - any capture failure: this bucket serves eagerly, said once
            b.broken = True
            log.error("CUDA graphs off for decode bucket %dx%d of this rank (capturing layer %d): %s: %s", b.rows,
                      b.positions, i, type(e).__name__, e)
            return None
