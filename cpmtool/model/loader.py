"""Load and save `Transformer` checkpoints in the HF layout (config.json + safetensors).

`load_model` accepts whatever `--model` accepts: a registry name, an HF directory or a `.gguf`
file. The model is built on the meta device and the checkpoint tensors are assigned into it, so
a checkpoint is held in memory once (read from an mmap, cast per tensor) and never twice.

`save_pretrained` writes a directory that both `load_model` and
`transformers.AutoModelForCausalLM.from_pretrained` read; the write is atomic (temp dir + rename).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from cpmtool.errors import ConfigError, ModelError
from cpmtool.model.config import ModelConfig
from cpmtool.model.transformer import Transformer, rope_inv_freq

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# keys some checkpoints carry that hold no weights (recomputed at load)
_IGNORED_KEYS = re.compile(r".*\.rotary_emb\.inv_freq$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A registry name, HF directory or .gguf file -> the local path (the registry owns the cache)."""
    from cpmtool.model.registry import resolve_model

    try:
        return Path(resolve_model(name_or_path))
    except ModelError:
        # the registry wants a tokenizer beside the weights; a bare checkpoint (a training output)
        # still loads, and the loader names what is missing more precisely
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            return path
        raise


def torch_dtype(dtype: str | torch.dtype, config: ModelConfig | None = None) -> torch.dtype:
    """"float32" | "bfloat16" | "float16" | "auto" (the checkpoint's own dtype) | a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    if name == "auto":
        name = config.torch_dtype if config is not None else "float32"
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r} (valid: auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attention: str | None = None,
) -> tuple[Transformer, ModelConfig]:
    """Load a checkpoint into our `Transformer`.

    Args:
        name_or_path: a registry name (`cpm-tiny`, `smollm2-135m`), an HF directory
            (config.json + model.safetensors or sharded safetensors with an index) or a `.gguf` file.
        dtype: parameter dtype: "float32" (default), "bfloat16", "float16" or "auto" (the checkpoint's).
        device: where the parameters live.
        attention: override the attention implementation ("dense", "infllmv2").

    Returns:
        (model in eval mode, its ModelConfig).

    Raises:
        ModelError: missing/corrupt files, missing or unexpected tensors, shape mismatches.
    """
    path = resolve(name_or_path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        target = torch_dtype(dtype)  # "auto" -> float32: GGUF weights are dequantised
        hf, tensors = _read_gguf(path, target)
        config = _config_from_dict(hf, path)
    else:
        config = read_config(path)
        target = torch_dtype(dtype, config)
        tensors = None
    if attention is not None:
        config.attention = attention
    config.torch_dtype = str(target).replace("torch.", "")
    device = torch.device(device)

    with torch.device("meta"):
        model = Transformer(config)
    if tensors is None:
        _convert_quantized(model, path)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    # parameters take the requested dtype; persistent buffers (packed weights, scales) keep their own
    fixed = {k: b.dtype for k, b in model.named_buffers() if k in expected}
    state = _read_state_dict(path, expected, target, device, fixed) if tensors is None else tensors
    state = _check_state_dict(state, expected, config, path, target, device, fixed)
    model.load_state_dict(state, strict=False, assign=True)  # keys checked above; a tied head is absent
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # assign replaced the shared parameter
    # non-persistent buffers stayed on meta; RoPE frequencies are kept in fp32 like HF
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval(), config


_REQUANTIZE = ("re-create it from the full-precision model: cpmtool quantize-ternary --model <full-precision model> "
               "--out DIR")


def quant_format(path: Path) -> dict[str, str]:
    """The `cpmtool.*` quantization tags in the safetensors header of a model directory ({} when plain)."""
    from safetensors import safe_open

    file = _shard_files(path)[0]
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            packed = any(k.endswith(".weight_packed") for k in f.keys())
    except Exception as e:  # safetensors raises its own error types for bad headers/truncation
        raise ModelError(f"corrupt safetensors file {file}: {_one_line(e)}") from e
    tags = {k: v for k, v in meta.items() if k.startswith("cpmtool.")}
    if packed and "cpmtool.quant" not in tags:
        raise ModelError(f"{file} holds packed weights but no cpmtool.quant format tag; {_REQUANTIZE}")
    return tags


def _convert_quantized(model: Transformer, path: Path) -> None:
    # a tagged checkpoint gets its runtime layers before the state dict is checked against the model
    tags = quant_format(path)
    fmt = tags.get("cpmtool.quant")
    if fmt is None:
        return
    from cpmtool.kernels.ternary_matmul import FORMAT, PackedTernaryLinear

    if fmt != FORMAT:
        raise ModelError(f"{path} is quantized in format {fmt!r}, which this cpmtool does not read "
                         f"(known: {FORMAT}); {_REQUANTIZE}")
    try:
        group_size, act_bits = int(tags["cpmtool.group_size"]), int(tags["cpmtool.act_bits"])
    except (KeyError, ValueError) as e:
        raise ModelError(f"{path}: bad {FORMAT} tags {tags}; {_REQUANTIZE}") from e
    from cpmtool.model.transformer import block_linears

    for _, parent, attr in block_linears(model):
        lin = getattr(parent, attr)
        setattr(parent, attr, PackedTernaryLinear(lin.in_features, lin.out_features, lin.bias is not None,
                                                  group_size=group_size, act_bits=act_bits, device="meta"))


def read_config(path: Path) -> ModelConfig:
    """ModelConfig of an HF directory's config.json."""
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise ModelError(f"not a model directory or .gguf file: {path}")
    if not cfg_file.is_file():
        raise ModelError(f"no config.json in {path}")
    try:
        hf = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"unreadable config.json in {path}: {e}") from e
    return _config_from_dict(hf, cfg_file)


def _config_from_dict(hf: dict, where: Path) -> ModelConfig:
    try:
        return ModelConfig.from_hf(hf)
    except ConfigError as e:
        raise ModelError(f"unsupported model config in {where}: {e}") from e
    except TypeError as e:
        raise ModelError(f"malformed model config in {where}: {e}") from e


def _read_gguf(path: Path, dtype: torch.dtype) -> tuple[dict, dict[str, torch.Tensor]]:
    from cpmtool.model.gguf import load_gguf_state_dict

    return load_gguf_state_dict(path, dtype=str(dtype).replace("torch.", ""))


def _shard_files(path: Path) -> list[Path]:
    single, index = path / SAFETENSORS, path / SAFETENSORS_INDEX
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"corrupt safetensors index {index}: {e}") from e
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"{index} names missing shard file(s): {', '.join(missing)}")
        return files
    raise ModelError(f"no safetensors weights in {path} (expected {SAFETENSORS} or {SAFETENSORS_INDEX})")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _read_state_dict(path: Path, expected: dict, dtype: torch.dtype, device: torch.device,
                     fixed: dict | None = None) -> dict:
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for file in _shard_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:  # mmap'd; a tensor is read on get
                for key in f.keys():
                    if key in expected:  # skip tied copies / stray keys without reading them
                        state[key] = f.get_tensor(key).to(device=device, dtype=(fixed or {}).get(key, dtype))
                    else:
                        state[key] = None  # reported (or ignored) by _check_state_dict
        except ModelError:
            raise
        except Exception as e:  # safetensors raises its own error types for bad headers/truncation
            raise ModelError(f"corrupt safetensors file {file}: {_one_line(e)}") from e
    return state


def _check_state_dict(state: dict, expected: dict, config: ModelConfig, path: Path, dtype, device,
                      fixed: dict | None = None) -> dict:
    state = {k: v for k, v in state.items() if not _IGNORED_KEYS.match(k)}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some checkpoints store the tied copy; the embedding wins
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelError(f"checkpoint {path} is missing tensor(s): {_names(missing)}")
    if unexpected:
        raise ModelError(f"checkpoint {path} has unexpected tensor(s): {_names(unexpected)} "
                         f"(config.json does not match the weights)")
    out = {}
    for key, shape in expected.items():
        t = state[key]
        if not isinstance(t, torch.Tensor):  # a GGUF reader may hand back numpy arrays
            t = torch.as_tensor(t)
        if tuple(t.shape) != tuple(shape):
            raise ModelError(f"tensor {key} in {path} has shape {tuple(t.shape)}, config.json implies {tuple(shape)}")
        out[key] = t.to(device=device, dtype=(fixed or {}).get(key, dtype))  # no-op for safetensors (cast on read); gguf tensors
    return out


def _names(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ConfigError(f"bad max_shard_size {size!r} (e.g. 500MB, 2GB, or a number of bytes)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** {"B": 0, "K": 1, "M": 2, "G": 3}[unit[0]])


def save_pretrained(
    model: Transformer,
    out_dir: str | os.PathLike,
    tokenizer=None,
    max_shard_size: int | str | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `model` as an HF checkpoint directory (what transformers' `from_pretrained` reads).

    Args:
        model: the model; its `config` becomes config.json (dtype taken from the parameters).
        out_dir: destination directory; replaced atomically if it already holds a checkpoint.
        tokenizer: an HF tokenizer whose files are saved beside the weights (optional).
        max_shard_size: bytes or "500MB"/"2GB": split into `model-0000i-of-0000n.safetensors` + index.
        metadata: the safetensors header's string metadata (default {"format": "pt"}); a quantizer
            tags its format here (`cpmtool.quant`), which `load_model` checks.

    Returns:
        out_dir as a Path.
    """
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").exists())):
        raise ModelError(f"refusing to overwrite {out}: it exists and is not a model directory")
    config: ModelConfig = model.config
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with the embedding; safetensors forbids aliases
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    metadata = metadata or {"format": "pt"}
    hf = config.to_hf()
    hf["torch_dtype"] = str(dtype).replace("torch.", "")

    shards = _shard(state, _parse_size(max_shard_size) if max_shard_size is not None else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        if len(shards) == 1:
            save_file(shards[0], tmp / SAFETENSORS, metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata=metadata)
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _shard(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if max_bytes is None:
        return [state]
    shards: list[dict] = [{}]
    size = 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:  # a tensor larger than the limit gets a shard alone
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += n
    return shards


def _replace_dir(new: Path, out: Path) -> None:
    # a directory cannot be os.replace'd onto a non-empty one: move the old aside first
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old / out.name, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
