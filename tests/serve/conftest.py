"""A tiny random Llama on smollm2's tokenizer, saved as an HF directory, served by a real
`cpmtool serve` process on a free loopback port for the whole session."""

from types import SimpleNamespace

import pytest
import torch

API_KEY = "sk-test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 512  # all of the tiny model's positions: long requests for the disconnect tests


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from cpmtool.errors import ModelError
    from cpmtool.model.config import ModelConfig
    from cpmtool.model.loader import save_pretrained
    from cpmtool.model.tokenizer import load_tokenizer
    from cpmtool.model.transformer import Transformer

    try:
        tok = load_tokenizer("smollm2-135m")
    except ModelError as e:
        pytest.skip(f"smollm2-135m is not pulled ({e}); `make test` pulls it first")
    torch.manual_seed(0)
    cfg = ModelConfig.from_hf(dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=len(tok), hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    model = Transformer(cfg)
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.3)  # large enough that greedy text varies from token to token
    return save_pretrained(model, tmp_path_factory.mktemp("tiny") / "model", tokenizer=tok)


@pytest.fixture(scope="session")
def server(tiny_dir):
    """A running server: .url, .key (bearer API key), .model (its model id), .max_len (context limit)."""
    from cpmtool.serve.process import launch_server

    with launch_server(str(tiny_dir), args=["--api-key", API_KEY, "--served-model-name", MODEL, "--max-model-len",
                                            str(MAX_MODEL_LEN), "--threads", "1"], startup_timeout=300) as srv:
        yield SimpleNamespace(url=srv.url, key=API_KEY, model=MODEL, max_len=MAX_MODEL_LEN)


@pytest.fixture()
def client(server):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture()
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.key}"}, timeout=120) as c:
        yield c


@pytest.fixture()
def metric(server):
    """metric(name) -> one sample of the server's /metrics (labels written out in `name`, or the only one)."""
    import httpx

    from cpmtool.serve.metrics import parse_metrics

    def read(name: str) -> float:
        samples = parse_metrics(httpx.get(f"{server.url}/metrics", timeout=60).text)
        if name in samples:
            return samples[name]
        hits = [v for k, v in samples.items() if k.split("{")[0] == name]
        assert len(hits) == 1, (name, hits)
        return hits[0]

    return read
