"""Ternary matmul, the spec (../shared/reference/inference-kernels.md §3): plain torch, float32, naive.

Format "ternary-2bit-v1": weight W (N, K) in {-1, 0, +1}, stored as codes w + 1 in {0, 1, 2},
4 per byte along K (byte j of row n holds k = 4j + i at bits 2i, i = 0..3; the tail is padded with
code 1 = zero), packed (N, ceil(K/4)) uint8, plus scales (N, K/group) bf16 or (1, 1) per tensor
(any float dtype is accepted here; the math runs in float32).
"""

import torch
import torch.nn.functional as F


def pack_ternary(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) in {-1, 0, 1} -> uint8 (N, ceil(K/4))."""
    n, k = q.shape
    codes = (q.to(torch.int16) + 1).to(torch.uint8)
    codes = F.pad(codes, (0, -k % 4), value=1).view(n, -1, 4)  # (N, K/4, 4)
    return codes[..., 0] | codes[..., 1] << 2 | codes[..., 2] << 4 | codes[..., 3] << 6


def unpack_ternary(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 (N, ceil(K/4)) -> int8 (N, K) in {-1, 0, 1}."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & 3  # (N, K/4, 4)
    return (codes.to(torch.int8) - 1).flatten(1)[:, :in_features]


def dequantize(packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """Float32 (N, K) = ternary * scale; scale (N, G) repeats over K/G consecutive columns."""
    w = unpack_ternary(packed, in_features).float()
    n, g = w.shape[0], scale.shape[-1]
    return (w.view(n, g, -1) * scale.float()[..., None]).view(n, in_features)  # (N, G, K/G) -> (N, K)


def act_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token absmax fake quantisation to `bits`-bit integers; 16 = float activations (W2A16)."""
    if bits >= 16:
        return x
    qmax = 2 ** (bits - 1) - 1
    s = qmax / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return (x * s).round().clamp(-qmax - 1, qmax) / s


def ternary_matmul(x, packed, scale, in_features: int, act_bits: int = 8, bias=None) -> torch.Tensor:
    """y (..., N) = act_quant(x) @ dequantize(W).T + bias, in float32."""
    return F.linear(act_quant(x.float(), act_bits), dequantize(packed, scale, in_features), bias)
