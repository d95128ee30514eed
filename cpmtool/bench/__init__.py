"""The benchmarks behind `cpmtool bench` (one module each; `suite` runs them all)."""

from __future__ import annotations

from cpmtool.errors import ConfigError

DEVICES = ("cpu", "cuda")


def check_device(device: str, *, present: bool = True) -> None:
    """A benchmark's --device: one of DEVICES and, with `present`, a CUDA device there for cuda.

    Raises:
        ConfigError: an unknown device, or cuda where torch sees none.
    """
    if device not in DEVICES:
        raise ConfigError(f"--device {device!r}: valid: {', '.join(DEVICES)}")
    if present and device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: torch sees no CUDA device")
