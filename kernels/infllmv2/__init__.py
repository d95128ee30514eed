"""InfLLM v2: MiniCPM4's trainable block-sparse attention (compressed-key block scoring, top-k block
selection shared by a GQA group, block-sparse attention), for prefill and decode.

- `reference.py`: plain torch, one sequence, the spec;
- `cpu.py`: the batched torch path used on CPU; `triton.py`: the kernels used on CUDA;
- `attention.py`: the model attention "infllmv2" (registered on import), the KV cache's compressed keys.

Importing this package registers the attention with `cpmtool.model.transformer`.
"""

from torch import nn

from .attention import infllmv2, infllmv2_attention
from .config import SparseConfig


class InfLLMv2(nn.Module):
    """`infllmv2` with its settings bound: `InfLLMv2(SparseConfig(...))(q, k, v, q_pos)`."""

    def __init__(self, cfg: SparseConfig | None = None):
        super().__init__()
        self.cfg = cfg or SparseConfig()

    def forward(self, q, k, v, q_pos, **kw):
        return infllmv2(q, k, v, q_pos, self.cfg, **kw)


def _register():
    from cpmtool.model.transformer import register_attention

    register_attention("infllmv2", infllmv2_attention)


_register()

__all__ = ["InfLLMv2", "SparseConfig", "infllmv2"]
