"""Ternary weights (BitNet b1.58 / BitCPM): absmean quantiser, STE fake-quant layer, 2-bit packing.

Formulas (../shared/reference/inference-kernels.md §3.1):

    scale = max(mean|W|, 1e-5)            per tensor, or per group of `group_size` consecutive inputs
    Wq    = clamp(round(W / scale), -1, 1)    of each output row (BitCPM4-CANN's group-wise scaling)
    x_q   = round(x * 127 / max|x|) * max|x| / 127     per token (`act_bits` 8; 16 = float activations)
    QAT:  y = F.linear(x + (x_q - x).detach(), W + (Wq*scale - W).detach())

The straight-through estimator is BitNet's: the gradient is the identity for every weight and
activation, also where rounding clamped a weight to +-1 (no clipped-STE mask), and no gradient
flows into the scales (they are part of the detached term). The latent float weights stay in the
optimizer.

The gpt-fast handler pattern: `Ternary(group_size, act_bits)` swaps layers for QAT
(`convert_for_qat`), packs a model (`quantize_state_dict`, `pack_model`) and builds the runtime
layers (`convert_for_runtime`); `save_ternary` writes a checkpoint that `load_model` reads back.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cpmtool.errors import ConfigError
from cpmtool.kernels.ternary_matmul import FORMAT, PackedTernaryLinear, act_quant, pack_ternary
from cpmtool.model.transformer import block_linears

ACT_BITS = (8, 16)


def weight_scale(w: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """Absmean scale of w (N, K): (1, 1) per tensor (group_size 0) or (N, K/group_size) per group.

    Rounded to bf16 (bitnet stores its scales as bf16), so QAT sees exactly the scales the file
    holds; returned as float32.
    """
    if not group_size:
        s = w.detach().float().abs().mean().clamp(min=1e-5).reshape(1, 1)
    else:
        n, k = w.shape
        s = w.detach().float().abs().view(n, k // group_size, group_size).mean(-1).clamp(min=1e-5)
    return s.to(torch.bfloat16).float()


def weight_quant(w: torch.Tensor, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 (N, K) in {-1, 0, 1}, float32 scale) of w (N, K)."""
    s = weight_scale(w, group_size)
    n, k = w.shape
    q = (w.detach().float().view(n, s.shape[-1], -1) / s[..., None]).round().clamp(-1, 1)  # (N, G, K/G)
    return q.view(n, k).to(torch.int8), s


def fake_quant_weight(w: torch.Tensor, group_size: int = 0) -> torch.Tensor:
    """Wq * scale in w's dtype and shape (no gradient: use it inside `ste`)."""
    q, s = weight_quant(w, group_size)
    n, k = w.shape
    return (q.float().view(n, s.shape[-1], -1) * s[..., None]).view(n, k).to(w.dtype)


def ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Forward xq, backward identity to x."""
    return x + (xq - x).detach()


class TernaryLinear(nn.Linear):
    """nn.Linear whose forward uses fake-quantised ternary weights and activations (QAT).

    It keeps nn.Linear's parameters (`weight`, `bias`) and state-dict names, so a QAT checkpoint
    is an ordinary full-precision checkpoint of the latent weights.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, group_size: int = 0,
                 act_bits: int = 8, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.group_size, self.act_bits = group_size, act_bits

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int = 0, act_bits: int = 8) -> TernaryLinear:
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, group_size=group_size, act_bits=act_bits,
                  device="meta")
        new.weight, new.bias = lin.weight, lin.bias  # the same Parameters: the optimizer sees no change
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = ste(self.weight, fake_quant_weight(self.weight, self.group_size))
        if self.act_bits < 16:
            x = ste(x, act_quant(x.float(), self.act_bits).to(x.dtype))
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}, act_bits={self.act_bits}"


class Ternary:
    """The ternary scheme: QAT layer swap, packing, runtime layer swap, and the checkpoint tag."""

    def __init__(self, group_size: int = 0, act_bits: int = 8):
        problems = []
        if group_size < 0:
            problems.append(f"--group-size must be >= 0 (0: one scale per tensor), got {group_size}")
        if act_bits not in ACT_BITS:
            problems.append(f"--act-bits must be one of {', '.join(map(str, ACT_BITS))}, got {act_bits}")
        if problems:
            raise ConfigError(problems)
        self.group_size, self.act_bits = group_size, act_bits

    def check(self, model: nn.Module) -> None:
        """Raise ConfigError when a block linear's input size is not a multiple of the group size."""
        if not self.group_size:
            return
        bad = sorted({m.in_features for _, p, a in block_linears(model) if (m := getattr(p, a)).in_features
                      % self.group_size})
        if bad:
            raise ConfigError(f"--group-size {self.group_size} does not divide the input size(s) {bad} of the "
                              f"model's linear layers; pick a divisor (e.g. 32 or 64) or 0 for per-tensor scales")

    def convert_for_qat(self, model: nn.Module) -> nn.Module:
        """Swap every block linear for a `TernaryLinear` sharing its parameters (in place)."""
        self.check(model)
        for _, parent, attr in block_linears(model):
            lin = getattr(parent, attr)
            if not isinstance(lin, TernaryLinear):
                setattr(parent, attr, TernaryLinear.from_linear(lin, self.group_size, self.act_bits))
        return model

    def quantize_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The packed state dict: `<linear>.weight_packed` + `.weight_scale` for block linears, the rest as is."""
        self.check(model)
        state = dict(model.state_dict())
        for name, parent, attr in block_linears(model):
            lin = getattr(parent, attr)
            q, s = weight_quant(lin.weight, self.group_size)
            del state[f"{name}.weight"]
            state[f"{name}.weight_packed"] = pack_ternary(q)
            state[f"{name}.weight_scale"] = s.to(torch.bfloat16)  # exact: the scale is bf16-rounded
        return state

    def convert_for_runtime(self, model: nn.Module) -> nn.Module:
        """Swap every block linear for an empty `PackedTernaryLinear` (in place; load the packed state next)."""
        for _, parent, attr in block_linears(model):
            lin = getattr(parent, attr)
            dev = lin.weight.device if hasattr(lin, "weight") else lin.weight_packed.device
            setattr(parent, attr, PackedTernaryLinear(lin.in_features, lin.out_features, lin.bias is not None,
                                                      group_size=self.group_size, act_bits=self.act_bits, device=dev))
        return model

    def metadata(self) -> dict[str, str]:
        """The safetensors header tag `load_model` checks (values must be strings)."""
        return {"format": "pt", "cpmtool.quant": FORMAT, "cpmtool.group_size": str(self.group_size),
                "cpmtool.act_bits": str(self.act_bits)}


def pack_model(model: nn.Module, scheme: Ternary) -> nn.Module:
    """A copy of `model` (dense or QAT layers) with packed ternary block linears; the original is untouched."""
    state = scheme.quantize_state_dict(model)
    packed = copy.deepcopy(model)
    scheme.convert_for_runtime(packed)
    packed.load_state_dict(state, strict=False)  # a tied lm_head is the embedding's (absent when tied)
    return packed.eval()


def save_ternary(model: nn.Module, out_dir: str | os.PathLike, scheme: Ternary, *, tokenizer=None,
                 keep_dtype: str = "bfloat16") -> Path:
    """Pack `model` and write it as a model directory `load_model` (and so serve/rollout/bench) reads.

    Args:
        model: a `Transformer` with dense or `TernaryLinear` block linears (float latent weights).
        scheme: group size and activation bits (written into the safetensors header).
        tokenizer: saved beside the weights.
        keep_dtype: dtype of the tensors kept unquantised (embeddings, norms, LM head, biases).
    """
    from cpmtool.model.loader import save_pretrained, torch_dtype

    packed = pack_model(model, scheme)
    dt = torch_dtype(keep_dtype)
    with torch.no_grad():
        for p in packed.parameters():
            p.data = p.data.to(dt)
    return save_pretrained(packed, out_dir, tokenizer=tokenizer, metadata=scheme.metadata())


def file_bytes(path: str | os.PathLike) -> int:
    """Bytes of a model directory's safetensors files."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def ternary_stats(model: nn.Module, scheme: Ternary) -> dict:
    """Weight counts and storage of a model's block linears under `scheme`, and of the bf16 model.

    bits_per_weight counts the packed codes and their bf16 scales over the quantised weights.
    """
    linears = [getattr(p, a) for _, p, a in block_linears(model)]
    n_q = sum(m.in_features * m.out_features for m in linears)
    q_bytes = sum(m.out_features * -(-m.in_features // 4) for m in linears)
    s_bytes = sum(2 * (m.out_features * m.in_features // scheme.group_size if scheme.group_size else 1)
                  for m in linears)
    n_all = sum(p.numel() for p in model.parameters())
    n_kept = n_all - n_q
    return {"quantized_weights": n_q, "kept_weights": n_kept, "bits_per_weight": round(8 * (q_bytes + s_bytes) / n_q, 4),
            "bf16_bytes": 2 * n_all, "packed_weight_bytes": q_bytes + s_bytes}
