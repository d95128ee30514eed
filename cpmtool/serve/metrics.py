"""Server metrics in the Prometheus text exposition format, under vLLM's names (`vllm:...`), so
dashboards built for a vLLM server read a cpmtool server unchanged.

Timings are measured in the engine thread: from the moment a request reaches the engine's queue,
excluding HTTP parsing, tokenisation and network time (as vLLM's server-side histograms do).
"""

from __future__ import annotations

import threading

# vLLM's bucket boundaries (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


def _one_two_five(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's token-count buckets)."""
    out, mag = [], 1
    while True:
        for m in (1, 2, 5):
            if m * mag > limit:
                return tuple(out)
            out.append(m * mag)
        mag *= 10


def _fmt(x: float) -> str:
    if x == float("inf"):
        return "+Inf"
    return repr(float(x)) if not float(x).is_integer() else f"{float(x):.1f}"


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, x: float) -> None:
        for i, b in enumerate(self.buckets):
            if x <= b:
                self.counts[i] += 1
                break
        self.sum += x
        self.count += 1


class Metrics:
    """Counters, gauges and histograms of one served model. Thread-safe."""

    def __init__(self, model_name: str, max_model_len: int = 2048):
        self.model_name = model_name
        self._lock = threading.Lock()
        self.running = 0
        self.waiting = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}
        tokens = _one_two_five(max_model_len)
        self.hist = {
            "time_to_first_token_seconds": (_Histogram(TTFT_BUCKETS), "Time to first token (s)."),
            "inter_token_latency_seconds": (_Histogram(ITL_BUCKETS), "Time between two tokens of a sequence (s)."),
            "time_per_output_token_seconds": (_Histogram(ITL_BUCKETS),
                                              "Deprecated name of inter_token_latency_seconds (s)."),
            "request_time_per_output_token_seconds": (_Histogram(ITL_BUCKETS),
                                                      "Mean time per output token after the first, per request (s)."),
            "e2e_request_latency_seconds": (_Histogram(REQUEST_BUCKETS), "End-to-end request latency (s)."),
            "request_queue_time_seconds": (_Histogram(REQUEST_BUCKETS), "Time a request waited before prefill (s)."),
            "request_prompt_tokens": (_Histogram(tokens), "Prompt tokens per request."),
            "request_generation_tokens": (_Histogram(tokens), "Generated tokens per request."),
            "request_params_n": (_Histogram((1, 2, 5, 10, 20)), "The n parameter of requests."),
            "request_params_max_tokens": (_Histogram(tokens), "The max_tokens parameter of requests."),
        }

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self.hist[name][0].observe(value)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def finish(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def set_load(self, running: int, waiting: int) -> None:
        self.running, self.waiting = running, waiting

    def render(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        lab = f'model_name="{_escape(self.model_name)}"'
        out: list[str] = []

        def head(name, kind, help_text):
            out.append(f"# HELP vllm:{name} {help_text}")
            out.append(f"# TYPE vllm:{name} {kind}")

        with self._lock:
            head("num_requests_running", "gauge", "Requests in the running batch.")
            out.append(f"vllm:num_requests_running{{{lab}}} {self.running}")
            head("num_requests_waiting", "gauge", "Requests waiting to be admitted.")
            out.append(f"vllm:num_requests_waiting{{{lab}}} {self.waiting}")
            head("prompt_tokens", "counter", "Prefilled prompt tokens.")
            out.append(f"vllm:prompt_tokens_total{{{lab}}} {self.prompt_tokens}")
            head("generation_tokens", "counter", "Generated tokens.")
            out.append(f"vllm:generation_tokens_total{{{lab}}} {self.generation_tokens}")
            head("request_success", "counter", "Finished requests by finish reason (abort: the client left).")
            for reason, n in sorted(self.finished.items()):
                out.append(f'vllm:request_success_total{{{lab},finished_reason="{reason}"}} {n}')
            for name, (h, help_text) in self.hist.items():
                head(name, "histogram", help_text)
                cum = 0
                for b, c in zip(h.buckets, h.counts, strict=True):
                    cum += c
                    out.append(f'vllm:{name}_bucket{{{lab},le="{_fmt(b)}"}} {cum}')
                out.append(f'vllm:{name}_bucket{{{lab},le="+Inf"}} {h.count}')
                out.append(f"vllm:{name}_sum{{{lab}}} {h.sum!r}")
                out.append(f"vllm:{name}_count{{{lab}}} {h.count}")
        return "\n".join(out) + "\n"


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse_metrics(text: str) -> dict[str, float]:
    """Samples of a Prometheus text exposition as {'name{labels}': value} (for tests and the bench)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
