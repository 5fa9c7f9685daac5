"""eval.py with videos: jsonl rows carrying `video` / `videos` (LLaVA / ms-swift) with or without <video> marks,
paths under the data root; the settings flags; VLMEvalKit's video TSVs refused by name; end to end on a tiny
random Qwen2.5-VL (batched == one at a time == sample.py's answer to the same prompt, references scored)."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import eval as E
import pixels
import sample as S
import weights
from test_sample_video import make_vl_dir, write_clip, write_frames


FRAMES = [f"frames/frame_{i:03d}.png" for i in (4, 2, 0)]  # a video given as its frames: these, in this order


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A data dir: a clip, a folder of frames, a picture, and a jsonl that names them relative to it."""
    d = tmp_path_factory.mktemp("videoqa")
    write_clip(d / "clip.mp4")
    write_frames(d / "frames")
    Image.new("RGB", (50, 30), (200, 10, 10)).save(d / "x.png")
    rows = [
        dict(id="v1", video="clip.mp4", conversations=[{"from": "human", "value": "<video>\nWhat moves?"},
                                                       {"from": "gpt", "value": "a square"}]),
        dict(id="v2", images=["x.png"], videos=["frames", FRAMES], category="compare", messages=[
            dict(role="user", content="Which video is red?\nA. the first\nB. the second"),
            dict(role="assistant", content="B")]),
        dict(id="t1", messages=[dict(role="user", content="Say hi."), dict(role="assistant", content="hi")]),
    ]
    (d / "videoqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_read_jsonl_videos(data):
    v1, v2, t1 = E.read_jsonl(data / "videoqa.jsonl")
    assert v1.videos == [data / "clip.mp4"] and v1.images == [] and v1.turns == [("user", "<video>\nWhat moves?")]
    assert v2.images == [data / "x.png"] and v2.videos == [data / "frames", [data / f for f in FRAMES]]
    assert v2.turns[0][1].startswith("<image><video><video>Which video")  # no marks: images, then videos, first
    assert v2.options == dict(A="the first", B="the second") and v2.refs == ["B"]
    assert t1.videos == [] and t1.turns == [("user", "Say hi.")]
    assert [i.get("type") for i in E.messages_of(v2.turns)[0]["content"]] == ["image", "video", "video", "text"]
    assert E.messages_of([("user", "a<video>b")])[0]["content"] == [
        dict(type="text", text="a"), dict(type="video"), dict(type="text", text="b")]
    assert E.read_jsonl(data / "videoqa.jsonl", root="/elsewhere")[0].videos == [Path("/elsewhere/clip.mp4")]


@pytest.mark.parametrize("row, match", [
    (dict(video="a.mp4", messages=[dict(role="user", content="<video><video>q"), dict(role="assistant", content="a")]),
     r"bad\.jsonl line 1: 2 <video> placeholders but 1 videos"),
    (dict(videos=[3], messages=[dict(role="user", content="q"), dict(role="assistant", content="a")]),
     r"line 1: video is a path or a list of frame paths, videos a list of them; got \[3\]"),
    (dict(video="", messages=[dict(role="user", content="q"), dict(role="assistant", content="a")]),
     r"line 1: video is a path or a list of frame paths"),
    (dict(videos=[[]], messages=[dict(role="user", content="q"), dict(role="assistant", content="a")]),
     r"line 1: video is a path or a list of frame paths"),
    (dict(images=["a.png", 7], messages=[dict(role="user", content="q"), dict(role="assistant", content="a")]),
     r"line 1: image / images must be a path or a list of paths"),
])
def test_bad_video_rows_name_the_line(tmp_path, row, match):
    (tmp_path / "bad.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=match):
        E.read_jsonl(tmp_path / "bad.jsonl")


def test_vlmevalkit_video_tsv_is_refused(tmp_path):
    """Video-MME's TSV (as VLMEvalKit writes it) has index, question, answer: read as text rows, its scores would
    be a blind model's. It is refused by name."""
    f = tmp_path / "Video-MME.tsv"
    f.write_text("index\tvideo\tvideo_path\tcandidates\tquestion\tanswer\n0\tabc\t./video/abc.mp4\t['A. x']\tq?\tA\n")
    with pytest.raises(ValueError, match=r"Video-MME\.tsv: a VLMEvalKit video TSV"):
        E.read_tsv(f)


def test_video_flags(capsys):
    cfg = E.parse_args(["--model", "m", "--data", "d.jsonl", "--fps", "1", "--max-frames", "4",
                        "--video-max-pixels", "1000"])
    assert (cfg.fps, cfg.max_frames, cfg.video_max_pixels) == (1.0, 4, 1000)
    with pytest.raises(SystemExit):
        E.parse_args(["--model", "m", "--data", "d.jsonl", "--max-frames", "-1"])
    assert "--max-frames -1: must be 0 or more" in capsys.readouterr().err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_vl_video")
    make_vl_dir(out, "qwen2_5_vl", seed=3)
    return out


def run(model_dir, out, files, *flags):
    return E.main(["--model", str(model_dir), "--data", *map(str, files), "--out", str(out), "--max-new-tokens", "6",
                   "--dtype", "float32", "--device", "cpu", *map(str, flags)])


def predictions(out: Path, stem: str) -> list[dict]:
    return [json.loads(x) for x in (out / f"{stem}.jsonl").read_text().splitlines()]


def sample_answer(model_dir, s: E.Sample, **video) -> str:
    """sample.py's answer to the row's prompt, through the library."""
    model, tok, image_cfg = weights.load(model_dir, "cpu", torch.float32)
    video_cfg = weights.video_config(model_dir, model.cfg, **video)
    system = weights.template_defaults(weights.read_chat_template(model_dir))[0]
    ids, vision = S.build_prompt(tok, E.messages_of(s.turns, system), [E.open_image(x) for x in s.images], image_cfg,
                                 [pixels.load_video(p, video_cfg) for p in s.videos], video_cfg)
    return tok.decode(S.generate(model, torch.tensor([ids]), None, **vision, max_new_tokens=6,
                                 stop_ids=weights.stop_token_ids(model_dir))[0])


def test_end_to_end_video_jsonl(model_dir, data, tmp_path):
    """Batched (a video row, an image + two videos, a text row in one left-padded batch) == one at a time; the
    video row's answer is sample.py's to the same prompt, and scores 1 against it as its reference; --max-frames
    reaches the frames."""
    samples = E.read_jsonl(data / "videoqa.jsonl")
    want = sample_answer(model_dir, samples[0])
    rows = [json.loads(x) for x in (data / "videoqa.jsonl").read_text().splitlines()]
    rows[0]["conversations"][1]["value"] = want  # its reference: the library's answer
    f = data / "scored.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    one, many = run(model_dir, tmp_path / "bs1", [f], "--batch-size", 1), run(model_dir, tmp_path / "bs3", [f])
    p1, p3 = predictions(tmp_path / "bs1", "scored"), predictions(tmp_path / "bs3", "scored")
    assert [p["prediction"] for p in p1] == [p["prediction"] for p in p3] and all(p["prediction"] for p in p1)
    assert p1[0]["prediction"] == want and p1[0]["exact_match"] == 1.0
    assert p1[2]["exact_match"] == float(p1[2]["prediction"].strip().lower() == "hi")
    assert p1[1]["acc"] == float(p1[1]["choice"] == "B") and p1[1]["refs"] == ["B"]
    got = many["results"][str(f)]
    assert got["n"] == 3 and one["config"]["max_frames"] == 0
    assert got["scores"]["exact_match"]["value"] == pytest.approx(100 * (1 + p1[2]["exact_match"]) / 2, abs=0.01)
    few = run(model_dir, tmp_path / "few", [f], "--max-frames", 4)
    got = predictions(tmp_path / "few", "scored")[0]["prediction"]
    assert got == sample_answer(model_dir, samples[0], max_frames=4) != want  # 4 frames, not 6
    assert few["config"]["max_frames"] == 4


def test_a_model_without_video_names_the_row(data, tmp_path):
    make_vl_dir(tmp_path / "m", "qwen2_5_vl", video_token=False)
    with pytest.raises(SystemExit, match=r"videoqa\.jsonl line 1: this model cannot take videos: its config\.json"):
        run(tmp_path / "m", tmp_path / "out", [data / "videoqa.jsonl"])
