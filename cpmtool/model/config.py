"""One config dataclass for every supported decoder family, built from an HF `config.json`.

Families differ only in a few switches, so they share one `Transformer`:

| family  | HF model_type | differences from Llama                                             |
|---------|---------------|--------------------------------------------------------------------|
| llama   | llama         | -                                                                  |
| qwen2   | qwen2         | bias on q/k/v (not o)                                              |
| qwen3   | qwen3         | RMSNorm on q and k per head (`qk_norm`), explicit head_dim         |
| minicpm | minicpm       | μP: embeddings × scale_emb, residual branches × scale_depth/√L,    |
|         |               | final hidden ÷ (hidden_size/dim_model_base) before the LM head     |
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from cpmtool.errors import ConfigError

FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "minicpm": ("MiniCPMForCausalLM", "minicpm"),
}
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "minicpm": "minicpm",
                "minicpm4": "minicpm"}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q/k/v/o (llama, qwen3, minicpm conventions)
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3
    # μP (MiniCPM); 1.0 / None mean "off", so a Llama is a MiniCPM with neutral scales.
    scale_emb: float = 1.0
    scale_depth: float | None = None
    dim_model_base: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    # Pluggable attention: "dense" (SDPA) or "infllmv2"; its settings (MiniCPM4 `sparse_config`).
    attention: str = "dense"
    sparse_config: dict | None = None
    extra: dict = field(default_factory=dict)  # unknown HF keys, kept so a save round-trips

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.family == "qwen3":
            self.qk_norm = True  # Qwen3 always has q/k norms; to_hf() does not write the flag
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"unknown family {self.family!r} (valid: {', '.join(FAMILIES)})")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in ROPE_TYPES:
            problems.append(f"rope_scaling type {rope_type!r} is not supported (valid: {', '.join(ROPE_TYPES)})")
        if problems:
            raise ConfigError(problems)

    # μP multipliers, neutral (1.0) for non-MiniCPM families.
    @property
    def residual_scale(self) -> float:
        if self.scale_depth is None:
            return 1.0
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_divisor(self) -> float:
        if self.dim_model_base is None:
            return 1.0
        return self.hidden_size / self.dim_model_base

    @property
    def is_mup(self) -> bool:
        return self.scale_emb != 1.0 or self.residual_scale != 1.0 or self.logit_divisor != 1.0

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """Build from an HF config.json dict (transformers 4.x `rope_theta` or 5.x `rope_parameters`)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in _MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r} (supported: {', '.join(sorted(_MODEL_TYPES))})"
            )
        family = _MODEL_TYPES[model_type]
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"unsupported hidden_act {act!r} (cpmtool's decoder implements silu)")
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_scaling = hf.get("rope_scaling") or None
        if rope_scaling is None and rope.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        known = {f.name for f in fields(cls)}
        kw = {k: hf[k] for k in known if k in hf and k not in ("family", "extra", "rope_theta", "rope_scaling")}
        kw["torch_dtype"] = str(hf.get("torch_dtype") or hf.get("dtype") or "float32").replace("torch.", "")
        if family == "qwen2":
            kw["attention_bias"] = False  # qwen2: q/k/v carry a bias and o does not; handled in the model
        if family == "qwen3":
            kw["qk_norm"] = True
        if family != "minicpm":
            kw.pop("scale_emb", None), kw.pop("scale_depth", None), kw.pop("dim_model_base", None)
        if hf.get("sparse_config") and kw.get("attention", "dense") == "dense":
            kw["attention"] = "infllmv2"
        skip = known | {"rope_parameters", "model_type", "architectures", "transformers_version", "dtype",
                        "auto_map", "_name_or_path"}
        extra = {k: v for k, v in hf.items() if k not in skip}
        return cls(family=family, rope_theta=float(rope_theta), rope_scaling=rope_scaling, extra=extra, **kw)

    def to_hf(self) -> dict:
        """An HF config.json dict that transformers (and our loader) reads back."""
        arch, model_type = FAMILIES[self.family]
        d = {k: v for k, v in asdict(self).items() if k not in ("family", "extra", "attention", "qk_norm")}
        if self.family != "minicpm":
            for k in ("scale_emb", "scale_depth", "dim_model_base"):
                d.pop(k)
        if not self.sparse_config:
            d.pop("sparse_config")
        if self.family == "qwen2":
            d.pop("attention_bias")
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default", **(self.rope_scaling or {})}
        if self.rope_scaling is None:
            d.pop("rope_scaling")
        d["hidden_act"] = "silu"
        d["architectures"] = [arch]
        d["model_type"] = model_type
        return {**self.extra, **d}

    def num_parameters(self) -> int:
        h, v, layers = self.hidden_size, self.vocab_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return emb + layers * per_layer + h
