"""The Qwen3 / Qwen2 decoder through the production loader equals transformers (fp32, CPU)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
import weights

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["qwen3", "qwen3_tied", "qwen2"]


def padded_batch(vocab: int, seed: int = 0):
    """Three rows: full, left-padded by 3, right-padded by 4."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, -4:] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def hf_logits(hf, ids, mask, positions):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shard", [False, True])
def test_logits_match_transformers(text_model_dir, kind, shard):
    hf, path = text_model_dir(kind, shard)
    if shard:
        assert (path / "model.safetensors.index.json").is_file()
    ours = weights.from_pretrained(path)
    ids, mask, positions = padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)  # our default positions are pad-aware: no position_ids passed
    want = hf_logits(hf, ids, mask, positions)
    real = mask.bool()
    err = (got[real] - want[real]).abs().max().item()
    print(f"{kind} shard={shard}: max |logit diff| = {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_unpadded_batch_uses_causal_path(text_model_dir, kind):
    hf, path = text_model_dir(kind)
    ours = weights.from_pretrained(path)
    ids = torch.randint(0, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (ours(ids) - hf(input_ids=ids).logits).abs().max().item()
    assert err <= 1e-4


def test_wrong_mapping_fails_comparison(text_model_dir, monkeypatch):
    """Negative control: a name map that swaps q_norm and k_norm loads without complaint (same shapes) but
    must give logits the comparison rejects."""
    hf, path = text_model_dir("qwen3")
    good = weights.our_name

    def swapped(name):
        name = good(name)
        return name.replace("q_norm", "@").replace("k_norm", "q_norm").replace("@", "k_norm")

    monkeypatch.setattr(weights, "our_name", swapped)
    ours = weights.from_pretrained(path)
    ids, mask, positions = padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        err = (ours(ids, attention_mask=mask) - hf_logits(hf, ids, mask, positions))[mask.bool()].abs().max()
    assert err > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decode_equals_recompute(text_model_dir, kind):
    """Greedy decoding with the KV cache (prefill, then one token at a time) gives the tokens and logits of
    recomputing the whole sequence each step; a left-padded batch of two."""
    _, path = text_model_dir(kind)
    ours = weights.from_pretrained(path)
    cfg = ours.cfg.text
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    steps = 8
    with torch.no_grad():
        cache = M.KVCache(cfg, batch_size=2, max_len=ids.shape[1] + steps)
        seq, full_mask = ids, mask
        logits = ours(ids, attention_mask=mask, cache=cache)[:, -1]
        for _ in range(steps):
            nxt = logits.argmax(-1, keepdim=True)
            recomputed = ours(seq, attention_mask=full_mask)[:, -1]
            assert (logits - recomputed).abs().max() <= 1e-5
            seq = torch.cat([seq, nxt], dim=1)
            full_mask = torch.cat([full_mask, torch.ones_like(nxt)], dim=1)
            logits = ours(nxt, attention_mask=full_mask, cache=cache)[:, -1]
        assert cache.length == seq.shape[1]


def test_cache_continuation_in_chunks(text_model_dir):
    """Chunks of several tokens at any offset: causality is aligned bottom-right."""
    _, path = text_model_dir("qwen3")
    ours = weights.from_pretrained(path)
    ids = torch.randint(0, ours.cfg.text.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids)
        cache = M.KVCache(ours.cfg.text, 1, 12)
        parts = [ours(ids[:, a:b], cache=cache) for a, b in [(0, 5), (5, 8), (8, 9), (9, 12)]]
    assert (torch.cat(parts, dim=1) - full).abs().max() <= 1e-5


def test_packed_documents_equal_separate_forwards(text_model_dir):
    """Two documents packed into one row with doc_ids and restarting positions give each document's own logits."""
    _, path = text_model_dir("qwen3")
    ours = weights.from_pretrained(path)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 211, (1, 6), generator=g), torch.randint(0, 211, (1, 9), generator=g)
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 6 + [1] * 9])
    positions = torch.cat([torch.arange(6), torch.arange(9)])[None]
    with torch.no_grad():
        got = ours(packed, position_ids=positions, doc_ids=doc_ids)
        want = torch.cat([ours(a), ours(b)], dim=1)
        leaky = ours(packed, position_ids=positions)  # negative control: without doc_ids b sees a
    assert (got - want).abs().max() <= 1e-5
    assert (leaky - want)[:, 6:].abs().max() > 1e-3


def test_tied_with_and_without_stored_lm_head(text_model_dir, tmp_path):
    hf, path = text_model_dir("qwen3_tied")
    stored = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in stored  # transformers omits the tied copy
    ref = weights.from_pretrained(path)
    ids = torch.randint(0, 173, (1, 5))
    # a checkpoint that also stores lm_head.weight (as some Qwen3 repos do) loads to the same model
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file({**stored, "lm_head.weight": stored["model.embed_tokens.weight"].clone()}, tmp_path / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(weights.from_pretrained(tmp_path)(ids), ref(ids))
    # ... but a stored lm_head that differs from the embeddings would be silently lost: refuse
    save_file({**stored, "lm_head.weight": torch.randn_like(stored["model.embed_tokens.weight"])}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="differs from embed_tokens"):
        weights.from_pretrained(tmp_path)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight


def test_missing_extra_and_misshaped_tensors_named_in_one_error(text_model_dir, tmp_path):
    _, path = text_model_dir("qwen3")
    stored = load_file(path / "model.safetensors")
    del stored["model.layers.1.self_attn.k_norm.weight"]
    stored["model.layers.1.self_attn.extra.weight"] = torch.zeros(3)
    stored["model.norm.weight"] = torch.ones(65)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(stored, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        weights.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "1 missing" in msg and "model.layers.1.self_attn.k_norm.weight" in msg
    assert "1 unexpected" in msg and "model.layers.1.self_attn.extra.weight" in msg
    assert "1 mis-shaped" in msg and "model.norm.weight: checkpoint (65,) vs model (64,)" in msg


def test_config_reads_head_dim_and_biases(text_model_dir):
    _, path = text_model_dir("qwen3")
    cfg = M.config_from_hf(json.loads((path / "config.json").read_text())).text
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.qk_norm, cfg.qkv_bias, cfg.tie_word_embeddings) == (24, 2, True, False, False)
    _, path = text_model_dir("qwen2")
    cfg = M.config_from_hf(json.loads((path / "config.json").read_text())).text
    assert (cfg.head_dim, cfg.qk_norm, cfg.qkv_bias) == (16, False, True)


def test_bf16_load_and_rope_stays_fp32(text_model_dir):
    """dtype=bfloat16 converts floating tensors on load; RoPE frequencies are still computed in fp32."""
    hf, path = text_model_dir("qwen3")
    ours = weights.from_pretrained(path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert M.rope_inv_freq(1e6, 24, torch.device("cpu")).dtype == torch.float32
    ids = torch.randint(0, 211, (1, 9))
    with torch.no_grad():
        err = (ours(ids).float() - hf(input_ids=ids).logits).abs().max()
    assert err < 0.1  # bf16 weights vs fp32 reference: close, not equal


@pytest.mark.parametrize("change, message", [
    (dict(hidden_size=-64), "hidden_size = -64, expected a positive integer"),
    (dict(vocab_size=10**12), "describes a decoder of 1.28e+14 parameters"),
    (dict(intermediate_size="96"), "intermediate_size = '96', expected a positive integer"),
    (dict(vocab_size=None), "config.json has no 'vocab_size'"),
    (dict(num_key_value_heads=0), "num_key_value_heads = 0, expected a positive integer"),
    (dict(num_key_value_heads=3), "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    (dict(num_hidden_layers=10**9), "more than any machine holds"),
    (dict(rms_norm_eps=0), "rms_norm_eps = 0, expected a positive number"),
])
def test_absurd_config_values_are_one_error_before_anything_is_built(text_model_dir, tmp_path, change, message):
    _, path = text_model_dir("qwen3")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{tmp_path}: not a Qwen model dir: .*{re.escape(message)}"):
        weights.from_pretrained(tmp_path)


def test_vision_patch_size_zero_is_refused():
    with pytest.raises(ValueError, match=r"patch_size = 0, expected a positive integer"):
        M.vision_config_from_hf(dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                                     patch_size=0, hidden_act="silu"))


def test_loader_names_wrong_dtypes_and_check_names_non_finite_tensors(text_model_dir, tmp_path):
    _, path = text_model_dir("qwen3")
    state = load_file(path / "model.safetensors")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    bad = dict(state)
    bad["model.norm.weight"] = state["model.norm.weight"].half()
    bad["model.layers.0.input_layernorm.weight"] = state["model.layers.0.input_layernorm.weight"].long()
    save_file(bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as e:
        weights.from_pretrained(tmp_path)
    assert "model.norm.weight: torch.float16, but config.json declares torch.float32" in str(e.value)
    assert "model.layers.0.input_layernorm.weight: torch.int64 where the model has a float parameter" in str(e.value)
    nan = dict(state)
    nan["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"].clone()
    nan["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(nan, tmp_path / "model.safetensors")
    assert weights.from_pretrained(tmp_path) is not None  # the plain load reads no values (it maps the file)
    r = subprocess.run([sys.executable, str(ROOT / "convert.py"), "check", "--model", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "model.layers.1.mlp.up_proj.weight: holds NaN or infinite values" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "convert.py"), "check", "--model", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "all finite" in r.stdout
