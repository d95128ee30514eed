"""The one decoder: Llama / Qwen2 / Qwen3 / MiniCPM(4) in plain torch, in the spirit of gpt-fast.

Parameter names follow the HF checkpoints (`model.layers.0.self_attn.q_proj.weight`, ...), so an
HF state dict loads with `load_state_dict` and a saved one loads in transformers.

Pluggable parts:
- attention: `config.attention` names an entry of `ATTENTION` (a function with the signature of
  `dense_attention`); `register_attention` adds one (InfLLM v2 registers "infllmv2").
- linear: every projection is an `nn.Linear` attribute with its HF name, so a quantizer swaps
  modules in place (the gpt-fast handler pattern: `convert_for_runtime(model)`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cpmtool.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _c_kernels(x, self.weight):  # one C pass forward and one backward (kernels/pointwise)
            return _pointwise.rms_norm(x, self.weight, self.eps)
        # normalise in fp32 like HF so bf16 runs match the reference
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (D/2,), with the static `linear` and `llama3` scalings."""
    import math

    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = config.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif kind == "llama3":
        factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_ctx = rs["original_max_position_embeddings"]
        lo_wavelen, hi_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > lo_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
        inv_freq = torch.where(is_mid, mid, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, T, D); cos/sin (B, T, D); HF's rotate-half convention
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos and a sign-folded sin, (B, 1, T, D) each, for `rotate`: built once per forward."""
    cos, sin = rope_cos_sin(inv_freq, positions, dtype)
    half = sin.shape[-1] // 2
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos[:, None], sin[:, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # apply_rope with the sign of rotate-half folded into the table: roll is one op where
    # chunk + neg + cat are three, and (-a) * b == -(a * b) exactly, so the result is bitwise equal
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def slot_mask(s: int, positions: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, T, S) bool: query t of row b sees slot s iff s <= positions[b, t] (and valid[b, s])."""
    mask = torch.arange(s, device=positions.device)[None, None, :] <= positions[:, :, None]  # (B, T, S)
    if valid is not None:
        mask = mask & valid[:, None, :]
    return mask[:, None]


class KVCache:
    """Preallocated per-layer K/V buffers, (B, Hkv, S, D) each, written at explicit positions.

    Rows may sit at different positions (continuous batching), so writes scatter by position and
    attention masks by position instead of assuming one shared length. `valid` (B, S) marks written
    slots, so padding or freed rows never leak into attention. Attention reads only the slots up to
    the high-water mark `used`, so a cache sized for the longest request costs nothing early on.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.used = 0
        # set while a CUDA-graph decode step runs (engine.cuda_graphs): `used` is then fixed by the
        # caller, and claim skips the host sync that reading the positions' maximum costs
        self.fixed_used = False
        self.extra: dict = {}  # per-attention state (InfLLM v2 keeps its compressed keys here)
        self._mask: tuple | None = None  # (positions, mask) of the current forward, see attn_mask

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def reset(self, rows: torch.Tensor | None = None) -> None:
        if rows is None:
            self.valid.zero_()
            self.used = 0
        else:
            self.valid[rows] = False

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store k, v (B, Hkv, T, D) at `positions` (B, T); return the cached (B, Hkv, used, D) views."""
        if layer == 0:
            self.claim(positions)
        idx = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k[layer].scatter_(2, idx, k)
        self.v[layer].scatter_(2, idx, v)
        return self.k[layer][:, :, : self.used], self.v[layer][:, :, : self.used]

    def claim(self, positions: torch.Tensor) -> None:
        """Mark the slots at `positions` (B, T) written and raise the high-water mark: a forward's
        bookkeeping, done once (at layer 0) before its layers write their K/V there."""
        if not self.fixed_used:
            self.used = max(self.used, int(positions.max()) + 1)
            if self.used > self.max_len:
                raise ValueError(f"KV cache overflow: position {self.used - 1} >= max_len {self.max_len}")
        self.valid.scatter_(1, positions, True)
        self._mask = None

    def attn_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, used) bool: query t of row b sees slot s iff s <= positions[b, t] and s is valid.

        Every layer of one forward asks for the same mask (valid only changes at layer 0's write),
        so it is built once per forward instead of once per layer.
        """
        if self._mask is None or self._mask[0] is not positions or self._mask[1].shape[-1] != self.used:
            self._mask = (positions, slot_mask(self.used, positions, self.valid[:, : self.used]))
        return self._mask[1]

    def grow(self, max_len: int) -> None:
        """Extend every row's slot capacity to `max_len` (new slots are invalid)."""
        pad = max_len - self.max_len
        if pad <= 0:
            return
        self.k = [F.pad(t, (0, 0, 0, pad)) for t in self.k]  # (B, Hkv, S, D): pad S
        self.v = [F.pad(t, (0, 0, 0, pad)) for t in self.v]
        self.valid = F.pad(self.valid, (0, pad))
        self._mask = None
        self.max_len = max_len

    def append_rows(self, other: KVCache) -> KVCache:
        """Append `other`'s rows after ours (a new admission joins the running batch)."""
        size = max(self.max_len, other.max_len)
        self.grow(size)
        other.grow(size)
        self.k = [torch.cat(p) for p in zip(self.k, other.k, strict=True)]
        self.v = [torch.cat(p) for p in zip(self.v, other.v, strict=True)]
        self.valid = torch.cat([self.valid, other.valid])
        self._mask = None
        self.used = max(self.used, other.used)
        for key in set(self.extra) | set(other.extra):
            a, b = self.extra.get(key), other.extra.get(key)
            if isinstance(a, torch.Tensor):
                self.extra[key] = torch.cat([a, b])
            elif isinstance(a, list):
                self.extra[key] = [torch.cat(p) for p in zip(a, b, strict=True)]
        return self

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (and reorder/repeat) the given rows: drops finished sequences, fans a prompt out to n samples."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.valid = self.valid.index_select(0, rows)
        self._mask = None
        # per-attention state follows the same rule: tensors (or per-layer lists of them) batch-first
        def sel(x):
            if isinstance(x, torch.Tensor):
                return x.index_select(0, rows)
            if isinstance(x, list):
                return [sel(t) for t in x]
            return x

        self.extra = {k: sel(v) for k, v in self.extra.items()}


class SharedPrompts:
    """A batch of responses whose prompts repeat: G distinct prompts, B responses.

    prompt_ids (G, P) and response_ids (B, L) are right-padded (prompt_lens, response_lens real
    tokens); group (B,) long is each response's prompt row; `keep`, when given, picks the (B, L)
    positions whose logits are wanted (the real response tokens), flat.
    """

    def __init__(self, prompt_ids, prompt_lens: list[int], response_ids, response_lens: list[int], group,
                 keep=None):
        self.prompt_ids, self.prompt_lens = prompt_ids, prompt_lens
        self.response_ids, self.response_lens, self.group = response_ids, response_lens, group
        self.keep = keep  # (N,) flat b * L + l of the positions to return logits at (None: all)


class _Recorder:
    """`response_logits`' prompt pass: plain causal attention (no cache, so no scatter into one),
    each layer's rotated K and V kept for the responses: (G, Hkv, P, D), or with `packed` (the
    varlen kernel) the prompts' real tokens (Np, Hkv*D)."""

    valid = None

    def __init__(self, packed: bool = False):
        self.packed = packed
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        self.k.append(k)
        self.v.append(v)
        return k, v


class _Prefix:
    """`response_logits`' response pass: a layer's keys and values are the fanned-out prompt's
    (B, Hkv, P, D) followed by the responses' own, concatenated. A KV cache written by position
    costs a scatter forward and a scatter plus a gather backward, on every layer; a concatenation's
    backward is two slices. Slots: prompt token i at slot i (valid below the prompt's length),
    response token j at slot P + j, so `positions` are slots here (the slot mask of
    `dense_attention` then holds) and the rotary takes the token positions separately."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], valid: torch.Tensor, t: int):
        self.k, self.v = k, v  # per layer, (B, Hkv, P, D)
        self.valid = torch.cat([valid, valid.new_ones(valid.shape[0], t)], dim=1)  # (B, P + T)
        self.used = self.valid.shape[1]
        self._mask = None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        return torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)  # (B, Hkv, P + T, D)

    def attn_mask(self, positions: torch.Tensor) -> torch.Tensor:
        if self._mask is None:  # the same for every layer
            self._mask = slot_mask(self.used, positions, self.valid)
        return self._mask


class _PackedPrefix:
    """`response_logits`' response pass on the varlen kernel: every response row reads its prompt's
    K/V (Np, Hkv*D) in place, prompt g at tokens pcu[g]..pcu[g+1], with no copy per response and no
    mask (kernels/varlen_attention); the backward sums a prompt's gradients over its responses."""

    packed = True
    valid = None

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], pcu: torch.Tensor, group: torch.Tensor):
        self.k, self.v, self.pcu, self.group = k, v, pcu, group

    def prefix(self, layer: int) -> tuple:
        return self.k[layer], self.v[layer], self.pcu, self.group


def _fan_out(group: torch.Tensor, g: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rows of a (G, ...) tensor to the (B, ...) of `group` (B,): row b is row group[b].

    A GRPO batch (or a DPO one) holds each prompt's responses side by side, n of them each: the fan
    out is then an expand, whose backward sums the n rows' gradients (a vectorised reduction). Any
    other order takes index_select, whose backward adds them into zeros by index (on the CPU an
    element-wise scatter_add, ~0.3 ms for each layer's K and V of a cpm-tiny GRPO update: that
    update took 0.526 s against 0.538 s, medians of 10 alternating in one process).
    """
    b = group.shape[0]
    n = b // g if g else 0
    if n and n * g == b and torch.equal(group, torch.arange(g, device=group.device).repeat_interleave(n)):
        return lambda x: x.unsqueeze(1).expand(g, n, *x.shape[1:]).reshape(b, *x.shape[1:])
    return lambda x: x.index_select(0, group)


class Packing:
    """Right-padded rows (B, T) with `lengths` real tokens, stored packed as (N, F) rows.

    Every projection, norm and MLP works per token, so in a prefill they run on the N real tokens
    only; attention is the one step that needs the (B, T) layout, and it alone unpacks. With
    `varlen` (training rows on the CPU, `_varlen_ok`) attention too runs on the packed tokens.
    """

    def __init__(self, lengths: list[int], b: int, t: int, device, varlen: bool = False):
        self.b, self.t = b, t
        real = torch.arange(t, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]  # (B, T)
        self.index = real.flatten().nonzero().flatten()  # (N,) flat b * T + t of each real token
        # varlen: attention runs on the packed tokens too (kernels/varlen_attention), rows at cu[b]..cu[b+1]
        self.varlen = varlen
        self.cu = torch.tensor([0, *lengths], device=device).cumsum(0) if varlen else None  # (B + 1,)

    def pack(self, z: torch.Tensor) -> torch.Tensor:
        # (B, T, F) -> (N, F)
        return z.reshape(self.b * self.t, -1).index_select(0, self.index)

    def unpack(self, z: torch.Tensor) -> torch.Tensor:
        # (N, F) -> (B, T, F), zeros at the padding
        out = z.new_zeros(self.b * self.t, z.shape[-1])
        return out.index_copy_(0, self.index, z).view(self.b, self.t, -1)


def dense_attention(q, k, v, *, positions, key_positions_valid=None, causal_no_cache=False, layer=None, cache=None,
                    config=None):
    """SDPA attention. q (B, H, T, D); k, v (B, Hkv, S, D). Returns (B, H, T, D).

    Without a cache (training, full-sequence scoring) it is plain causal attention. With a cache,
    query t of row b sees cached slot s iff s <= positions[b, t] and the slot is valid.
    """
    groups = q.shape[1] // k.shape[1]
    if causal_no_cache:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
    s = k.shape[2]
    if q.shape[2] == 1 and key_positions_valid is not None and q.device.type == "cpu":
        y = _decode_kernel(q, k, v, positions, key_positions_valid)  # None: not taken, SDPA below
        if y is not None:
            return y
    if cache is not None and s == cache.used and key_positions_valid is not None:
        mask = cache.attn_mask(positions)  # (B, 1, T, S), shared by the layers of this forward
    else:
        mask = slot_mask(s, positions, key_positions_valid)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)


def _decode_kernel(q, k, v, positions, valid):
    # the C decode kernel (kernels/decode_attention), imported on the first CPU decode step
    global _decode_attention
    if _decode_attention is None:
        try:
            from cpmtool.kernels.decode_attention import decode_attention as _decode_attention
        except ImportError:
            _decode_attention = False
    return _decode_attention(q, k, v, positions, valid) if _decode_attention else None


_decode_attention = None

AttentionFn = Callable[..., torch.Tensor]
ATTENTION: dict[str, AttentionFn] = {"dense": dense_attention}


def register_attention(name: str, fn: AttentionFn) -> None:
    ATTENTION[name] = fn


def _attention_fn(name: str) -> AttentionFn:
    if name not in ATTENTION and name == "infllmv2":
        try:  # registers itself on import, once that issue lands
            import cpmtool.kernels.infllmv2  # noqa: F401
        except ImportError:
            pass
    if name not in ATTENTION:
        from cpmtool.errors import ConfigError

        raise ConfigError(f"unknown attention {name!r} (available: {', '.join(sorted(ATTENTION))})")
    return ATTENTION[name]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        h, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        qkv_bias = config.attention_bias or config.family == "qwen2"
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=config.attention_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.attn_fn = _attention_fn(config.attention)

    def forward(self, x, cos, sin, positions, cache: KVCache | None, packing: Packing | None = None):
        # x (B, T, hidden), or (N, hidden) real tokens with `packing`; cos, sin: rope_tables (B, 1, T, D)
        d = self.config.head_dim
        if packing is not None and packing.varlen:
            return self._varlen(x, cos, sin, cache, packing)
        if packing is None:
            b, t, _ = x.shape
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            b, t = packing.b, packing.t
            q, k, v = (packing.unpack(m(x)) for m in (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(b, t, self.n_heads, d)  # (B, T, H, D)
        k = k.view(b, t, self.n_kv, d)
        v = v.view(b, t, self.n_kv, d)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if _c_kernels(q, k, cos):  # the rotary in C, on the tokens-major layout (kernels/pointwise)
            q, k = _pointwise.rope(q, cos, sin), _pointwise.rope(k, cos, sin)
            q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        else:
            q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        valid = None
        if cache is not None:
            k, v = cache.write(self.layer, k, v, positions)  # (B, Hkv, S, D)
            valid = cache.valid[:, : k.shape[2]] if cache.valid is not None else None
        # a _Recorder only keeps the K/V: the attention is the plain causal one
        causal = cache is None or cache.valid is None
        y = self.attn_fn(q, k, v, positions=positions, key_positions_valid=valid, causal_no_cache=causal,
                         layer=self.layer, cache=cache, config=self.config)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * d)
        return self.o_proj(y if packing is None else packing.pack(y))

    def _varlen(self, x, cos, sin, cache, packing: Packing):
        # x (N, hidden) packed real tokens; cos, sin (1, 1, N, D) packed too. Attention runs on the
        # packed rows (kernels/varlen_attention): no padded (B, T) layout, no mask, no prefix copies
        n, d = x.shape[0], self.config.head_dim
        q = self.q_proj(x).view(1, n, self.n_heads, d)  # (1, N, H, D)
        k = self.k_proj(x).view(1, n, self.n_kv, d)
        v = self.v_proj(x)  # (N, Hkv*D)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = _pointwise.rope(q, cos, sin).view(n, -1)  # (N, H*D)
        k = _pointwise.rope(k, cos, sin).view(n, -1)  # (N, Hkv*D)
        prefix = None
        if isinstance(cache, _Recorder):
            cache.write(self.layer, k, v, None)
        elif isinstance(cache, _PackedPrefix):
            prefix = cache.prefix(self.layer)
        y = _varlen_kernel.varlen_attention(q, k, v, packing.cu, n_heads=self.n_heads, prefix=prefix)  # (N, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        if _c_kernels(g, u):  # one C pass forward and one backward, silu(g) not kept (kernels/pointwise)
            return self.down_proj(_pointwise.swiglu(g, u))
        return self.down_proj(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.residual_scale = config.residual_scale  # μP: scale_depth / sqrt(L); 1.0 otherwise

    def forward(self, x, cos, sin, positions, cache, packing: Packing | None = None):
        a = self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, packing)
        x = x + (a if self.residual_scale == 1.0 else a * self.residual_scale)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + (m if self.residual_scale == 1.0 else m * self.residual_scale)


def _linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # a plain nn.Linear without its module call (~5 us a call, 28 calls a decode step on cpm-tiny)
    return F.linear(x, m.weight, m.bias) if type(m) is nn.Linear else m(x)


_pointwise = None  # kernels/pointwise once resolved; False: unavailable


def _c_kernels(*ts: torch.Tensor) -> bool:
    # whether these tensors take kernels/pointwise: fp32 on the CPU, the library built
    if _pointwise is None:
        _load_pointwise()
    return bool(_pointwise) and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)


def _load_pointwise() -> None:
    global _pointwise
    try:
        from cpmtool.kernels import pointwise

        _pointwise = pointwise if pointwise.kernel() is not None else False
    except ImportError:
        _pointwise = False


_decode_step_kernel = None  # kernels/decode_step once resolved; False: unavailable


def _step_kernel(model) -> bool:
    # whether `_decode_step` runs its layers in one C call: the kernel built against torch's MKL sgemm,
    # and layers it computes (plain linears, no q/k norms or MLP bias)
    global _decode_step_kernel
    if _decode_step_kernel is None:
        try:
            from cpmtool.kernels import decode_step

            _decode_step_kernel = decode_step
        except ImportError:
            _decode_step_kernel = False
    return bool(_decode_step_kernel) and _decode_step_kernel.supports(model)


_varlen_kernel = None  # kernels/varlen_attention once resolved; False: unavailable


def _varlen_ok(config: ModelConfig, w: torch.Tensor) -> bool:
    """Whether packed training rows run attention packed (kernels/varlen_attention): dense attention,
    fp32 on the CPU, the C kernels built, a head_dim the kernel takes. Otherwise SDPA on padded rows."""
    global _varlen_kernel
    if config.attention != "dense" or w.dtype != torch.float32 or w.device.type != "cpu" or not _c_kernels():
        return False
    if _varlen_kernel is None:
        try:
            from cpmtool.kernels import varlen_attention

            _varlen_kernel = varlen_attention
        except ImportError:
            _varlen_kernel = False
    return bool(_varlen_kernel) and _varlen_kernel.available(config.head_dim, n_heads=config.num_attention_heads,
                                                            n_kv=config.num_key_value_heads)


class _Body(nn.Module):
    # the `model.` prefix of HF names
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, parent module, attribute) of every linear layer inside the blocks: the
    projections a quantizer swaps (embeddings and the LM head are outside the blocks)."""
    out = []
    for name, parent in model.named_modules():
        if not name.startswith("model.layers."):
            continue
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear) or hasattr(child, "weight_packed"):
                out.append((f"{name}.{attr}", parent, attr))
    return out


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = _Body(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def new_cache(self, batch_size: int, max_len: int, dtype=None, device=None) -> KVCache:
        p = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, dtype or p.dtype, device or p.device)

    def hidden_states(self, input_ids, positions=None, cache: KVCache | None = None,
                      lengths: list[int] | None = None, rope_positions=None) -> torch.Tensor:
        """Final normed hidden states (B, T, hidden), already divided by the μP logit divisor.

        `lengths`: rows are right-padded and row b holds lengths[b] real tokens; the padding then
        costs attention only (the rest runs on the real tokens packed) and its hidden states are 0.
        `rope_positions` (B, T), when the rotary positions are not `positions` (`_Prefix` slots).
        """
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        if t == 1 and cache is not None and self._c_decode(input_ids, cache):
            return self._decode_step(input_ids, positions, cache)
        packing = None
        varlen = lengths is not None and self._varlen(cache)
        if lengths is not None and (varlen or sum(lengths) < b * t):
            packing = Packing(lengths, b, t, input_ids.device, varlen=varlen)
            input_ids = input_ids.reshape(-1).index_select(0, packing.index)  # (N,)
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden) or (N, hidden)
        if self.config.scale_emb != 1.0:
            x = x * self.config.scale_emb
        rope_at = positions if rope_positions is None else rope_positions  # (B, T)
        if varlen:  # the tables of the packed tokens only, (1, 1, N, D)
            rope_at = rope_at.reshape(1, -1).index_select(1, packing.index)
        cos, sin = rope_tables(self.inv_freq, rope_at, x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, positions, cache, packing)
        x = self.model.norm(x)
        if self.config.logit_divisor != 1.0:
            x = x / self.config.logit_divisor
        return x if packing is None else packing.unpack(x)

    def packs_attention(self) -> bool:
        """Whether rows given with `lengths` and no KV cache run attention on their packed tokens
        (kernels/varlen_attention) rather than SDPA on the padded rows."""
        return _varlen_ok(self.config, self.model.embed_tokens.weight)

    def _varlen(self, cache) -> bool:
        # packed attention: a response_logits pass as it was set up, or plain rows without a cache
        if isinstance(cache, (_Recorder, _PackedPrefix)):
            return cache.packed
        return cache is None and self.packs_attention()

    def _c_decode(self, input_ids, cache: KVCache) -> bool:
        """Whether a decode step can take `_decode_step`: fp32 on the CPU, no autograd, dense attention
        without per-attention cache state or q/k norms, and the C kernels built."""
        if (type(cache) is not KVCache or input_ids.device.type != "cpu" or torch.is_grad_enabled()
                or self.config.attention != "dense" or self.config.qk_norm or cache.extra
                or cache.k[0].dtype != torch.float32 or self.model.norm.weight.dtype != torch.float32):
            return False
        return _c_kernels()

    def _decode_step(self, input_ids, positions, cache: KVCache) -> torch.Tensor:
        """`hidden_states` of one token per row, (B, 1, hidden), with every op between the matmuls in
        C (kernels/pointwise): on a small model a decode step is mostly per-op overhead, and this
        runs ~11 calls a layer where the torch path runs ~40. Same values up to float rounding (the
        norm's summation order, silu's exp); the tests hold it to the torch path. Where the model's
        layers allow (`kernels.decode_step.supports`) the layer loop itself is one C call making the
        same calls, with the same logits (cpm-tiny at 64 rows: 3.78 against 5.59 ms a step)."""
        ks = _pointwise
        cfg = self.config
        b = input_ids.shape[0]
        x = self.model.embed_tokens(input_ids.reshape(b))  # (B, hidden), a new tensor: updated in place below
        if cfg.scale_emb != 1.0:
            x = x * cfg.scale_emb
        cos, sin = rope_tables(self.inv_freq, positions, x.dtype)  # (B, 1, 1, D) each
        cache.claim(positions)
        if _step_kernel(self):  # the whole layer loop in one C call (kernels/decode_step)
            h = _decode_step_kernel.decode_step(self, x, positions, cache, cos, sin)
            return (h / cfg.logit_divisor if cfg.logit_divisor != 1.0 else h)[:, None]
        used = cache.used
        valid = cache.valid[:, :used]
        rs = cfg.residual_scale
        a = None  # the last sublayer's output, added to x by the next norm
        for i, block in enumerate(self.model.layers):
            att, mlp = block.self_attn, block.mlp
            norm = block.input_layernorm
            h = ks.add_rmsnorm(x, a, rs, norm.weight, norm.eps)  # (B, hidden)
            q = ks.rope_write(_linear(att.q_proj, h), _linear(att.k_proj, h), _linear(att.v_proj, h), cos, sin,
                              cache.k[i], cache.v[i], positions, att.n_heads)  # (B, H, 1, D)
            y = att.attn_fn(q, cache.k[i][:, :, :used], cache.v[i][:, :, :used], positions=positions,
                            key_positions_valid=valid, layer=i, cache=cache, config=cfg)  # (B, H, 1, D)
            a = _linear(att.o_proj, y.reshape(b, -1))
            norm = block.post_attention_layernorm
            h = ks.add_rmsnorm(x, a, rs, norm.weight, norm.eps)
            a = _linear(mlp.down_proj, ks.silu_mul(_linear(mlp.gate_proj, h), _linear(mlp.up_proj, h)))
        h = ks.add_rmsnorm(x, a, rs, self.model.norm.weight, self.model.norm.eps)
        if cfg.logit_divisor != 1.0:
            h = h / cfg.logit_divisor
        return h[:, None]

    def forward(self, input_ids, positions=None, cache: KVCache | None = None, lengths: list[int] | None = None,
                select: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                responses: SharedPrompts | None = None) -> torch.Tensor:
        """Logits (B, T, V). `positions` (B, T) default to 0..T-1; with `cache` they index its slots.

        Training passes `lengths` (right-padded rows: the padding costs attention only, see
        `hidden_states`) and `select` (B, L) positions: the logits are then (B, L, V), at those
        positions only, so the prompt's positions never go through the LM head; with `keep` (N,)
        flat indices into those (B, L), the logits are (N, V) at them only (the padding skips it
        too). With `responses` (and `input_ids` None) it returns `response_logits(responses)`; this
        goes through forward so that a DistributedDataParallel wrapper sees the call.
        """
        if responses is not None:
            return self.response_logits(responses)
        h = self.hidden_states(input_ids, positions, cache, lengths=lengths)  # (B, T, hidden)
        if select is not None:
            h = h.gather(1, select[..., None].expand(-1, -1, h.shape[-1]))  # (B, L, hidden)
            return self._head_at(h, keep)
        return self.lm_head(h)

    def response_logits(self, batch: SharedPrompts) -> torch.Tensor:
        """Logits (B, L, V) predicting every response token (or (N, V) at `batch.keep`), each
        distinct prompt run once.

        GRPO's n samples of a prompt (DPO's chosen and rejected) repeat the prompt: run per row,
        its tokens cost n times. Here the prompts run once (G rows, plain causal attention), their
        per-layer K/V are fanned out to the B responses (`_fan_out`, whose backward sums the n
        rows' gradients), and the responses run after them as a second chunk attending to those
        K/V and their own (`_Prefix`), as a prefill and a decode chunk do in the engine. Logits and
        gradients are those of the B full rows; only the summation order differs. On the CPU in
        fp32 both passes run packed through kernels/varlen_attention instead (`_PackedPrefix`): the
        responses read the prompts' K/V in place, with no fan-out copies, padding or mask (cpm-tiny's
        GRPO update: 376 against 415 ms, medians of 8 alternating in one process).
        """
        g, p = batch.prompt_ids.shape
        b, width = batch.response_ids.shape
        dev = batch.prompt_ids.device
        packed = self.packs_attention()
        rec = _Recorder(packed)
        h = self.hidden_states(batch.prompt_ids, None, rec, lengths=batch.prompt_lens)  # (G, P, hidden)
        plen = torch.tensor(batch.prompt_lens, device=dev)
        fan = _fan_out(batch.group, g)
        first = fan(h[torch.arange(g, device=dev), plen - 1])  # (B, hidden): token 0
        if width == 1:
            return self._head_at(first[:, None], batch.keep)
        if packed:  # the responses read the prompts' packed K/V in place
            pcu = torch.cat([plen.new_zeros(1), plen.cumsum(0)])  # (G + 1,)
            prefix = _PackedPrefix(rec.k, rec.v, pcu, batch.group)
        else:
            valid = fan(torch.arange(p, device=dev)[None] < plen[:, None])  # (B, P)
            prefix = _Prefix([fan(k) for k in rec.k], [fan(v) for v in rec.v], valid, width - 1)
        # response token j (j < L - 1) sits at slot P + j, at position len(prompt) + j, and predicts token j + 1
        steps = torch.arange(width - 1, device=dev)
        slots = (p + steps).expand(b, width - 1)  # (B, L - 1)
        pos = fan(plen)[:, None] + steps  # (B, L - 1)
        lens = [max(n - 1, 0) for n in batch.response_lens]
        rest = self.hidden_states(batch.response_ids[:, :-1], slots, prefix, lengths=lens,
                                  rope_positions=pos)  # (B, L - 1, hidden)
        return self._head_at(torch.cat([first[:, None], rest], dim=1), batch.keep)

    def _head_at(self, h: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        # h (B, L, hidden) -> logits (B, L, V), or (N, V) at the flat positions `keep`
        if keep is not None:
            h = h.reshape(-1, h.shape[-1]).index_select(0, keep)
        return self.lm_head(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on a few rows of hidden states (B, hidden) -> (B, V), as in decoding.

        With few rows, MKL runs W @ h^T (the weight as the left operand) faster than the h @ W^T
        of nn.Linear (by ~15-20% at B=32, V=49152 on one core) and gives the same bits. The result
        is then a transposed (column-major) view: a contiguous copy would cost another ~5 ms.
        """
        head = self.lm_head
        if type(head) is not nn.Linear or head.bias is not None or hidden.dim() != 2 or hidden.shape[0] > 64:
            return head(hidden)
        return torch.mm(head.weight, hidden.t()).t()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def greedy(self, input_ids: list[int], max_new_tokens: int, stop_ids: list[int] | None = None) -> list[int]:
        """Greedy decoding of one sequence with the KV cache (a reference loop; the engine batches)."""
        stop = set(self.config.eos_ids if stop_ids is None else stop_ids)
        cache = self.new_cache(1, len(input_ids) + max_new_tokens)
        ids = torch.tensor([input_ids])
        pos = torch.arange(len(input_ids))[None]
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(self(ids, pos, cache)[0, -1].argmax())
            out.append(nxt)
            if nxt in stop:
                break
            ids, pos = torch.tensor([[nxt]]), pos[:, -1:] + 1
        return out
