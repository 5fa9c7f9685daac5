"""eval.py: reading VLMEvalKit TSV / jsonl rows, prompts, letter extraction, the scorers on hand-written cases,
errors that name the file and row, and an end-to-end run on a tiny random model (batched == one at a time)."""
import json
from pathlib import Path

import pytest

import eval as E
import pixels
import scores
import weights

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
OPTS = dict(A="cat", B="dog", C="bird", D="fish")


@pytest.mark.parametrize("text, want", [
    ("B", "B"), ("b", "B"), (" (C) ", "C"), ("(c)", "C"), ("D.", "D"), ("[d]", "D"), ("**B**", "B"),
    ("B. dog", "B"), ("(c) bird, because it has wings", "C"), ("C) bird", "C"),
    ("The answer is B.", "B"), ("the answer is (c)", "C"), ("Answer: d", "D"), ("The correct option is (A).", "A"),
    ("I would pick option d.", "D"), ("\\boxed{B}", "B"), ("答案是B", "B"),
    ("I think C is right.", "C"), ("B is the answer", "B"), ("A is right", "A"),
    ("A dog is shown, so the answer is B", "B"),  # "A" opening a sentence is an article
    ("A fish swims in the picture.", "D"),  # no letter: the one option text named
    ("the answer is a bird", "C"),  # a lower-case "a" is never a letter on its own
    ("Both A and B look right.", None), ("E", None), ("", None), ("I don't know.", None),
    ("a cat or a dog", None),  # two option texts
])
def test_extract_choice(text, want):
    assert scores.extract_choice(text, OPTS) == want  # our extractor (acc_extracted) keeps every old case


@pytest.mark.parametrize("pred, ref, want", [
    ("12", "12", True), ("12 kg", "12", True), ("$1,234", "1234", True), ("1,234.5", "1234.5", True),
    ("3.5 million", "3.5", True), ("45%", "45", True), ("45%", "0.45", True), ("0.45", "45%", True),
    ("104.9", "100", True), ("105.1", "100", False), ("95", "100", True), ("94.9", "100", False),
    ("0", "0", True), ("0.01", "0", False), ("-3", "3", False), ("Yes", "yes", True), ("1,23", "123", False),
    ("about 12", "12", False), ("12.", "12", True),
])
def test_relaxed_match(pred, ref, want):
    assert scores.relaxed_lenient(pred, ref) is want  # our lenient reading (relaxed_accuracy_lenient)


def test_normalise_and_exact_match():
    # exact match is VLMEvalKit's GQA / OCRVQA rule now: strip + lower, no VQA normalisation
    assert scores.score("  Two ", ["two", "2 cats"], {}, "generic")["exact_match"] == 1.0
    assert scores.score("2", ["Two"], {}, "generic")["exact_match"] == 0.0


def test_anls_and_vqa_accuracy_and_contains():
    assert scores.anls("Hello  World", ["hello world"]) == 1.0
    assert scores.anls("hello wrld", ["hello world"]) == pytest.approx(1 - 1 / 11)
    assert scores.anls("abc", ["xyz"]) == 0.0 and scores.anls("abcd", ["abxy"]) == 0.5  # distance 0.5 still counts
    assert scores.vqa_score("2", ["2"] * 10, "textvqa-official") == 1.0
    assert scores.vqa_score("two", ["2"] * 3 + ["3"] * 7, "textvqa-official") == pytest.approx(0.9)  # 3 of 10
    assert scores.vqa_score("2", ["2"] * 2 + ["x"] * 8, "textvqa-official") == pytest.approx(0.6)
    assert scores.vqa_score("2", ["2"], "textvqa-official") == 0.0  # leave-one-out over one reference: none left
    s = E.Sample("w", "0", [], [], ["John Smith", "J. Smith"])
    got = scores.score("It was signed by John Smith.", s.refs, s.options, "generic")
    assert got["contains"] == 1.0 and got["exact_match"] == 0.0 and got["anls"] == 0.0
    assert scores.score("john smith", s.refs, s.options, "generic")["anls"] == 1.0
    think = "<think>\nThe letter says John Smith.\n</think>\n\nJohn Smith"
    assert scores.score(think, s.refs, s.options, "generic")["exact_match"] == 1.0


def test_read_tsv_multiple_choice_prompts_and_images():
    samples = E.read_tsv(FIXTURES / "tiny_mcq.tsv")
    assert [s.index for s in samples] == ["0", "1", "2", "3"]
    s0, s1, s2, s3 = samples
    assert s0.turns == [("user", "<image>Question: What colour is the picture?\nOptions:\nA. red\nB. green\n"
                                 "C. blue\nAnswer with the option's letter from the given choices directly.")]
    assert s1.turns[0][1].startswith("<image>Hint: The picture has one colour.\nQuestion: Which colour")
    assert s1.options == dict(A="red", B="green", C="blue", D="yellow") and s1.refs == ["C"]
    assert s1.images == s0.images and len(s0.images[0]) > 64  # "0" in the image cell: row 0's image
    assert len(s2.images) == 2 and s2.turns[0][1].startswith("<image><image>Question: <image 1> <image 2> Which")
    assert [s.category for s in samples] == ["colour", "colour", "compare", ""]
    assert E.open_image(s2.images[1]).size == (28, 56)
    assert len(E.read_tsv(FIXTURES / "tiny_mcq.tsv", max_samples=2)) == 2


def test_rows_without_an_image_are_left_out_as_vlmevalkit_does(tmp_path, capsys):
    f = tmp_path / "s.tsv"
    f.write_text("index\tquestion\tanswer\timage\n1\tq\ta\t\n2\tq\tb\t" + "Q" * 80 + "\n")
    assert [s.index for s in E.read_tsv(f)] == ["2"]
    assert "1 rows without an image left out" in capsys.readouterr().err
    f.write_text("index\tquestion\tanswer\n1\tq\ta\n")  # no image column at all: a text benchmark
    assert [s.index for s in E.read_tsv(f)] == ["1"]


def test_read_tsv_short_answer_rows():
    q1, q2, q3 = E.read_tsv(FIXTURES / "tiny_vqa.tsv")
    assert q1.options == {} and q1.refs == ["12", "12", "twelve", "12", "12 km"]  # a list cell: every reference
    assert q2.refs == ["35%"] and q3.refs == ["John Smith"]
    assert q1.turns[0][1] == ("<image>What number is written on the sign?\n"
                              "Answer the question using a single word or phrase.")


def test_chinese_rows_ask_in_chinese():
    assert E.mcq_prompt("图中是什么？", dict(A="猫", B="狗")).endswith("\n请直接回答选项字母。")


def test_image_path_column_and_jsonl(tmp_path):
    tsv = tmp_path / "p.tsv"
    tsv.write_text("index\tquestion\tanswer\timage_path\n7\tWhat?\tcat\t['a.png', 'b.png']\n")
    (s,) = E.read_tsv(tsv)
    assert s.images == [tmp_path / "a.png", tmp_path / "b.png"]
    assert E.read_tsv(tsv, root="/data/imgs")[0].images == [Path("/data/imgs/a.png"), Path("/data/imgs/b.png")]
    lines = [
        dict(messages=[dict(role="system", content="Be brief."), dict(role="user", content="Q1 <image> then <image>"),
                       dict(role="assistant", content="red")], images=["x.png", "y.png"]),
        dict(id="v1", image="z.png", category="c", conversations=[
            dict(value="What is it?\nA. a cat\nB. a dog\nAnswer with the option's letter.", **{"from": "human"}),
            dict(value="(B)", **{"from": "gpt"})]),
    ]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    a, b = E.read_jsonl(f)
    assert a.turns == [("system", "Be brief."), ("user", "Q1 <image> then <image>")] and a.refs == ["red"]
    assert a.images == [tmp_path / "x.png", tmp_path / "y.png"] and a.options == {} and a.index == "1"
    assert b.turns == [("user", "<image>What is it?\nA. a cat\nB. a dog\nAnswer with the option's letter.")]
    assert b.options == dict(A="a cat", B="a dog") and b.refs == ["B"] and b.index == "v1" and b.category == "c"
    f.write_text(json.dumps(dict(messages=[dict(role="user", content="Which letter is on the sign?\nA. fake option"),
                                           dict(role="assistant", content="C")])) + "\n")
    (c,) = E.read_jsonl(f)  # a one-letter answer the prompt does not list as an option: a short answer
    assert c.options == {} and c.refs == ["C"] and scores.score("c", c.refs, c.options, "generic")["exact_match"] == 1.0


MCQ_HEAD = "index\tquestion\tA\tB\tanswer\timage\n"


@pytest.mark.parametrize("body, match", [
    ("index\tquestion\timage\n1\tq\tx\n", r"bad\.tsv: no answer column"),
    (MCQ_HEAD + "5\tq\tx\ty\tA\t" + "Q" * 80 + "\n7\tq\tx\ty\tC\t5\n",
     r"bad\.tsv row 2 \(index 7\): answer 'C' is not one of its options A, B"),
    (MCQ_HEAD + "5\tq\tx\ty\tA\t9\n", r"row 1 \(index 5\): image '9' names no row with an image"),
    (MCQ_HEAD + "5\tq\tx\ty\n", r"row 1 \(index 5\): 4 fields where the header has 6"),
    (MCQ_HEAD + "5\tq\tx\ty\tA\tz\textra\n", r"row 1 \(index 5\): 7 fields where the header has 6"),
    (MCQ_HEAD + "5\t\tx\ty\tA\tz\n", r"row 1 \(index 5\): empty question or answer"),
])
def test_bad_tsv_rows_name_file_and_row(tmp_path, body, match):
    (tmp_path / "bad.tsv").write_text(body)
    with pytest.raises(ValueError, match=match):
        E.read_tsv(tmp_path / "bad.tsv")


@pytest.mark.parametrize("line, match", [
    ('{"messages": [', r"bad\.jsonl line 2: "),
    ('{"text": "q"}', r"line 2: no 'messages' \(ms-swift\) or 'conversations' \(LLaVA\) list"),
    ('{"messages": [{"role": "user", "content": "q"}]}', r"line 2: the last turn must be the reference answer"),
    ('{"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     r"line 2: a turn is not"),
    ('{"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}]}',
     r"line 2: 1 <image> placeholders but 0 images"),
])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, match):
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    (tmp_path / "bad.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(ValueError, match=match):
        E.read_jsonl(tmp_path / "bad.jsonl")


def test_summary_counts_unparsed_answers_and_categories():
    samples = E.read_tsv(FIXTURES / "tiny_mcq.tsv")
    preds = ["A", "I cannot tell.", "the second", "B"]
    sc = [scores.score(p, s.refs, s.options, "generic", s.category) for p, s in zip(preds, samples)]
    assert [x["choice"] for x in sc] == ["A", None, "B", "B"]
    got = scores.summarise([dict(index=s.index, category=s.category, **x) for s, x in zip(samples, sc)], "generic")
    assert got["n"] == 4 and got["scores"]["acc"] == dict(value=50.0, protocol="vlmevalkit-rules")
    assert got["unreadable"] == 1 and got["unreadable_extracted"] == 1
    assert {c: (v["n"], v["scores"]["acc"]["value"]) for c, v in got["per_category"].items()} == {
        "colour": (2, 50.0), "compare": (1, 100.0)}


# ---- end to end: a tiny random Qwen2.5-VL (its template has a default system prompt) and the fixture files ----


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch
    import transformers
    from tokenizers import Tokenizer

    import tiny_tokenizer as T
    from conftest import randomize

    out = tmp_path_factory.mktemp("tiny_vl")
    T.make_tokenizer(out, T.QWEN25_VL)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=tok.get_vocab_size(), rms_norm_eps=1e-6,
                         bos_token_id=None, eos_token_id=eos, pad_token_id=None,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                           patch_size=14, window_size=56, fullatt_block_indexes=[1]),
        image_token_id=tok.token_to_id("<|image_pad|>"), video_token_id=tok.token_to_id("<|video_pad|>"),
        vision_start_token_id=tok.token_to_id("<|vision_start|>"),
        vision_end_token_id=tok.token_to_id("<|vision_end|>"),
        eos_token_id=eos)
    torch.manual_seed(0)
    randomize(transformers.Qwen2_5_VLForConditionalGeneration(cfg), seed=3).save_pretrained(out)
    pixels.save_image_config(pixels.ImageConfig(patch_size=14, min_pixels=4 * 28**2, max_pixels=8 * 28**2,
                                            image_mean=pixels.CLIP_MEAN, image_std=pixels.CLIP_STD), out)
    return out


def hf_items(text):
    """A turn's text with <image> marks as transformers' chat templates take it: content items."""
    items = []
    for k, piece in enumerate(text.split("<image>")):
        items += ([dict(type="image")] if k else []) + ([dict(type="text", text=piece)] if piece else [])
    return items


@pytest.mark.parametrize("source", ["tsv", "jsonl"])
def test_prompt_ids_are_what_transformers_makes_of_the_row(model_dir, tmp_path, source):
    """The ids eval.py feeds the model == transformers' processor on Qwen's chat template (default system prompt,
    images first for a TSV row; a jsonl's own system turn and interleaved images)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor

    import sample
    import tiny_tokenizer as T

    if source == "tsv":
        s = E.read_tsv(FIXTURES / "tiny_mcq.tsv")[2]
    else:
        for name, size in (("a.png", (60, 40)), ("b.png", (30, 70))):
            E.open_image(E.read_tsv(FIXTURES / "tiny_mcq.tsv")[0].images[0]).resize(size).save(tmp_path / name)
        f = tmp_path / "c.jsonl"
        f.write_text(json.dumps(dict(images=["a.png", "b.png"], messages=[
            dict(role="system", content="Be brief."), dict(role="user", content="First <image> then <image> last?"),
            dict(role="assistant", content="red")])) + "\n")
        (s,) = E.read_jsonl(f)
    images = [E.open_image(x) for x in s.images]
    system = weights.template_defaults(weights.read_chat_template(model_dir))[0]
    image_cfg = pixels.image_config_from_dir(model_dir, patch_size=14)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids, vision = sample.build_prompt(tok, E.messages_of(s.turns, system), images, image_cfg)
    pv, grid = vision["pixel_values"], vision["image_grid_thw"]

    images_only = type("P", (Qwen2_5_VLProcessor,), dict(get_attributes=classmethod(lambda c: ["image_processor",
                                                                                                 "tokenizer"])))
    proc = images_only(image_processor=AutoImageProcessor.from_pretrained(model_dir),
                       tokenizer=AutoTokenizer.from_pretrained(model_dir), chat_template=T.QWEN25_VL)
    chat = [dict(role=r, content=hf_items(t) if r == "user" else t) for r, t in s.turns]
    want = proc(text=[proc.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)], images=images,
                return_tensors="pt")
    assert ids == want["input_ids"][0].tolist()
    assert torch.equal(grid, want["image_grid_thw"]) and torch.equal(pv, want["pixel_values"])
    assert ("Be brief." if source == "jsonl" else "You are a helpful assistant.") in tok.decode(ids)


def run(model_dir, out, batch_size, files):
    return E.main(["--model", str(model_dir), "--data", *map(str, files), "--out", str(out), "--batch-size",
                   str(batch_size), "--max-new-tokens", "6", "--dtype", "float32", "--device", "cpu"])


def test_end_to_end_batched_equals_one_at_a_time(model_dir, tmp_path):
    img = tmp_path / "img.png"
    from PIL import Image
    Image.new("RGB", (50, 30), (10, 200, 10)).save(img)
    jl = tmp_path / "chat.jsonl"
    jl.write_text(json.dumps(dict(images=[str(img)], messages=[
        dict(role="user", content="<image>What colour?\nA. green\nB. red"),
        dict(role="assistant", content="A")])) + "\n")
    files = [FIXTURES / "tiny_mcq.tsv", FIXTURES / "tiny_vqa.tsv", jl]
    one = run(model_dir, tmp_path / "bs1", 1, files)
    many = run(model_dir, tmp_path / "bs3", 3, files)
    for f in files:
        p1 = [json.loads(x) for x in (tmp_path / "bs1" / f"{f.stem}.jsonl").read_text().splitlines()]
        p3 = [json.loads(x) for x in (tmp_path / "bs3" / f"{f.stem}.jsonl").read_text().splitlines()]
        assert [p["prediction"] for p in p1] == [p["prediction"] for p in p3]
        assert len(p1) == many["results"][str(f)]["n"] and all(p["prediction"] for p in p1)
        # the summary is the mean of the per-sample scores written beside it
        key = "acc" if f.suffix == ".jsonl" or "mcq" in f.stem else "exact_match"
        got = many["results"][str(f)]["scores"][key]
        assert got["value"] == pytest.approx(100 * sum(p[key] for p in p3) / len(p3), abs=0.01)
        assert got["protocol"]  # a number never comes without its rule
    summary = json.loads((tmp_path / "bs3" / "summary.json").read_text())
    assert summary["config"]["batch_size"] == 3 and summary["results"][str(files[0])]["samples_per_s"] > 0
    assert one["results"][str(files[1])]["per_category"].keys() == {"scene", "chart", "doc"}


def test_end_to_end_bad_image_names_the_row(model_dir, tmp_path):
    tsv = tmp_path / "broken.tsv"
    good = (FIXTURES / "tiny_vqa.tsv").read_text().splitlines()
    tsv.write_text("\n".join(good[:2] + [good[2].rsplit("\t", 1)[0] + "\t" + "A" * 100]) + "\n")
    with pytest.raises(SystemExit, match=r"broken\.tsv row 2 \(index q2\): cannot decode image"):
        run(model_dir, tmp_path / "out", 2, [tsv])
