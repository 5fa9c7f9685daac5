"""sample.py: greedy tokens equal transformers' generate (Qwen2.5-VL, Qwen3-VL, Qwen3 and Qwen2 text), a left-padded
batch equals each prompt alone, cached decode equals recomputing, seeded sampling, stop ids, the prompt text equals
Qwen's chat templates, and the command line (one-shot, chat, text-only) with its errors. fp32, CPU."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer

import pixels
import sample as S
import test_vlm as V  # the tiny Qwen2.5-VL / Qwen3-VL configs, their prompts with images
import tiny_tokenizer as T
import weights
from conftest import TEXT_CONFIGS, randomize

ROOT = Path(__file__).resolve().parents[1]
N = 12  # new tokens per comparison


@pytest.fixture(scope="module", params=list(V.FAMILIES))
def vl(request, tmp_path_factory):
    """(hf model, ours loaded from its directory) for Qwen2.5-VL and Qwen3-VL. Untied: test_vlm's tied random
    Qwen3-VL answers every prompt by repeating its last token, which would leave decoding untested."""
    make_cfg, cls = V.FAMILIES[request.param]
    out = tmp_path_factory.mktemp(request.param)
    cfg = make_cfg(out)
    cfg.tie_word_embeddings = False
    cfg.get_text_config().tie_word_embeddings = False
    torch.manual_seed(0)
    hf = V.randomize(cls(cfg), seed=1).eval()
    hf.save_pretrained(out)
    return hf, weights.from_pretrained(out)


def hf_generate(hf, ids, mask, pv=None, grids=None, n=N, eos=None) -> list[list[int]]:
    images = {} if pv is None else dict(pixel_values=pv, image_grid_thw=grids, mm_token_type_ids=(ids == V.IMAGE).int())
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                          pad_token_id=0, **images)
    return out[:, ids.shape[1]:].tolist()


def vl_batch(hf):
    """Two rows, left-padded: two images then text, and one longer image with more text before it."""
    return V.batch(hf.config, [V.GRIDS[:2], V.GRIDS[2:]], [[3, 2, 4], [6, 1]], pad_left={0, 1}, seed=3)


def test_greedy_equals_transformers_vl(vl):
    hf, ours = vl
    ids, mask, pv, grids = V.batch(hf.config, [V.GRIDS[:2]], [[3, 2, 4]], seed=5)
    got = S.generate(ours, ids, mask, pv, grids, max_new_tokens=N)
    assert got == hf_generate(hf, ids, mask, pv, grids)
    assert len(set(got[0])) > N // 2  # a constant answer would prove little


def test_left_padded_batch_equals_each_alone_and_transformers_vl(vl):
    hf, ours = vl
    ids, mask, pv, grids = vl_batch(hf)
    assert (mask[:, 0] == 0).any()
    got = S.generate(ours, ids, mask, pv, grids, max_new_tokens=N)
    n0 = int(grids[:2].prod(-1).sum())  # row 0's images are the first two grids
    for row, (p, g) in enumerate([(pv[:n0], grids[:2]), (pv[n0:], grids[2:])]):
        alone = ids[row, mask[row].bool()][None]
        assert [got[row]] == S.generate(ours, alone, None, p, g, max_new_tokens=N)
        assert [got[row]] == hf_generate(hf, alone, torch.ones_like(alone), p, g)


def test_cached_decode_equals_recompute_padded_vl(vl):
    _, ours = vl
    ids, mask, pv, grids = vl_batch(vl[0])
    toks = torch.tensor(S.generate(ours, ids, mask, pv, grids, max_new_tokens=6))
    full, full_mask = torch.cat([ids, toks], 1), torch.cat([mask, torch.ones_like(toks)], 1)
    with torch.no_grad():
        logits = ours(full, pixel_values=pv, image_grid_thw=grids, attention_mask=full_mask)
    assert torch.equal(logits[:, ids.shape[1] - 1 : -1].argmax(-1), toks)


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_greedy_equals_transformers_text_and_padded_batch(text_model_dir, kind):
    hf, path = text_model_dir(kind)
    ours = weights.from_pretrained(path)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, hf.config.vocab_size, (n,), generator=g).tolist() for n in (9, 4)]
    ids, mask = S.pad_left(rows, pad_id=0)
    got = S.generate(ours, ids, mask, max_new_tokens=N)
    for row, r in enumerate(rows):
        alone = torch.tensor([r])
        assert [got[row]] == S.generate(ours, alone, max_new_tokens=N) == hf_generate(hf, alone, None)
    assert got == hf_generate(hf, ids, mask)  # transformers' own left-padded batch, too


def test_negative_control_decoding_without_the_padding_mask_differs(text_model_dir, monkeypatch):
    """The batch comparison above can fail: decode steps that ignore the pads give a padded row other tokens."""
    _, path = text_model_dir("qwen3")
    ours = weights.from_pretrained(path)
    rows = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [2, 7, 1, 8]]
    ids, mask = S.pad_left(rows, pad_id=0)
    step = S.decode_step
    monkeypatch.setattr(S, "decode_step", lambda model, tokens, cache, mask: step(model, tokens, cache, None))
    assert S.generate(ours, ids, mask, max_new_tokens=N)[1] != S.generate(ours, torch.tensor(rows[1:]),
                                                                          max_new_tokens=N)[0]


def test_sampling_is_seeded_and_top_k_1_or_tiny_top_p_is_greedy(text_model_dir):
    _, path = text_model_dir("qwen3")
    ours = weights.from_pretrained(path)
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    run = lambda **kw: S.generate(ours, ids, max_new_tokens=N, **kw)  # noqa: E731
    greedy = run()
    a, b, c = run(temperature=1.5, seed=7), run(temperature=1.5, seed=7), run(temperature=1.5, seed=8)
    assert a == b and a != c and a != greedy
    assert run(temperature=1.5, top_k=1, seed=3) == greedy
    assert run(temperature=1.5, top_p=1e-6, seed=3) == greedy


def test_pick_top_k_and_top_p_keep_the_right_tokens():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log().expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    seen = lambda **kw: set(S.pick(logits, 1.0, generator=g, **kw).tolist())  # noqa: E731
    assert seen(top_k=0, top_p=1.0) == {0, 1, 2, 3}
    assert seen(top_k=2, top_p=1.0) == {1, 3}
    assert seen(top_k=0, top_p=0.7) == {1, 3}  # 0.5 < 0.7: the next token is needed, then 0.8 >= 0.7
    assert seen(top_k=0, top_p=0.45) == {1}
    assert seen(top_k=3, top_p=0.9) == {1, 2, 3}
    assert seen(top_k=0, top_p=0.0) == {1}
    assert S.pick(logits[:2], 0.0, 0, 1.0, None).tolist() == [1, 1]


def test_stop_ids_cut_before_the_first_stop(text_model_dir):
    hf, path = text_model_dir("qwen3")
    ours = weights.from_pretrained(path)
    ids, mask = S.pad_left([[5, 6, 7, 8, 9], [10, 11, 12]], pad_id=0)
    full = S.generate(ours, ids, mask, max_new_tokens=N)
    stop = full[0][4]
    cut = full[0].index(stop)  # its first occurrence
    assert stop not in full[1]
    streamed = []
    got = S.generate(ours, ids, mask, max_new_tokens=N, stop_ids=[stop], on_token=lambda r, t: streamed.append((r, t)))
    assert got == [full[0][:cut], full[1]]  # row 1 runs on to max_new_tokens
    assert [t for r, t in streamed if r == 0] == got[0] and [t for r, t in streamed if r == 1] == got[1]
    want = hf_generate(hf, ids[:1], None, n=N, eos=stop)[0]  # transformers ends with the stop id itself
    assert want[: want.index(stop)] == got[0]


def test_context_overflow_is_an_error(text_model_dir):
    _, path = text_model_dir("qwen3")
    ours = weights.from_pretrained(path)  # max_position_embeddings 256
    with pytest.raises(ValueError, match=r"the prompt is 256 tokens .* context is 256"):
        S.generate(ours, torch.zeros(1, 256, dtype=torch.long), max_new_tokens=4)
    assert len(S.generate(ours, torch.zeros(1, 250, dtype=torch.long), max_new_tokens=40)[0]) == 6  # cut to fit


def test_stop_token_ids_read_generation_config_then_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(eos_token_id=5, text_config=dict(eos_token_id=7))))
    (tmp_path / "generation_config.json").write_text(json.dumps(dict(eos_token_id=[7, 9])))
    assert weights.stop_token_ids(tmp_path) == [7, 9, 5]
    (tmp_path / "generation_config.json").unlink()
    assert weights.stop_token_ids(tmp_path) == [5, 7]


@pytest.mark.parametrize("template", ["QWEN25_VL", "QWEN3_VL", "QWEN3"])
def test_prompt_text_equals_the_chat_template(template):
    """render() == Qwen's jinja template (through transformers) for a multi-turn chat with a system turn and
    images between text, as the chat mode builds it."""
    messages = [dict(role="system", content="Be brief."),
                dict(role="user", content=[dict(type="image"), dict(type="text", text="What is it?")]),
                dict(role="assistant", content="A cat."),
                dict(role="user", content=[dict(type="text", text="And "), dict(type="image"),
                                           dict(type="text", text=" this?")])]
    if template == "QWEN3":  # text only: strings
        messages = [m if isinstance(m["content"], str) else
                    dict(role=m["role"], content="".join(i.get("text", "") for i in m["content"])) for m in messages]
    from jinja2 import Environment

    want = Environment().from_string(getattr(T, template)).render(messages=messages, add_generation_prompt=True)
    assert S.render(messages) == want


# ----------------------------------------------------------------------------------------------------------------
# the command line, on model dirs with a tokenizer


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL dir as convert.py / train.py write one: weights, tokenizer, chat template, image settings.
    Its context is 64 tokens, so that a large image overflows it."""
    out = tmp_path_factory.mktemp("cli_vl")
    T.make_tokenizer(out, T.QWEN25_VL)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = {k: tok.token_to_id(t) for k, t in dict(image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                                                   vision_start_token_id="<|vision_start|>",
                                                   vision_end_token_id="<|vision_end|>").items()}
    eos = tok.token_to_id("<|im_end|>")
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=tok.get_vocab_size(), max_position_embeddings=64,
                         eos_token_id=eos, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                                mrope_section=[2, 3, 3])),
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                           patch_size=14, window_size=56, fullatt_block_indexes=[1]), eos_token_id=eos, **ids)
    torch.manual_seed(0)
    randomize(transformers.Qwen2_5_VLForConditionalGeneration(cfg), seed=4).save_pretrained(out)
    pixels.save_image_config(pixels.ImageConfig(patch_size=14, min_pixels=4 * 28**2, max_pixels=64 * 28**2,
                                            image_mean=pixels.CLIP_MEAN, image_std=pixels.CLIP_STD), out)
    Image.effect_noise((30, 20), 60).convert("RGB").save(out / "small.png")  # 56 x 56 after resizing: 4 tokens
    Image.effect_noise((300, 300), 60).convert("RGB").save(out / "large.png")  # 64 tokens: over the context
    return out


def expected_answer(model_dir, prompt: str, images: list[str], n: int) -> str:
    """What the CLI should print: generate() on the same prompt, in-process, decoded."""
    model, tok, image_cfg = weights.load(model_dir, "cpu", torch.float32)
    system = weights.template_defaults(weights.read_chat_template(model_dir))[0]
    imgs = [pixels.load_image(p) for p in images]
    ids, vision = S.build_prompt(tok, [dict(role="system", content=system)] * bool(system)
                                 + [S.user_message(prompt, imgs)], imgs, image_cfg)
    assert "You are a helpful assistant." in tok.decode(ids, skip_special_tokens=False) or not image_cfg
    out = S.generate(model, torch.tensor([ids]), None, **vision, max_new_tokens=n,
                     stop_ids=weights.stop_token_ids(model_dir))
    return tok.decode(out[0])


def run_cli(*args, stdin: str | None = None):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_cli_answers_about_an_image(cli_dir):
    p = run_cli("--model", cli_dir, "--image", cli_dir / "small.png", "--prompt", "Describe the image.",
                "--max-new-tokens", 8, "--dtype", "float32")
    assert p.returncode == 0, p.stderr
    want = expected_answer(cli_dir, "Describe the image.", [cli_dir / "small.png"], 8)
    assert want and p.stdout == want + "\n"


def test_cli_chat_keeps_going_after_a_bad_image(cli_dir):
    turns = f"/image {cli_dir / 'small.png'}\nWhat is it?\n/image {cli_dir / 'nope.png'}\nAnd this?\nMore?\n/quit\n"
    p = run_cli("--model", cli_dir, "--max-new-tokens", 4, "--dtype", "float32", "--chat", stdin=turns)
    assert p.returncode == 0, p.stderr
    assert f"error: image file not found: {cli_dir / 'nope.png'}" in p.stderr
    assert p.stdout.count("assistant> ") == 3  # the bad image refused when typed, nothing else lost


def test_cli_chat_commands_and_a_prompt_from_stdin(cli_dir):
    turns = "/foo\n/image\n/reset\nhi\n"
    p = run_cli("--model", cli_dir, "--max-new-tokens", 2, "--dtype", "float32", "--chat", stdin=turns)
    assert p.returncode == 0 and "error: unknown command /foo: `/image PATH`" in p.stderr, p.stderr
    assert "(conversation and attachments cleared)" in p.stderr and "Traceback" not in p.stderr
    assert p.stdout.count("assistant> ") == 1  # EOF after the last turn leaves quietly
    p = run_cli("--model", cli_dir, "--image", cli_dir / "small.png", "--max-new-tokens", 8, "--dtype", "float32",
                stdin="Describe the image.\n")
    assert p.returncode == 0 and p.stdout == expected_answer(cli_dir, "Describe the image.",
                                                             [cli_dir / "small.png"], 8) + "\n"
    p = run_cli("--model", cli_dir, "--dtype", "float32", stdin="")
    assert p.returncode == 1 and p.stderr.strip() == "error: no --prompt and nothing on stdin: give a prompt, or --chat"


def test_cli_text_only_llm(tmp_path, capsys):
    T.make_tokenizer(tmp_path, T.QWEN3)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    cfg = dict(TEXT_CONFIGS["qwen3"], vocab_size=tok.get_vocab_size(), eos_token_id=tok.token_to_id("<|im_end|>"))
    randomize(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg)), seed=2).save_pretrained(tmp_path)
    S.main(["--model", str(tmp_path), "--prompt", "Count: 1, 2, 3", "--max-new-tokens", "6", "--dtype", "float32"])
    want = expected_answer(tmp_path, "Count: 1, 2, 3", [], 6)
    assert want and capsys.readouterr().out == want + "\n"
    Image.new("RGB", (28, 28)).save(tmp_path / "x.png")
    with pytest.raises(SystemExit, match="cannot take images: a text-only LLM"):
        S.main(["--model", str(tmp_path), "--prompt", "hi", "--image", str(tmp_path / "x.png"), "--dtype", "float32"])


def error_of(argv) -> str:
    with pytest.raises(SystemExit) as e:
        S.main([str(a) for a in argv] + ["--dtype", "float32"])
    return str(e.value.code)


def test_cli_errors(cli_dir, tmp_path):
    base = ["--prompt", "Describe the image."]
    assert error_of(["--model", cli_dir, "--image", tmp_path / "nope.jpg", *base]) == \
        f"error: image file not found: {tmp_path / 'nope.jpg'}"
    (tmp_path / "notes.jpg").write_text("not an image")
    assert error_of(["--model", cli_dir, "--image", tmp_path / "notes.jpg", *base]).startswith(
        f"error: cannot decode image file {tmp_path / 'notes.jpg'}")
    too_long = error_of(["--model", cli_dir, "--image", cli_dir / "large.png", *base])
    assert "the prompt is" in too_long and "context is 64" in too_long
    assert error_of(["--model", tmp_path / "missing", *base]) == f"error: model dir not found: {tmp_path / 'missing'}"
    assert "no config.json, not a model directory" in error_of(["--model", tmp_path, *base])
    (tmp_path / "config.json").write_text("{}")
    assert error_of(["--model", tmp_path, *base]).startswith(f"error: {tmp_path}: not a Qwen model dir")
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(cli_dir, no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
    assert "no tokenizer.json" in error_of(["--model", no_tok, *base])


def test_compiled_decode_step_gives_the_same_tokens(text_model_dir):
    """The torch.compile path (the CLI's default on CUDA) traced here on CPU: same tokens, no recompile per step."""
    from torch._dynamo.utils import counters

    _, path = text_model_dir("qwen3")
    ours = weights.from_pretrained(path)
    ids = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(4))
    want = S.generate(ours, ids, max_new_tokens=N)
    torch._dynamo.reset()
    counters.clear()
    assert S.generate(ours, ids, max_new_tokens=N, compile=True) == want
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # not one per cache length


# ----------------------------------------------------------------------------------------------------------------
# bf16 on CPU: load() packs the decoder's weights for oneDNN; the numbers must not move by one bit


def logits_and_tokens(model, ids, pv=None, grids=None):
    with torch.no_grad():
        logits = model(ids, pixel_values=pv, image_grid_thw=grids)
    return logits, S.generate(model, ids, None, pv, grids, max_new_tokens=N)


@pytest.mark.parametrize("kind", ["qwen3", "qwen2"])
def test_packed_bf16_decoder_is_bit_identical(text_model_dir, kind):
    _, path = text_model_dir(kind)
    plain, packed = weights.from_pretrained(path, dtype=torch.bfloat16), weights.from_pretrained(path, dtype=torch.bfloat16)
    layers = packed.cfg.text.num_layers
    assert weights.pack_for_cpu(packed) == 7 * layers + 1  # q k v o gate up down per layer, and lm_head
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    ids = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(6))
    (a, toks_a), (b, toks_b) = logits_and_tokens(plain, ids), logits_and_tokens(packed, ids)
    assert torch.equal(a, b) and toks_a == toks_b
    # negative control: the comparison sees one row of one weight moved to its next bf16 numbers
    nudged = weights.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        nudged.model.layers[0].mlp.down_proj.weight.view(torch.int16)[0] += 1
    weights.pack_for_cpu(nudged)
    assert not torch.equal(logits_and_tokens(nudged, ids)[0], b)
    assert weights.pack_for_cpu(weights.from_pretrained(path)) == 0  # fp32 keeps F.linear: transformers' exact numbers


def test_no_onednn_means_no_packing(text_model_dir, monkeypatch):
    _, path = text_model_dir("qwen3")
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    model = weights.from_pretrained(path, dtype=torch.bfloat16)
    assert weights.pack_for_cpu(model) == 0 and type(model.lm_head) is torch.nn.Linear


def test_load_packs_a_vl_model_and_its_images_give_the_same_answer(cli_dir):
    model, tok, image_cfg = weights.load(cli_dir, "cpu", torch.bfloat16)
    plain = weights.from_pretrained(cli_dir, dtype=torch.bfloat16)
    assert isinstance(model.lm_head, weights.PackedLinear) and isinstance(model.model.layers[0].mlp.up_proj, weights.PackedLinear)
    assert type(model.visual.blocks[0].mlp.up_proj) is torch.nn.Linear  # the tower runs once per prompt: as loaded
    imgs = [pixels.load_image(cli_dir / "small.png")]
    ids, vision = S.build_prompt(tok, [S.user_message("Describe the image.", imgs)], imgs, image_cfg)
    pv, grid = vision["pixel_values"], vision["image_grid_thw"]
    ids = torch.tensor([ids])
    (a, toks_a), (b, toks_b) = logits_and_tokens(plain, ids, pv, grid), logits_and_tokens(model, ids, pv, grid)
    assert torch.equal(a, b) and toks_a == toks_b


@pytest.mark.parametrize("argv, message", [
    (["--top-p", "0"], "--top-p 0.0: must be within (0, 1]"), (["--max-new-tokens", "0"], "must be at least 1"),
    (["--temperature", "-1"], "--temperature -1.0: must be 0 or more"), (["--dtype", "float16"], "invalid choice"),
])
def test_sample_flags_are_checked_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        S.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
