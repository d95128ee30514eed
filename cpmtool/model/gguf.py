"""Read a GGUF file as an HF-layout model: config dict, dequantized state dict, tokenizer.

transformers' own GGUF loader keeps weights quantized (slow, not savable), so weights are
dequantized here with `gguf.quants.dequantize`. llama.cpp's converter permutes the rows of
q_proj/k_proj for the "llama" architecture (its rotary kernel pairs dimensions (2i, 2i+1) where
HF pairs (i, i + d/2)); `_unpermute` undoes that so the weights are in HF layout again.
Qwen2/Qwen3 GGUFs are stored unpermuted.

    config, state = load_gguf_state_dict("model.gguf")          # load directly
    convert_gguf("model.gguf", "out/", dtype="float32")          # once, to safetensors
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from cpmtool.errors import ModelError

# progress(stage, done, total): stages are "read", "tensors", "tokenizer", "write".
Progress = Callable[[str, int, int], None]

# GGUF architecture -> (HF architectures[0], model_type, q/k rows permuted by llama.cpp).
_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
}

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")
_DTYPES = ("float32", "bfloat16", "float16")


def _reader(path: str | os.PathLike):
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"GGUF file not found: {p}")
    try:
        return GGUFReader(str(p))
    except Exception as e:  # gguf raises ValueError/struct errors on a truncated or foreign file
        raise ModelError(f"cannot read GGUF file {p}: {type(e).__name__}: {e}") from e


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _hf_config(reader) -> dict:
    import numpy as np

    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ModelError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(sorted(_ARCHS))})"
        )
    hf_arch, model_type, _ = _ARCHS[arch]

    def need(key: str):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ModelError(f"GGUF metadata lacks {arch}.{key}")
        return v

    names = {t.name for t in reader.tensors}
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else int(embd.shape[1])  # gguf shapes are (in, out)
    head_dim = _field(reader, f"{arch}.attention.key_length") or _field(
        reader, f"{arch}.rope.dimension_count"
    )
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    cfg = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(head_dim) if head_dim else hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        # stored as float32: 1e-5 would read back as 9.999999747378752e-06
        "rms_norm_eps": float(str(np.float32(need("attention.layer_norm_rms_epsilon")))),
        "rope_theta": theta,
        "rope_parameters": {"rope_theta": theta, "rope_type": "default"},
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "initializer_range": 0.02,
        "use_cache": True,
    }
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        factor = _field(reader, f"{arch}.rope.scaling.factor")
        if scaling != "linear" or factor is None:
            raise ModelError(f"GGUF rope scaling {scaling!r} is not supported (only linear)")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
        cfg["rope_parameters"].update(cfg["rope_scaling"])
    return cfg


def _unpermute(w, n_head: int):
    # llama.cpp stored rows as (head, d/2, 2); HF wants (head, 2, d/2).  w: (n_head * d, in)
    d2 = w.shape[0] // n_head // 2
    return w.reshape(n_head, d2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{m.group(1)}.{_BLOCK_TENSORS[m.group(2)]}"
    # e.g. rope_freqs.weight (llama3 rope scaling): silently dropping it would give a wrong model
    raise ModelError(f"GGUF tensor {name!r} has no HF equivalent in cpmtool's converter")


def _state_dict(reader, cfg: dict, dtype: str, progress: Progress | None) -> dict:
    import numpy as np
    import torch
    from gguf.quants import dequantize

    if dtype not in _DTYPES:
        raise ModelError(f"unsupported dtype {dtype!r} (valid: {', '.join(_DTYPES)})")
    permuted = _ARCHS[_field(reader, "general.architecture")][2]
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    tdtype = getattr(torch, dtype)
    state = {}
    n = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        hf = _hf_name(t.name)
        try:
            w = dequantize(t.data, t.tensor_type)  # HF (out, in) order: gguf lists dims reversed
        except NotImplementedError as e:
            raise ModelError(f"GGUF tensor {t.name} has unsupported type {t.tensor_type.name}") from e
        kind = t.name.split(".")[-2]
        if permuted and kind in heads:
            w = _unpermute(w, heads[kind])
        state[hf] = torch.from_numpy(np.array(w, dtype=np.float32)).to(tdtype)
        if progress:
            progress("tensors", i + 1, n)
    if cfg["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    return state


def load_gguf_state_dict(
    path: str | os.PathLike, dtype: str = "float32", progress: Progress | None = None
) -> tuple[dict, dict]:
    """Load a GGUF file as (HF config.json dict, HF-named state dict of dequantized tensors).

    Args:
        path (str | PathLike): the .gguf file.
        dtype (str): "float32" (default), "bfloat16" or "float16" for the returned tensors.
        progress (callable | None): called as progress(stage, done, total).

    With tied embeddings the state dict has no `lm_head.weight` (as HF's save_pretrained).
    Raises ModelError for unreadable files or unsupported architectures/tensor types.
    """
    return _load(_reader_with_progress(path, progress), dtype, progress)


def _reader_with_progress(path, progress: Progress | None):
    if progress:
        progress("read", 0, 1)
    reader = _reader(path)
    if progress:
        progress("read", 1, 1)
    return reader


def _load(reader, dtype: str, progress: Progress | None) -> tuple[dict, dict]:
    cfg = _hf_config(reader)
    cfg["torch_dtype"] = dtype
    return cfg, _state_dict(reader, cfg, dtype, progress)


def gguf_tokenizer(path: str | os.PathLike, max_length: int | None = None):
    """Build a transformers tokenizer (with its chat template) from a GGUF file's metadata, offline."""
    from transformers import AutoTokenizer

    p = Path(path).resolve()
    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    except Exception as e:  # transformers raises ValueError/KeyError for tokenizers it cannot rebuild
        raise ModelError(f"cannot build a tokenizer from {p}: {type(e).__name__}: {e}") from e
    if max_length:
        tok.model_max_length = max_length
    return tok


def gguf_metadata(path: str | os.PathLike) -> dict:
    """The GGUF's descriptive metadata (general.*) plus the HF config, without dequantizing."""
    return _metadata(_reader(path))


def _metadata(reader) -> dict:
    meta = {k: _field(reader, k) for k in reader.fields if k.startswith("general.")}
    types = sorted({t.tensor_type.name for t in reader.tensors})
    params = sum(int(t.n_elements) for t in reader.tensors)
    return {"general": meta, "tensor_types": types, "params": params, "config": _hf_config(reader)}


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "float32",
    progress: Progress | None = None,
    card: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a GGUF file to an HF model directory (safetensors, tokenizer, configs).

    Args:
        gguf_path (str | PathLike): the .gguf file.
        out_dir (str | PathLike): the directory to create.
        dtype (str): stored weight dtype: "float32" (default), "bfloat16" or "float16".
        progress (callable | None): called as progress(stage, done, total).
        card (dict | None): extra fields for card.json (provenance shown by `cpmtool models info`).
        overwrite (bool): replace an existing out_dir (default False: ModelError if it exists).

    The files are written into a temporary sibling directory that is renamed into place at the
    end, so an interrupted conversion never leaves a half-written out_dir. Returns out_dir.
    """
    from safetensors.torch import save_file

    src, out = Path(gguf_path), Path(out_dir)
    if out.exists() and not overwrite:
        raise ModelError(f"{out} already exists")
    reader = _reader_with_progress(src, progress)
    cfg, state = _load(reader, dtype, progress)
    meta = _metadata(reader)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if progress:
            progress("tokenizer", 0, 1)
        tok = gguf_tokenizer(src, max_length=cfg["max_position_embeddings"])
        tok.save_pretrained(str(tmp))
        _keep_chat_template(tmp, tok)
        if progress:
            progress("tokenizer", 1, 1)
            progress("write", 0, 1)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        info = {
            "name": meta["general"].get("general.name"),
            "source": src.name,
            "source_quantization": "/".join(meta["tensor_types"]),
            "stored_dtype": dtype,
            "license": meta["general"].get("general.license"),
            "converted_by": "cpmtool.model.gguf.convert_gguf",
            **(card or {}),
        }
        (tmp / "card.json").write_text(
            json.dumps({k: v for k, v in info.items() if v is not None}, indent=2) + "\n"
        )
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        progress("write", 1, 1)
    return out


def _keep_chat_template(d: Path, tok) -> None:
    # transformers 5 writes the template to chat_template.jinja; older readers (and tools that
    # only read tokenizer_config.json) look for the key, so store it in both places.
    path = d / "tokenizer_config.json"
    tc = json.loads(path.read_text())
    for k in ("is_local", "local_files_only"):  # load-time flags, not properties of the tokenizer
        tc.pop(k, None)
    if tok.chat_template:
        tc["chat_template"] = tok.chat_template
    path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


def _replace_dir(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
