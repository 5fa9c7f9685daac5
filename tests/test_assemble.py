"""convert.py's saving half and `assemble`, on tiny random checkpoints: every output tensor traced to its source
and bitwise equal to it, the text config (rope_theta included) taken from the LLM, and the transformers round
trip (Qwen3-VL donor: loads cleanly and gives our logits; Qwen2.5-VL donor + Qwen3: transformers refuses it)."""
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import convert
import model as M
import pixels
import weights
from conftest import randomize
from tiny_tokenizer import QWEN3, QWEN3_VL, QWEN25_VL, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 448  # the tiny tokenizer's ids reach 425


def token_ids(tok_dir: Path) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    names = dict(image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                 vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
    return {k: tok.token_to_id(v) for k, v in names.items()}


def save(hf_model, out: Path, chat_template: str, shard: str = "1GB", tokenizer_vocab: int = 400) -> Path:
    hf_model.save_pretrained(out, max_shard_size=shard)
    make_tokenizer(out, chat_template, vocab_size=tokenizer_vocab)
    return out


def qwen25_donor(out: Path, shard="30KB", tokenizer_vocab=400) -> Path:
    """Qwen2.5-VL: text head_dim 24 (M-RoPE sections 4+4+4), rope_theta 5e5, merger 32*4 -> 48."""
    make_tokenizer(out, QWEN25_VL, vocab_size=tokenizer_vocab)
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=VOCAB, rms_norm_eps=1e-6,
                         rope_parameters=dict(rope_type="default", rope_theta=5e5, mrope_section=[4, 4, 4])),
        vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=48,
                           patch_size=14, window_size=56, fullatt_block_indexes=[1, 3]), **token_ids(out))
    save(randomize(transformers.Qwen2_5_VLForConditionalGeneration(cfg), 1), out, QWEN25_VL, shard, tokenizer_vocab)
    # the Qwen2.5-VL preprocessor settings, with bounds of its own to show they are the donor's
    pixels.save_image_config(pixels.image_config_from_dir(out, 14, min_pixels=56 * 56, max_pixels=28 * 28 * 64), out)
    return out


def qwen3vl_donor(out: Path) -> Path:
    """Qwen3-VL: text hidden 64, head_dim 16 (sections 4+2+2, interleaved), rope_theta 5e6, tied; deepstack."""
    make_tokenizer(out, QWEN3_VL)
    cfg = transformers.Qwen3VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, rms_norm_eps=1e-6,
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[4, 2, 2],
                                              mrope_interleaved=True)),
        vision_config=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                           patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0, 2]),
        tie_word_embeddings=True, **token_ids(out))
    return save(randomize(transformers.Qwen3VLForConditionalGeneration(cfg), 2), out, QWEN3_VL, "30KB")


def qwen3_llm(out: Path, tied: bool, shard="30KB"):
    """Untied: width 64, head_dim 24, rope_theta 1e6. Tied: width 48 (narrower than the Qwen3-VL donor's 64),
    head_dim 16, rope_theta 1e4. Neither theta is its donor's."""
    if tied:
        kw = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=16, rope_theta=1e4, tie_word_embeddings=True)
    else:
        kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24, rope_theta=1e6, tie_word_embeddings=False)
    hf = randomize(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=VOCAB, rms_norm_eps=1e-6, max_position_embeddings=512, **kw)), 3).eval()
    return hf, save(hf, out, QWEN3, shard)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Sharded donors and LLMs, built once; tests copy a dir before changing it."""
    root = tmp_path_factory.mktemp("parts")
    untied, untied_dir = qwen3_llm(root / "qwen3_untied", tied=False)
    tied, tied_dir = qwen3_llm(root / "qwen3_tied", tied=True)
    return dict(qwen25=qwen25_donor(root / "qwen25"), qwen3vl=qwen3vl_donor(root / "qwen3vl"),
                untied=untied_dir, tied=tied_dir, hf_untied=untied, hf_tied=tied)


def assemble(vision, llm, out, **kw):
    return convert.assemble(convert.AssembleArgs(vision=str(vision), llm=str(llm), out=str(out), **kw))


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name, file in weights.checkpoint_files(path).items():
        with safe_open(file, framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def check_traced(out: Path, origins: dict, sources: dict[str, Path], dtype=torch.float32) -> dict[str, int]:
    """Every output tensor is in `origins`, and each copied one is bitwise its source (cast to dtype); from the
    sources' side, every LLM tensor and every vision-tower tensor is in the output. Returns origin counts."""
    got, src = read_all(out), {role: read_all(path) for role, path in sources.items()}
    assert set(got) == set(origins)
    counts = {}
    for name, (origin, source) in origins.items():
        counts[origin] = counts.get(origin, 0) + 1
        assert got[name].dtype == dtype
        if origin in ("vision", "llm"):
            role, src_name = source.split(":", 1)
            assert convert.our_name(src_name) == convert.our_name(name)  # the same parameter, renamed at most
            assert torch.equal(got[name], src[role][src_name].to(dtype)), name
    by_ours = {convert.our_name(n): t for n, t in got.items()}
    for role, tensors in src.items():
        for name, t in tensors.items():
            ours = convert.our_name(name)
            if role == "llm" and ours != "lm_head.weight" or role == "vision" and ours.startswith("visual.") \
                    and "merger" not in ours:
                assert torch.equal(by_ours[ours], t.to(dtype)), name
    return counts


def text_logits(m, ids):
    with torch.no_grad():
        return m(ids) if isinstance(m, M.VLM) else m(input_ids=ids).logits


# ------------------------------------------------------------------------------------------------------------------
# the two recipes


def test_qwen25_vision_untied_qwen3(dirs, tmp_path, capsys):
    out = tmp_path / "out"
    origins = assemble(dirs["qwen25"], dirs["untied"], out, dtype="float32", max_shard_size="40KB")
    table = capsys.readouterr().out
    counts = check_traced(out, origins, {"vision": dirs["qwen25"], "llm": dirs["untied"]})
    assert counts == {"vision": 4 * 12 + 1, "fresh": 5, "llm": 3 * 11 + 3}  # q_norm / k_norm and lm_head included
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == len(origins)
    assert "model.language_model.layers.{0..2}.self_attn.q_norm.weight" in table

    cfg, llm, donor = (M.config_from_hf(json.loads((d / "config.json").read_text()))
                       for d in (out, dirs["untied"], dirs["qwen25"]))
    assert cfg.text.rope_theta == llm.text.rope_theta == 1e6 != donor.text.rope_theta
    assert cfg.text == dataclasses.replace(llm.text, mrope_section=(4, 4, 4), mrope_interleaved=False)
    assert cfg.vision == dataclasses.replace(donor.vision, out_hidden_size=64)
    assert (out / "tokenizer.json").read_bytes() == (dirs["untied"] / "tokenizer.json").read_bytes()
    assert (out / "generation_config.json").read_bytes() == (dirs["untied"] / "generation_config.json").read_bytes()
    assert pixels.image_config_from_dir(out) == pixels.image_config_from_dir(dirs["qwen25"])
    # the donor's video settings (from its preprocessor_config.json, as transformers reads them), written out
    assert pixels.video_config_from_dir(out) == pixels.video_config_from_dir(dirs["qwen25"], patch_size=14)
    assert pixels.video_config_from_dir(out).max_pixels == 28 * 28 * 64  # the donor's bound, not the class's

    # ours loads it; on text it is exactly the LLM (1-D positions = 3-D positions with equal rows)
    ours, ids = weights.from_pretrained(out), torch.randint(0, 400, (2, 17), generator=torch.Generator().manual_seed(0))
    want = text_logits(dirs["hf_untied"], ids)
    assert (text_logits(ours, ids) - want).abs().max() < 1e-5
    # negative control: the second published recipe's bug, the template's rope_theta, shows in the logits
    object.__setattr__(ours.model, "cfg", dataclasses.replace(cfg.text, rope_theta=donor.text.rope_theta))
    assert (text_logits(ours, ids) - want).abs().max() > 1e-3
    object.__setattr__(ours.model, "cfg", cfg.text)
    # and with an image
    ids = torch.tensor([[1, 2, cfg.vision_start_token_id] + [cfg.image_token_id] * 6 + [cfg.vision_end_token_id, 3]])
    logits = ours(ids, pixel_values=torch.randn(24, 3 * 2 * 14 * 14), image_grid_thw=torch.tensor([[1, 4, 6]]))
    assert logits.shape == (1, 11, VOCAB) and torch.isfinite(logits).all()


def test_qwen25_donor_output_is_refused_by_transformers(dirs, tmp_path):
    out = tmp_path / "out"
    assemble(dirs["qwen25"], dirs["untied"], out, dtype="float32")
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "qwen2_5_vl_qwen3" and "architectures" not in hf
    for load in (transformers.AutoConfig.from_pretrained, transformers.AutoModelForImageTextToText.from_pretrained):
        with pytest.raises(ValueError, match="model type `qwen2_5_vl_qwen3` but Transformers does not recognize"):
            load(out)
    # why: forced into the Qwen2.5-VL class, QK-norm has nowhere to go and the q/k/v biases are made up (here the
    # projections are also mis-shaped, head_dim 24 != 64 / 4 heads; with Qwen3-8B's shapes they would load)
    _, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, ignore_mismatched_sizes=True)
    assert any("q_norm" in k for k in info["unexpected_keys"]) and any("q_proj.bias" in k for k in info["missing_keys"])


def test_qwen3vl_vision_tied_narrower_qwen3_copy(dirs, tmp_path):
    out = tmp_path / "out"
    origins = assemble(dirs["qwen3vl"], dirs["tied"], out, merger_init="copy", dtype="float32")
    counts = check_traced(out, origins, {"vision": dirs["qwen3vl"], "llm": dirs["tied"]})
    # merger + 2 deepstack mergers: norm (2) + fc1 (2) copied, fc2 (2) cropped from 64 to 48 rows
    assert counts == {"vision": 2 + 1 + 4 * 12 + 3 * 4, "cropped": 3 * 2, "llm": 2 * 11 + 2}
    got, donor = read_all(out), read_all(dirs["qwen3vl"])
    for name in ("model.visual.merger.linear_fc2.weight", "model.visual.deepstack_merger_list.1.linear_fc2.bias"):
        assert origins[name][0] == "cropped" and torch.equal(got[name], donor[name][:48])
    assert "lm_head.weight" not in got  # tied, as in the LLM
    assert pixels.video_config_from_dir(out) == pixels.video_config_from_dir(dirs["qwen3vl"], patch_size=16)

    hf, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.text_config.rope_parameters["rope_theta"] == 1e4 and hf.config.text_config.hidden_size == 48
    ours, ids = weights.from_pretrained(out), [1, 2, 408] + [403] * 6 + [401, 5, 6]
    ids, grid = torch.tensor([ids]), torch.tensor([[1, 4, 6]])
    pv = torch.randn(24, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf.eval()(input_ids=ids, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=(ids == 403).int())
        got_logits = ours(ids, pixel_values=pv, image_grid_thw=grid)
    assert (got_logits - want.logits).abs().max() < 1e-4
    text = torch.arange(3, 40)[None]
    assert (text_logits(ours, text) - text_logits(dirs["hf_tied"], text)).abs().max() < 1e-5


def test_qwen25_vision_qwen2_is_a_qwen2_5_vl_checkpoint(dirs, tmp_path):
    """The one other pair transformers has a class for: written in the layout transformers writes (old)."""
    hf_llm = randomize(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=VOCAB, rope_theta=2e5, rms_norm_eps=1e-6, tie_word_embeddings=False)), 5).eval()
    out = tmp_path / "out"
    origins = assemble(dirs["qwen25"], save(hf_llm, tmp_path / "qwen2", QWEN3), out, dtype="float32")
    assert check_traced(out, origins, {"vision": dirs["qwen25"], "llm": tmp_path / "qwen2"})["llm"] == 2 * 12 + 3
    assert "visual.merger.mlp.2.weight" in origins and "model.layers.0.self_attn.q_proj.bias" in origins
    hf, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours, grid = weights.from_pretrained(out), torch.tensor([[1, 4, 6]])
    ids = torch.tensor([[1, 2, 408] + [403] * 6 + [401, 5, 6]])
    pv = torch.randn(24, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf.eval()(input_ids=ids, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=(ids == 403).int())
        assert (ours(ids, pixel_values=pv, image_grid_thw=grid) - want.logits).abs().max() < 1e-4


def test_fresh_merger_and_copy_into_a_wider_llm(dirs, tmp_path):
    origins = assemble(dirs["qwen3vl"], dirs["tied"], tmp_path / "fresh", dtype="float32", seed=7)
    got = read_all(tmp_path / "fresh")
    mergers = {n: t for n, t in got.items() if "merger" in n}
    assert {origins[n] for n in mergers} == {("fresh", "fresh (seed 7)")} and len(mergers) == 3 * 6
    for name, t in mergers.items():  # PatchMerger.init_weights: trunc-normal(0.02) weights, zero biases, unit norms
        if "norm" in name:
            assert torch.all(t == (1 if name.endswith("weight") else 0))
        elif name.endswith("bias"):
            assert torch.all(t == 0)
        else:
            assert t.abs().max() <= 0.04 and 0.015 < t.std() < 0.025
    again = assemble(dirs["qwen3vl"], dirs["tied"], tmp_path / "again", dtype="float32", seed=7)
    assert again == origins and all(torch.equal(t, read_all(tmp_path / "again")[n]) for n, t in mergers.items())
    # copy into an LLM wider (64) than the Qwen2.5-VL merger's 48: the last Linear cannot be cropped, so it is fresh
    origins = assemble(dirs["qwen25"], dirs["untied"], tmp_path / "copy", merger_init="copy", dtype="float32")
    merger = {n.split("merger.")[1]: o for n, (o, _) in origins.items() if "merger" in n}
    assert merger == {"ln_q.weight": "vision", "mlp.0.weight": "vision", "mlp.0.bias": "vision",
                      "mlp.2.weight": "fresh", "mlp.2.bias": "fresh"}


def test_bfloat16_and_cli(dirs, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "convert.py"), "assemble", "--vision", str(dirs["qwen3vl"]), "--llm",
           str(dirs["tied"]), "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "model.language_model.layers.{0..1}.self_attn.k_norm.weight" in run.stdout and "fresh" in run.stdout
    origins = json.loads((out / "assemble.json").read_text())["tensors"]
    check_traced(out, {k: tuple(v) for k, v in origins.items()}, {"vision": dirs["qwen3vl"], "llm": dirs["tied"]},
                 dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 1 and "exists and is not empty" in again.stderr and "Traceback" not in again.stderr


# ------------------------------------------------------------------------------------------------------------------
# strictness


def edited_copy(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    hf = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**hf, **config}))
    return dst


def test_tied_llm_with_a_stored_lm_head(dirs, tmp_path):
    """Some tied checkpoints store lm_head.weight anyway: equal to the embeddings it is dropped, else an error."""
    def with_head(dst, head):
        llm = shutil.copytree(dirs["tied"], dst)
        index = json.loads((llm / "model.safetensors.index.json").read_text())
        weights.write_safetensors(llm / "head.safetensors", [weights.Item("lm_head.weight", tuple(head.shape),
                                                                          head.dtype, lambda: head)])
        index["weight_map"]["lm_head.weight"] = "head.safetensors"
        (llm / "model.safetensors.index.json").write_text(json.dumps(index))
        return llm

    embed = dirs["hf_tied"].model.embed_tokens.weight.detach()
    assemble(dirs["qwen3vl"], with_head(tmp_path / "same", embed.clone()), tmp_path / "ok")
    assert "llm:lm_head.weight" in json.loads((tmp_path / "ok" / "assemble.json").read_text())["dropped"]
    with pytest.raises(ValueError, match="tie_word_embeddings is true but it differs"):
        assemble(dirs["qwen3vl"], with_head(tmp_path / "differs", embed + 1), tmp_path / "bad")


def test_errors(dirs, tmp_path):
    q25, q3vl, untied, tied = dirs["qwen25"], dirs["qwen3vl"], dirs["untied"], dirs["tied"]
    with pytest.raises(ValueError, match="has no vision_config: no vision tower"):
        assemble(untied, tied, tmp_path / "a")
    with pytest.raises(ValueError, match="model_type 'qwen3_vl'; --llm wants a text-only Qwen3 or Qwen2"):
        assemble(q25, q3vl, tmp_path / "b")
    with pytest.raises(ValueError, match="model_type 'llama'"):
        assemble(q25, edited_copy(untied, tmp_path / "llama", model_type="llama"), tmp_path / "c")
    with pytest.raises(ValueError, match="ids up to 425 but vocab_size is 420: the embedding cannot cover"):
        assemble(q25, edited_copy(untied, tmp_path / "small", vocab_size=420), tmp_path / "d")
    with pytest.raises(ValueError, match=r"disagree on special tokens[\s\S]*'<\|image_pad\|>': id 303"):
        assemble(qwen25_donor(tmp_path / "other_tok", tokenizer_vocab=300), untied, tmp_path / "e")
    with pytest.raises(ValueError, match=r"sections \(4, 4, 4\) cover 12 frequencies, the LLM's head_dim 16 has 8"):
        assemble(q25, tied, tmp_path / "f")
    with pytest.raises(ValueError, match=r"llm model.layers.1.mlp.up_proj.weight: shape \(80, 48\), the model needs"):
        assemble(q3vl, edited_copy(tied, tmp_path / "wide", intermediate_size=96), tmp_path / "g")
    for bad in (dict(merger_init="crop"), dict(dtype="int8")):
        with pytest.raises(ValueError, match="expected fresh|copy, a float dtype"):
            assemble(q25, untied, tmp_path / "h", **bad)
    with pytest.raises(ValueError, match="is one of the inputs"):
        assemble(q3vl, tied, tied, force=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.safetensors.index.json").write_text("{}")  # stale: must go with --force
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        assemble(q3vl, tied, tmp_path / "full")
    assemble(q3vl, tied, tmp_path / "full", force=True)
    assert not (tmp_path / "full" / "model.safetensors.index.json").exists()
    assert weights.from_pretrained(tmp_path / "full") is not None


# ------------------------------------------------------------------------------------------------------------------
# the saving half train.py uses


def tiny_vlm(kind: str):
    from test_vlm import qwen3vl, qwen25

    return randomize({"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
                      "qwen3_vl": transformers.Qwen3VLForConditionalGeneration}[kind]((qwen25 if kind == "qwen2_5_vl"
                                                                                        else qwen3vl)(None)), 4)


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_tied", "qwen2_5_vl", "qwen3_vl"])
def test_save_state_dict_writes_what_transformers_writes(kind, tmp_path):
    if kind.startswith("qwen3") and kind != "qwen3_vl":
        hf = qwen3_llm(tmp_path / "hf", tied=kind == "qwen3_tied", shard="1GB")[0]
    else:
        hf = tiny_vlm(kind)
        hf.save_pretrained(tmp_path / "hf")
    ours = weights.from_pretrained(tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    weights.save_state_dict(ours.state_dict(), tmp_path / "ours", hf_config, max_shard_size="50KB")
    want, got = read_all(tmp_path / "hf"), read_all(tmp_path / "ours")
    assert sorted(got) == sorted(want)  # the same names (old layout for Qwen2.5-VL; no tied lm_head)
    assert all(torch.equal(got[k], want[k]) for k in want)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "ours" / "config.json").read_text()) == hf_config
    again, info = type(hf).from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert all(torch.equal(again.state_dict()[k], v) for k, v in hf.state_dict().items())


def test_save_state_dict_is_strict_and_replaces_an_earlier_save(tmp_path):
    hf = tiny_vlm("qwen3_vl")
    hf.save_pretrained(tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    state = weights.from_pretrained(tmp_path / "hf").state_dict()
    bad = {k: v for k, v in state.items() if "q_norm" not in k} | {"visual.extra": torch.zeros(1)}
    bad["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"(?s)missing model.layers.0.self_attn.q_norm.weight.*unexpected "
                                         r"visual.extra.*model.norm.weight: \(3,\) but the config makes \(64,\)"):
        weights.save_state_dict(bad, tmp_path / "bad", hf_config)
    weights.save_state_dict(state, tmp_path / "out", hf_config, max_shard_size="30KB")
    shards = len(list((tmp_path / "out").glob("model-*.safetensors")))
    weights.save_state_dict(state, tmp_path / "out", hf_config)  # one file now: the index and shards must go
    assert shards > 1 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert all(torch.equal(v, weights.from_pretrained(tmp_path / "out").state_dict()[k]) for k, v in state.items())


def test_copy_model_files(dirs, tmp_path):
    copied = weights.copy_model_files(dirs["qwen25"], tmp_path / "x")
    assert copied == ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json"]
    assert all((tmp_path / "x" / n).read_bytes() == (dirs["qwen25"] / n).read_bytes() for n in copied)
