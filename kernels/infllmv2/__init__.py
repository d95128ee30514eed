"""InfLLM v2: MiniCPM4's trainable block-sparse attention (compressed-key block scoring, top-k block
selection shared by a GQA group, block-sparse attention), for prefill and decode.

- `reference.py`: plain torch, one sequence, the spec;
- `cpu.py`: the batched torch path used on CPU; `triton.py`: the kernels used on CUDA;
- `attention.py`: the model attention "infllmv2" (registered on import), the KV cache's compressed keys.

Importing this package registers the attention with `cpmtool.model.transformer`.

Semantics are those of the HF remote code / infllmv2_cuda_impl (the training-consistent path of
`../shared/reference/inference-kernels.md` §1): compressed LSE from the 4x coarser keys, local blocks
forced inside a top-(topk + window/block) selection per KV head, per query token. Where we depart:
- a query that sees no coarse key yet (its first 4*kernel_size tokens) scores all blocks 0 instead
  of the spec's inf/NaN; the forced sink and window blocks already cover every key there;
- top-k ties go to the lower block index (the official CUDA top-k leaves them unspecified; ties are
  common because neighbouring blocks share the max-pooled window on their border);
- no repeat of query heads up to 16 per KV head (the official kernels' fixed group): it scales every
  block score of a group by the same factor, so the selection and the output are unchanged;
- use_nope un-rotates the cached keys when compressing (and the queries when scoring) instead of
  keeping a second, pre-RoPE key cache: same values up to rounding;
- the KV cache recompresses the windows that complete from the cached keys instead of keeping the
  official uncompressed tail buffer: same values, and a reset or overwritten row invalidates exactly
  the windows it touches.
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
