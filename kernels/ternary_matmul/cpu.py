"""The CPU path: unpack the 2-bit weights once, then run every call on the cached dense float matrix.

Options measured on this machine's CPU (`cpmtool bench ternary` re-measures them, rows `cpu_path`):
- unpack + dequantise to float32 on every call, then `F.linear`: the 2-bit unpack (shifts, masks,
  a cast over N*K elements) costs about as much as the matmul itself at decode (M = 1), so ~2x slower;
- int8 weights cached, int8 activations, `torch._int_mm`: exact int32 accumulation, but ATen's CPU
  int8 GEMM is a fallback loop here, 10-50x slower than fp32 `F.linear` (and per-group scales would
  need one int matmul per group);
- bf16 weights cached: no native bf16 GEMM on this CPU, 1.5-5x slower than fp32;
- a bitnet.cpp-style lookup table (TL1/TL2) needs hand-written SIMD; in torch ops it is a gather per
  weight pair, far slower than one BLAS call;
- float32 weights cached (this path): MKL/oneDNN GEMM, as fast as the full-precision model.

So on CPU the ternary model computes at the speed of the fp32 one and its win is the 2-bit file
(8x fewer weight bytes than bf16 to store and load); resident memory for the block weights is that
of fp32 once they are unpacked. The activation quantisation (absmax per token) runs on every call,
so the outputs are those of the W1.58A8 model, equal to the reference up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import act_quant, dequantize


class DenseCache:
    """The dequantised (N, K) weight in the compute dtype, rebuilt when the packed tensor changes."""

    def __init__(self):
        self.key, self.weight = None, None

    def get(self, packed: torch.Tensor, scale: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
        key = (packed.data_ptr(), packed._version, scale.data_ptr(), scale._version, dtype, packed.device)
        if key != self.key:
            self.weight = dequantize(packed, scale, in_features).to(dtype)
            self.key = key
        return self.weight


class _LastInput:
    # q/k/v read the same normed hidden states, and so do gate/up: quantise them once. The entry
    # holds the input tensor itself, so an identity match cannot be a freed tensor's reused memory.
    x = out = None
    version = bits = -1


def act_quant_shared(x: torch.Tensor, bits: int) -> torch.Tensor:
    """`act_quant` in x's dtype, reusing the last result when called again on the same unmodified tensor."""
    last = _LastInput
    if x is last.x and x._version == last.version and bits == last.bits:
        return last.out
    out = act_quant(x.float(), bits).to(x.dtype)
    last.x, last.version, last.bits, last.out = x, x._version, bits, out
    return out


def ternary_matmul_cpu(x, packed, scale, in_features: int, act_bits: int = 8, bias=None,
                       cache: DenseCache | None = None) -> torch.Tensor:
    """y (..., N) in x's dtype, through the cached dense weight (built now when no cache is given)."""
    w = (cache or DenseCache()).get(packed, scale, in_features, x.dtype)
    xq = act_quant_shared(x, act_bits) if act_bits < 16 else x
    return F.linear(xq, w, None if bias is None else bias.to(x.dtype))
