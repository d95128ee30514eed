"""Atomic checkpoints in HF layout, with the trainer state needed to resume identically.

    <out>/checkpoints/step-000010/   config.json, model.safetensors, tokenizer files (HF layout:
                                     `cpmtool ... --model <dir>` and transformers load it) and
                                     trainer_state.pt (step, optimizer, RNG states, recipe state)
    <out>/checkpoints/latest          the name of the newest complete checkpoint

A checkpoint is written into a hidden temp directory and renamed into place, and `latest` is
replaced atomically after that, so a crash mid-write leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from cpmtool.errors import ConfigError

STATE_FILE = "trainer_state.pt"


def rng_states() -> dict:
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_states(states: dict) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])


def save_checkpoint(out: str | Path, step: int, model, tokenizer, state: dict, *, keep: int = 2) -> Path:
    """Write checkpoint `step` of a run into `<out>/checkpoints/` and point `latest` at it.

    Args:
        model: the policy (a `Transformer`), saved with `save_pretrained`.
        state: picklable trainer state (optimizer state dict, RNG states, cursors ...).
        keep: how many most recent checkpoints to keep (older ones are deleted).
    """
    from cpmtool.model.loader import save_pretrained

    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, tokenizer=tokenizer)
    torch.save({**state, "step": step, "rng": rng_states()}, tmp / STATE_FILE)
    final = root / name
    if final.exists():  # a resumed run writing the same step again
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".latest.tmp-{os.getpid()}"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / "latest")
    if keep > 0:
        done = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(out) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"{pointer} names {path.name}, which is incomplete; remove it or start afresh")
    return path


def load_state(path: str | Path) -> dict:
    """The trainer state of a checkpoint (our own pickle: optimizer state, RNG states, recipe state)."""
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)


def load_for_training(name_or_path, *, dtype: str = "float32", device: str = "cpu"):
    """`load_model` whose parameters own their memory.

    The loader hands out tensors backed by the checkpoint's mmap; a training run that outlives a
    rewrite of that file (a new checkpoint saved in place, a rebuilt registry model) would then
    die of SIGBUS on the next page it touches. Returns (model, config).
    """
    from cpmtool.model.loader import load_model

    model, config = load_model(name_or_path, dtype=dtype, device=device)
    with torch.no_grad():
        for p in model.parameters():  # tied weights are one Parameter: cloned once
            p.data = p.data.clone()
        for b in model.buffers():
            b.data = b.data.clone()
    return model, config
