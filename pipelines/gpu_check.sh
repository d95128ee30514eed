#!/usr/bin/env bash
# GPU checks in one command, for a CUDA machine with torch and triton (the project's device runs, or
# any GPU box with cpmtool importable): the Triton kernels compiled and checked against their torch
# references (small odd shapes and full size), the model running them on CUDA, then the attention
# benchmark (Triton vs SDPA, prefill and decode), a training-step timing (forward + backward), and
# the trainers on CUDA with bench train-rl --device cuda (gpu_train_check.sh).
#
#   bash pipelines/gpu_check.sh [OUTDIR]     # writes gpu.txt, pytest.log, attention.jsonl, train_step.jsonl
set -uo pipefail
out=${1:-gpu-check}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
$py -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)" \
  | tee -a "$out/gpu.txt"

# every Triton test (compiled, not interpreted, when CUDA is present), the model's, the trainer's and the
# engine's gpu-marked tests (the engine's need smollm2-135m pulled, else they skip)
$py -m pytest -q -p no:cacheprovider --timeout 600 tests/kernels/test_infllmv2_triton.py \
  tests/kernels/test_ternary_matmul_triton.py tests/model/test_sparse_attention.py tests/train/test_rl.py \
  tests/engine/test_native.py tests/engine/test_cuda_graphs.py \
  -k "triton or gpu or cuda or test_full_size" 2>&1 | tee "$out/pytest.log" || status=1

$py -m cpmtool bench attention --context 4k,8k,16k,32k,64k,128k >"$out/attention.jsonl" 2>"$out/attention.txt" \
  || status=1
cat "$out/attention.txt"

# training through the sparse op: forward + backward of one attention layer, Triton vs SDPA (bf16,
# MiniCPM4-0.5B heads: 16 query / 2 KV of 64), median of 10 after warm-up, CUDA events
$py - "$out/train_step.jsonl" <<'EOF' || status=1
import json, sys
import torch
import torch.nn.functional as F
from triton.testing import do_bench
from cpmtool.kernels.infllmv2 import SparseConfig
from cpmtool.kernels.infllmv2 import triton as tri
from cpmtool.kernels.infllmv2.cpu import compress, pool_blocks, select_blocks
from cpmtool.kernels.infllmv2.triton import infllmv2_triton

cfg = SparseConfig(dense_len=-1)
rows = []
for t in (8192, 32768, 65536):
    q, k, v = (torch.randn(1, h, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (16, 2, 2))
    pos = torch.arange(t, device="cuda")[None]
    do = torch.randn(1, 16, t, 64, device="cuda", dtype=torch.bfloat16)

    def dense():
        torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v), do)

    def sparse():
        torch.autograd.grad(infllmv2_triton(q, k, v, pos, cfg), (q, k, v), do)

    d_ms = do_bench(dense, warmup=50, rep=200, return_mode="median")
    s_ms = do_bench(sparse, warmup=50, rep=200, return_mode="median")
    # where the sparse time goes: block selection (compress, stage 1, pooling, top-k), stage-2 fwd, bwd
    n, qs, ks, vs, ps = 2, q.detach().reshape(2, 8, t, 64), k.detach().reshape(2, t, 64), v.detach().reshape(2, t, 64), \
        pos.expand(2, t).to(torch.int32).contiguous()

    def select():
        c1, c2 = compress(ks, cfg.kernel_size, cfg.kernel_stride), compress(ks, cfg.kernel_size2, cfg.kernel_stride2)
        sc = tri.stage1_scores(qs, c1, c2, ps, cfg)
        return select_blocks(pool_blocks(sc, cfg, -(-t // cfg.block_size)), ps, cfg).to(torch.int32).contiguous()

    idx = select()
    bq = tri.calculate_settings(8, 64, cfg.block_size, t)["BQ"]
    plan = tri.tile_plan(idx, -(-t // cfg.block_size), bq)
    o, lse, _ = tri.infllmv2_fwd(qs, ks, vs, idx, ps, cfg.block_size, plan)
    dor = do.reshape(2, 8, t, 64)
    parts = {name: do_bench(fn, warmup=20, rep=100, return_mode="median") for name, fn in (
        ("select", select), ("plan", lambda: tri.tile_plan(idx, -(-t // cfg.block_size), bq)),
        ("fwd", lambda: tri.infllmv2_fwd(qs, ks, vs, idx, ps, cfg.block_size, plan)),
        ("bwd", lambda: tri.infllmv2_bwd(dor, qs, ks, vs, o, lse, ps, cfg.block_size, plan)))}
    parts["union_blocks_mean"] = plan.count.float().mean().item()
    rows.append({"op": "attention_fwd_bwd", "context": t, "dense_ms": d_ms, "sparse_ms": s_ms, "speedup": d_ms / s_ms,
                 "sparse_parts_ms": parts})
    print(f"fwd+bwd {t:>6} tokens: sdpa {d_ms:8.2f} ms  infllmv2-triton {s_ms:8.2f} ms  speedup {d_ms / s_ms:5.2f}x"
          f"  (select {parts['select']:.2f}, plan {parts['plan']:.2f}, fwd {parts['fwd']:.2f}, bwd {parts['bwd']:.2f} ms;"
          f" {parts['union_blocks_mean']:.0f} blocks per {bq}-token tile)")
with open(sys.argv[1], "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
EOF
bash "$(dirname "$0")/gpu_train_check.sh" "$out" || status=1
exit $status
