"""A whole decode step of a dense fp32 model on the CPU in one C call: `cpu_step.c`, built on first use
by kernels/cbuild.py. Its matmuls call the BLAS sgemm torch itself uses (MKL's `sgemm_`, looked up
in torch's library), so it needs a torch built with MKL; otherwise, like any kernel that cannot be
built, `available()` is False and `Transformer._decode_step` runs its layers from Python.

`decode_step(model, x, positions, cache, cos, signed_sin)`: x (B, hidden) the tokens' (scaled)
embeddings, updated in place as the residual stream; returns the final normed hidden states (B,
hidden). The caller has claimed the cache slots (`KVCache.claim`).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("cpu_step.c")
_lib: list = []  # [library or None], resolved once
_sgemm: list = []  # [address of torch's sgemm_ or None]
_WS = threading.local()  # per thread (a server's engine may step in its own): a workspace grown to the largest batch


def _kernel():
    if not _lib:
        from ..cbuild import load

        lib = load(_SRC) if sgemm_address() else None
        if lib is not None and lib.decode_step_available():
            p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
            lib.decode_step.argtypes = [p, p, p, p, i64, i64, i64, i32, p, p, i64, i32, p, p, p, f32, f32, p, p, p,
                                        i32, i32, i32, i32, i32, i32, i32]
            lib.decode_step.restype = ctypes.c_int
        else:
            lib = None
        _lib.append(lib)
    return _lib[0]


def sgemm_address() -> int | None:
    """The address of the Fortran `sgemm_` in torch's CPU library (MKL builds export it), or None."""
    if not _sgemm:
        addr = None
        path = Path(torch.__file__).parent / "lib" / ("libtorch_cpu.so" if os.name == "posix" else "torch_cpu.dll")
        try:
            addr = ctypes.cast(ctypes.CDLL(str(path)).sgemm_, ctypes.c_void_p).value
        except (OSError, AttributeError):
            addr = None
        _sgemm.append(addr if torch.backends.mkl.is_available() else None)
    return _sgemm[0]


def supports(model) -> bool:
    """Whether the model's layers are what the C step computes: plain nn.Linear projections (no
    MLP bias, no quantized layers), no q/k norms, fp32 contiguous weights (the C side reads them by
    pointer), and heads the attention kernel takes."""
    from torch import nn

    cfg = model.config
    g, d = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim
    if cfg.qk_norm or cfg.mlp_bias or d % 8 or d > 256 or g > 16 or cfg.num_attention_heads % cfg.num_key_value_heads:
        return False
    for block in model.model.layers:
        att, mlp = block.self_attn, block.mlp
        mods = (att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(m) is not nn.Linear or m.weight.dtype != torch.float32 or not m.weight.is_contiguous()
               or (m.bias is not None and not m.bias.is_contiguous()) for m in mods):
            return False
        if not (block.input_layernorm.weight.is_contiguous() and block.post_attention_layernorm.weight.is_contiguous()):
            return False
    return _kernel() is not None


def decode_step(model, x: torch.Tensor, positions: torch.Tensor, cache, cos: torch.Tensor,
                signed_sin: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    b, hidden = x.shape
    h, hkv, d, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    need = b * (3 * h * d + 2 * hkv * d + hidden + 2 * inter)
    ws = getattr(_WS, "ws", None)
    if ws is None or ws.numel() < need:
        ws = _WS.ws = torch.empty(need)
    ptrs = []
    for block in model.model.layers:
        att, mlp = block.self_attn, block.mlp
        ptrs += [m.weight.data_ptr() for m in (block.input_layernorm, att.q_proj, att.k_proj, att.v_proj, att.o_proj,
                                                block.post_attention_layernorm, mlp.gate_proj, mlp.up_proj,
                                                mlp.down_proj)]
        ptrs += [m.bias.data_ptr() if m.bias is not None else None for m in (att.q_proj, att.k_proj, att.v_proj,
                                                                               att.o_proj)]
    n_layers = len(model.model.layers)
    kc = (ctypes.c_void_p * n_layers)(*[t.data_ptr() for t in cache.k])
    vc = (ctypes.c_void_p * n_layers)(*[t.data_ptr() for t in cache.v])
    st = cache.k[0].stride()
    if any(t.stride() != st for t in (*cache.k, *cache.v)) or st[-1] != 1 or cache.valid.stride(-1) != 1:
        raise ValueError("decode_step: every layer's K and V cache buffers need the same strides, rows contiguous")
    used = cache.used
    valid = cache.valid
    pos = positions.reshape(b).to(torch.int64).contiguous()
    cos, signed_sin = cos.reshape(b, d).contiguous(), signed_sin.reshape(b, d).contiguous()
    out = torch.empty(b, hidden)
    norm = model.model.norm
    rc = _kernel().decode_step(sgemm_address(), (ctypes.c_void_p * len(ptrs))(*ptrs), kc, vc, st[0], st[1], st[2],
                               cache.k[0].shape[2], pos.data_ptr(), valid.data_ptr(), valid.stride(0), used,
                               cos.data_ptr(), signed_sin.data_ptr(), norm.weight.data_ptr(), norm.eps,
                               cfg.residual_scale, x.data_ptr(), out.data_ptr(), ws.data_ptr(), b, n_layers, hidden,
                               inter, h, hkv, d)
    if rc:
        raise ValueError(f"decode_step: a position outside the cache's {cache.k[0].shape[2]} slots")
    return out
