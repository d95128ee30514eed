"""Export a checkpoint as a plain `LlamaForCausalLM`, folding MiniCPM's μP scales into the weights.

MiniCPM computes (s = scale_emb, r = scale_depth/√L, d = hidden_size/dim_model_base):

    x₀ = s·E[ids];   x ← x + r·o_proj(attn(norm(x)));   x ← x + r·down_proj(mlp(norm(x)))
    logits = W_head · (norm_f(x_L) / d)

A Llama computes the same with s = r = d = 1, so the scales move into weights:

- E ← s·E. The scaled embedding *is* the residual stream x₀, so every RMSNorm downstream sees
  exactly the input it saw before; no eps caveat applies.
- o_proj and down_proj (weights and biases) ← r·(…): each residual branch adds the same vector.
- norm_f.weight ← norm_f.weight / d. RMSNorm is linear in its weight, so the head sees norm_f(x)/d.
  With tied embeddings the head is the scaled E (s·E), so the final norm also takes 1/s; this
  keeps the checkpoint tied (no second vocab×hidden matrix) and stays exact.

Only the MiniCPM and Llama families are exported: a Qwen2 or Qwen3 checkpoint is already
loadable by transformers as itself, and Qwen3's q/k norms have no Llama equivalent, so those
raise ModelError instead of writing a copy under another name.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from cpmtool.errors import ModelError
from cpmtool.model.transformer import Transformer

# MiniCPM config keys that mean nothing to a Llama (InfLLM v2 and Eagle-head settings)
_MINICPM_ONLY = ("sparse_config", "mup_denominator", "use_mup")


def fold_mup(model: Transformer) -> Transformer:
    """Fold the μP scales of `model` into its weights, in place; its config becomes a Llama's."""
    c = model.config
    s, r, d = c.scale_emb, c.residual_scale, c.logit_divisor
    with torch.no_grad():
        if c.tie_word_embeddings:
            d = d * s  # the head shares E, which is about to carry s
        model.model.embed_tokens.weight.mul_(s)
        for block in model.model.layers:
            for lin in (block.self_attn.o_proj, block.mlp.down_proj):
                lin.weight.mul_(r)
                if lin.bias is not None:
                    lin.bias.mul_(r)
        model.model.norm.weight.div_(d)
    extra = {k: v for k, v in c.extra.items() if k not in _MINICPM_ONLY}
    model.config = dataclasses.replace(c, family="llama", scale_emb=1.0, scale_depth=None, dim_model_base=None,
                                       attention="dense", sparse_config=None, extra=extra)
    for block in model.model.layers:
        block.residual_scale = 1.0
    return model


def export_llama(src: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "auto") -> Path:
    """Write `src` as an equivalent LlamaForCausalLM checkpoint (HF layout, safetensors).

    Args:
        src: a registry name, HF directory or .gguf file of the llama or minicpm family.
        out_dir: destination directory (written atomically; tokenizer files copied when present).
        dtype: dtype of the written weights; "auto" keeps the source's. Folding runs in float32.

    Returns:
        out_dir as a Path.

    Raises:
        ModelError: the source is a qwen2/qwen3 checkpoint (already loadable by transformers).
    """
    from cpmtool.model.loader import load_model, save_pretrained, torch_dtype

    out_dtype = torch_dtype(_source_dtype(src) if dtype == "auto" else dtype)
    model, config = load_model(src, dtype="float32", attention="dense")  # a Llama has no sparse attention
    if config.family not in ("llama", "minicpm"):
        arch = config.to_hf()["architectures"][0]
        raise ModelError(f"{src} is a {config.family} checkpoint, already loadable by transformers as {arch}; "
                         f"export-llama converts minicpm and llama checkpoints only")
    fold_mup(model)
    model.to(out_dtype)
    return save_pretrained(model, out_dir, tokenizer=_tokenizer_or_none(src))


def _source_dtype(src: str | os.PathLike) -> str:
    from cpmtool.model.loader import read_config, resolve

    path = resolve(src)
    if path.is_dir():
        return read_config(path).torch_dtype
    return "float32"  # a GGUF's weights are dequantised to float32


def _tokenizer_or_none(src):
    from cpmtool.model.tokenizer import load_tokenizer

    try:
        return load_tokenizer(src)
    except ModelError:
        return None

