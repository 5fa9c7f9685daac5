"""data.py: rendering against transformers' processors + Qwen's chat templates (the oracle), exact label masks,
packed == padded == one-at-a-time loss on tiny random VLMs, the linter on a corpus of malformed samples, and the
loader's shards, determinism and resumption. Every token id comes from the tiny tokenizer, none from Qwen."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image, ImageDraw
from tokenizers import Tokenizer
from transformers import AutoImageProcessor, AutoTokenizer

import data as D
import pixels
import tiny_tokenizer as T
import weights
from conftest import TEXT_CONFIGS, randomize

FIXTURES = Path(__file__).parent / "fixtures" / "data"

# family -> (config class, model class, processor class, chat template, patch size). "qwen3" is what this
# project builds: a Qwen3-VL vision tower under a hybrid Qwen3 LLM, whose template has the <think> logic.
FAMILIES = {
    "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration,
                   transformers.Qwen2_5_VLProcessor, T.QWEN25_VL, 14),
    "qwen3_vl": (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration,
                 transformers.Qwen3VLProcessor, T.QWEN3_VL, 16),
    "qwen3": (transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration,
              transformers.Qwen3VLProcessor, T.QWEN3, 16),
}


def make_model_dir(out: Path, family: str, weights: bool = True) -> Path:
    """A tiny random VLM dir: tokenizer + chat template, config.json (+ safetensors), preprocessor_config.json."""
    config_cls, model_cls, _, template, patch = FAMILIES[family]
    T.make_tokenizer(out, template)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = dict(image_token_id=tok.token_to_id("<|image_pad|>"), video_token_id=tok.token_to_id("<|video_pad|>"),
               vision_start_token_id=tok.token_to_id("<|vision_start|>"),
               vision_end_token_id=tok.token_to_id("<|vision_end|>"), bos_token_id=tok.token_to_id("<|endoftext|>"),
               eos_token_id=tok.token_to_id("<|im_end|>"), pad_token_id=tok.token_to_id("<|endoftext|>"))
    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=tok.get_vocab_size(), rms_norm_eps=1e-6,
                **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    if patch == 14:
        cfg = config_cls(text_config=dict(text, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                                     mrope_section=[2, 3, 3])),
                         vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48,
                                            out_hidden_size=64, patch_size=14, window_size=56,
                                            fullatt_block_indexes=[1]), **ids)
    else:
        cfg = config_cls(text_config=dict(text, head_dim=24, rope_parameters=dict(
                             rope_type="default", rope_theta=5e6, mrope_section=[4, 4, 4], mrope_interleaved=True)),
                         vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48,
                                            out_hidden_size=64, patch_size=16, num_position_embeddings=16,
                                            deepstack_visual_indexes=[0]), tie_word_embeddings=True, **ids)
    if weights:
        torch.manual_seed(0)
        randomize(model_cls(cfg)).save_pretrained(out)
    else:
        cfg.save_pretrained(out)
    factor = 2 * patch  # small bounds: every test image is a handful of tokens
    pixels.save_image_config(pixels.ImageConfig(patch_size=patch, min_pixels=4 * factor**2, max_pixels=24 * factor**2,
                                      image_mean=pixels.CLIP_MEAN, image_std=pixels.CLIP_STD), out)
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    cache = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_model_dir(tmp_path_factory.mktemp(family), family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Path]:
    """Two images of different sizes and aspects (their token counts differ), drawn so they are not flat."""
    out = tmp_path_factory.mktemp("images")
    paths = []
    for k, (w, h) in enumerate([(90, 50), (60, 130)]):
        img = Image.new("RGB", (w, h), (10 + 90 * k, 200, 40))
        ImageDraw.Draw(img).ellipse((5, 5, w - 10, h // 2), fill=(250, 30 * k, 90))
        paths.append(out / f"img{k}.png")
        img.save(paths[-1])
    return paths


def sample(messages, images=()) -> D.Sample:
    return D.Sample("test:1", tuple(messages), tuple(images))


THINK = "<think>\nThe bars rise, then one falls.\n</think>\n\nThe fourth bar is the tallest."
SAMPLES = {  # multi-turn, two images of different sizes (one in the first turn, one later), system or not
    "two_images": ([("user", "<image>\nWhat is in the first picture?"), ("assistant", "A green blob."),
                    ("user", "And here?<image> Compare."), ("assistant", "The second one is taller.")], 2),
    "system": ([("system", "You answer briefly."), ("user", "<image>Colour?"), ("assistant", "Green."),
                ("user", "<image>"), ("assistant", "Taller.")], 2),
    "text_only": ([("user", "Translate: the weather is nice."), ("assistant", "Il fait beau.")], 0),
    "thinking": ([("user", "<image>How many bars?"), ("assistant", "<think>\nCounting.\n</think>\n\nFour."),
                  ("user", "Which is tallest?"), ("assistant", THINK)], 1),
}


def oracle(family: str, path: Path, messages, image_paths):
    """input_ids, pixel_values, image_grid_thw from transformers: processor.apply_chat_template + processor call."""
    _, _, processor_cls, template, _ = FAMILIES[family]
    # without its video processor, which needs torchvision (not installable beside the CPU torch here)
    images_only = type(processor_cls.__name__, (processor_cls,),
                       dict(get_attributes=classmethod(lambda cls: ["image_processor", "tokenizer"])))
    proc = images_only(image_processor=AutoImageProcessor.from_pretrained(path),
                       tokenizer=AutoTokenizer.from_pretrained(path), chat_template=template)
    chat = []
    for role, text in messages:
        if family == "qwen3":  # the text LLM's template takes strings: the vision markup goes in literally
            chat.append(dict(role=role, content=text.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")))
        elif role == "user":  # the VL templates take content items: {"type": "image"} where an image goes
            items = []
            for k, piece in enumerate(text.split("<image>")):
                items += ([dict(type="image")] if k else []) + ([dict(type="text", text=piece)] if piece else [])
            chat.append(dict(role=role, content=items))
        else:
            chat.append(dict(role=role, content=text))
    text = proc.apply_chat_template(chat, tokenize=False)
    out = proc(text=[text], images=[Image.open(p) for p in image_paths] or None, return_tensors="pt")
    return out["input_ids"][0], out.get("pixel_values"), out.get("image_grid_thw")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", list(SAMPLES))
def test_rendering_matches_processor_and_chat_template(family, name, model_dir, images):
    d = model_dir(family)
    messages, n_images = SAMPLES[name]
    chat = D.load_chat(d, D.DataConfig())
    ours = D.encode(sample(messages, images[:n_images]), chat, max_length=10_000)
    ids, pixel_values, grid = oracle(family, d, messages, images[:n_images])
    assert ours.input_ids.tolist() == ids.tolist()
    if n_images:
        assert torch.equal(ours.pixel_values, pixel_values) and torch.equal(ours.image_grid_thw, grid)
        assert len(set(pixels.num_image_tokens(grid, chat.image.merge_size))) == n_images  # sizes really differ
    # the linter measures the same length without preprocessing the pixels
    checked, problems = D.check_sample(sample(messages, images[:n_images]), chat, 10_000)
    assert not problems and checked.tokens == len(ids)
    assert list(checked.image_tokens) == (pixels.num_image_tokens(grid, chat.image.merge_size) if n_images else [])


def test_template_decides_system_prompt_and_think():
    assert weights.template_defaults(T.QWEN25_VL) == ("You are a helpful assistant.", False)
    assert weights.template_defaults(T.QWEN3_VL) == ("", False)
    assert weights.template_defaults(T.QWEN3) == ("", True)


def learned_runs(chat: D.Chat, ex: D.Example) -> list[str]:
    """The text of each maximal run of learned tokens."""
    ids, labels = ex.input_ids.tolist(), ex.labels.tolist()
    assert all(label in (-100, t) for t, label in zip(ids, labels))
    runs, run = [], []
    for t, label in zip(ids, labels):
        if label != -100:
            run.append(t)
        elif run:
            runs, run = runs + [run], []
    return [chat.tokenizer.decode(r, skip_special_tokens=False) for r in runs + ([run] if run else [])]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_labels_are_exactly_the_assistant_turns(family, model_dir, images):
    chat = D.load_chat(model_dir(family), D.DataConfig())
    ex = D.encode(sample(SAMPLES["two_images"][0], images), chat, 10_000)
    assert learned_runs(chat, ex) == ["A green blob.<|im_end|>", "The second one is taller.<|im_end|>"]
    # a thinking block is ordinary text to a template without <think> logic
    ex = D.encode(sample(SAMPLES["thinking"][0], images[:1]), chat, 10_000)
    assert learned_runs(chat, ex) == ["<think>\nCounting.\n</think>\n\nFour.<|im_end|>", THINK + "<|im_end|>"]


def test_labels_with_qwen3_think_blocks(model_dir, images):
    d = model_dir("qwen3")
    chat = D.load_chat(d, D.DataConfig())
    ex = D.encode(sample(SAMPLES["thinking"][0], images[:1]), chat, 10_000)
    # history loses its reasoning (as the template does); the last turn's reasoning is learned
    assert learned_runs(chat, ex) == ["Four.<|im_end|>", THINK + "<|im_end|>"]
    # no reasoning: the template still writes an empty block; it is prompt, not answer
    ex = D.encode(sample(SAMPLES["text_only"][0]), chat, 10_000)
    text = chat.tokenizer.decode(ex.input_ids.tolist(), skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nIl fait beau.<|im_end|>\n")
    assert learned_runs(chat, ex) == ["Il fait beau.<|im_end|>"]
    # --no-think and --system-prompt override what the template decides
    chat = D.load_chat(d, D.DataConfig(think=False, system_prompt="Be brief."))
    text = chat.tokenizer.decode(D.encode(sample(SAMPLES["text_only"][0]), chat, 10_000).input_ids.tolist(), False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nTranslate: the weather is nice."
                    "<|im_end|>\n<|im_start|>assistant\nIl fait beau.<|im_end|>\n")


def test_no_default_system_prompt_on_request(model_dir):
    chat = D.load_chat(model_dir("qwen2_5_vl"), D.DataConfig(system_prompt=""))
    text = chat.tokenizer.decode(D.encode(sample(SAMPLES["text_only"][0]), chat, 10_000).input_ids.tolist(), False)
    assert text.startswith("<|im_start|>user\n")


def test_grounding_tokens_and_empty_system_turns_are_data(model_dir):
    chat = D.load_chat(model_dir("qwen3_vl"), D.DataConfig())
    box = "<|object_ref_start|>the cup<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|>"
    messages = [("system", ""), ("user", "Where is the cup?"), ("assistant", box)]
    ok, problems = D.check_sample(sample(messages), chat, 512)
    assert not problems and ok.tokens > 0


def test_text_only_llm(tmp_path, images):
    T.make_tokenizer(tmp_path, T.QWEN3)
    transformers.Qwen3Config(**TEXT_CONFIGS["qwen3"]).save_pretrained(tmp_path)
    chat = D.load_chat(tmp_path, D.DataConfig())
    assert chat.image is None and not chat.mrope
    _, problems = D.check_sample(sample(SAMPLES["two_images"][0], images), chat, 512)
    assert [str(p) for p in problems] == ["test:1: no vision tower: 2 image(s) but the model is a text-only LLM"]
    batch = D.collate([[D.encode(sample(SAMPLES["text_only"][0]), chat, 512)]], chat.pad_id, chat.mrope)
    assert batch["position_ids"].shape == batch["input_ids"].shape and "pixel_values" not in batch


def loss_sum(net, batch: dict) -> torch.Tensor:
    batch = dict(batch)
    labels = batch.pop("labels")
    logits = net(**batch)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_packed_loss_equals_unpacked(family, model_dir, images):
    d = model_dir(family)
    chat = D.load_chat(d, D.DataConfig())
    net = weights.from_pretrained(d, dtype=torch.float64)
    ex = [D.encode(sample(m, images[:n]), chat, 10_000) for m, n in SAMPLES.values()]
    with torch.no_grad():
        one = sum(loss_sum(net, D.collate([[e]], chat.pad_id, chat.mrope)) for e in ex)
        padded = loss_sum(net, D.collate([[e] for e in ex], chat.pad_id, chat.mrope))
        rows = [[ex[0], ex[2]], [ex[1], ex[3]]]  # each row mixes an image sample with another
        length = max(sum(len(e.input_ids) for e in row) for row in rows) + 5  # trailing pads too
        packed = D.collate(rows, chat.pad_id, chat.mrope, length)
        assert packed["doc_ids"].shape == (2, length) and packed["position_ids"].shape == (3, 2, length)
        assert abs(loss_sum(net, packed) - one) < 1e-5 and abs(padded - one) < 1e-5
        # negative controls: samples that see each other, or images without their 3-D positions, change the loss.
        # (Positions that run on from one sample to the next would not: RoPE is relative, a whole document
        # shifted scores the same in exact arithmetic; restarting keeps bf16's rounding of cos/sin identical too.)
        assert abs(loss_sum(net, {k: v for k, v in packed.items() if k != "doc_ids"}) - one) > 1e-3
        flat = torch.arange(length).expand(3, 2, -1)
        assert abs(loss_sum(net, dict(packed, position_ids=flat)) - one) > 1e-3


# ---- the linter ----

MAX_LENGTH = 256  # the corpus's long samples exceed it
EXPECTED = {  # bad.jsonl line -> the problem(s) it must produce
    1: ["bad JSON: Expecting ',' delimiter (column 143)"],
    2: ['not an object: a sample is a JSON object, not [{"from": "human", "value": "hi"}, {"...'],
    3: ["missing field: a sample has `conversations` (LLaVA) or `messages` (ms-swift)"],
    4: ["conflicting fields: a sample has `conversations` (LLaVA) or `messages` (ms-swift), not both"],
    5: ["unknown field: 'img'"],
    6: ["unknown role: turn 1: 'robot', expected one of system, user, assistant"],
    7: ["unknown role: turn 1: 'bot', expected one of human, gpt, system"],
    8: ["missing field: turn 0 needs 'from' and 'value'"],
    9: ["empty conversation: messages is []"],
    10: ["bad order: the conversation must start with a user turn (after an optional system turn)"],
    11: ["bad order: turns 0 and 1 are both user turns; they alternate"],
    12: ["bad order: the last turn is a user turn: nothing to learn from"],
    13: ["bad order: turn 2 is a system turn; only the first turn may be"],
    14: ["image count mismatch: 2 <image> placeholder(s) but 1 image(s)"],
    15: ["image count mismatch: 0 <image> placeholder(s) but 1 image(s)"],
    16: ["missing image: images/nope.png"],
    17: ["undecodable image: cannot decode image file images/truncated.png: OSError: image file is truncated"],
    18: ["undecodable image: cannot decode image file images/notes.jpg: UnidentifiedImageError: cannot identify "
         "image file 'images/notes.jpg'"],
    19: ["image cut by max_length: 919 tokens and the last image ends at token 892 > 256"],
    20: ["empty turn: turn 1 (assistant) has no text"],
    21: ["bad field: turn 1: content is 42, not a string"],
    22: ["misplaced <image>: in turn 1 (assistant); images go in user turns"],
    23: ["reserved token: turn 0 contains <|im_end|>; special tokens come from the chat template only"],
    24: ["missing video: clips/dog.mp4"],
    25: ["bad field: images must be a path or a list of paths, not 5"],
    26: ["bad image: images/sliver.png: image of 2x402 (h x w) has aspect ratio 201.0; the limit is 200: crop or "
         "pad it"],
    27: ["unknown field: turn 1: 'weight'"],
    28: ["nothing to learn: no assistant token in the first 256 (max_length)"],
}
EXPECTED_JSON = {  # bad.json: a structural problem, then a syntax error that stops the file
    8: ["empty conversation: conversations is \"hi there\""],
    11: ["bad JSON: expected ',' or ']'; rest unread"],
}


def corpus_problems(chat, files):
    samples, problems = D.load_samples(files)
    ok, summary, more = D.check_dataset(samples, chat, D.DataConfig(max_length=MAX_LENGTH))
    return ok, summary, problems + more


def by_line(problems, file: str) -> dict[int, list[str]]:
    out = {}
    for p in problems:
        name, line = p.where.rsplit(":", 1)
        if name == file:
            out.setdefault(int(line), []).append(str(p).split(": ", 1)[1])
    return out


def test_malformed_corpus(model_dir, monkeypatch):
    monkeypatch.chdir(FIXTURES)  # relative paths in, relative paths in every message
    chat = D.load_chat(model_dir("qwen3_vl"), D.DataConfig())
    assert len(EXPECTED) + len(EXPECTED_JSON) >= 15
    ok, _, problems = corpus_problems(chat, ["bad.jsonl", "bad.json"])
    samples, _ = D.load_samples(["bad.jsonl"])  # forked checkers find the same
    assert D.check_dataset(samples, chat, D.DataConfig(max_length=MAX_LENGTH), num_workers=2)[2] == \
        D.check_dataset(samples, chat, D.DataConfig(max_length=MAX_LENGTH))[2]
    assert by_line(problems, "bad.jsonl") == EXPECTED
    assert by_line(problems, "bad.json") == EXPECTED_JSON
    assert [s.where for s in ok] == ["bad.json:2"]  # the one good sample before the damage
    ok, summary, problems = corpus_problems(chat, ["good.jsonl", "good.json"])
    assert not problems and len(ok) == 6
    assert summary.splitlines()[0] == "valid samples: 6 (4 with 5 images, 2 text-only)"


def test_linter_cli(model_dir, monkeypatch, capsys):
    monkeypatch.chdir(FIXTURES)
    d = str(model_dir("qwen3_vl"))
    assert D.main(["good.jsonl", "good.json", "--model", d]) == 0
    assert D.main(["good.jsonl", "bad.jsonl", "bad.json", "--model", d, "--max-length", str(MAX_LENGTH)]) == 1
    out = capsys.readouterr().out.splitlines()
    for file, expected in (("bad.jsonl", EXPECTED), ("bad.json", EXPECTED_JSON)):
        for line, messages in expected.items():
            for m in messages:
                assert f"{file}:{line}: {m}" in out
    assert "30 problem(s) in 30 sample(s): " in "\n".join(out)


def test_formats_and_paths(tmp_path):
    """The same conversation as a LLaVA .json array and as ms-swift .jsonl gives the same sample."""
    (tmp_path / "a.json").write_text('[\n {"image": "x.png", "conversations": [\n  {"from": "system", "value": "S"},'
                                     '\n  {"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]}\n]\n')
    (tmp_path / "b.jsonl").write_text('\n{"images": ["x.png"], "messages": [{"role": "system", "content": "S"}, '
                                      '{"role": "user", "content": "<image>Q"}, '
                                      '{"role": "assistant", "content": "A"}]}\n')
    (a,), _ = D.load_samples([tmp_path / "a.json"])
    (b,), _ = D.load_samples([tmp_path / "b.jsonl"], data_root="/data")
    assert (a.where, b.where) == (f"{tmp_path}/a.json:2", f"{tmp_path}/b.jsonl:2")
    assert a.messages == b.messages == (("system", "S"), ("user", "<image>Q"), ("assistant", "A"))
    assert (a.images, b.images) == ((tmp_path / "x.png",), (Path("/data/x.png"),))


def test_no_qwen_token_ids_in_the_code():
    assert not re.search(r"1516[4-6]\d", (Path(D.__file__)).read_text())


# ---- packing and the loader ----


def realistic_lengths(n: int, seed: int = 0) -> list[int]:
    """Token counts like a LLaVA-style SFT mix: short captions and VQA with one image (a few hundred image
    tokens), long multi-image/multi-turn samples, text-only chat (log-normal)."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, n, p=[0.6, 0.15, 0.25])
    one = rng.integers(64, 1280, n) + rng.integers(20, 300, n)
    many = rng.integers(2, 5, n) * rng.integers(64, 800, n) + rng.integers(100, 1500, n)
    text = np.clip(rng.lognormal(5.5, 0.9, n), 20, 4096)
    return np.minimum(np.select([kind == 0, kind == 1], [one, many], text), 4096).astype(int).tolist()


def test_plan_shards_packs_and_is_deterministic():
    lengths = realistic_lengths(3000)
    cfg = D.DataConfig(max_length=4096, batch_size=2, pack_window=512)
    plans = [D.plan(lengths, cfg, seed=1, epoch=0, rank=r, world_size=3) for r in range(3)]
    seen = [i for batches, _ in plans for batch in batches for row in batch for i in row]
    assert len(seen) == len(set(seen)) and len(seen) + sum(d for _, d in plans) == len(lengths)  # disjoint, all
    assert len({len(batches) for batches, _ in plans}) == 1  # every rank takes the same number of steps
    assert all(sum(lengths[i] for i in row) <= 4096 for batches, _ in plans for batch in batches for row in batch)
    assert D.plan(lengths, cfg, 1, 0, 2, 3) == plans[2] and D.plan(lengths, cfg, 1, 1, 2, 3) != plans[2]
    packed = D.efficiency(plans[0][0], lengths, cfg)
    padded_cfg = D.DataConfig(max_length=4096, batch_size=8, pack=False)
    padded = D.efficiency(D.plan(lengths, padded_cfg, 1, 0)[0], lengths, padded_cfg)
    rows, room = 0, 0  # plain concatenation: a new row whenever the next sample does not fit
    for n in lengths:
        rows, room = (rows + 1, 4096 - n) if n > room else (rows, room - n)
    concat = sum(lengths) / (4096 * rows)
    assert packed > 0.97 and packed > concat + 0.05 and packed > padded


def batches_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loader_resumes_and_workers_agree(model_dir, images):
    chat = D.load_chat(model_dir("qwen3_vl"), D.DataConfig())
    cfg = D.DataConfig(max_length=128, batch_size=2, pack_window=8)
    raw = [sample(m, images[:n]) for m, n in SAMPLES.values()] * 5
    samples, _, problems = D.check_dataset([D.Sample(f"s:{k}", s.messages, s.images) for k, s in enumerate(raw)],
                                           chat, cfg)
    assert not problems and len(samples) == 20
    loader = D.Loader(samples, chat, cfg, seed=3)
    full, offsets = [], []
    for batch in loader.batches(epoch=0):
        full.append(batch)
        offsets.append(loader.offset)
    assert offsets[-1] == 20 and len(full) >= 3
    assert all(b["input_ids"].shape[1] == 128 for b in full)  # packed rows are static
    resumed = list(loader.batches(epoch=0, start=offsets[1]))
    assert len(resumed) == len(full) - 2 and all(map(batches_equal, resumed, full[2:]))
    with pytest.raises(ValueError, match="not a batch boundary"):
        next(loader.batches(epoch=0, start=offsets[0] + 1))
    workers = D.Loader(samples, chat, cfg, seed=3, num_workers=2)
    assert all(map(batches_equal, workers.batches(epoch=0), full))
    assert not all(map(batches_equal, loader.batches(epoch=1), full))
    # each batch's images are its own: pixel rows match the image tokens in it
    for b in full:
        grids = b.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long))
        assert int((b["input_ids"] == chat.image_token_id).sum()) == sum(pixels.num_image_tokens(grids, 2))
        assert b.get("pixel_values", torch.zeros(0)).shape[0] == int(grids.prod(-1).sum())


@pytest.mark.parametrize("name, content, where, message", [
    ("dup.jsonl", '{"conversations": [], "conversations": [{"from": "human", "value": "hi"}]}\n', ":1",
     "bad JSON: duplicate key 'conversations'"),
    ("trailing.json", '[\n{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},\n]',
     ":3", "bad JSON: a trailing comma before ']' is not JSON"),
    ("nan.jsonl", '{"messages": [], "id": NaN}\n', ":1", "bad JSON: NaN is not JSON"),
    ("latin1.jsonl", b'{"id": 1}\n{"id": "caf\xe9"}\n', ":2", "not UTF-8: byte 0xe9 at offset 21"),
    ("data.csv", "a,b\n", ":0", "unknown file type"),
    ("empty.jsonl", "", ":0", "empty dataset: the file holds no samples"),
    ("empty.json", "[]", ":0", "empty dataset"),
])
def test_strict_dataset_files(tmp_path, name, content, where, message):
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    _, problems = D.load_samples([f])
    assert any(str(p).startswith(f"{f}{where}: ") and message in str(p) for p in problems), problems


def test_missing_dataset_file_is_a_problem(tmp_path):
    _, problems = D.load_samples([tmp_path / "nope.jsonl"])
    assert [str(p) for p in problems] == [f"{tmp_path / 'nope.jsonl'}:0: missing file: no such dataset file"]


def test_repeated_problems_are_counted_not_repeated(tmp_path):
    line = {"category": "x", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    f = tmp_path / "many.jsonl"
    f.write_text("".join(json.dumps(line) + "\n" for _ in range(511)))
    _, problems = D.load_samples([f])
    text = D.describe_problems(problems)
    assert text.startswith("511 problem(s) in 511 sample(s): 511 unknown field")
    assert text.count("unknown field: 'category'") == 4  # three shown, then the count
    assert text.endswith("... and 508 more like this: unknown field: 'category'")


def test_image_check_is_cached_beside_the_data_and_redone_for_a_changed_file(model_dir, tmp_path, monkeypatch):
    chat = D.load_chat(model_dir("qwen3_vl"), D.DataConfig())
    for i in range(3):
        Image.new("RGB", (40 + 8 * i, 32), (10 * i, 0, 0)).save(tmp_path / f"{i}.png")
    lines = [{"messages": [{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "x"}],
              "images": [f"{i}.png"]} for i in range(3)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    samples, _ = D.load_samples([tmp_path / "d.jsonl"])
    first, _, problems = D.check_dataset(samples, chat, D.DataConfig())
    cache = json.loads((tmp_path / "d.jsonl.images.json").read_text())
    assert not problems and len(cache) == 3 and all(v[2:4] == [32, 40 + 8 * i] for i, v in enumerate(cache.values()))
    decoded = []
    load = D.pixels.load_image
    monkeypatch.setattr(D.pixels, "load_image", lambda p: decoded.append(p) or load(p))
    again, _, _ = D.check_dataset(samples, chat, D.DataConfig())
    assert decoded == [] and [s.tokens for s in again] == [s.tokens for s in first]  # nothing decoded again
    Image.new("RGB", (96, 64)).save(tmp_path / "1.png")  # a changed file: its size and mtime differ
    D.check_dataset(samples, chat, D.DataConfig())
    cache = json.loads((tmp_path / "d.jsonl.images.json").read_text())
    assert decoded == [tmp_path / "1.png"] and cache[str(tmp_path / "1.png")][2:4] == [64, 96]
    (tmp_path / "2.png").write_bytes(b"broken now")
    _, _, problems = D.check_dataset(samples, chat, D.DataConfig())
    assert [p.kind for p in problems] == ["undecodable image"] and problems[0].where.endswith("d.jsonl:3")
