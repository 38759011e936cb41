"""Model semantics on tiny configs, fast paths against naive ones (fp32 unless noted).

Tolerances: in fp32 two orderings of the same arithmetic differ by a few ulps per operation;
after a few layers of K <= 320 sums that is ~1e-6 of the logits' scale, so 1e-5 relative (to the
largest |logit|) separates reassociation from any real difference (a wrong cache slot, position or
mask moves logits by >1e-2). bf16 comparisons use 3e-2: 2**-8 per rounding, compounded.
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_common.model_args import ModelArgs
from moe_worker.checkpoint import Checkpoint, load_model
from moe_worker.model import (
    Rotary,
    apply_rope,
    causal_mask,
    route,
    run_local_experts,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def tokens(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---- gate ---------------------------------------------------------------------------------------


def reference_gate(scores: torch.Tensor, bias: torch.Tensor, a: ModelArgs):
    """Transcription of DeepSeek-V3 inference/model.py Gate.forward after `scores.sigmoid()`."""
    original_scores = scores
    scores = scores + bias
    scores = scores.view(scores.size(0), a.n_group, -1)
    group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
    indices = group_scores.topk(a.topk_group, dim=-1)[1]
    mask = scores.new_ones(scores.size(0), a.n_group, dtype=bool).scatter_(1, indices, False)
    scores = scores.masked_fill_(mask.unsqueeze(-1), float("-inf")).flatten(1)
    indices = torch.topk(scores, a.num_experts_per_tok, dim=-1)[1]
    weights = original_scores.gather(1, indices)
    weights /= weights.sum(dim=-1, keepdim=True)
    weights *= a.routed_scaling_factor
    return weights, indices


@pytest.fixture
def args(tiny_config) -> ModelArgs:
    return ModelArgs.from_hf_config(tiny_config)


def test_route_matches_reference_gate(args):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(512, args.n_routed_experts, generator=g)
    bias = torch.randn(args.n_routed_experts, generator=g) * 0.3 - 0.5  # negative biased scores too
    w, ids = route(scores, bias, args)
    rw, rids = reference_gate(scores.clone(), bias, args)
    assert torch.equal(ids, rids)
    assert torch.allclose(w, rw, rtol=0, atol=1e-6)


def test_route_properties(args):
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(256, args.n_routed_experts, generator=g)
    bias = torch.randn(args.n_routed_experts, generator=g)
    w, ids = route(scores, bias, args)
    # weights come from the unbiased scores, normalised, times routed_scaling_factor
    unbiased = scores.gather(1, ids)
    assert torch.allclose(w, unbiased / unbiased.sum(-1, keepdim=True) * 2.5, atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.full((256,), 2.5), atol=1e-5)
    # at most topk_group groups per token, and they are the groups with the best top-2 sums
    groups = ids // args.experts_per_group
    assert max(len(set(row)) for row in groups.tolist()) <= args.topk_group
    # the bias changes the choice: with it removed, some tokens pick other experts
    _, ids0 = route(scores, torch.zeros_like(bias), args)
    assert not torch.equal(ids.sort(-1).values, ids0.sort(-1).values)


def test_group_masking_is_minus_infinity(args):
    """Biased scores all negative: masking dropped groups with 0.0 (transformers 4.51) would pick
    experts from them; -inf (reference) never does."""
    scores = torch.full((1, args.n_routed_experts), 0.1)
    scores[0, :4] = 0.3  # group 0 best, group 1 second
    scores[0, 4:8] = 0.2
    bias = torch.full((args.n_routed_experts,), -1.0)
    _, ids = route(scores, bias, args)
    assert set((ids // args.experts_per_group).flatten().tolist()) <= {0, 1}


# ---- rope ---------------------------------------------------------------------------------------


def test_rope_is_the_reference_complex_rotation(args):
    rot = Rotary(args)
    pos = torch.arange(37)
    cos, sin = rot(pos).real, rot(pos).imag
    x = torch.randn(2, 37, 4, args.qk_rope_head_dim)
    # reference apply_rotary_emb: view_as_complex on interleaved pairs times e^{i theta}
    freqs = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))
    ref = torch.view_as_real(torch.view_as_complex(x.view(2, 37, 4, -1, 2)) * freqs.view(1, 37, 1, -1)).flatten(3)
    assert torch.allclose(apply_rope(x, rot(pos)), ref, atol=1e-5)


def test_yarn_frequencies(args, tiny_config):
    """Fast dims (rotating > beta_fast times in 4096 positions) untouched, slow ones divided by 40."""
    inv = Rotary(args).inv_freq
    base = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    assert inv[0] == base[0]
    assert inv[-1] == pytest.approx(float(base[-1] / 40), rel=1e-6)
    plain = Rotary(ModelArgs.from_hf_config({**tiny_config, "rope_scaling": None})).inv_freq
    assert torch.equal(plain, base)


# ---- attention and cache ------------------------------------------------------------------------


@pytest.mark.parametrize("ckpt_name, dtype, tol", [("bf16_ckpt", torch.float32, 1e-5), ("fp8_ckpt", torch.float32, 1e-5)])
def test_absorbed_equals_naive(request, ckpt_name, dtype, tol):
    path = request.getfixturevalue(ckpt_name)
    # weight_only keeps fp8 weights but no activation rounding, so both forms compute the same math
    naive = load_model(path, dtype=dtype, attn_impl="naive", fp8_impl="weight_only")
    absorb = load_model(path, dtype=dtype, attn_impl="absorb", fp8_impl="weight_only")
    t = tokens(2, 11)
    ln, la = naive(t), absorb(t)
    assert ln.dtype == torch.float32 and ln.shape == (2, 11, 256)
    assert rel(la, ln) < tol


def test_absorbed_equals_naive_attention_in_bf16(bf16_ckpt):
    """In bf16 the two forms round differently (~3e-3 per layer); through the whole model that can
    flip a top-k expert choice, which moves the logits by far more than any attention tolerance
    (torch 2.15's CPU kernels did at this seed). So compare every layer's attention on the same input."""
    model = load_model(bf16_ckpt, dtype=torch.bfloat16, attn_impl="naive", fp8_impl="weight_only")
    inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, args: inputs.append(args)) for b in model.layers]
    model(tokens(2, 11))
    for h in hooks:
        h.remove()
    assert len(inputs) == len(model.layers)
    for block, (x, rope, start, mask, cache, _) in zip(model.layers, inputs, strict=True):
        naive = block.attn(x, rope, start, mask, cache, "naive")
        absorbed = block.attn(x, rope, start, mask, cache, "absorb")
        assert absorbed.dtype == torch.bfloat16 and rel(absorbed.float(), naive.float()) < 3e-2


@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_cached_decode_equals_full_recompute(bf16_ckpt, impl):
    model = load_model(bf16_ckpt, dtype=torch.float32, attn_impl=impl)
    t = tokens(2, 12, seed=3)
    full = model(t)
    cache = model.new_cache(batch=2, max_len=16)
    steps = [model(t[:, :5], 0, cache)]  # prefill
    steps += [model(t[:, i : i + 1], i, cache) for i in range(5, 8)]  # decode one token at a time
    steps.append(model(t[:, 8:12], 8, cache))  # a chunk after decoding (chunked prefill)
    assert rel(torch.cat(steps, dim=1), full) < 1e-5
    # a wrong position is caught by the comparison: it is not vacuous
    cache2 = model.new_cache(batch=2, max_len=16)
    model(t[:, :5], 0, cache2)
    assert rel(model(t[:, 5:6], 6, cache2), full[:, 5:6]) > 1e-3


def test_cached_decode_fp8_default_impl(fp8_ckpt):
    """FP8 model with the default (emulated FP8) products: decode == recompute as well."""
    model = load_model(fp8_ckpt, dtype=torch.float32)
    assert model.fp8
    t = tokens(1, 9, seed=4)
    full = model(t)
    cache = model.new_cache(1, 9)
    steps = [model(t[:, :4], 0, cache)] + [model(t[:, i : i + 1], i, cache) for i in range(4, 9)]
    assert rel(torch.cat(steps, 1), full) < 1e-5


def test_latent_cache_size(bf16_ckpt):
    model = load_model(bf16_ckpt, dtype=torch.float32)
    cache = model.new_cache(1, 8)
    assert cache.values_per_token_per_layer() == model.args.kv_lora_rank + model.args.qk_rope_head_dim == 80
    naive = load_model(bf16_ckpt, dtype=torch.float32, attn_impl="naive").new_cache(1, 8)
    assert naive.values_per_token_per_layer() == 4 * (48 + 32)


def test_cache_misuse_is_refused(bf16_ckpt):
    model = load_model(bf16_ckpt, dtype=torch.float32)
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        model(tokens(1, 5), 0, model.new_cache(1, 4))
    with pytest.raises(ValueError, match="needs the cache"):
        model(tokens(1, 1), 3)


def test_causal_mask():
    m = causal_mask(2, 3)
    assert m.shape == (3, 5)
    assert torch.isinf(m).tolist() == [[False, False, False, True, True], [False] * 4 + [True], [False] * 5]
    assert causal_mask(7, 1) is None


# ---- MoE: the replaceable routed-expert computation --------------------------------------------


def test_routed_experts_are_replaceable(bf16_ckpt):
    model = load_model(bf16_ckpt, dtype=torch.float32)
    t = tokens(1, 6)
    before = model(t)
    calls = []

    def recording(x, topk_ids, topk_weights, experts, layer_id):
        calls.append((layer_id, x.shape, topk_ids.shape, topk_weights.dtype, sorted(experts)))
        return run_local_experts(x, topk_ids, topk_weights, experts, layer_id)

    for moe in model.moe_layers():
        moe.routed = recording
    assert torch.equal(model(t), before)
    assert [c[0] for c in calls] == [1, 2]
    assert calls[0][1:] == ((6, 320), (6, 4), torch.float32, list(range(16)))

    for moe in model.moe_layers():
        moe.routed = lambda x, *_: torch.zeros_like(x)
    assert rel(model(t), before) > 1e-2  # the routed experts matter


def test_split_ownership_sums_to_the_whole(bf16_ckpt):
    """What dispatch/combine relies on: each rank computes its experts' share (other slots -1)."""
    with Checkpoint(bf16_ckpt) as ck:
        model = ck.build(dtype=torch.float32)
    moe = next(model.moe_layers())
    x = torch.randn(10, 320)
    w, ids = moe.gate(x)
    experts = moe.local_experts()
    whole = run_local_experts(x, ids, w, experts)
    parts = torch.zeros_like(whole)
    for rank in range(4):  # four ranks, four experts each
        mine = {e: m for e, m in experts.items() if e % 4 == rank}
        parts += run_local_experts(x, torch.where(ids % 4 == rank, ids, -1), w, mine, skip=-1)
    assert torch.allclose(parts, whole, atol=1e-5)
    empty = run_local_experts(x[:0], ids[:0], w[:0], experts)
    assert empty.shape == (0, 320)
    with pytest.raises(KeyError, match="expert .* which this rank does not hold"):
        run_local_experts(x, ids, w, {e: m for e, m in experts.items() if e < 8}, layer_id=1)


def test_partial_ownership_and_expert_swap(bf16_ckpt):
    owned = {1: [0, 5], 2: [15]}
    with Checkpoint(bf16_ckpt) as ck:
        model = ck.build(dtype=torch.float32, owned_experts=owned)
        moe, moe2 = model.moe_layers()
        assert moe.owned_experts == {0, 5} and moe2.owned_experts == {15}
        full = ck.build(dtype=torch.float32)
        x = torch.randn(3, 320)
        staged = ck.read_expert(moe, 7)  # an expert-map switch: load expert 7 while serving...
        assert moe.owned_experts == {0, 5}
        moe.remove_expert(5)  # ...and swap at a step boundary
        moe.add_expert(7, staged)
        assert moe.owned_experts == {0, 7}
        ck.load_expert(moe, 0)  # reloading in place works too
        ref = next(full.moe_layers()).experts["7"]
        assert torch.equal(moe.experts["7"](x), ref(x))


def test_model_refuses_bad_ownership(args):
    from moe_worker.model import Transformer

    with pytest.raises(ValueError, match="not MoE layers"):
        Transformer(args, owned_experts={0: [1]}, device="meta")
    with pytest.raises(ValueError, match="out of range"):
        Transformer(args, owned_experts={1: [16]}, device="meta")


def test_softmax_scale_uses_yarn_mscale(args):
    assert args.softmax_scale == pytest.approx(48**-0.5 * (0.1 * math.log(40) + 1) ** 2)


@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_packed_attention_equals_one_sequence_at_a_time(bf16_ckpt, impl):
    """MLA.forward_packed (what the engine runs: projections over all sequences' tokens at once,
    decode tokens batched into one attention call over padded latent caches) gives each sequence
    what MLA.forward gives it alone, for decode and prefill segments of different lengths mixed."""
    from moe_worker.model import Segment

    model = load_model(bf16_ckpt, dtype=torch.float32, attn_impl=impl)
    attn = model.layers[0].attn
    D = model.args.hidden_size
    g = torch.Generator().manual_seed(3)
    # (cached positions before this step, new tokens this step) per sequence: three decodes of
    # different context lengths, a prefill from scratch and a prefill chunk after a prefix.
    shapes = [(5, 1), (0, 4), (11, 1), (3, 3), (1, 1)]
    history = [torch.randn(1, p, D, generator=g) for p, _ in shapes]
    new = [torch.randn(1, s, D, generator=g) for _, s in shapes]

    def prepared_caches():
        caches = [model.new_cache(1, 16).layers[0] for _ in shapes]
        for (p, _), h, c in zip(shapes, history, caches, strict=True):
            if p:
                attn(h, model.rotary(torch.arange(p)), 0, causal_mask(0, p), c, impl)
        return caches

    ref_caches = prepared_caches()
    alone = [attn(x, model.rotary(torch.arange(p, p + s)), p, causal_mask(p, s), c, impl)[0]
             for (p, s), x, c in zip(shapes, new, ref_caches, strict=True)]
    caches = prepared_caches()
    packed = attn.forward_packed(torch.cat([x[0] for x in new]),
                                 model.rotary(torch.cat([torch.arange(p, p + s) for p, s in shapes])),
                                 [Segment(p, s, c) for (p, s), c in zip(shapes, caches, strict=True)], impl)
    assert rel(packed, torch.cat(alone)) < 1e-5
    # Each cache now holds what the one-at-a-time step wrote: the next step sees the same keys.
    for (p, s), c, ref in zip(shapes, caches, ref_caches, strict=True):
        for name in ("kv", "pe") if impl == "absorb" else ("k", "v"):
            assert rel(getattr(c, name)[:, :p + s], getattr(ref, name)[:, :p + s]) < 1e-6
    # Not vacuous: packing the same tokens under shifted positions changes the answer.
    shifted = attn.forward_packed(torch.cat([x[0] for x in new]),
                                  model.rotary(torch.cat([torch.arange(p + 1, p + s + 1) for p, s in shapes])),
                                  [Segment(p, s, c) for (p, s), c in zip(shapes, prepared_caches(), strict=True)], impl)
    assert rel(shifted, packed) > 1e-3


def test_paged_latent_cache_equals_the_per_sequence_cache(bf16_ckpt):
    """The engine's paged latent cache (pages from one pool per layer, a block table per sequence)
    gives the packed attention the same keys as per-sequence caches: same outputs, decode and
    prefill mixed, over pages that are not contiguous (a freed page is reused out of order)."""
    from moe_worker.model import PagedLatentCache, Segment

    model = load_model(bf16_ckpt, dtype=torch.float32, attn_impl="absorb")
    attn = model.layers[0].attn
    D = model.args.hidden_size
    pool = PagedLatentCache(model.args, pages=16, page_size=4, dtype=torch.float32)
    spacer = pool.allocate(5)  # two pages taken and given back: later sequences get scattered pages
    shapes = [(5, 1), (0, 4), (11, 1), (3, 3), (1, 1)]
    seqs = [pool.allocate(p + s + 1) for p, s in shapes]
    pool.release(spacer)
    assert pool.free_pages == 16 - sum(len(q.pages) for q in seqs)
    g = torch.Generator().manual_seed(5)
    history = [torch.randn(p, D, generator=g) for p, _ in shapes]
    new = [torch.randn(s, D, generator=g) for _, s in shapes]

    def step(views, xs, starts_lengths):
        return attn.forward_packed(torch.cat(xs), model.rotary(torch.cat([torch.arange(p, p + s) for p, s in starts_lengths])),
                                   [Segment(p, s, v) for (p, s), v in zip(starts_lengths, views, strict=True)], "absorb")

    own = [model.new_cache(1, 16).layers[0] for _ in shapes]
    paged = [pool.view(q, 0) for q in seqs]
    with_history = [(0, p) for p, _ in shapes if p]
    for views in (own, paged):
        step([v for v, (p, _) in zip(views, shapes, strict=True) if p], [h for h in history if len(h)], with_history)
    want = step(own, new, shapes)
    got = step(paged, new, shapes)
    assert rel(got, want) < 1e-6
    # a full pool says so, and a released sequence's pages can be taken again
    with pytest.raises(MemoryError, match="free pages"):
        pool.allocate(4 * (pool.free_pages + 1))
    pool.release(seqs[0])
    assert pool.allocate(len(seqs[0].slots) or 4).pages
