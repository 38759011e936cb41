#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one short run (about 11 minutes on an H200; PART=tests or
# PART=bench runs one half, for a device call limited to 10 minutes): the CUDA tests of
# the worker (blockwise FP8 torch._scaled_mm, the model and engine ranks on the device), the expert
# benchmark in TFLOPS (eager and CUDA graphs), the Triton FP8 GEMM sweep (bench/fp8_gemm.py) and
# whole-model decode against transformers (bench/decode.py --device cuda).
# Uses the machine's own python3 with torch; nothing is installed.
# Logs go to $OUT (or ./gpu-check-out). Usage: bash hack/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD/worker:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' \
  2>&1 | tee -a "$out/gpu.txt"
rc=0
part="${PART:-all}"
if [[ $part != bench ]]; then
# Which scale layouts cuBLAS's blockwise FP8 GEMM accepts on this torch (fp8._scaled_mm_blockwise
# uses the first: 1x128 activation scales outer-dim-major, 128x128 weight scales as (K/128, N/128)).
python3 - <<'PY' 2>&1 | tee "$out/layouts.txt"
import torch
from moe_worker import fp8
q, s = fp8.quantize_weight(torch.randn(2048, 7168) / 7168**0.5)
q, s = q.cuda(), s.cuda()
x = torch.randn(64, 7168, device="cuda", dtype=torch.bfloat16)
xq, xs = fp8.act_quant(x)
for an, sa in (("a outer-major", xs.t().contiguous().t()), ("a row-major", xs.contiguous())):
    for bn, sb in (("b (K/128,N/128) view", s.t()), ("b contiguous", s.t().contiguous())):
        try:
            torch._scaled_mm(xq, q.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
            print("ok  ", an, "|", bn)
        except Exception as e:
            print("FAIL", an, "|", bn, "|", str(e).splitlines()[0][:300])
for K in (128, 256, 384, 640, 896, 1024):  # which K the blockwise GEMM gets right (fp8.SCALED_MM_K)
    qk, sk = fp8.quantize_weight(torch.randn(256, K) / K**0.5)
    xk = torch.randn(32, K, device="cuda")
    a_q, a_s = fp8.act_quant(xk)
    y = torch._scaled_mm(a_q, qk.cuda().t(), scale_a=a_s.t().contiguous().t(), scale_b=sk.cuda().t(),
                         out_dtype=torch.float32)
    ref = fp8.linear(xk.cpu(), qk, sk, impl="emulate")
    print("K", K, "relative error", float((y.cpu() - ref).norm() / ref.norm()))
for rows in (1, 3, 4, 8, 16, 64):  # token rows the raw kernel takes (fp8.py pads to SCALED_MM_ROWS)
    for out_dtype in (torch.bfloat16, torch.float32):
        xq, xs = fp8.act_quant(x[:rows].float())
        try:
            torch._scaled_mm(xq, q.t(), scale_a=xs.t().contiguous().t(), scale_b=s.t(), out_dtype=out_dtype)
            print("ok  ", rows, "rows", out_dtype)
        except Exception as e:
            print("FAIL", rows, "rows", out_dtype, "|", str(e).splitlines()[0][:200])
PY
# Where an FP8 linear's time goes (2048 x 7168, CUDA events, median of 50 back-to-back calls).
python3 - <<'PY' 2>&1 | tee "$out/breakdown.txt"
import torch, torch.nn.functional as F
from moe_worker import fp8
from moe_worker.fp8_triton import act_quant_padded
def t(fn, n=50):
    fn(); torch.cuda.synchronize(); a, b = torch.cuda.Event(True), torch.cuda.Event(True); a.record()
    for _ in range(n): fn()
    b.record(); b.synchronize(); return a.elapsed_time(b) / n * 1e3
q, s = fp8.quantize_weight(torch.randn(2048, 7168) / 7168**0.5); q, s = q.cuda(), s.cuda()
w16 = fp8.dequantize_weight(q, s, torch.bfloat16)
print("us per call:  T  bf16_mm  act_quant_torch  act_quant_triton  scaled_mm_only  linear_scaled_mm")
for T in (1, 16, 128, 512, 4096):
    x = torch.randn(T, 7168, device="cuda", dtype=torch.bfloat16)
    xq, xs = act_quant_padded(x, None, 16, fp8.ACT_AMAX_FLOOR, fp8.FP8_MAX)
    print(f"{T:>5} {t(lambda: x @ w16.t()):8.1f} {t(lambda: fp8.act_quant(x)):8.1f} "
          f"{t(lambda: act_quant_padded(x, None, 16, 1e-4, 448.0)):8.1f} "
          f"{t(lambda: torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s.t(), out_dtype=torch.bfloat16)):8.1f} "
          f"{t(lambda: fp8.linear(x, q, s, impl='scaled_mm')):8.1f}")
PY
timeout 300 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/worker/test_worker_cuda.py \
  tests/worker/test_worker_fp8.py 2>&1 | tee "$out/pytest.log" || rc=1
fi
if [[ $part != tests ]]; then
timeout 120 python3 bench/expert.py --tokens 1,16,128,512,4096 --rounds 7 2>&1 | tee "$out/expert.log" || rc=1
# Issue 19's "FP8 expert at 1, 16, 64 tokens <= 0.7x bf16": cuBLAS (the default), then our split-K
# Triton kernel where it times faster (MOE_FP8_DECODE_GEMM=auto; its choices are logged).
timeout 120 python3 bench/expert.py --tokens 1,16,64,128,512,4096 --rounds 7 --graphs --impls scaled_mm \
  2>&1 | tee "$out/expert-graphs.log" || rc=1
timeout 60 python3 bench/expert.py --tokens 1,16,64 --rounds 7 --graphs --impls scaled_mm --decode-gemm auto \
  2>&1 | tee "$out/expert-graphs-auto.log" || rc=1
timeout 170 python3 bench/fp8_gemm.py --budget-s 110 2>&1 | tee "$out/fp8_gemm.log" || rc=1
# Whole-model decode on the GPU vs transformers' DeepseekV3ForCausalLM, same weights, same run (issue
# 19's "3x transformers"); needs transformers importable. Our decode steps run as CUDA graphs (the default).
timeout 240 python3 bench/decode.py --device cuda --dtype bf16 --batches 1,16,64 --new 32 2>&1 \
  | tee "$out/decode.log" || rc=1
# Issue 19's "CUDA-graph decode at least 2x eager at batch 1": the same without graphs.
timeout 90 python3 bench/decode.py --device cuda --dtype bf16 --batches 1 --new 32 --cuda-graphs off 2>&1 \
  | tee "$out/decode-eager.log" || rc=1
fi
exit $rc
