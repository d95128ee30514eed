"""Engine throughput benchmarks, peers side by side in one process on the same prompts.

`bench_engine`: our native engine vs transformers `generate` (and vLLM when asked) on `batch`
real instructions (alpaca_seed.jsonl, chat template), greedy, exactly `max_tokens` new tokens per
prompt (EOS ignored), so every peer does the same work. Reports generated tokens per second
(prefill included, as a user sees it), the ratio to transformers, and how many rows produced the
same tokens as transformers (a check that the peers computed the same thing).

`bench_spec`: speculative decoding vs plain decoding on the native engine at temperature 0 on a
repetitive task (the model repeats a given text, as in editing or extraction workloads, where
prompt lookup shines), with prompt lookup and with a draft model. Reports tokens/s, the speedup,
the acceptance statistics, and whether the greedy text was identical (it must be).

Times come from `time.perf_counter` around each peer's call after one warm-up call; on a shared
machine they are noisy, so `repeats` > 1 keeps the best run of each peer.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cpmtool.bench import check_device
from cpmtool.errors import ConfigError, InputError

ALPACA = "alpaca_seed.jsonl"


def default_prompts_path() -> Path:
    """The shared alpaca sample: $CPMTOOL_DATA, or ../shared/data beside the repository."""
    import os

    candidates = []
    if os.environ.get("CPMTOOL_DATA"):
        candidates.append(Path(os.environ["CPMTOOL_DATA"]) / ALPACA)
    here = Path(__file__).resolve()
    candidates += [p / "shared" / "data" / ALPACA for p in here.parents]
    for c in candidates:
        if c.is_file():
            return c
    raise InputError(f"cannot find {ALPACA} (looked in {', '.join(str(c.parent) for c in candidates[:3])}); "
                     "pass --prompts FILE")


def load_instructions(path: str | Path | None, n: int, *, min_output_chars: int = 0) -> list[dict]:
    """The first `n` alpaca-style records (instruction, input, output) from `path`, in file order."""
    import orjson

    path = Path(path) if path else default_prompts_path()
    out = []
    try:
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                r = orjson.loads(line)
                text = r.get("instruction") or r.get("prompt")
                if not isinstance(text, str) or len(r.get("output") or "") < min_output_chars:
                    continue
                out.append(r)
                if len(out) == n:
                    break
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from e
    except orjson.JSONDecodeError as e:
        raise InputError(f"{path}: not JSONL ({e})") from e
    if len(out) < n:
        raise InputError(f"{path} has {len(out)} usable records, {n} needed")
    return out


def _messages(r: dict) -> list[dict]:
    text = r.get("instruction") or r.get("prompt")
    if r.get("input"):
        text = f"{text}\n\n{r['input']}"
    return [{"role": "user", "content": text}]


def _best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn()
        dt = time.perf_counter() - t0
        if dt < best:
            best, out = dt, res
    return best, out


def _hf_generate(ref, prompts: list[list[int]], max_tokens: int, pad_id: int) -> list[list[int]]:
    import torch
    import transformers

    width = max(len(p) for p in prompts)
    dev = ref.device
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=dev)  # left padding, as HF wants
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    gc = transformers.GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                       pad_token_id=pad_id, eos_token_id=None)
    with torch.inference_mode():
        out = ref.generate(ids, attention_mask=mask, generation_config=gc)
    return out[:, width:].tolist()


def bench_engine(model: str = "smollm2-135m", *, batch: int = 32, max_tokens: int = 128,
                 prompts: str | Path | None = None, compare: Sequence[str] = (), repeats: int = 1,
                 dtype: str = "float32", threads: int | None = None, device: str = "cpu",
                 progress: Callable[[str], None] | None = None) -> dict:
    """Native engine vs transformers `generate` (+ `compare` peers: "vllm") at one batch size.

    Returns a record: model, batch, max_tokens, prompt_tokens, then per peer
    {seconds, tokens, tokens_per_s}, `ratio_vs_hf` per peer, and `same_as_hf` (rows whose tokens
    equal transformers'). On `device="cuda"` the native engine runs twice, with its decode steps
    replayed as CUDA graphs ("native") and eagerly ("native_eager"), so the graphs' share is measured
    in the same process.
    """
    import torch

    from cpmtool.engine.native import NativeEngine
    from cpmtool.engine.types import Request, SamplingParams
    from cpmtool.model.tokenizer import encode_chat

    if batch < 1 or max_tokens < 1 or repeats < 1:
        raise ConfigError("--batch, --max-tokens and --repeats must be >= 1")
    unknown = set(compare) - {"vllm", "hf"}
    if unknown:
        raise ConfigError(f"unknown --compare peer(s) {', '.join(sorted(unknown))} (valid: vllm)")
    check_device(device)
    if threads:
        torch.set_num_threads(threads)
    say = progress or (lambda s: None)
    records = load_instructions(prompts, batch)
    say(f"loading {model} (native)")
    native = NativeEngine.load(model, dtype=dtype, device=device, max_batch=batch)
    tok = native.tokenizer
    ids = [encode_chat(tok, _messages(r)) for r in records]
    reqs = [Request(prompt_ids=p, id=str(i)) for i, p in enumerate(ids)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    result: dict = {"bench": "engine", "model": model, "batch": batch, "max_tokens": max_tokens, "dtype": dtype,
                    "device": device, "threads": torch.get_num_threads(), "prompt_tokens": sum(len(p) for p in ids),
                    "peers": {}}

    def record(name: str, seconds: float, outs: list[list[int]]):
        n = sum(len(o) for o in outs)
        result["peers"][name] = {"seconds": round(seconds, 3), "tokens": n, "tokens_per_s": round(n / seconds, 2)}

    say("warm-up")
    native.generate(reqs[:2], params.with_(max_tokens=2))
    say("native engine")
    dt, res = _best_time(lambda: native.generate(reqs, params), repeats)
    ours = [r.completions[0].token_ids for r in res]
    record("native", dt, ours)
    eager_outs = None
    if device == "cuda":
        eager = NativeEngine(native.model, tok, max_batch=batch, cuda_graphs=False)
        say("native engine, eager decode steps")
        eager.generate(reqs[:2], params.with_(max_tokens=2))
        dt, eres = _best_time(lambda: eager.generate(reqs, params), repeats)
        eager_outs = [r.completions[0].token_ids for r in eres]
        record("native_eager", dt, eager_outs)

    import transformers

    from cpmtool.model.loader import read_config, resolve, torch_dtype

    say("loading transformers")
    with tempfile.TemporaryDirectory(prefix="cpmtool-bench-engine-") as tmp:
        path = resolve(model)
        if path.is_dir() and read_config(path).family == "minicpm":  # transformers has no MiniCPM class
            from cpmtool.model.export import export_llama

            path = export_llama(model, Path(tmp) / "llama")  # the exact Llama equivalent
        ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype)).to(device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    _hf_generate(ref, ids[:2], 2, pad)
    say("transformers generate")
    dt, hf = _best_time(lambda: _hf_generate(ref, ids, max_tokens, pad), repeats)
    record("hf", dt, hf)
    ref = None  # free it before vLLM loads
    result["same_as_hf"] = {"native": sum(a == b for a, b in zip(ours, hf, strict=True))}
    if eager_outs is not None:  # the graphs replay the eager step: the same tokens, row for row
        result["same_as_hf"]["native_eager"] = sum(a == b for a, b in zip(eager_outs, hf, strict=True))
        result["graphs_same_as_eager"] = sum(a == b for a, b in zip(ours, eager_outs, strict=True))

    if "vllm" in compare:
        from cpmtool.engine.vllm_backend import VllmEngine

        say("loading vllm")
        vl = VllmEngine.load(model, dtype=dtype, max_batch=batch)
        vl.generate(reqs[:2], params.with_(max_tokens=2))
        say("vllm")
        dt, vres = _best_time(lambda: vl.generate(reqs, params), repeats)
        vouts = [r.completions[0].token_ids for r in vres]
        record("vllm", dt, vouts)
        result["same_as_hf"]["vllm"] = sum(a == b for a, b in zip(vouts, hf, strict=True))
    hf_rate = result["peers"]["hf"]["tokens_per_s"]
    result["ratio_vs_hf"] = {k: round(v["tokens_per_s"] / hf_rate, 2) for k, v in result["peers"].items() if k != "hf"}
    return result


REPEAT_TEMPLATE = "Repeat the following text exactly, word for word, and nothing else.\n\n{text}"


def bench_spec(model: str = "smollm2-135m", *, methods: Sequence[str] = ("ngram", "draft"),
               draft_model: str = "self:20", spec_tokens: int = 4, frspec_vocab: int | None = None,
               batch: int = 1, n_prompts: int = 4, max_tokens: int = 128, prompts: str | Path | None = None,
               repeats: int = 1, dtype: str = "float32", threads: int | None = None,
               progress: Callable[[str], None] | None = None) -> dict:
    """Speculative vs plain greedy decoding on the native engine, on a repetitive task.

    `n_prompts` alpaca answers (of at least 400 characters) are given back to the model to repeat;
    requests run `batch` at a time. Returns a record with, per run ("plain", "ngram", "draft"):
    seconds, tokens, tokens_per_s, and for speculative runs the speedup over plain, `identical`
    (same token ids as plain for every prompt) and the acceptance statistics.
    """
    import torch

    from cpmtool.engine.native import NativeEngine
    from cpmtool.engine.speculative import SpecConfig
    from cpmtool.engine.types import Request, SamplingParams
    from cpmtool.model.tokenizer import encode_chat

    bad = set(methods) - {"ngram", "draft"}
    if bad or not methods:
        raise ConfigError(f"--methods takes ngram and/or draft (got {', '.join(methods) or 'none'})")
    if threads:
        torch.set_num_threads(threads)
    say = progress or (lambda s: None)
    records = load_instructions(prompts, n_prompts, min_output_chars=400)
    say(f"loading {model}")
    plain = NativeEngine.load(model, dtype=dtype, max_batch=batch)
    tok = plain.tokenizer
    ids = [encode_chat(tok, [{"role": "user", "content": REPEAT_TEMPLATE.format(text=r["output"])}]) for r in records]
    reqs = [Request(prompt_ids=p, id=str(i)) for i, p in enumerate(ids)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    result: dict = {"bench": "spec", "model": model, "task": "repeat", "batch": batch, "n_prompts": n_prompts,
                    "max_tokens": max_tokens, "spec_tokens": spec_tokens, "dtype": dtype,
                    "threads": torch.get_num_threads(), "runs": {}}

    def run(engine):
        return [r.completions[0].token_ids for r in engine.generate(reqs, params)]

    plain.generate(reqs[:1], params.with_(max_tokens=2))
    say("plain greedy")
    dt, base = _best_time(lambda: run(plain), repeats)
    n = sum(len(o) for o in base)
    result["runs"]["plain"] = {"seconds": round(dt, 3), "tokens": n, "tokens_per_s": round(n / dt, 2)}
    for method in methods:
        cfg = SpecConfig(method, spec_tokens, draft_model=draft_model if method == "draft" else None,
                         frspec_vocab=frspec_vocab if method == "draft" else None)
        eng = NativeEngine(plain.model, tok, max_batch=batch, speculative=cfg)
        eng.generate(reqs[:1], params.with_(max_tokens=2))
        say(f"speculative ({method})")
        eng.speculative.stats.__init__()  # count the timed runs only
        dt, outs = _best_time(lambda e=eng: run(e), repeats)
        m = sum(len(o) for o in outs)
        stats = eng.speculative.stats.as_dict()
        entry = {"seconds": round(dt, 3), "tokens": m, "tokens_per_s": round(m / dt, 2),
                 "speedup": round((m / dt) / (n / result["runs"]["plain"]["seconds"]), 2),
                 "identical": outs == base, **{k: stats[k] for k in ("acceptance_rate", "tokens_per_step")}}
        if method == "draft":
            entry["draft_model"] = draft_model
            if frspec_vocab:
                entry["frspec_vocab"] = frspec_vocab
        result["runs"][method] = entry
    return result


def format_engine(r: dict) -> str:
    """A small table of `bench_engine`'s or `bench_spec`'s record (for stderr)."""
    rows = [["peer", "tokens", "seconds", "tok/s", "ratio", "note"]]
    if r["bench"] == "engine":
        for name, p in r["peers"].items():
            ratio = "1.00" if name == "hf" else f"{r['ratio_vs_hf'][name]:.2f}"
            note = "" if name == "hf" else f"same tokens as hf: {r['same_as_hf'].get(name)}/{r['batch']}"
            rows.append([name, str(p["tokens"]), f"{p['seconds']:.2f}", f"{p['tokens_per_s']:.1f}", ratio, note])
        head = (f"{r['model']}: batch {r['batch']}, {r['max_tokens']} new tokens each, {r['dtype']}, "
                f"{r.get('device', 'cpu')}, {r['threads']} threads")
    else:
        for name, p in r["runs"].items():
            ratio = "1.00" if name == "plain" else f"{p['speedup']:.2f}"
            note = "" if name == "plain" else (f"identical: {p['identical']}, accept {p['acceptance_rate']:.2f}, "
                                               f"{p['tokens_per_step']:.2f} tok/step")
            rows.append([name, str(p["tokens"]), f"{p['seconds']:.2f}", f"{p['tokens_per_s']:.1f}", ratio, note])
        head = (f"{r['model']}: repeat task, {r['n_prompts']} prompts, batch {r['batch']}, k={r['spec_tokens']}, "
                f"{r['dtype']}, {r['threads']} threads")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join([head, *lines])
