"""sample.py with videos, both families (Qwen2.5-VL: time in M-RoPE; Qwen3-VL: "<t seconds>" in the prompt): the
prompt build_prompt writes equals what transformers' processor writes (its replace_video_token, on a stub, as in
test_video.py); greedy tokens equal transformers' generate; cached decode equals recomputing; the static-cache
path equals the eager one; the command line (--video, --fps / --max-frames / --video-max-pixels, `/video` in the
chat) and its one-line errors. Tiny random models with the tiny tokenizer, clips written with PyAV. fp32, CPU."""
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer
from transformers.video_utils import VideoMetadata

import pixels
import sample as S
import test_vlm as V
import tiny_tokenizer as T
import weights
from test_video import processor_stub

ROOT = Path(__file__).resolve().parents[1]
N = 8  # new tokens per comparison
TEMPLATES = {"qwen2_5_vl": T.QWEN25_VL, "qwen3_vl": T.QWEN3_VL}
VISION_IDS = dict(image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                  vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")


def write_clip(path: Path, n: int = 12, fps: int = 4, h: int = 48, w: int = 64, seed: int = 0) -> Path:
    """An H.264 mp4 of n random frames (PyAV, libx264), its index first (faststart: a cut file still opens)."""
    frames = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return path


def write_frames(folder: Path, n: int = 5, h: int = 40, w: int = 56, seed: int = 1) -> Path:
    """A folder of n PNG frames (an odd count: the last one is repeated to a whole frame pair)."""
    folder.mkdir()
    for i, f in enumerate(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)):
        Image.fromarray(f).save(folder / f"frame_{i:03d}.png")
    return folder


def make_vl_dir(out: Path, family: str, seed: int = 1, video_token: bool = True):
    """A tiny random model dir of the family as convert.py writes one: weights, tokenizer with Qwen's chat template,
    image and video settings small enough for a few tokens per frame pair. Untied (test_sample's reason)."""
    make_cfg, cls = V.FAMILIES[family]
    T.make_tokenizer(out, TEMPLATES[family])
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    cfg, eos = make_cfg(out), tok.token_to_id("<|im_end|>")
    for key, token in VISION_IDS.items():
        setattr(cfg, key, tok.token_to_id(token))
    text = cfg.get_text_config()
    text.vocab_size, cfg.eos_token_id, text.eos_token_id = tok.get_vocab_size(), eos, eos
    cfg.tie_word_embeddings = text.tie_word_embeddings = False
    if family == "qwen2_5_vl":
        cfg.vision_config.tokens_per_second = 2  # the released checkpoints' value
    torch.manual_seed(0)
    hf = V.randomize(cls(cfg), seed=seed).eval()
    hf.save_pretrained(out)
    if not video_token:  # a VL model dir whose config.json names no video token
        c = json.loads((out / "config.json").read_text())
        c.pop("video_token_id")
        (out / "config.json").write_text(json.dumps(c))
    p = cfg.vision_config.patch_size
    f = (2 * p) ** 2
    mean, std = (pixels.CLIP_MEAN, pixels.CLIP_STD) if p == 14 else ((0.5,) * 3, (0.5,) * 3)
    pixels.save_image_config(pixels.ImageConfig(patch_size=p, min_pixels=4 * f, max_pixels=8 * f, image_mean=mean,
                                                image_std=std), out)
    video = pixels.video_config_from_dir(out / "none", patch_size=p)  # the family's class defaults
    pixels.save_video_config(dataclasses.replace(video, min_pixels=4 * f, max_pixels=(8 if p == 14 else 24) * f), out)
    return hf


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(d / "x.png")
    return dict(clip=write_clip(d / "clip.mp4"), frames=write_frames(d / "frames"), image=d / "x.png", dir=d)


@pytest.fixture(scope="module", params=list(V.FAMILIES))
def vl(request, tmp_path_factory):
    """(family, hf model, its dir, (ours, tokenizer, image_cfg, video_cfg) as sample.main loads them)."""
    out = tmp_path_factory.mktemp(request.param)
    hf = make_vl_dir(out, request.param, seed=2)
    model, tok, image_cfg = weights.load(out, "cpu", torch.float32)
    return request.param, hf, out, (model, tok, image_cfg, weights.video_config(out, model.cfg))


def prompt(vl, text: str, media: list, system: bool = True):
    """(messages, ids, vision) for one user turn, as sample.main builds it."""
    family, _, out, (_, tok, image_cfg, video_cfg) = vl
    default = weights.template_defaults(TEMPLATES[family])[0]
    messages = [dict(role="system", content=default)] * (system and bool(default)) + [S.user_message(text, media)]
    images, videos = ([m for m in media if isinstance(m, pixels.Video) == v] for v in (False, True))
    return (messages, *S.build_prompt(tok, messages, images, image_cfg, videos, video_cfg))


def processor_ids(family: str, out: Path, messages, vision, videos) -> list[int]:
    """What transformers makes of the conversation: the chat template (through its tokenizer), the pads replaced
    by the family's processor (replace_image_token / replace_video_token, on a stub), its tokenizer again."""
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    proc = processor_stub(family)
    images = [proc.replace_image_token(vision, i) for i in range(len(vision.get("image_grid_thw", [])))]
    meta = [VideoMetadata(total_num_frames=v.total_frames, fps=v.fps, frames_indices=v.indices) for v in videos]
    clips = [proc.replace_video_token(dict(vision, video_metadata=meta), i) for i in range(len(videos))]
    text = proc.get_text_with_replacements([text], images_replacements=images, videos_replacements=clips)[0][0]
    return hf_tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_with_a_video_equals_the_processors(vl, media):
    """An image, a video file and a folder of frames in one turn (images first, as Qwen's examples put them): the
    ids are transformers'; Qwen2.5-VL's second_per_grid_ts is its processor's 2 / sampled fps. Negative control:
    the other family's processor writes other ids for the same grids."""
    family, _, out, (model, tok, image_cfg, video_cfg) = vl
    items = [pixels.load_video(media["clip"], video_cfg), pixels.load_image(media["image"]),
             pixels.load_video(media["frames"], video_cfg)]
    messages, ids, vision = prompt(vl, "What happens?", items)
    assert [i["type"] for i in messages[-1]["content"]] == ["image", "video", "video", "text"]
    videos = [items[0], items[2]]
    assert ids == processor_ids(family, out, messages, vision, videos)
    assert ids.count(model.cfg.video_token_id) == int(vision["video_grid_thw"].prod(-1).sum()) // 4
    sizes = [(len(v.frames), *v.frames.shape[1:3]) for v in videos]
    assert ids.count(model.cfg.video_token_id) == sum(sum(pixels.video_blocks(*s, video_cfg)) for s in sizes)
    if family == "qwen2_5_vl":
        meta = [VideoMetadata(total_num_frames=v.total_frames, fps=v.fps, frames_indices=v.indices) for v in videos]
        assert vision["second_per_grid_ts"].tolist() == pytest.approx([2 / m.sampled_fps for m in meta])
        assert "seconds>" not in tok.decode(ids, skip_special_tokens=False)
    else:
        assert "second_per_grid_ts" not in vision
        frame_pairs = int(vision["video_grid_thw"][:, 0].sum())
        assert tok.decode(ids, skip_special_tokens=False).count(" seconds>") == frame_pairs
    other = "qwen3_vl" if family == "qwen2_5_vl" else "qwen2_5_vl"
    assert ids != processor_ids(other, out, messages, vision, videos)


def test_prompt_counts_and_model_without_video_are_errors(vl, media):
    family, _, out, (model, tok, image_cfg, video_cfg) = vl
    clip = pixels.load_video(media["clip"], video_cfg)
    message = S.user_message("Hi", [clip])
    with pytest.raises(ValueError, match="the messages have 1 video items but 0 videos were given"):
        S.build_prompt(tok, [message], video_cfg=video_cfg)
    with pytest.raises(ValueError, match="cannot take videos"):
        S.build_prompt(tok, [message], videos=[clip])


def hf_generate(family, hf, ids, vision, n=N) -> list[int]:
    kw = {k: v for k, v in vision.items() if family == "qwen2_5_vl" or k != "second_per_grid_ts"}
    mm = (ids == hf.config.image_token_id).int() + 2 * (ids == hf.config.video_token_id).int()
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm, max_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_with_a_video_equals_transformers_and_recomputing(vl, media, monkeypatch):
    """One prompt with a video: our greedy tokens are transformers'; a left-padded batch (the frames folder, and
    an image + the clip) decodes each row as alone; cached decode == a full recompute; the static-cache path
    (compile=True, its step left eager: inductor is test_decode's) == eager. Negative control: the same prompt
    with the clip's frames in reverse answers otherwise."""
    family, hf, out, (model, tok, image_cfg, video_cfg) = vl
    clip = pixels.load_video(media["clip"], video_cfg)
    _, ids, vision = prompt(vl, "What happens?", [clip])
    ids = torch.tensor([ids])
    got = S.generate(model, ids, None, **vision, max_new_tokens=N)
    assert got == [hf_generate(family, hf, ids, vision)] and len(set(got[0])) > 2
    reverse = dataclasses.replace(clip, frames=clip.frames[::-1].copy())
    assert S.generate(model, ids, None, **prompt(vl, "What happens?", [reverse])[2], max_new_tokens=N) != got

    rows = [prompt(vl, "Describe.", [pixels.load_video(media["frames"], video_cfg)])[1:],
            prompt(vl, "Compare.", [pixels.load_image(media["image"]), clip])[1:]]
    ids, mask = S.pad_left([r for r, _ in rows], pad_id=0)
    vision = {k: torch.cat([v[k] for _, v in rows if k in v]) for k in dict.fromkeys(k for _, v in rows for k in v)}
    batch = S.generate(model, ids, mask, **vision, max_new_tokens=N)
    assert (mask[:, 0] == 0).any()
    for row, (r, v) in enumerate(rows):
        assert [batch[row]] == S.generate(model, torch.tensor([r]), None, **v, max_new_tokens=N)
    toks = torch.tensor(batch)
    with torch.no_grad():
        logits = model(torch.cat([ids, toks], 1), attention_mask=torch.cat([mask, torch.ones_like(toks)], 1), **vision)
    assert torch.equal(logits[:, ids.shape[1] - 1 : -1].argmax(-1), toks)
    monkeypatch.setattr(S, "compiled_decode_step", lambda cuda: S.decode_step)
    assert S.generate(model, ids, mask, **vision, max_new_tokens=N, compile=True) == batch


def test_video_settings_and_their_overrides(vl, media):
    family, _, out, (model, _, _, video_cfg) = vl
    assert video_cfg == pixels.video_config_from_dir(out)  # 0: the dir's own settings
    small = weights.video_config(out, model.cfg, fps=1.0, max_frames=4, max_pixels=video_cfg.min_pixels // 2)
    low = video_cfg.min_pixels // 2
    assert (small.fps, small.max_frames, small.max_pixels, small.min_pixels) == (1.0, 4, low, low)
    few = pixels.load_video(media["clip"], small)
    assert len(few.frames) == 4 and few.frames.shape[1:] == (48, 64, 3)  # 3 s at 1 fps, at least min_frames
    assert pixels.preprocess_video(few.frames, small)[1].prod() < pixels.preprocess_video(
        pixels.load_video(media["clip"], video_cfg).frames, video_cfg)[1].prod()


# ----------------------------------------------------------------------------------------------------------------
# the command line


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_video")
    make_vl_dir(out, "qwen2_5_vl", seed=4)
    return out


def expected_answer(model_dir, text: str, paths: list[tuple[str, Path]], n: int) -> str:
    """What the CLI should print, computed in-process through the library."""
    model, tok, image_cfg = weights.load(model_dir, "cpu", torch.float32)
    cfgs = image_cfg, weights.video_config(model_dir, model.cfg)
    media = [S.attach(kind, p, *cfgs) for kind, p in paths]
    system = weights.template_defaults(weights.read_chat_template(model_dir))[0]
    messages = [dict(role="system", content=system), S.user_message(text, media)]
    images, videos = ([m for m in media if isinstance(m, pixels.Video) == v] for v in (False, True))
    ids, vision = S.build_prompt(tok, messages, images, cfgs[0], videos, cfgs[1])
    out = S.generate(model, torch.tensor([ids]), None, **vision, max_new_tokens=n,
                     stop_ids=weights.stop_token_ids(model_dir))
    return tok.decode(out[0])


def test_cli_answers_about_a_video(cli_dir, media):
    """`python sample.py --video clip.mp4 --video frames/ --prompt ...`, end to end in a process of its own."""
    p = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(cli_dir), "--video", str(media["clip"]),
                        "--video", str(media["frames"]), "--prompt", "What happens?", "--max-new-tokens", str(N),
                        "--dtype", "float32"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    want = expected_answer(cli_dir, "What happens?", [("video", media["clip"]), ("video", media["frames"])], N)
    assert want and p.stdout == want + "\n"
    assert want != expected_answer(cli_dir, "What happens?", [("video", media["frames"])], N)  # the clip matters


def error_of(argv) -> str:
    with pytest.raises(SystemExit) as e:
        S.main([str(a) for a in argv] + ["--prompt", "What happens?", "--dtype", "float32"])
    return str(e.value.code)


def test_cli_video_errors_are_one_line_and_name_the_file(cli_dir, media, tmp_path):
    missing = tmp_path / "nope.mp4"
    assert error_of(["--model", cli_dir, "--video", missing]) == f"error: video file not found: {missing}"
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all" * 50)
    bad = error_of(["--model", cli_dir, "--video", tmp_path / "bad.mp4"])
    assert bad.startswith(f"error: cannot open video file {tmp_path / 'bad.mp4'}") and "\n" not in bad
    data = media["clip"].read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 2 // 3])  # its header promises frames it lacks
    assert error_of(["--model", cli_dir, "--video", tmp_path / "cut.mp4"]) == \
        f"error: {tmp_path / 'cut.mp4'}: 12 frames in its header, fewer decode (the file is truncated?)"
    (tmp_path / "empty").mkdir()
    assert "a folder of frames with no" in error_of(["--model", cli_dir, "--video", tmp_path / "empty"])


def test_models_that_take_no_video_say_so(media, tmp_path):
    make_vl_dir(tmp_path / "vl", "qwen2_5_vl", video_token=False)
    assert error_of(["--model", tmp_path / "vl", "--video", media["clip"]]) == \
        "error: this model cannot take videos: its config.json has no video_token_id"
    T.make_tokenizer(tmp_path / "llm", T.QWEN3)
    llm = transformers.Qwen3Config(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=16, vocab_size=450)
    transformers.Qwen3ForCausalLM(llm).save_pretrained(tmp_path / "llm")
    assert error_of(["--model", tmp_path / "llm", "--video", media["clip"]]) == \
        "error: this model cannot take videos: a text-only LLM"


@pytest.mark.parametrize("argv, message", [(["--fps", "-1"], "--fps -1.0: must be 0 or more"),
                                           (["--max-frames", "-2"], "--max-frames -2: must be 0 or more"),
                                           (["--video-max-pixels", "-5"], "--video-max-pixels -5: must be 0 or more")])
def test_video_flags_are_checked_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        S.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_chat_video_command(cli_dir, media, monkeypatch, capsys):
    """`/video PATH` in the chat: decoded when typed (a bad path refused then, nothing else lost), attached to the
    next message, whose answer is the one-shot answer to the same turn."""
    turns = (f"/video {media['clip']}\n/video {media['dir'] / 'nope.mp4'}\n/video\nWhat happens?\n"
             f"/image {media['image']}\n/video {media['frames']}\nAnd now?\n/quit\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO(turns))
    S.main(["--model", str(cli_dir), "--chat", "--max-new-tokens", str(N), "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert f"error: video file not found: {media['dir'] / 'nope.mp4'}" in err and "error: no video path given" in err
    assert "`/image PATH`, `/video PATH` attach" in err and "Traceback" not in err
    assert "you (+1 video)> " in out and "you (+1 image, 1 video)> " in out and out.count("assistant> ") == 2
    first = out.split("assistant> ")[1].split("\nyou> ")[0]  # the answer, up to the next prompt
    assert first == expected_answer(cli_dir, "What happens?", [("video", media["clip"])], N)
