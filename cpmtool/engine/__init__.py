"""Generation backends behind one interface.

Every backend has `generate(requests, params=None) -> list[Result]` (request order) and
`generate_stream(requests, params=None) -> Iterator[Result]` (completion order), with the request
and result types of `cpmtool.engine.types`.
"""

from __future__ import annotations

from cpmtool.engine.types import Completion, Request, Result, SamplingParams
from cpmtool.errors import ConfigError

BACKENDS = ("native", "vllm", "openai")


def load_engine(model: str | None, backend: str = "native", *, api_base: str | None = None,
                api_key: str | None = None, dtype: str = "float32", device: str = "cpu",
                max_batch: int = 64, attention: str | None = None, **kw):
    """An engine for `model` on `backend` ("native" | "vllm" | "openai")."""
    if backend == "native":
        from cpmtool.engine.native import NativeEngine

        if model is None:
            raise ConfigError("--model is required for the native engine")
        return NativeEngine.load(model, dtype=dtype, device=device, attention=attention, max_batch=max_batch, **kw)
    if backend == "vllm":
        from cpmtool.engine.vllm_backend import VllmEngine

        return VllmEngine.load(model, dtype=dtype, **kw)
    if backend == "openai":
        from cpmtool.engine.openai_backend import OpenAIEngine

        if not api_base:
            raise ConfigError("--engine openai needs --api-base URL")
        return OpenAIEngine(api_base, model=model, api_key=api_key, **kw)
    raise ConfigError(f"unknown engine {backend!r} (valid: {', '.join(BACKENDS)})")


__all__ = ["BACKENDS", "Completion", "Request", "Result", "SamplingParams", "load_engine"]
