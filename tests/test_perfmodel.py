"""The capacity and performance model: sizes from the architecture, DeepEP byte counting, rooflines,
overlap, limits, and calibration against DeepSeek's published figures."""

from __future__ import annotations

import math

import pytest
import yaml

from moe_operator import api, perfmodel
from moe_operator.perfmodel import GB, Workload
from support import REPO


def manifest_spec(name: str) -> api.MoEDeploymentSpec:
    return api.parse_deployment(yaml.safe_load((REPO / "manifests" / f"{name}.yaml").read_text())).spec


def ds_spec(ep: int, experts_per_gpu: int, redundant: int, **par) -> api.MoEDeploymentSpec:
    return api.parse_spec({
        "model": {"checkpoint": {"pvcName": "w"}},
        "parallelism": {"expertParallelSize": ep, "maxExpertsPerGpu": experts_per_gpu,
                        "redundantExperts": redundant, "allowSmallExpertParallel": True, **par},
        "loadBalancing": {"enabled": True, "maxReplicasPerExpert": min(4, ep)}})


def fp8_linear(out_dim: int, in_dim: int) -> int:
    """FP8 e4m3 weight plus one FP32 scale per 128x128 block, partial blocks padded (README_WEIGHTS)."""
    return out_dim * in_dim + 4 * -(-out_dim // 128) * -(-in_dim // 128)


# --- memory -------------------------------------------------------------------------------------


def test_memory_breakdown_deepseek_v3_ep288_on_the_brief_gpu_adds_up():
    """Every row recomputed here from DeepSeek-V3's config.json numbers, without the model's helpers."""
    spec = manifest_spec("deepseek-v3-ep288")
    hw = perfmodel.hardware("brief")
    batch, context = 64, 4096
    m = perfmodel.memory(spec, hw, Workload("decode", batch, context, micro_batches=2))

    hidden, inter, moe_inter, vocab = 7168, 18432, 2048, 129280
    layers, dense_layers, moe_layers = 61, 3, 58
    heads, q_lora, kv_lora, nope, rope, v = 128, 1536, 512, 128, 64, 128
    expert = 2 * fp8_linear(moe_inter, hidden) + fp8_linear(hidden, moe_inter)
    assert expert == 44_040_192 + 10_752  # notes 5.5: 44.04 MB FP8 + 2,688 FP32 scales
    mla = (fp8_linear(q_lora, hidden) + fp8_linear(heads * (nope + rope), q_lora)
           + fp8_linear(kv_lora + rope, hidden) + fp8_linear(heads * (nope + v), kv_lora)
           + fp8_linear(hidden, heads * v) + 2 * (q_lora + kv_lora))
    dense = 2 * fp8_linear(inter, hidden) + fp8_linear(hidden, inter)
    expected = {
        "routed_experts": moe_layers * 1 * expert,  # 288 slots on 288 GPUs
        "shared_experts": moe_layers * expert,
        "attention": layers * mla,
        "dense_mlp": dense_layers * dense,
        "embeddings": 2 * vocab * hidden * 2,
        "router_and_norms": moe_layers * (256 * hidden * 2 + 256 * 4) + (2 * layers + 1) * hidden * 2,
        "kv_cache": batch * context * layers * (kv_lora + rope) * 2,
        # DeepEP low-latency layout for 32 tokens per micro-batch and 288 experts: two symmetric buffers
        # of send + receive (combine message = BF16 hidden + per-128 min/max) + signalling.
        "comm_buffers": 2 * (2 * 288 * 32 * (hidden * 2 + hidden // 128 * 4) + 1152),
        "runtime_reserved": 3.0e9,
    }
    for row, value in expected.items():
        assert getattr(m, row) == pytest.approx(value, rel=1e-12), row
    # vLLM's EPLB note: ~2.4 GB per extra expert slot per rank for DeepSeek-V3 (58 x 44 MB).
    assert 2.5e9 < m.routed_experts < 2.6e9
    # notes 5.4: 70,272 B of latent cache per token over 61 layers
    assert m.kv_cache / (batch * context) == 70_272
    # activations are an estimate; they must at least hold the residual stream and stay small in decode
    assert batch * hidden * 2 * 3 < m.activations < 0.5 * GB
    total = sum(expected.values()) + m.activations
    assert m.total == pytest.approx(total, rel=1e-12)
    assert m.weights == pytest.approx(sum(expected[r] for r in (
        "routed_experts", "shared_experts", "attention", "dense_mlp", "embeddings", "router_and_norms")), rel=1e-12)
    assert 21.5 * GB < m.weights < 22.0 * GB
    assert m.capacity == 64e9 and m.fits and m.free == pytest.approx(64e9 - total)


def test_whole_model_is_671b_parameters():
    """BF16 copy on 256 GPUs, one expert each: the group holds each parameter once (plus replicated parts)."""
    spec = api.parse_spec({"model": {"checkpoint": {"pvcName": "w"}, "precision": "bf16"},
                           "parallelism": {"expertParallelSize": 256, "redundantExperts": 0}})
    w = perfmodel.weight_bytes(spec)
    params = (w["routed_experts"] * 256 + sum(v for k, v in w.items() if k != "routed_experts")) / 2
    assert 670.5e9 < params < 671.5e9  # report: 671B total (MTP module excluded)
    assert perfmodel.attention_params(spec.model.architecture) == pytest.approx(187.1e6, rel=1e-3)


def test_more_experts_per_gpu_and_attention_tp_move_memory_where_expected():
    hw = perfmodel.hardware("h200")
    w = Workload("decode", 32, 4096)
    one = perfmodel.memory(ds_spec(288, 1, 32), hw, w)
    four = perfmodel.memory(ds_spec(72, 4, 32), hw, w)
    assert four.routed_experts == pytest.approx(4 * one.routed_experts)
    assert four.attention == one.attention and four.kv_cache == one.kv_cache
    tp4 = perfmodel.memory(perfmodel.with_attention_tp(ds_spec(288, 1, 32), 4), hw, w)
    # the MLA latent is shared by all heads, so each TP rank keeps the whole cache of the group
    assert tp4.kv_cache == pytest.approx(4 * one.kv_cache)
    # the worker splits only the heads: embedding and LM head stay whole on every rank
    assert tp4.attention < 0.35 * one.attention and tp4.embeddings == one.embeddings


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_attention_tp_weights_and_collective_are_what_the_worker_runs(tp):
    """Per rank of a TP group of `tp`: q_a and kv_a whole, rows of q_b and kv_b and columns of o_proj
    for 128 / tp heads; per attention layer one reduce-scatter of o_proj's partial sums and one
    all-gather after the FFN, each (tp - 1) / tp x T x hidden x 2 B (T: the group's tokens)."""
    hidden, layers, heads, q_lora, kv_lora, nope, rope, v = 7168, 61, 128, 1536, 512, 128, 64, 128
    nh = heads // tp
    spec = perfmodel.with_attention_tp(ds_spec(320, 1, 64), tp)
    hw = perfmodel.hardware("h800")
    m = perfmodel.memory(spec, hw)
    mla = (fp8_linear(q_lora, hidden) + fp8_linear(kv_lora + rope, hidden)  # q_a, kv_a: whole
           + fp8_linear(nh * (nope + rope), q_lora) + fp8_linear(nh * (nope + v), kv_lora)  # q_b, kv_b rows
           + fp8_linear(hidden, nh * v)  # o_proj columns
           + 2 * (q_lora + kv_lora))
    assert m.attention == layers * mla
    assert m.embeddings == 2 * 129280 * hidden * 2
    e = perfmodel.step(spec, hw, Workload("decode", 32, 4096, micro_batches=2))
    for lc in e.layers:
        group_tokens = tp * 16  # a micro-batch: 16 tokens per rank into the FFN, tp x that into attention
        assert op(lc, "attention_tp_comm").bytes == pytest.approx(2 * (tp - 1) / tp * group_tokens * hidden * 2)
        assert op(lc, "attention_tp_comm").bound == "nvlink"
        # the latent projections run on all the group's tokens, the heads' on 1/tp of the heads
        proj = 2 * group_tokens * ((q_lora + kv_lora + rope) * hidden + nh * (nope + rope) * q_lora
                                   + nh * (nope + v) * kv_lora + hidden * nh * v)
        assert op(lc, "attention_proj").flops == pytest.approx(proj)
        # the FFN sees only this rank's 16 tokens per micro-batch: the MoE exchange is that of TP1
        if lc.kind == "moe":
            dp = moe_layer(perfmodel.step(ds_spec(320, 1, 64), hw, Workload("decode", 32, 4096, micro_batches=2)))
            assert op(lc, "dispatch").bytes == op(dp, "dispatch").bytes
            assert op(lc, "routed_experts").flops == op(dp, "routed_experts").flops
    tp1 = perfmodel.step(ds_spec(320, 1, 64), hw, Workload("decode", 32, 4096))
    assert not any(o.name == "attention_tp_comm" for lc in tp1.layers for o in lc.compute_ops)


def test_an_fp8_o_proj_that_would_cut_a_128_block_stays_whole_under_attention_tp():
    """The tiny model's o_proj has 4 heads x 32 = 128 columns: at TP2 a rank's 64 would cut its one
    FP8 block, so the worker keeps it whole on every rank (BF16 splits it)."""
    hw = perfmodel.hardware("h100")
    hidden, layers, q_lora, kv_lora, nope, rope, v = 128, 4, 64, 32, 32, 16, 32
    for precision, o_cols in (("fp8", 4 * v), ("bf16", 2 * v)):
        raw = yaml.safe_load((REPO / "manifests" / "tiny-ep16-tp2.yaml").read_text())["spec"]
        raw["model"]["precision"] = precision
        spec = api.parse_spec(raw)
        lin = fp8_linear if precision == "fp8" else (lambda o, i: 2 * o * i)
        mla = (lin(q_lora, hidden) + lin(kv_lora + rope, hidden) + lin(2 * (nope + rope), q_lora)
               + lin(2 * (nope + v), kv_lora) + lin(hidden, o_cols) + 2 * (q_lora + kv_lora))
        assert perfmodel.memory(spec, hw).attention == layers * mla, precision


def test_admission_refuses_what_cannot_fit_with_the_breakdown():
    hw = perfmodel.hardware("brief")
    ok, msg = perfmodel.check_fits(manifest_spec("deepseek-v3-ep288"), hw)
    assert ok and msg.startswith("fits:")
    # 18 experts per GPU on 16 GPUs: 18 x 58 x 44 MB = 46 GB of experts next to 22 GB of the rest
    ok, msg = perfmodel.check_fits(ds_spec(16, 18, 32), hw)
    assert not ok
    assert msg.startswith("does not fit:") and "of 64 GB" in msg and "routed experts 46.0" in msg


# --- time ---------------------------------------------------------------------------------------


def moe_layer(e: perfmodel.StepEstimate) -> perfmodel.LayerCost:
    return next(lc for lc in e.layers if lc.kind == "moe")


def op(lc: perfmodel.LayerCost, name: str) -> perfmodel.Op:
    return next(o for o in lc.compute_ops + lc.comm_ops if o.name == name)


def test_routed_flops_and_deepep_bytes_per_token():
    spec = manifest_spec("deepseek-v3-ep288")
    e = perfmodel.step(spec, perfmodel.hardware("h800"), Workload("decode", 10, 1024, micro_batches=1, imbalance=1.0))
    lc = moe_layer(e)
    # notes 5.5: 704.6 MFLOP of routed experts per token per MoE layer (8 x 2 x 44.04 M)
    assert op(lc, "routed_experts").flops / 10 == pytest.approx(704.6e6, rel=1e-4)
    # notes 1.4: low-latency dispatch 7,408 B per (token, expert) pair, BF16 combine 14,336 B
    assert op(lc, "dispatch").bytes / 10 == pytest.approx(59_264)
    assert op(lc, "combine").bytes / 10 == pytest.approx(114_688)


def test_dispatch_goes_over_nvlink_inside_a_node_and_the_network_across_nodes():
    hw = perfmodel.hardware("h100")
    w = Workload("decode", 128, 2048, micro_batches=1)
    inside = moe_layer(perfmodel.step(ds_spec(8, 32, 0), hw, w))
    across = moe_layer(perfmodel.step(ds_spec(288, 1, 32), hw, w))
    assert {o.bound for o in inside.comm_ops} == {"nvlink"}
    assert {o.bound for o in across.comm_ops} == {"network"}
    # 128 tokens x 8 pairs x 7,408 B at 40 GB/s, 280/288 of them off the node, imbalance 1.11
    expected = 128 * 8 * 1.11 * 7408 * (280 / 288) / 40e9 + 20e-6
    assert op(across, "dispatch").time == pytest.approx(expected, rel=1e-9)


def test_prefill_counts_each_remote_node_once():
    hw = perfmodel.hardware("h800")
    lc = moe_layer(perfmodel.step(ds_spec(32, 9, 32), hw, Workload("prefill", 8192, 4096, micro_batches=1,
                                                                   imbalance=1.0)))
    # 8 groups on 4 nodes, 4 groups per token: a node is hit with probability 1 - C(6,4)/C(8,4)
    remote = 3 * (1 - math.comb(6, 4) / math.comb(8, 4))
    nvl = 8192 * 8 * 7392
    net = 8192 * remote * 7392
    assert op(lc, "dispatch").bytes == pytest.approx(nvl + net)


def test_expert_gemm_turns_compute_bound_past_the_roofline_ridge():
    """FP8 expert GEMM: 2m FLOP per weight byte for m tokens per expert; the weights-only ridge is
    m = peak / bandwidth / 2 (~295 on H100). Activation traffic moves the real ridge a little higher."""
    hw = perfmodel.hardware_from_dict({"base": "h100", "mfu": 1.0, "memory_efficiency": 1.0})
    spec = ds_spec(256, 1, 0)
    assert 290 < 1979e12 / 3.35e12 / 2 < 300

    def routed(tokens_per_expert: int) -> perfmodel.Op:
        # one expert per GPU: each GPU receives batch x 8 pairs
        e = perfmodel.step(spec, hw, Workload("decode", tokens_per_expert / 8, 1, micro_batches=1, imbalance=1.0))
        return op(moe_layer(e), "routed_experts")

    expert_bytes = 44_040_192 + 10_752
    for m in (100, 1000):
        assert routed(m).flops / expert_bytes == pytest.approx(2 * m * 44_040_192 / expert_bytes)
    assert routed(200).bound == "memory"
    assert routed(300).bound == "memory"
    assert routed(600).bound == "compute"


def test_two_micro_batches_hide_all_to_all_at_large_batch_and_cost_at_small():
    """SGLang measured two-batch overlap: -27% at 32 tokens/GPU, +25.5% at 256 (decode)."""
    spec, hw = manifest_spec("deepseek-v3-ep288"), perfmodel.hardware("h800")

    def speedup(b: int) -> float:
        one = perfmodel.step(spec, hw, Workload("decode", b, 4096, micro_batches=1)).step_time
        two = perfmodel.step(spec, hw, Workload("decode", b, 4096, micro_batches=2)).step_time
        return one / two

    assert speedup(2) < 0.8  # weights read twice, nothing to hide
    assert 1.2 < speedup(256) < 2.0  # all-to-all hidden behind compute, bounded by 2x
    e = perfmodel.step(spec, hw, Workload("decode", 256, 4096))
    lc = moe_layer(e)
    assert lc.layer_time == pytest.approx(2 * max(lc.compute, lc.comm))


def test_decode_step_and_throughput_are_consistent():
    spec, hw = manifest_spec("deepseek-v3-ep320"), perfmodel.hardware("h800")
    e = perfmodel.step(spec, hw, Workload("decode", 100, 4096))
    assert e.step_time == pytest.approx(sum(lc.count * lc.layer_time for lc in e.layers) + e.head_time)
    assert e.tokens_per_s_per_gpu == pytest.approx(100 / e.step_time)
    assert e.tokens_per_s_per_node == pytest.approx(8 * e.tokens_per_s_per_gpu)
    assert e.time_per_output_token == e.step_time
    # the decode memory floor of notes 7 (expert weights at 3.35 TB/s) is far below one step
    assert e.step_time > 58 * 44e6 / 3.35e12
    assert {lc.kind: lc.count for lc in e.layers} == {"dense": 3, "moe": 58}


def test_largest_batch_is_bound_by_memory_or_latency():
    spec, hw = manifest_spec("deepseek-v3-ep288"), perfmodel.hardware("h800")
    lim = perfmodel.max_batch(spec, hw, context=8192, tpot_target=None)
    assert lim.binding == "memory" and lim.estimate.memory.fits
    over = perfmodel.step(spec, hw, Workload("decode", lim.batch + 1, 8192))
    assert not over.memory.fits
    lim = perfmodel.max_batch(spec, hw, context=1024, tpot_target=0.030)
    assert lim.binding == "latency" and lim.estimate.step_time <= 0.030
    assert perfmodel.step(spec, hw, Workload("decode", lim.batch + 1, 1024)).step_time > 0.030
    nothing = perfmodel.max_batch(spec, hw, context=1024, tpot_target=0.001)
    assert nothing.batch == 0 and nothing.binding == "latency" and nothing.estimate is None


def test_plan_fills_the_status_prediction():
    p = perfmodel.plan(manifest_spec("deepseek-v3-ep288"), perfmodel.hardware("brief"))
    pred = p.prediction()
    assert isinstance(pred, api.Prediction) and pred.hardware == "brief"
    assert 0 < pred.time_per_output_token_ms <= 50
    assert pred.decode_tokens_per_second_per_gpu == pytest.approx(p.decode.batch / pred.time_per_output_token_ms * 1e3,
                                                                  rel=1e-3)
    assert 20 < pred.memory_per_gpu_gib < 64e9 / 2**30


def test_sweep_compares_layouts_at_the_same_gpu_count():
    spec, hw = manifest_spec("deepseek-v3-ep288"), perfmodel.hardware("brief")
    rows = perfmodel.sweep_ep(spec, hw, [64, 288])
    by = {(r.gpus, r.layout): r for r in rows}
    assert by[(64, "one-per-gpu")].limit is None and "256" in by[(64, "one-per-gpu")].note
    assert by[(64, "colocated")].experts_per_gpu == 5  # ceil(288 / 64)
    one, colo = by[(288, "one-per-gpu")], by[(288, "colocated")]
    assert (one.experts_per_gpu, one.redundant_experts, colo.experts_per_gpu) == (1, 32, 2)
    assert one.limit.estimate.memory.routed_experts == pytest.approx(colo.limit.estimate.memory.routed_experts / 2)
    # on the brief GPU, 5 experts per GPU leave less room and take longer to read than 1
    assert one.limit.estimate.tokens_per_s_per_gpu > 1.5 * by[(64, "colocated")].limit.estimate.tokens_per_s_per_gpu


# --- hardware -----------------------------------------------------------------------------------


def test_brief_profile_is_the_design_brief():
    b = perfmodel.hardware("brief")
    assert (b.fp8_tflops, b.mfu, b.memory_gb, b.memory_tbs, b.memory_efficiency) == (400, 0.6, 64, 1.8, 0.8)
    assert b.flops_rate("fp8") == pytest.approx(240e12) and b.hbm_rate == pytest.approx(1.44e12)
    assert perfmodel.hardware("H800").nvlink_rate == pytest.approx(160e9)  # DeepSeek: "160 GB/s"
    assert perfmodel.hardware("h200").memory_tbs == 4.8


def test_user_defined_hardware():
    hw = perfmodel.hardware_from_dict({"base": "h100", "name": "h100-40g", "memory_gb": 40})
    assert (hw.name, hw.memory_gb, hw.fp8_tflops) == ("h100-40g", 40, 1979)
    full = perfmodel.hardware_from_dict({"name": "x", "memory_gb": 96, "memory_tbs": 4, "fp8_tflops": 2000,
                                         "bf16_tflops": 1000})
    assert full.mfu == 0.6
    for bad, words in (({"base": "h100", "hbm": 1}, "unknown hardware field"),
                       ({"name": "x", "memory_gb": 1}, "lacks"),
                       ({"base": "h100", "mfu": 1.5}, "mfu"),
                       ({"base": "h100", "memory_gb": "lots"}, "number"),
                       ({"base": "b300"}, "unknown hardware 'b300'")):
        with pytest.raises(perfmodel.PerfModelError, match=words):
            perfmodel.hardware_from_dict(bad)


def test_gpu_product_label_maps_to_a_profile():
    assert perfmodel.hardware_for_gpu_product("NVIDIA-H100-80GB-HBM3").name == "h100"
    assert perfmodel.hardware_for_gpu_product("NVIDIA-H200").name == "h200"
    assert perfmodel.hardware_for_gpu_product("Tesla-T4") is None


def test_workload_is_validated():
    for kw in ({"batch": 0}, {"cache_hit": 1.0}, {"micro_batches": 3}, {"imbalance": 0.5}, {"phase": "train"}):
        with pytest.raises(perfmodel.PerfModelError):
            Workload(**kw)


def test_tiny_model_is_modelled_too():
    e = perfmodel.step(manifest_spec("tiny-ep16"), perfmodel.hardware("h100"), Workload("decode", 8, 256))
    assert e.memory.fits and e.step_time > 0 and {lc.kind for lc in e.layers} == {"dense", "moe"}


# --- calibration --------------------------------------------------------------------------------

# model / published, as printed in docs/perfmodel.md. The justified band of each case is in
# perfmodel.CALIBRATION; this pin (+-5%) makes any change to the model that moves a ratio show.
PINNED = {
    "decode-ep144": 1.70,
    "decode-ep320-tp4": 0.71,
    "decode-ep320-dp": 1.67,
    "prefill-ep32": 2.13,
    "profile-decode-ep128": 1.46,
    "profile-prefill-ep32": 1.34,
    "sglang-decode-ep72": 1.29,
    "sglang-prefill-ep32": 1.59,
}


@pytest.fixture(scope="module")
def calibration():
    return {r.case.key: r for r in perfmodel.calibrate()}


def test_calibration_covers_deepseek_published_setups(calibration):
    assert set(calibration) == set(PINNED)
    assert calibration["decode-ep144"].case.published_per_node == 14_800
    assert calibration["prefill-ep32"].case.published_per_node == 73_700


@pytest.mark.parametrize("key", sorted(PINNED))
def test_calibration_ratio_is_in_its_band_and_pinned(calibration, key):
    r = calibration[key]
    lo, hi = r.case.band
    assert lo <= r.ratio <= hi, (key, r.ratio)
    assert r.ratio == pytest.approx(PINNED[key], rel=0.05), (key, r.ratio)


def test_calibration_inputs_follow_the_published_setups(calibration):
    ep144 = calibration["decode-ep144"].estimate
    assert ep144.gpus == 144 and ep144.workload.context == 4989
    assert ep144.time_per_output_token <= 0.050  # 20-22 tok/s per user
    pre = calibration["prefill-ep32"].estimate
    assert pre.workload.cache_hit == 0.563 and pre.gpus == 32
    # prefill compares input tokens including cache hits: new tokens / (1 - hit rate)
    assert pre.input_tokens_per_s_per_node == pytest.approx(pre.tokens_per_s_per_node / 0.437)


def test_docs_calibration_table_matches_the_model(calibration):
    from moe_operator.cli import plan as plan_cli

    doc = (REPO / "docs" / "perfmodel.md").read_text()
    table = plan_cli.calibration_markdown(list(calibration.values()))
    missing = [line for line in table.splitlines() if line not in doc]
    assert not missing, "docs/perfmodel.md is stale; regenerate with `moe plan --calibration`:\n" + "\n".join(missing)


# --- KV admission on each rank ------------------------------------------------------------------


def test_kv_budget_is_the_memory_left_after_weights_buffers_and_activations():
    spec, hw = manifest_spec("deepseek-v3-ep320"), perfmodel.hardware("h800")
    a = spec.model.architecture
    per_token = (a.kv_lora_rank + a.qk_rope_head_dim) * 2 * a.num_hidden_layers  # MLA latent cache, BF16
    assert per_token == perfmodel.kv_bytes_per_token(a) == 70272
    kv = perfmodel.kv_admission(spec, hw, max_seqs=64)
    fixed = perfmodel.memory(spec, hw, Workload("decode", 64, 1))
    free = hw.capacity - (fixed.total - fixed.kv_cache)
    assert kv.cache_tokens == int(free // per_token)
    assert 700_000 < kv.cache_tokens < 800_000  # ~54 GB of an 80 GB GPU
    assert kv.max_seqs == 64 and kv.max_context == kv.model_context == 163840 and not kv.clamped
    # With every sequence at its budget share, memory is full and not over.
    full = perfmodel.memory(spec, hw, Workload("decode", 64, kv.cache_tokens / 64))
    assert full.total <= hw.capacity < full.total + 64 * per_token


def test_kv_admission_default_sequence_count_fills_the_budget_with_typical_requests():
    spec, hw = manifest_spec("deepseek-v3-ep320"), perfmodel.hardware("h800")
    kv = perfmodel.kv_admission(spec, hw)
    # as many 4096-token sequences as fit, and the budget holds them all
    assert kv.max_seqs * 4096 <= kv.cache_tokens < (kv.max_seqs + 2) * 4096
    assert perfmodel.memory(spec, hw, Workload("decode", kv.max_seqs, 4096)).fits
    assert not perfmodel.memory(spec, hw, Workload("decode", kv.max_seqs + 1, 4096)).fits
    # attention TP: the worker counts a TP group's sequences on its first rank and every rank of the
    # group keeps all of their latent cache, so both limits are the group's: 64 sequences of a TP2
    # group put 32 tokens per GPU through the FFN, and the cache is all the memory left
    spec2 = perfmodel.with_attention_tp(ds_spec(320, 1, 64), 2)
    fixed = perfmodel.memory(spec2, hw, Workload("decode", 32, 1))
    free = hw.capacity - (fixed.total - fixed.kv_cache)
    assert perfmodel.kv_admission(spec2, hw, max_seqs=64).cache_tokens == int(free // 70272)
    kv2 = perfmodel.kv_admission(spec2, hw)
    per_gpu = perfmodel.max_batch(spec2, hw, context=4096, tpot_target=None, cap=perfmodel.MAX_SEQS_PER_RANK).batch
    assert kv2.max_seqs == 2 * per_gpu and kv2.max_seqs * 4096 <= kv2.cache_tokens < (kv2.max_seqs + 4) * 4096
    assert perfmodel.memory(spec2, hw, Workload("decode", kv2.max_seqs / 2, 4096)).fits


def test_a_budget_below_the_models_context_clamps_the_context():
    import dataclasses

    spec = manifest_spec("deepseek-v3-ep320")
    small = dataclasses.replace(perfmodel.hardware("h800"), name="small", memory_gb=30.3)
    assert perfmodel.check_fits(spec, small)[0]
    kv = perfmodel.kv_admission(spec, small, max_seqs=64)
    assert kv.clamped and kv.max_context == kv.cache_tokens < kv.model_context == 163840
    assert 60_000 < kv.cache_tokens < 80_000
    # the spec's own context, when it sets one below the budget, is kept
    assert perfmodel.kv_admission(spec, small, max_seqs=64, max_context=32768).max_context == 32768
    with pytest.raises(perfmodel.PerfModelError, match="no GPU memory left"):
        perfmodel.kv_admission(spec, small, max_seqs=4000)  # activations and buffers alone overflow


def test_kv_admission_for_the_tiny_demo_model_is_sane():
    kv = perfmodel.kv_admission(manifest_spec("tiny-ep16"), perfmodel.hardware("h100"))
    # the model's whole context, a bounded count, and a budget the count can use up (not 200M tokens)
    assert (kv.max_context, kv.max_seqs) == (4096, perfmodel.MAX_SEQS_PER_RANK)
    assert kv.cache_tokens == perfmodel.MAX_SEQS_PER_RANK * 4096
