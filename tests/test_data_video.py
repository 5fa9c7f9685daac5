"""data.py with videos: a sample with a video (a file, a folder of frames, a list of frames) renders to the ids
transformers' processors write (their real text expansion and second_per_grid_ts, fed our preprocessed frames,
as the video processors need torchvision), with the 3-D positions of their get_rope_index; the linter names every
broken video by file:line and counts video tokens; packed video samples score as unpacked ones."""
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.video_utils import VideoMetadata

import data as D
import pixels
import weights
from test_data import FAMILIES, loss_sum, model_dir  # noqa: F401 (a fixture)

FPS, SECONDS = 10, 2.2  # the test clip: 22 frames at 10 fps


def write_clip(path: Path, frames: np.ndarray, fps: int = FPS, **options) -> Path:
    """An H.264 .mp4 of (T, H, W, 3) uint8 frames (yuv420p: H and W even), with PyAV."""
    with av.open(str(path), "w", options=options) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return path


def moving_square(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A square moving right over a coloured background: frames that differ, in order."""
    x = np.zeros((n, h, w, 3), np.uint8)
    x[..., 0], x[..., 2] = np.random.default_rng(seed).integers(0, 80), 60
    for t in range(n):
        x[t, h // 4 : h // 4 + 12, 2 * t : 2 * t + 12] = (250, 220, 30)
    return x


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("media")
    clip = write_clip(out / "clip.mp4", moving_square(int(FPS * SECONDS), 48, 64))
    (frames := out / "frames").mkdir()
    for t, f in enumerate(moving_square(5, 40, 56, seed=1)):
        Image.fromarray(f).save(frames / f"{t:03d}.png")
    img = Image.new("RGB", (60, 44), (30, 200, 90))
    img.save(out / "img.png")
    return dict(clip=clip, frames=frames, image=out / "img.png", dir=out)


class StubVideoProcessor:
    """The processor's video_processor: our frames and pixels (pixels.load_video + preprocess_video) with the
    metadata transformers' own would return; everything the processor does with them is its own code."""

    def __init__(self, cfg: pixels.VideoConfig, sources):
        self.cfg, self.sources = cfg, sources
        self.merge_size, self.temporal_patch_size = cfg.merge_size, cfg.temporal_patch_size

    def __call__(self, videos=None, **kwargs):
        pv, grids, metadata = [], [], []
        for source in self.sources:
            v = pixels.load_video(source, self.cfg)
            p, g = pixels.preprocess_video(v.frames, self.cfg)
            pv.append(p), grids.append(g)
            metadata.append(VideoMetadata(total_num_frames=v.total_frames, fps=v.fps, frames_indices=v.indices))
        return BatchFeature(dict(pixel_values_videos=torch.cat(pv), video_grid_thw=torch.cat(grids),
                                 video_metadata=metadata))


def oracle(family, d: Path, messages, images, videos, cfg: pixels.VideoConfig):
    """input_ids, second_per_grid_ts and the 3-D positions from transformers: apply_chat_template, the
    processor's call (its text expansion of every video) and the model's get_rope_index."""
    _, model_cls, processor_cls, template, _ = FAMILIES[family]
    stub = StubVideoProcessor(cfg, videos)
    cls = type(processor_cls.__name__, (processor_cls,), dict(
        get_attributes=classmethod(lambda cls: ["image_processor", "tokenizer"]),
        check_argument_for_proper_class=lambda self, name, arg: None))
    proc = cls(image_processor=AutoImageProcessor.from_pretrained(d), tokenizer=AutoTokenizer.from_pretrained(d),
               chat_template=template)
    proc.video_processor = stub
    chat = []
    for role, text in messages:
        if role != "user":
            chat.append(dict(role=role, content=text))
            continue
        items = []
        for piece in text.replace("<video>", "\0video\0").replace("<image>", "\0image\0").split("\0"):
            items += [dict(type=piece)] if piece in ("image", "video") else [dict(type="text", text=piece)] if piece else []
        chat.append(dict(role=role, content=items))
    text = proc.apply_chat_template(chat, tokenize=False)
    frames = [pixels.load_video(v, cfg).frames for v in videos]  # what the stub is handed (it reads `videos` itself)
    out = proc(text=[text], images=[Image.open(p) for p in images] or None, videos=frames or None, return_tensors="pt")
    hf = model_cls._from_config(transformers.AutoConfig.from_pretrained(d))
    rope_kw = dict(second_per_grid_ts=out["second_per_grid_ts"]) if "second_per_grid_ts" in out else {}
    mm = ((out["input_ids"] == hf.config.image_token_id).int() + 2 * (out["input_ids"] == hf.config.video_token_id).int())
    pos, _ = hf.model.get_rope_index(out["input_ids"], mm_token_type_ids=mm, image_grid_thw=out.get("image_grid_thw"),
                                     video_grid_thw=out["video_grid_thw"], **rope_kw)
    return out["input_ids"][0], out.get("second_per_grid_ts"), pos[:, 0], out["pixel_values_videos"]


MESSAGES = [("user", "<image>Look, then watch: <video>What moves?"), ("assistant", "A yellow square, to the right."),
            ("user", "<video>And here?"), ("assistant", "It moves right too.")]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_video_rendering_matches_processor(family, model_dir, media):
    d = model_dir(family)
    chat = D.load_chat(d, D.DataConfig())
    videos = [media["clip"], media["frames"]]
    s = D.Sample("test:1", tuple(MESSAGES), (media["image"],), tuple(videos))
    ours = D.encode(s, chat, 10_000)
    ids, seconds, pos, pvv = oracle(family, d, MESSAGES, [media["image"]], videos, chat.video)
    assert ours.input_ids.tolist() == ids.tolist()
    assert torch.equal(ours.position_ids, pos) and torch.equal(ours.pixel_values_videos, pvv)
    n_frames = ours.video_grid_thw[:, 0].tolist()
    assert n_frames == [2, 3]  # 4 of 22 frames sampled at 2 fps (a temporal patch is 2); 5 frames given, 1 repeated
    if family == "qwen2_5_vl":  # 4 of 22 frames at 10 fps: 1.1 s a temporal patch; the frames 1 s (2 at 2 fps)
        assert seconds.tolist() == pytest.approx([2 / (4 / 22 * FPS), 1.0])
    else:
        text = chat.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
        assert text.count(" seconds>") == 5 and "<0.0 seconds>" not in text  # a timestamp per frame pair
    # the linter counts the same length without decoding a frame
    checked, problems = D.check_sample(s, chat, 10_000)
    assert not problems and checked.tokens == len(ids)
    assert list(checked.video_tokens) == (ours.video_grid_thw.prod(-1) // 4).tolist()
    # negative controls: another frame rate writes other ids (Qwen3-VL's timestamps, Qwen2.5-VL's frame count);
    # frames in the wrong order are other pixels at the same ids
    other = D.encode(s, D.load_chat(d, D.DataConfig(fps=1.0)), 10_000)
    assert other.input_ids.tolist() != ids.tolist() or not torch.equal(other.position_ids, pos)
    reverse = D.Sample("test:1", tuple(MESSAGES), (media["image"],),
                       (media["clip"], tuple(sorted(media["frames"].iterdir(), reverse=True))))
    rev = D.encode(reverse, chat, 10_000)
    assert rev.input_ids.tolist() == ids.tolist() and not torch.equal(rev.pixel_values_videos, pvv)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_packed_video_loss_equals_unpacked(family, model_dir, media):
    d = model_dir(family)
    chat = D.load_chat(d, D.DataConfig())
    net = weights.from_pretrained(d, dtype=torch.float64)
    samples = [D.Sample("t:1", tuple(MESSAGES[:2]), (media["image"],), (media["clip"],)),
               D.Sample("t:2", (("user", "Hi."), ("assistant", "Hello.")), ()),
               D.Sample("t:3", tuple(MESSAGES[2:]), (), (media["frames"],))]
    ex = [D.encode(s, chat, 10_000) for s in samples]
    with torch.no_grad():
        one = sum(loss_sum(net, D.collate([[e]], chat.pad_id, chat.mrope)) for e in ex)
        packed = D.collate([ex], chat.pad_id, chat.mrope, sum(len(e.input_ids) for e in ex) + 3)
        assert packed["video_grid_thw"].shape == (2, 3)
        assert abs(loss_sum(net, packed) - one) < 1e-5
        flat = torch.arange(packed["input_ids"].shape[1]).expand(3, 1, -1)  # control: no video positions
        assert abs(loss_sum(net, dict(packed, position_ids=flat)) - one) > 1e-3


def test_linter_names_every_broken_video(model_dir, media, tmp_path):
    chat = D.load_chat(model_dir("qwen3_vl"), D.DataConfig())
    clip = media["clip"].read_bytes()
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    write_clip(tmp_path / "faststart.mp4", moving_square(30, 48, 64), movflags="faststart")  # the index first
    data = (tmp_path / "faststart.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "ok.mp4").write_bytes(clip)
    (tmp_path / "empty").mkdir()
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (40, 32)).save(tmp_path / "mixed" / "0.png")
    Image.new("RGB", (48, 32)).save(tmp_path / "mixed" / "1.png")

    def row(content, answer="It moves.", **media_fields):
        return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
                **media_fields}

    rows = [row("<video>What?", videos=["nope.mp4"]),                     # 1 missing
            row("<video>What?", video="junk.mp4"),                         # 2 not a video
            row("<video>What?", video="cut.mp4"),                          # 3 truncated
            row("<video>What?", video="empty"),                            # 4 a folder without frames
            row("<video>What?", video="mixed"),                            # 5 frames of two sizes
            row("<video><video>Both?", videos=["ok.mp4"]),                 # 6 count mismatch
            row("What?", answer="<video>", videos=["ok.mp4"]),             # 7 misplaced
            row("<video>What?", video=["mixed/0.png", 5]),                 # 8 bad field
            row("<video>What?", video="ok.mp4", videos=["ok.mp4"]),        # 9 both fields
            row("<video>" * 30 + "What?", videos=["ok.mp4"] * 30),         # 10 cut by max_length
            row("<video>What?", video=["mixed/0.png", "mixed/0.png"])]     # 11 fine: a list of frames
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, problems = D.load_samples([tmp_path / "v.jsonl"])
    ok, summary, more = D.check_dataset(samples, chat, D.DataConfig(max_length=512))
    got = {int(p.where.rsplit(":", 1)[1]): f"{p.kind}: {p.detail}" for p in problems + more}
    where = str(tmp_path)
    assert got.pop(1) == "missing video: " + where + "/nope.mp4"
    assert got.pop(2).startswith(f"undecodable video: cannot open video file {where}/junk.mp4")
    assert got.pop(3).startswith(f"undecodable video: {where}/cut.mp4: frame ")
    assert got.pop(4) == f"bad video: {where}/empty: no frame images"
    assert got.pop(5) == f"bad video: {where}/mixed: frames of 2 sizes"
    assert got.pop(6) == "video count mismatch: 2 <video> placeholder(s) but 1 video(s)"
    assert got.pop(7) == "misplaced <video>: in turn 1 (assistant); videos go in user turns"
    assert got.pop(8).startswith("bad field: `video` is a path or a list of frame paths")
    assert got.pop(9) == "conflicting fields: `video` and `videos`: use one"
    assert got.pop(10).startswith("video cut by max_length: ")
    assert got == {} and [s.where.rsplit(":", 1)[1] for s in ok] == ["11"]
    assert "1 with 1 videos" in summary and "video tokens: " in summary
    # a text-only LLM, and a VLM whose config has no video_token_id, refuse videos by name
    cfg = json.loads((model_dir("qwen3_vl") / "config.json").read_text())
    nov = tmp_path / "novideo"
    nov.mkdir()
    for f in model_dir("qwen3_vl").iterdir():
        if f.is_file():
            (nov / f.name).write_bytes(f.read_bytes())
    (nov / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "video_token_id"}))
    _, _, more = D.check_dataset(samples[-1:], D.load_chat(nov, D.DataConfig()), D.DataConfig())
    assert [str(p).split(": ", 1)[1] for p in more] == [
        "no video support: 1 video(s) but the model's config.json has no video_token_id"]


def test_video_check_is_cached(model_dir, media, tmp_path, monkeypatch):
    chat = D.load_chat(model_dir("qwen2_5_vl"), D.DataConfig())
    (tmp_path / "c.mp4").write_bytes(media["clip"].read_bytes())
    (tmp_path / "d.jsonl").write_text(json.dumps({"conversations": [
        {"from": "human", "value": "<video>What?"}, {"from": "gpt", "value": "A square."}], "video": "c.mp4"}) + "\n")
    samples, _ = D.load_samples([tmp_path / "d.jsonl"])
    first, _, problems = D.check_dataset(samples, chat, D.DataConfig())
    cache = json.loads((tmp_path / "d.jsonl.videos.json").read_text())
    assert not problems and list(cache.values())[0][2:] == [22, 10.0, 48, 64, ""]
    monkeypatch.setattr(D.pixels, "video_facts", lambda p: pytest.fail(f"decoded {p} again"))
    again, _, _ = D.check_dataset(samples, chat, D.DataConfig())
    assert [s.tokens for s in again] == [s.tokens for s in first]
