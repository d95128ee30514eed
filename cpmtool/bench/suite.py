"""`bench all`: run the other benchmarks one after another and write one report.

    report = run_suite(default_suite(quick=True), "bench/results")   # -> bench/results/<date>-<host>/

Each benchmark runs as its own `cpmtool bench NAME ...` process, so one that fails (a missing
optional peer such as datatrove or trl, a missing data file, a crash, a timeout) becomes a
`skipped` row with its one-line reason and the suite goes on; a process also starts with fresh
torch thread settings and frees its memory when it ends. An optional peer that is not installed
(vllm for `engine`, trl for `train-rl`) is left out of that benchmark's command and listed as a
skipped peer.

The result directory holds `report.md` (a summary table, then one table per benchmark against its
named peers, with ratios), a PNG per benchmark, `machine.json` (CPU, cores, memory, load, torch,
GPU), and each benchmark's raw output (`<name>.jsonl`) and log (`<name>.log`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cpmtool.bench import check_device
from cpmtool.errors import ConfigError

Table = tuple[list[str], list[list[str]]]  # header, rows


@dataclass
class SubBench:
    """One benchmark of the suite: the `cpmtool bench` arguments and how to read its JSON rows."""

    name: str
    args: list[str]
    peers: str  # who is compared with whom, for the report
    table: Callable[[list[dict]], Table] | None = None  # None: every scalar field of every row
    headline: Callable[[list[dict]], str] | None = None
    bars: Callable[[list[dict]], tuple[str, dict[str, float]]] | None = None  # (y label, {peer: value})
    skipped_peers: dict[str, str] = field(default_factory=dict)  # peer -> why it was left out
    skip: str | None = None  # why the whole benchmark cannot run here


@dataclass
class Outcome:
    name: str
    status: str  # "ok" | "skipped"
    seconds: float
    rows: list[dict]
    reason: str = ""


# ---------------------------------------------------------------- the benchmarks


def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _engine_table(rows):
    r = rows[0]
    out = [[name, _f(p["tokens_per_s"], "{:.1f}"), str(p["tokens"]), _f(p["seconds"]),
            "1.00" if name == "hf" else _f(r["ratio_vs_hf"].get(name)),
            "" if name == "hf" else f"{r['same_as_hf'].get(name)}/{r['batch']}"] for name, p in r["peers"].items()]
    return ["peer", "tokens/s", "tokens", "seconds", "ratio vs hf", "same tokens as hf"], out


def _engine_headline(rows):
    r = rows[0]
    return (f"{r['model']} batch {r['batch']} x {r['max_tokens']} tokens: native "
            f"{r['peers']['native']['tokens_per_s']:.1f} vs transformers {r['peers']['hf']['tokens_per_s']:.1f} "
            f"tok/s, **{r['ratio_vs_hf']['native']:.2f}x**")


def _spec_table(rows):
    r = rows[0]
    out = [[name, _f(p["tokens_per_s"], "{:.1f}"), "1.00" if name == "plain" else _f(p.get("speedup")),
            _f(p.get("acceptance_rate")), _f(p.get("tokens_per_step")), str(p.get("identical", ""))]
           for name, p in r["runs"].items()]
    return ["decoding", "tokens/s", "speedup", "acceptance", "tokens/step", "identical to plain"], out


def _spec_headline(rows):
    r = rows[0]
    best = max((k for k in r["runs"] if k != "plain"), key=lambda k: r["runs"][k]["speedup"], default=None)
    if best is None:
        return "plain only"
    return (f"{r['model']} repeat task: {best} {r['runs'][best]['speedup']:.2f}x over plain greedy, "
            f"identical: {r['runs'][best]['identical']}")


def _attention_table(rows):
    return (["context", "phase", "dense ms", "InfLLM v2 ms", "speedup"],
            [[str(r["context"]), r["phase"], _f(r["dense_ms"]), _f(r["sparse_ms"]), _f(r["speedup"])] for r in rows])


def _attention_headline(rows):
    top = max(r["context"] for r in rows)
    at = {r["phase"]: r["speedup"] for r in rows if r["context"] == top}
    return f"InfLLM v2 vs dense at {top} tokens: " + ", ".join(f"{p} **{s:.2f}x**" for p, s in at.items())


def _train_rl_table(rows):
    ratio = next((r for r in rows if r["trainer"] == "ratio"), None)
    out = [[r["trainer"], _f(r.get("samples_per_s")), _f(r.get("completion_tokens_per_s"), "{:.1f}"),
            str(r.get("steps", "")), _f(r.get("seconds"), "{:.1f}")] for r in rows if r["trainer"] != "ratio"]
    if ratio:
        out.append(["ours / theirs", _f(ratio.get("samples_per_s_ratio")),
                    _f(ratio.get("completion_tokens_per_s_ratio")), "", ""])
    return ["trainer", "samples/s", "completion tokens/s", "steps", "seconds"], out


def _train_rl_headline(rows):
    ratio = next((r for r in rows if r["trainer"] == "ratio"), None)
    ours = next(r for r in rows if r["trainer"] != "ratio")
    text = f"ours {ours['samples_per_s']:.2f} samples/s"
    return text + (f", **{ratio['samples_per_s_ratio']:.2f}x** TRL" if ratio and ratio.get("samples_per_s_ratio")
                   else "")


def _clean_table(rows):
    r = rows[0]
    out = [[side, _f(r[side]["docs_per_s"], "{:.1f}"), _f(r[side]["seconds"]), str(r[side]["kept"])]
           for side in ("datatrove", "cpmtool")]
    out.append(["cpmtool / datatrove", _f(r["speedup"]), "", f"agreement {100 * r['agreement']:.1f}%"])
    return ["implementation", "docs/s", "seconds", "kept"], out


def _clean_headline(rows):
    r = rows[0]
    return (f"{r['docs']} docs: **{r['speedup']:.2f}x** datatrove, keep/drop agreement "
            f"{100 * r['agreement']:.1f}%")


def _speed_table(rows):
    r = rows[0]
    out = [["requests/s", _f(r.get("request_throughput"))], ["output tokens/s", _f(r.get("output_throughput"))]]
    for m in ("ttft", "tpot", "itl", "e2el"):
        out.append([f"{m.upper()} mean / p50 / p99 ms", " / ".join(
            _f(r.get(k)) for k in (f"mean_{m}_ms", f"median_{m}_ms", f"p99_{m}_ms"))])
    return ["metric", "value"], out


def _speed_headline(rows):
    r = rows[0]
    return (f"{r.get('model')}: {_f(r.get('output_throughput'), '{:.1f}')} output tok/s, "
            f"TTFT p50 {_f(r.get('median_ttft_ms'), '{:.0f}')} ms, TPOT p50 {_f(r.get('median_tpot_ms'), '{:.1f}')} ms")


def _eval_table(rows):
    out = []
    for r in rows:
        out.append([r["model"], str(r["prompts"]), str(r["samples"]), _pct(r["accuracy"]),
                    _f(r["mean_tokens"], "{:.1f}"), _f(r["tokens_per_correct"], "{:.1f}"),
                    _pct(r["over_length_rate"])])
    return ["model", "prompts", "samples", "accuracy", "mean tokens", "tokens/correct", "over-length"], out


def _eval_headline(rows):
    r = rows[0]
    return f"{r['model']}: accuracy {_pct(r['accuracy'])} on {r['prompts']} prompts, {r['samples']} samples"


def _ternary_table(rows):
    r = rows[0]
    g = r.get
    return (["model", "decode tokens/s", "file bytes", "bits per weight"],
            [["fp32", _cell(g("decode_tok_s_fp32")), _cell(g("file_bytes_model")), "32"],
             ["ternary", _cell(g("decode_tok_s_ternary")), _cell(g("file_bytes_ternary")), _cell(g("bits_per_weight"))],
             ["ternary / fp32", _cell(g("decode_speed_vs_fp32")), _cell(g("size_vs_model_file")), ""]])


def _ternary_headline(rows):
    r = rows[0]
    return (f"{r.get('model')}: {r.get('bits_per_weight')} bits/weight, file {100 * r['size_vs_bf16']:.1f}% of bf16, "
            f"decode **{r.get('decode_speed_vs_fp32')}x** fp32")


def generic_table(rows: list[dict]) -> Table:
    """Every scalar field of every row: the fallback for a benchmark the suite has no reader for."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if k not in keys and (v is None or isinstance(v, (str, int, float, bool)))]
    return keys, [[_cell(r.get(k)) for k in keys] for r in rows]


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def default_suite(*, quick: bool = False, threads: int | None = None,
                  commands: dict[str, set[str]] | None = None, device: str = "cpu") -> list[SubBench]:
    """The benchmarks `bench all` runs, with --quick (smoke-test sizes) or full settings.

    `commands` maps the `cpmtool bench` subcommands of this build to their option names (the CLI
    reads them off its app); `ternary` runs only when it is there, with `--quick` if it takes one.
    `device="cuda"` runs the engine, the trainers and the server on the GPU (`attention` times its
    Triton kernels there whenever CUDA is present); the others are CPU benchmarks.
    """
    from cpmtool.bench.evaluate import shared_data

    check_device(device, present=False)  # the suite is listed and selected without a GPU
    commands = commands or {}

    t = ["--threads", str(threads)] if threads else []
    dev = ["--device", device] if device != "cpu" else []
    suite: list[SubBench] = []

    vllm = importlib.util.find_spec("vllm") is not None
    engine = SubBench("engine", (["--model", "smollm2-135m", "--batch", "4", "--max-tokens", "16"] if quick else [])
                      + (["--compare", "vllm"] if vllm else []) + t + dev,
                      "native engine vs transformers generate" + (" vs vLLM" if vllm else ""),
                      _engine_table, _engine_headline,
                      lambda rows: ("tokens/s", {k: v["tokens_per_s"] for k, v in rows[0]["peers"].items()}))
    if not vllm:
        engine.skipped_peers["vllm"] = "not installed (pip install 'cpmtool[vllm]', or `make test-vllm`'s venv)"
    suite.append(engine)

    suite.append(SubBench("spec", (["--methods", "ngram", "--prompts-n", "1", "--max-tokens", "32"] if quick else [])
                          + t, "speculative decoding vs plain greedy", _spec_table, _spec_headline,
                          lambda rows: ("tokens/s", {k: v["tokens_per_s"] for k, v in rows[0]["runs"].items()})))

    suite.append(SubBench("attention", (["--context", "1k,4k", "--decode-steps", "3"] if quick else []) + t,
                          "InfLLM v2 sparse attention vs dense SDPA", _attention_table, _attention_headline))

    trl = importlib.util.find_spec("trl") is not None
    rl = SubBench("train-rl", (["--batch-size", "2", "--n", "4", "--max-tokens", "16", "--steps", "1", "--warmup",
                                "1", "--repeat", "1"] if quick else []) + ["--compare", "trl" if trl else ""] + t + dev,
                  "our GRPO trainer vs TRL GRPOTrainer" if trl else "our GRPO trainer",
                  _train_rl_table, _train_rl_headline,
                  lambda rows: ("samples/s", {r["trainer"]: r["samples_per_s"] for r in rows if r["trainer"] != "ratio"}))
    if not trl:
        rl.skipped_peers["trl"] = "not installed (pip install 'cpmtool[trl]')"
    suite.append(rl)

    clean = SubBench("clean", [], "cpmtool clean rules vs datatrove", _clean_table, _clean_headline,
                     lambda rows: ("docs/s", {s: rows[0][s]["docs_per_s"] for s in ("datatrove", "cpmtool")}))
    try:
        clean.args = [str(shared_data("web_docs_sample.jsonl"))] + (["--limit", "100"] if quick else [])
    except Exception as e:  # InputError: the shared sample is not on this machine
        clean.skip = str(e)
    suite.append(clean)

    suite.append(SubBench("speed", ["--launch", "--model", "cpm-tiny" if quick else "smollm2-135m"]
                          + (["--num-prompts", "8", "--concurrency", "4", "--input-len", "16", "--output-len", "16"]
                             if quick else [])
                          + (["--serve-args", " ".join([f"--threads {threads}"] * bool(threads) + dev)]
                             if threads or dev else []),
                          "cpmtool serve under load (vLLM's serving benchmark metrics)", _speed_table,
                          _speed_headline,
                          lambda rows: ("ms", {f"{p} {m.upper()}": rows[0].get(f"{p}_{m}_ms") or 0
                                               for m in ("ttft", "tpot") for p in ("median", "p99")})))

    suite.append(SubBench("eval", ["--model", "cpm-tiny", "--data", "arithmetic", "--level", "1", "--level", "2",
                                   "--level", "3"]
                          + (["--n-prompts", "10", "--max-tokens", "96"] if quick else
                             ["--n-prompts", "200", "--n", "8", "--temperature", "1", "--max-tokens", "160"]) + t,
                          "cpm-tiny on the arithmetic test split (levels 1-3)", _eval_table, _eval_headline))

    ternary = SubBench("ternary", [], "ternary (BitCPM) vs full precision", _ternary_table, _ternary_headline,
                       lambda rows: ("decode tokens/s", {"fp32": rows[0]["decode_tok_s_fp32"],
                                                         "ternary": rows[0]["decode_tok_s_ternary"]}))
    if "ternary" not in commands:
        ternary.skip = "`cpmtool bench ternary` is not in this build yet"
    else:  # its flags are its own: pass only the ones it has
        opts = commands["ternary"]
        if quick and "--quick" in opts:
            ternary.args = ["--quick"]
        elif quick:
            ternary.args = [x for flag, v in (("--max-tokens", "16"), ("--repeats", "1")) if flag in opts
                            for x in (flag, v)]
        if threads and "--threads" in opts:
            ternary.args += t
    suite.append(ternary)
    return suite


# ---------------------------------------------------------------- running


def run_bench(b: SubBench, out_dir: Path, *, timeout: float = 1800, python: str = sys.executable,
              log: Callable[[str], None] = lambda s: None) -> Outcome:
    """Run one benchmark as `python -m cpmtool bench NAME ARGS`; its rows, or a skip with the reason."""
    if b.skip:
        return Outcome(b.name, "skipped", 0.0, [], b.skip)
    cmd = [python, "-m", "cpmtool", "bench", b.name, *b.args]
    log(f"$ cpmtool bench {b.name} {' '.join(b.args)}")
    t0 = time.monotonic()
    env = dict(os.environ, CPMTOOL_PROGRESS="0")
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        _save(out_dir, b.name, e.stdout or b"", e.stderr or b"")
        return Outcome(b.name, "skipped", time.monotonic() - t0, [], f"timed out after {timeout:.0f} s")
    seconds = time.monotonic() - t0
    _save(out_dir, b.name, p.stdout, p.stderr)
    if p.returncode != 0:
        return Outcome(b.name, "skipped", seconds, [], _reason(p.stderr, p.returncode))
    try:
        rows = [json.loads(x) for x in p.stdout.decode().splitlines() if x.strip()]
    except json.JSONDecodeError as e:
        return Outcome(b.name, "skipped", seconds, [], f"output is not JSON lines ({e})")
    if not rows:
        return Outcome(b.name, "skipped", seconds, [], "no result rows on stdout")
    return Outcome(b.name, "ok", seconds, rows)


def _save(out_dir: Path, name: str, stdout: bytes, stderr: bytes) -> None:
    (out_dir / f"{name}.jsonl").write_bytes(stdout)
    (out_dir / f"{name}.log").write_bytes(stderr)


def _reason(stderr: bytes, rc: int) -> str:
    lines = [x.strip() for x in stderr.decode(errors="replace").splitlines() if x.strip()]
    errs = [x for x in lines if ": error: " in x]
    last = errs[-1].split(": error: ", 1)[1] if errs else (lines[-1] if lines else "")
    return f"exit {rc}: {last}" if last else f"exit {rc}"


def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, memory, load, Python, torch, GPU."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = None
    info = {
        "host": socket.gethostname(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "os": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(ram, 1) if ram else None,
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpu": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    from cpmtool import __version__

    info["cpmtool"] = __version__
    try:
        info["git_commit"] = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                            cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def result_dir(root: str | Path) -> Path:
    """A new directory `root/<date>T<hhmm>-<host>` (UTC)."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M")
    base = Path(root) / f"{stamp}-{socket.gethostname().split('.')[0]}"
    d, i = base, 1
    while d.exists():
        i += 1
        d = base.with_name(f"{base.name}-{i}")
    d.mkdir(parents=True)
    return d


def select(suite: list[SubBench], only: Sequence[str] = (), skip: Sequence[str] = ()) -> list[SubBench]:
    names = [b.name for b in suite]
    bad = [n for n in [*only, *skip] if n not in names]
    if bad:
        raise ConfigError(f"unknown benchmark(s) {', '.join(bad)} (valid: {', '.join(names)})")
    return [b for b in suite if (not only or b.name in only) and b.name not in skip]


def run_suite(suite: list[SubBench], root: str | Path = "bench/results", *, quick: bool = False,
              timeout: float = 1800, out_dir: str | Path | None = None,
              log: Callable[[str], None] = lambda s: None) -> dict:
    """Run every benchmark of `suite` and write the report; returns {"dir", "results": [...]}.

    Args:
        suite: the benchmarks (`default_suite`, possibly `select`ed).
        root: where the dated result directory is made (ignored when `out_dir` is given).
        quick: recorded in the report (the settings are in each benchmark's args).
        timeout: seconds one benchmark may take before it is stopped and skipped.
        log: a line of progress (the CLI prints it on stderr).
    """
    d = Path(out_dir) if out_dir else result_dir(root)
    d.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    outcomes = []
    for b in suite:
        o = run_bench(b, d, timeout=timeout, log=log)
        log(f"  {b.name}: {o.status} in {o.seconds:.0f} s" + (f" ({o.reason})" if o.reason else ""))
        outcomes.append(o)
    machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    (d / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    pngs = {b.name: _plot(b, o, d, log) for b, o in zip(suite, outcomes, strict=True) if o.status == "ok"}
    (d / "report.md").write_text(render_report(suite, outcomes, machine, quick=quick, pngs=pngs))
    results = [{"bench": o.name, "status": o.status, "seconds": round(o.seconds, 1), "reason": o.reason,
                "headline": _headline(b, o), "skipped_peers": b.skipped_peers, "args": b.args, "rows": o.rows}
               for b, o in zip(suite, outcomes, strict=True)]
    (d / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return {"dir": str(d), "results": results}


def _headline(b: SubBench, o: Outcome) -> str:
    if o.status != "ok":
        return ""
    try:
        return b.headline(o.rows) if b.headline else ""
    except (KeyError, TypeError, ValueError, StopIteration, ZeroDivisionError) as e:
        return f"(no headline: {type(e).__name__} {e})"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def render_report(suite: list[SubBench], outcomes: list[Outcome], machine: dict, *, quick: bool,
                  pngs: dict[str, str | None]) -> str:
    """report.md: machine, summary table, one section per benchmark."""
    gpu = ", ".join(machine["gpu"]) or "none"
    parts = [
        f"# cpmtool bench all{' --quick' if quick else ''}: {machine['date']}",
        "",
        f"Machine: {machine['cpu']} ({machine['cores_usable']} usable of {machine['cores']} cores), "
        f"{machine['ram_gib']} GiB RAM, GPU: {gpu}; Python {machine['python']}, torch {machine['torch']}, "
        f"cpmtool {machine['cpmtool']} ({machine.get('git_commit') or 'no git'}). Load average at the start "
        f"{machine['load_avg']}, at the end {machine.get('load_avg_end')}: on a shared machine the figures "
        "are rough; compare runs made on the same idle machine." + (
            " --quick: smoke-test sizes, not the sizes to quote." if quick else ""),
        "",
        "## Summary",
        "",
    ]
    summary = []
    for b, o in zip(suite, outcomes, strict=True):
        summary.append([b.name, o.status, _headline(b, o) if o.status == "ok" else o.reason, f"{o.seconds:.0f}"])
        for peer, why in b.skipped_peers.items():
            summary.append([f"{b.name} / {peer}", "skipped", why, ""])
    parts += [_md_table(["bench", "status", "result", "seconds"], summary), ""]
    for b, o in zip(suite, outcomes, strict=True):
        parts += [f"## {b.name}: {b.peers}", ""]
        cmd = f"cpmtool bench {b.name} {' '.join(b.args)}".strip()
        parts += [f"`{cmd}`", ""]
        if o.status != "ok":
            parts += [f"Skipped: {o.reason}", ""]
            continue
        try:
            header, rows = (b.table or generic_table)(o.rows)
        except (KeyError, TypeError, ValueError, StopIteration) as e:
            header, rows = generic_table(o.rows)
            parts += [f"(raw rows: the report's reader failed with {type(e).__name__} {e})", ""]
        parts += [_md_table(header, rows), ""]
        for peer, why in b.skipped_peers.items():
            parts += [f"- {peer}: skipped, {why}"]
        if b.skipped_peers:
            parts += [""]
        if pngs.get(b.name):
            parts += [f"![{b.name}]({pngs[b.name]})", ""]
    return "\n".join(parts).rstrip("\n") + "\n"


def _plot(b: SubBench, o: Outcome, d: Path, log: Callable[[str], None]) -> str | None:
    """A PNG of the benchmark's main figure: peers as bars, attention as time vs context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        if b.name == "attention":
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
            for ax, phase in zip(axes, ("prefill", "decode"), strict=True):
                rs = sorted((r for r in o.rows if r["phase"] == phase), key=lambda r: r["context"])
                if not rs:
                    continue
                ax.plot([r["context"] for r in rs], [r["dense_ms"] for r in rs], marker="o", label="dense SDPA")
                ax.plot([r["context"] for r in rs], [r["sparse_ms"] for r in rs], marker="s", label="InfLLM v2")
                ax.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="ms", title=phase)
                ax.grid(alpha=0.3)
                ax.legend()
        elif b.bars:
            ylabel, vals = b.bars(o.rows)
            fig, ax = plt.subplots(figsize=(5, 3.2))
            ax.bar(list(vals), list(vals.values()), color="tab:blue")
            for i, v in enumerate(vals.values()):
                ax.annotate(f"{v:.4g}", (i, v), ha="center", va="bottom", fontsize=8)
            ax.set(ylabel=ylabel, title=f"bench {b.name}")
        else:
            return None
        fig.tight_layout()
        name = f"{b.name}.png"
        fig.savefig(d / name, dpi=100)
        plt.close(fig)
        return name
    except (KeyError, TypeError, ValueError) as e:  # a row shape the plot does not know: the table still stands
        log(f"  no plot for {b.name}: {type(e).__name__} {e}")
        return None
