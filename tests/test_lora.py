"""LoRA (lora.py) against PEFT, the oracle: the same base and adapter weights give the same logits both ways
(PEFT's adapter into our model, ours into PEFT), merging changes nothing, training moves only A and B (fp32, CPU)."""
import copy
import json
import re

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import convert
import lora
import model as M
import test_vlm as V  # the tiny Qwen2.5-VL / Qwen3-VL configs and their image prompts
import weights

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_lora(params, seed: int) -> None:
    """A and B random (B is zeros at init, which would let any wrong mapping pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def peft_lora(peft_model):
    return [p for n, p in peft_model.named_parameters() if "lora_" in n]


def ids_for(vocab: int, seed: int = 0):
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_into_ours(text_model_dir, tmp_path, rslora):
    hf, path = text_model_dir("qwen3")
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=12, target_modules=ALL,
                                                                use_rslora=rslora)).eval()
    randomize_lora(peft_lora(pm), seed=1)
    pm.save_pretrained(tmp_path)
    ours = weights.from_pretrained(path)
    cfg = lora.load_adapter(ours, tmp_path)
    assert (cfg.rank, cfg.alpha, cfg.use_rslora, set(cfg.targets)) == (4, 12, rslora, set(ALL))
    layer = ours.model.layers[0].self_attn.q_proj
    theirs = pm.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]
    assert layer.scale == theirs == 12 / (2 if rslora else 4)  # alpha / sqrt(r) with rsLoRA, else alpha / r
    ids = ids_for(hf.config.vocab_size)
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        err = max_diff(ours(ids), want)
        for m in lora.lora_modules(ours).values():  # negative control: the other scaling rule
            m.scale = 12 / (4 if rslora else 2)
        wrong = max_diff(ours(ids), want)
    print(f"PEFT adapter (use_rslora={rslora}) -> ours: max |logit diff| {err:.2e}, other scale {wrong:.2e}")
    assert err <= 1e-5 and wrong > 1e-2


def test_our_adapter_into_peft(text_model_dir, tmp_path):
    hf, path = text_model_dir("qwen3")
    ours = weights.from_pretrained(path)
    cfg = lora.LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    paths = lora.apply_lora(ours, cfg)
    assert len(paths) == 3 * 3 and paths[0] == "model.layers.0.self_attn.q_proj"
    lora.init_lora(ours, seed=0)
    randomize_lora([p for n, p in ours.named_parameters() if "lora_" in n], seed=2)
    lora.save_adapter(ours, cfg, tmp_path, base_model_name_or_path=str(path))
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (conf["peft_type"], conf["r"], conf["target_modules"]) == ("LORA", 4, ["down_proj", "q_proj", "v_proj"])
    names = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight" in names and len(names) == 2 * 9
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()
    wrapped = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
               if isinstance(m, peft.tuners.lora.Linear)}
    assert wrapped == set(paths)
    ids = ids_for(hf.config.vocab_size, 1)
    with torch.no_grad():
        got, want, base = ours(ids), pm(input_ids=ids).logits, hf(input_ids=ids).logits
    print(f"our adapter -> PEFT: max |logit diff| {max_diff(got, want):.2e}, vs the base {max_diff(got, base):.2e}")
    assert max_diff(got, want) <= 1e-5
    assert max_diff(got, base) > 1e-2  # negative control: the adapter matters


def test_merge_and_merge_lora_dir(text_model_dir, tmp_path):
    """merged == unmerged, in memory and through merge_lora_dir -> save_state_dict -> transformers; tied head."""
    hf, path = text_model_dir("qwen3_tied")
    ours = weights.from_pretrained(path)
    cfg = lora.LoRAConfig(rank=2, alpha=4, use_rslora=True)
    lora.apply_lora(ours, cfg)
    randomize_lora([p for n, p in ours.named_parameters() if "lora_" in n], seed=3)
    lora.save_adapter(ours, cfg, tmp_path / "adapter")
    ids = ids_for(hf.config.vocab_size, 2)
    with torch.no_grad():
        unmerged = ours(ids)
        lora.merge_lora(ours)
        merged = ours(ids)
    assert set(ours.state_dict()) == set(weights.from_pretrained(path).state_dict())  # the base names, nothing else
    convert.merge_lora_dir(path, tmp_path / "adapter", tmp_path / "merged")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        via_hf, base = back(input_ids=ids).logits, hf(input_ids=ids).logits
    print(f"merged vs unmerged {max_diff(merged, unmerged):.2e}, "
          f"merge_lora_dir in transformers {max_diff(via_hf, unmerged):.2e}")
    assert max_diff(merged, unmerged) <= 1e-5 and max_diff(via_hf, unmerged) <= 1e-5
    assert max_diff(base, unmerged) > 1e-2


def test_training_moves_only_lora(text_model_dir):
    _, path = text_model_dir("qwen3")
    ours = weights.from_pretrained(path)
    lora.apply_lora(ours, lora.LoRAConfig(rank=4, alpha=8, dropout=0.1))
    lora.init_lora(ours, seed=0)
    q = ours.model.layers[0].self_attn.q_proj
    assert not q.weight.requires_grad and q.lora_A.weight.requires_grad and ours.model.norm.weight.requires_grad
    ours.requires_grad_(False)  # as train.set_trainable with the LLM frozen, then LoRA's own flags again
    lora.set_lora_trainable(ours)
    trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 7 * 3 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ours.train()
    ids = ids_for(211, 3)
    for _ in range(3):
        ours(ids, labels=ids).backward()
        opt.step()
        opt.zero_grad()
    for n, p in ours.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n  # base bitwise unchanged, every A and B moved


def test_meta_build_equals_cpu_build(text_model_dir):
    """The FSDP path: build on meta, apply LoRA, then load base + lora_init_state (or to_empty + init_lora)."""
    _, path = text_model_dir("qwen3")
    cfg = lora.LoRAConfig(rank=4, alpha=8)
    ref = weights.from_pretrained(path)
    lora.apply_lora(ref, cfg)
    lora.init_lora(ref, seed=5)
    with torch.device("meta"):
        meta = M.VLM(ref.cfg)
    state = weights.load_state_dict(path, meta)  # before apply_lora: the checkpoint's names
    lora.apply_lora(meta, cfg)
    assert all(p.is_meta for n, p in meta.named_parameters() if "lora_" in n)
    meta.load_state_dict(state | lora.lora_init_state(meta, seed=5), strict=True, assign=True)
    empty = copy.deepcopy(meta).to_empty(device="cpu")
    lora.init_lora(empty, seed=5)
    for name, want in ref.named_parameters():
        assert torch.equal(meta.get_parameter(name), want), name
        assert meta.get_parameter(name).requires_grad == want.requires_grad, name
        if "lora_" in name:
            assert torch.equal(empty.get_parameter(name), want), name


def test_strict_errors(text_model_dir, tmp_path):
    hf, path = text_model_dir("qwen3")
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    pm.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    pre = "base_model.model.model.layers."
    del tensors[pre + "1.self_attn.k_proj.lora_B.weight"]
    tensors[pre + "0.self_attn.q_norm.lora_A.weight"] = torch.zeros(4, 24)
    tensors[pre + "2.self_attn.q_proj.lora_A.weight"] = torch.zeros(3, 64)
    save_file(tensors, file)
    ours = weights.from_pretrained(path)
    with pytest.raises(ValueError) as e:
        lora.load_adapter(ours, tmp_path)
    msg = str(e.value)
    assert "missing model.layers.1.self_attn.k_proj.lora_B.weight" in msg
    assert "unexpected base_model.model.model.layers.0.self_attn.q_norm.lora_A.weight" in msg
    assert "model.layers.2.self_attn.q_proj.lora_A.weight: adapter (3, 64) vs (4, 64) for r=4" in msg
    assert not lora.lora_modules(ours)  # left as it was
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf | {"use_dora": True}))
    with pytest.raises(ValueError, match="does not implement: use_dora=True"):
        lora.load_adapter(ours, tmp_path)
    with pytest.raises(ValueError, match=r"targets \['qkv'\] match no Linear"):
        lora.apply_lora(ours, lora.LoRAConfig(targets=("q_proj", "qkv")))
    with pytest.raises(ValueError, match="part .vision. has no Linear"):
        lora.apply_lora(ours, lora.LoRAConfig(parts=("llm", "vision")))


# Qwen2.5-VL: its checkpoint files use the old layout, PEFT's adapter the in-memory (new) one; LoRA on both parts,
# names that occur in both (down_proj). Qwen3-VL: the new layout everywhere, vision's GELU MLP names.
VL_TARGETS = {"qwen2_5_vl": ("q_proj", "v_proj", "down_proj", "qkv"), "qwen3_vl": ("o_proj", "qkv", "linear_fc1")}


@pytest.mark.parametrize("family", list(V.FAMILIES))
def test_vl_adapter_both_ways(family, tmp_path):
    """In fp64: in fp32 the base models alone differ by rounding (3.6e-5 on Qwen3-VL's logits of scale 51), in
    fp64 by 0, so 1e-5 is a bar for LoRA and not for the base."""
    make_cfg, cls = V.FAMILIES[family]
    torch.manual_seed(0)
    hf = V.randomize(cls(make_cfg(None)), seed=1).eval()
    hf.save_pretrained(tmp_path / "model")
    hf.double()
    ours = weights.from_pretrained(tmp_path / "model", dtype=torch.float64)
    cfg = lora.LoRAConfig(rank=4, alpha=8, targets=VL_TARGETS[family], parts=("llm", "vision"))
    paths = lora.apply_lora(ours, cfg)
    randomize_lora([p for n, p in ours.named_parameters() if "lora_" in n], seed=4)
    lora.save_adapter(ours, cfg, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours", autocast_adapter_dtype=False).eval()
    wrapped = {convert.our_name(n.removeprefix("base_model.model.")) for n, m in pm.named_modules()
               if isinstance(m, peft.tuners.lora.Linear)}
    assert wrapped == set(paths) and any(p.startswith("visual.blocks.") for p in paths)
    ids, mask, pv, grids = V.batch(hf.config, [V.GRIDS[:2]], [[3, 2, 4]])
    pv = pv.double()
    with torch.no_grad():
        got, want = ours(ids, pixel_values=pv, image_grid_thw=grids), V.hf_forward(pm, ids, mask, pv, grids)
        base = V.hf_forward(hf, ids, mask, pv, grids)
    pm.save_pretrained(tmp_path / "peft")  # and back: PEFT's own file into a fresh model of ours
    back = weights.from_pretrained(tmp_path / "model", dtype=torch.float64)
    assert lora.load_adapter(back, tmp_path / "peft").parts == ("llm", "vision")
    with torch.no_grad():
        again = back(ids, pixel_values=pv, image_grid_thw=grids)
    print(f"{family}: ours -> PEFT {max_diff(got, want):.2e}, PEFT -> ours {max_diff(again, want):.2e}, "
          f"vs base {max_diff(got, base):.2e}")
    assert max_diff(got, want) <= 1e-5 and max_diff(again, want) <= 1e-5
    assert max_diff(got, base) > 1e-2


def test_vl_targets_stay_in_their_part():
    """PEFT full-matches target_modules against every module path: a VL adapter's regex must not also catch the
    other part's Linears of the same name (Qwen2.5-VL's vision MLP has a down_proj too)."""
    pattern = lora.peft_targets(["model.layers.0.mlp.down_proj", "visual.blocks.1.attn.qkv"], vl=True)
    assert re.fullmatch(pattern, "model.language_model.layers.7.mlp.down_proj")
    assert re.fullmatch(pattern, "model.visual.blocks.0.attn.qkv")
    assert not re.fullmatch(pattern, "model.visual.blocks.0.mlp.down_proj")
    assert not re.fullmatch(pattern, "model.visual.merger.mlp.0")
    assert lora.peft_targets(["model.layers.0.mlp.down_proj"], vl=False) == ["down_proj"]
