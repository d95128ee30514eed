"""Ternary vs full precision on this CPU: bits per weight, file size, decode tokens/s, and the CPU
matmul options of `cpmtool.kernels.ternary_matmul.cpu` re-measured on the model's largest linear.

Decode speed is greedy decoding on the KV cache (`Transformer.forward` with a cache, batch
`batch`, after a `prompt_len`-token prefill that is not timed), both models loaded by `load_model`
in float32. Each time is the best of `repeats` runs and is measured twice: wall clock, and CPU
time of this process (`time.process_time`, all its threads). On a shared machine where other jobs
take most of the cores the wall clock mostly measures waiting, so the ratios use CPU time unless
`clock="wall"`; nothing here is asserted.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from cpmtool.errors import ModelError

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _best(fn: Callable[[], object], repeats: int, clock: str = "cpu") -> float:
    fn()  # warm-up: allocations, the ternary layers' dense cache
    now = CLOCKS[clock]
    best = float("inf")
    for _ in range(repeats):
        t0 = now()
        fn()
        best = min(best, now() - t0)
    return best


@torch.no_grad()
def decode_tokens_per_s(model, *, batch: int = 1, prompt_len: int = 16, max_tokens: int = 64, repeats: int = 3,
                        seed: int = 0) -> dict[str, float]:
    """Generated tokens per second of greedy decoding (all rows, prefill excluded): {"cpu": ..., "wall": ...}."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=gen)

    def run():
        cache = model.new_cache(batch, prompt_len + max_tokens)
        pos = torch.arange(prompt_len).expand(batch, prompt_len)
        nxt = model(prompt, pos, cache)[:, -1].argmax(-1)
        pos = pos[:, -1:]
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(max_tokens - 1):
            pos = pos + 1
            nxt = model(nxt[:, None], pos, cache)[:, -1].argmax(-1)
        return time.process_time() - c0, time.perf_counter() - w0

    run()
    times = [run() for _ in range(repeats)]
    n = batch * (max_tokens - 1)
    return {"cpu": n / max(min(t[0] for t in times), 1e-9), "wall": n / min(t[1] for t in times)}


def cpu_paths(n: int, k: int, *, m_values=(1, 16), group_size: int = 0, repeats: int = 20,
              clock: str = "cpu") -> list[dict]:
    """Microseconds per call of each CPU option for an (N, K) ternary weight at M rows of activations."""
    from cpmtool.kernels.ternary_matmul import act_quant, dequantize, pack_ternary
    from cpmtool.kernels.ternary_matmul.cpu import DenseCache, ternary_matmul_cpu

    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=gen)
    packed = pack_ternary(q)
    scale = torch.rand(n, k // group_size, generator=gen) if group_size else torch.tensor([[0.02]])
    rows = []
    for m in m_values:
        x = torch.randn(m, k, generator=gen)
        cache = DenseCache()
        w8 = q.t().contiguous()  # (K, N) int8 for torch._int_mm
        wb = dequantize(packed, scale, k).bfloat16()

        def int8(x=x, w8=w8):
            s = 127 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
            return torch._int_mm((x * s).round().to(torch.int8), w8).float() / s * scale.reshape(-1)[0]

        options = {
            "unpack_per_call_fp32": lambda x=x: F.linear(act_quant(x, 8), dequantize(packed, scale, k)),
            "cached_fp32 (used)": lambda x=x, cache=cache: ternary_matmul_cpu(x, packed, scale, k, 8, cache=cache),
            "cached_bf16": lambda x=x, wb=wb: F.linear(act_quant(x, 8).bfloat16(), wb),
        }
        if not group_size:  # one int matmul covers a per-tensor scale only
            options["int8_int_mm"] = int8
        base = None
        for name, fn in options.items():
            try:
                us = _best(fn, repeats, clock) * 1e6
            except RuntimeError as e:  # torch._int_mm's shape limits differ across builds
                rows.append({"cpu_path": name, "m": m, "n": n, "k": k, "error": " ".join(str(e).split())[:120]})
                continue
            base = base or us
            rows.append({"cpu_path": name, "m": m, "n": n, "k": k, "us_per_call": round(us, 1),
                         "vs_unpack_per_call": round(base / us, 2)})
    return rows


def bench_ternary(model: str = "cpm-tiny", *, ternary: str | None = None, group_size: int = 0, act_bits: int = 8,
                  batch: int = 1, prompt_len: int = 16, max_tokens: int = 64, repeats: int = 3,
                  threads: int | None = None, kernels: bool = True, clock: str = "cpu") -> dict:
    """Compare the full-precision `model` with its ternary version (`ternary`, a quantize-ternary
    model directory; default: `model` ternarised now, PTQ, which has the same speed and size).

    Returns one record: bits per weight, file bytes (ternary, original, bf16), decode tokens/s of
    each, their ratios, and the CPU path rows (`cpu_paths`) when `kernels`.
    """
    from cpmtool.kernels.ternary_matmul import PackedTernaryLinear
    from cpmtool.model.loader import load_model, resolve
    from cpmtool.model.transformer import block_linears
    from cpmtool.quant.ternary import Ternary, file_bytes, save_ternary

    if threads:
        torch.set_num_threads(threads)
    fp, _ = load_model(model)
    tmp = None
    if ternary is None:
        tmp = tempfile.TemporaryDirectory(prefix="cpmtool-ternary-")
        ternary = save_ternary(fp, Path(tmp.name) / "model", Ternary(group_size, act_bits))
    try:
        tq, _ = load_model(ternary)
        layers = [getattr(p, a) for _, p, a in block_linears(tq)]
        if not layers or not all(isinstance(m, PackedTernaryLinear) for m in layers):
            raise ModelError(f"{ternary} is not a ternary model (make one with: cpmtool quantize-ternary)")
        n_w = sum(m.in_features * m.out_features for m in layers)
        q_bytes = sum(m.weight_packed.numel() + m.weight_scale.numel() * m.weight_scale.element_size()
                      for m in layers)
        n_params = sum(p.numel() for p in fp.parameters())
        rec = {
            "model": str(model), "ternary": str(ternary), "group_size": layers[0].group_size,
            "act_bits": layers[0].act_bits, "threads": torch.get_num_threads(),
            "bits_per_weight": round(8 * q_bytes / n_w, 4), "quantized_weights": n_w, "params": n_params,
            "file_bytes_ternary": file_bytes(ternary), "file_bytes_model": file_bytes(resolve(model)),
            "bf16_bytes": 2 * n_params,
        }
        rec["size_vs_bf16"] = round(rec["file_bytes_ternary"] / rec["bf16_bytes"], 4)
        rec["size_vs_model_file"] = round(rec["file_bytes_ternary"] / rec["file_bytes_model"], 4)
        kw = dict(batch=batch, prompt_len=prompt_len, max_tokens=max_tokens, repeats=repeats)
        rec["batch"], rec["max_tokens"] = batch, max_tokens
        f, t = decode_tokens_per_s(fp, **kw), decode_tokens_per_s(tq, **kw)
        rec["clock"] = clock
        rec["decode_tok_s_fp32"], rec["decode_tok_s_ternary"] = round(f[clock], 2), round(t[clock], 2)
        rec["decode_speed_vs_fp32"] = round(t[clock] / f[clock], 3)
        rec["decode_tok_s_wall_fp32"], rec["decode_tok_s_wall_ternary"] = round(f["wall"], 2), round(t["wall"], 2)
        rec["load_average_1m"] = round(os.getloadavg()[0], 2)
        if kernels:
            big = max(layers, key=lambda m: m.in_features * m.out_features)
            rec["cpu_paths"] = cpu_paths(big.out_features, big.in_features, m_values=(1, max(batch, 16)),
                                         group_size=big.group_size, clock=clock)
        return rec
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_ternary(r: dict) -> str:
    lines = [
        f"ternary vs full precision: {r['model']} ({r['params']} params), {r['threads']} threads, batch {r['batch']}",
        f"  bits per quantised weight   {r['bits_per_weight']}  ({r['quantized_weights']} weights, group "
        f"{r['group_size'] or 'per tensor'}, A{r['act_bits']})",
        f"  file                        {r['file_bytes_ternary']} B = {r['size_vs_bf16']:.1%} of bf16 "
        f"({r['bf16_bytes']} B), {r['size_vs_model_file']:.1%} of the model's file",
        f"  decode tokens/{r['clock']}-s{' ' * (10 - len(r['clock']))}fp32 {r['decode_tok_s_fp32']}  ternary "
        f"{r['decode_tok_s_ternary']}  x{r['decode_speed_vs_fp32']}  (wall: {r['decode_tok_s_wall_fp32']} vs "
        f"{r['decode_tok_s_wall_ternary']}, load {r['load_average_1m']})",
    ]
    for row in r.get("cpu_paths", []):
        res = f"{row['us_per_call']:9.1f} us  x{row['vs_unpack_per_call']}" if "us_per_call" in row else row["error"]
        lines.append(f"  cpu path {row['cpu_path']:22s} M={row['m']:<3d} {row['n']}x{row['k']}: {res}")
    if r.get("cpu_paths"):
        lines.append(f"  (cpu paths: {r['clock']} time per call)")
    return "\n".join(lines)
