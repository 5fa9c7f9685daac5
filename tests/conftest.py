"""Shared test helpers: tiny random transformers models saved in HF layout (transformers is the oracle only)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the flat project files: model.py, convert.py, ...


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """HF initialises norms to ones and biases to zeros; make every tensor random so that a wrong mapping
    (q_norm <-> k_norm, say) cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() == 1:  # norm weights stay near one, biases near zero
                p.copy_((1.0 if "norm" in name or "ln" in name else 0.0) + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


TEXT_CONFIGS = {
    # head_dim 24 != hidden 64 / heads 4, GQA 4:2, untied
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, vocab_size=211, rope_theta=1e6, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, max_position_embeddings=256),
    "qwen3_tied": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                       num_key_value_heads=2, head_dim=16, vocab_size=173, rope_theta=1e4, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, max_position_embeddings=256),
    # Qwen2: q/k/v biases, no QK-norm, head_dim = hidden / heads
    "qwen2": dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=199, rope_theta=1e6, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, max_position_embeddings=256),
}


def make_text_model(kind: str, out: Path, shard: bool = False, seed: int = 0):
    """A tiny random Qwen3ForCausalLM / Qwen2ForCausalLM saved with save_pretrained; returns the HF model."""
    import transformers

    kw = dict(TEXT_CONFIGS[kind])
    if kind.startswith("qwen3"):
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw))
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    randomize(hf, seed).eval()
    hf.save_pretrained(out, max_shard_size="20KB" if shard else "1GB")
    return hf


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory):
    """(kind, shard) -> (hf_model, directory), built once per session."""
    cache = {}

    def get(kind: str, shard: bool = False):
        if (kind, shard) not in cache:
            out = tmp_path_factory.mktemp(f"{kind}_{'sharded' if shard else 'single'}")
            cache[kind, shard] = (make_text_model(kind, out, shard), out)
        return cache[kind, shard]

    return get
