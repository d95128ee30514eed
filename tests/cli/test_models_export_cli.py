"""`cpmtool models export --format llama` through the CLI: μP folded, same logits in transformers."""

import subprocess
import sys

import torch


def test_export_minicpm_to_llama_through_cli(tmp_path):
    import transformers

    from cpmtool.model.config import ModelConfig
    from cpmtool.model.loader import save_pretrained
    from cpmtool.model.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(family="minicpm", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, scale_emb=12.0, scale_depth=1.4,
                      dim_model_base=16, tie_word_embeddings=True)
    model = Transformer(cfg).eval()
    src = save_pretrained(model, tmp_path / "src")
    out = tmp_path / "llama"
    r = subprocess.run([sys.executable, "-m", "cpmtool", "models", "export", str(src), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        want, got = model(ids), hf(ids).logits
    assert (want - got).abs().max().item() < 1e-3
    assert torch.equal(want.argmax(-1), got.argmax(-1))


def test_export_rejects_unknown_format(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cpmtool", "models", "export", "smollm2-135m", "--out",
                        str(tmp_path / "x"), "--format", "onnx"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "cpmtool models: error: unknown export format 'onnx' (valid: llama)"
