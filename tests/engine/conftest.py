import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from cpmtool.errors import ModelError
    from cpmtool.model.tokenizer import load_tokenizer

    try:
        return load_tokenizer("smollm2-135m")
    except ModelError as e:
        pytest.skip(f"smollm2-135m is not pulled ({e}); `make test` pulls it first")


@pytest.fixture(scope="session")
def tiny_pair(smollm2_tokenizer):
    """A randomly initialised 2-layer Llama on smollm2's vocabulary: ours and transformers', same weights."""
    import transformers

    from cpmtool.model.config import ModelConfig
    from cpmtool.model.transformer import Transformer

    torch.manual_seed(0)
    hc = transformers.LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512,
        eos_token_id=None, bos_token_id=None,
    )
    ref = transformers.LlamaForCausalLM(hc).eval()
    ours = Transformer(ModelConfig.from_hf(hc.to_dict())).eval()
    ours.load_state_dict(ref.state_dict(), strict=False)
    return ours, ref
