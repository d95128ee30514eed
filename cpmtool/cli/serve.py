"""`cpmtool serve`: an OpenAI-compatible HTTP server (library: cpmtool.serve.app)."""

from __future__ import annotations

import os
import sys

import typer


def command(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registry name, HF directory or .gguf file."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port (0: any free port)."),
    api_key: str = typer.Option(None, "--api-key", envvar="CPMTOOL_API_KEY",
                                help="Require `Authorization: Bearer KEY` on /v1 routes (401 otherwise)."),
    served_model_name: str = typer.Option(None, "--served-model-name",
                                          help="Model id in /v1/models and responses (default: --model)."),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="Most sequences decoded together."),
    max_model_len: int = typer.Option(None, "--max-model-len", min=2,
                                      help="Prompt + completion token limit (default: the model's, at most 4096)."),
    default_max_tokens: int = typer.Option(1024, "--default-max-tokens", min=1,
                                           help="Completion limit for chat requests that set none."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16 | auto."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N."),
    threads: int = typer.Option(0, "--threads", min=0, help="torch CPU threads (0: torch's default)."),
    attention: str = typer.Option(None, "--attention", help="Override the attention: dense | infllmv2."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level (info shows each request)."),
):
    """Serve a model over the OpenAI HTTP API with continuous batching.

    Endpoints: /v1/models, /v1/completions, /v1/chat/completions (stream: true for SSE), /health,
    /metrics (Prometheus, vLLM's metric names). Stops on Ctrl-C.

    Example: cpmtool serve --model smollm2-135m --port 8000 &
             curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
               -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'
    """
    from cpmtool.serve.app import serve

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"cpmtool serve: warning: listening on {host} without --api-key", file=sys.stderr)

    def ready(url: str) -> None:
        print(f"cpmtool serve: {model} on {url} (pid {os.getpid()}); Ctrl-C stops", file=sys.stderr, flush=True)

    serve(model, host=host, port=port, api_key=api_key, served_model_name=served_model_name, max_batch=max_batch,
          max_model_len=max_model_len, default_max_tokens=default_max_tokens, dtype=dtype, device=device,
          threads=threads, attention=attention, log_level=log_level, on_ready=ready)
