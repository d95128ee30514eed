"""InfLLM v2 settings: MiniCPM4's `sparse_config` keys, their defaults and the derived sizes.

Defaults are the MiniCPM4-8B model card's (`../shared/reference/inference-kernels.md` §1.1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from cpmtool.errors import ConfigError


@dataclass(frozen=True)
class SparseConfig:
    kernel_size: int = 32  # keys mean-pooled into one compressed key ("semantic kernel")
    kernel_stride: int = 16
    init_blocks: int = 1  # sink blocks every query attends to
    block_size: int = 64
    window_size: int = 2048  # local window in tokens, always attended
    topk: int = 64
    use_nope: bool = False  # score blocks with keys/queries before RoPE
    dense_len: int = 8192  # dense attention below this KV length; -1 = always sparse

    def __post_init__(self):
        p = []
        for f in ("kernel_size", "kernel_stride", "block_size", "topk"):
            if getattr(self, f) <= 0:
                p.append(f"{f}={getattr(self, f)} must be > 0")
        if self.init_blocks < 0 or self.window_size < 0:
            p.append("init_blocks and window_size must be >= 0")
        if p:
            raise ConfigError(p)
        # The pooling from compressed keys to blocks assumes whole strides per block and per kernel
        # (FastDeploy's InfLLMv2 constraints, plus window % block).
        if self.block_size % self.kernel_stride:
            p.append(f"block_size={self.block_size} must be a multiple of kernel_stride={self.kernel_stride}")
        if self.kernel_size % self.kernel_stride:
            p.append(f"kernel_size={self.kernel_size} must be a multiple of kernel_stride={self.kernel_stride}")
        if self.window_size % self.block_size:
            p.append(f"window_size={self.window_size} must be a multiple of block_size={self.block_size}")
        if self.init_blocks >= self.topk:  # so the forced blocks always fit in the top-k
            p.append(f"init_blocks={self.init_blocks} must be < topk={self.topk}")
        if p:
            raise ConfigError(p)

    @classmethod
    def from_dict(cls, d: dict | None) -> SparseConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown sparse_config keys {unknown} (valid: {', '.join(sorted(known))})")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def local_blocks(self) -> int:
        return self.window_size // self.block_size

    @property
    def topk_eff(self) -> int:
        # HF code: the forced local blocks are counted inside the top-k, so it asks for topk + local
        return self.topk + self.local_blocks

    @property
    def kernel_size2(self) -> int:
        # the coarse compression used only for the LSE approximation is 4x the scoring one (128/64)
        return 4 * self.kernel_size

    @property
    def kernel_stride2(self) -> int:
        return 4 * self.kernel_stride

    def is_sparse(self, kv_len: int) -> bool:
        return self.dense_len < 0 or kv_len >= self.dense_len


def num_compressed(length: int, kernel: int, stride: int) -> int:
    """Number of full compression windows over `length` keys (partial windows are not emitted)."""
    return 0 if length < kernel else (length - kernel) // stride + 1
