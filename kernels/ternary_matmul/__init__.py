"""Ternary matmul: 2-bit packed {-1, 0, +1} weights with per-tensor or per-group scales (BitNet b1.58 /
BitCPM), per-token absmax activations.

- `reference.py`: the format (`pack_ternary`, `unpack_ternary`) and the naive float32 matmul, the spec;
- `cpu.py`: the CPU path (weights unpacked once to a cached float matrix; the options measured are
  listed there); `triton.py`: the kernel used on CUDA.

`PackedTernaryLinear` is the runtime layer `load_model` builds for a "ternary-2bit-v1" checkpoint.
Departures from bitnet: packing is along K within each output row (bitnet's I2_S interleaves
128-weight blocks, its GPU format permutes 16x32 tiles), scales may be per group (bitnet: one bf16
per projection; both bf16), and `act_bits=16` means float activations (W2A16) rather than a 16-bit integer grid.
"""

import torch
from torch import nn

from .cpu import DenseCache, ternary_matmul_cpu
from .reference import act_quant, dequantize, pack_ternary, unpack_ternary

FORMAT = "ternary-2bit-v1"


def ternary_matmul(x, packed, scale, in_features: int, act_bits: int = 8, bias=None, cache=None) -> torch.Tensor:
    """y (..., N) = act_quant(x) @ (ternary * scale).T + bias: Triton on CUDA, the cached dense path on CPU."""
    if x.is_cuda:
        try:
            from .triton import ternary_matmul_fwd
        except ImportError:  # no triton on this CUDA host: the torch path still runs there
            pass
        else:
            return ternary_matmul_fwd(x, packed, scale, in_features, act_bits, bias)
    return ternary_matmul_cpu(x, packed, scale, in_features, act_bits, bias, cache)


class PackedTernaryLinear(nn.Module):
    """A linear layer over packed ternary weights: buffers `weight_packed` (N, ceil(K/4)) uint8 and
    `weight_scale` (N, K/group_size) bf16, or (1, 1) per tensor (group_size 0)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, group_size: int = 0,
                 act_bits: int = 8, device=None, dtype=None):
        super().__init__()
        if group_size and in_features % group_size:
            raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.act_bits = group_size, act_bits
        scale_shape = (out_features, in_features // group_size) if group_size else (1, 1)
        self.register_buffer("weight_packed", torch.full((out_features, -(-in_features // 4)), 0x55,
                                                         dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._cache = DenseCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ternary_matmul(x, self.weight_packed, self.weight_scale, self.in_features, self.act_bits, self.bias,
                              self._cache)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}, act_bits={self.act_bits}")


__all__ = ["FORMAT", "PackedTernaryLinear", "act_quant", "dequantize", "pack_ternary", "ternary_matmul",
           "unpack_ternary"]
