"""scores.py against the benchmarks' own scorers. Every expected value in the tables below was produced by running
the reference implementation (copied outside this repository, never committed) on the case:
    VLMEvalKit  open-compass/VLMEvalKit @ e8e78f05f3080fe28154f2130321f17951c3be94: matching_util.can_infer (MCQ
                rules), vqa_eval.process_line + hit_calculate (vqa_score, anls, relaxed_accuracy, accuracy),
                image_vqa.OCRBench.evaluate (OCRBench; MultimodalOCR @ 794c36d's example.py has the same rule)
    TextVQA     facebookresearch/mmf @ b0ffc7fba39f210f833c127362146aec01a2f259:
                m4c_evaluators.TextVQAAccuracyEvaluator
    VQAv2       GT-Vision-Lab/VQA @ a013f0043c1e2cdc995922dfe257f7149aa9af06: vqaEval.py VQAEval.evaluate, one question
    ChartQA     google-research/pix2struct @ 945f27e936c9464d9d7c133f1bd1f4f383be9e99: metrics.relaxed_correctness
The predictions are run through score()'s own preparation first (a leading <think> block removed, then stripped),
as the reference saw them. Then: MMBench's circular aggregation, OCRBench's sums, the extractor's guarantee
(never a different letter where the rules read the right one) and hand-written cases of our extractor."""
import re

import pytest

import scores as S

OPTS = {"en": dict(A="cat", B="dog", C="bird", D="fish"), "cn": dict(A="红色", B="蓝色", C="绿色", D="黄色")}
HME = "Handwritten Mathematical Expression Recognition"


def prep(pred):
    return re.sub(r"^\s*<think>.*?</think>", "", pred, flags=re.S).strip()


MCQ = [  # (prediction, options, VLMEvalKit can_infer's letter; None = its False or 'Z')
    ('B', 'en', 'B'),
    ('b', 'en', None),
    ('(C)', 'en', 'C'),
    ('D.', 'en', 'D'),
    ('**B**', 'en', 'B'),
    ('B. dog', 'en', 'B'),
    ('C) bird', 'en', 'C'),
    ('The answer is B.', 'en', 'B'),
    ('the answer is (c)', 'en', None),
    ('Answer: D', 'en', 'D'),
    ('The answer is: D', 'en', 'D'),
    ('Option A is wrong; the answer is B.', 'en', 'B'),
    ('答案是蓝色', 'cn', 'B'),
    ('答案是B', 'cn', None),
    ('选B', 'cn', None),
    ('答案是 C', 'cn', 'C'),
    ('答案：B. 蓝色', 'cn', 'B'),
    ('【答案】B', 'cn', None),
    ('图片中的颜色是蓝色，所以选B。', 'cn', 'B'),
    ('首先，图中的动物有羽毛，不是猫也不是狗。因此答案是C。', 'en', None),
    ('\\boxed{b}', 'en', None),
    ('\\boxed{\\text{B}}', 'en', 'B'),
    ('The final answer is $\\boxed{C}$.', 'en', 'C'),
    ('A dog is shown, so the answer is B', 'en', 'B'),
    ('A fish swims in the picture.', 'en', 'D'),
    ('I think C is right.', 'en', 'C'),
    ('Both A and B look right.', 'en', None),
    ('E', 'en', None),
    ('', 'en', None),
    ("I don't know.", 'en', None),
    ('a cat or a dog', 'en', None),
    ('Cannot determine the answer from the image.', 'en', None),
    ('Z', 'en', None),
    ('Failed to obtain answer via API', 'en', None),
    ("Let's think step by step. The animal has feathers and wings, and it is perched "
     'on a branch. Cats and dogs do not have feathers, and fish live in water. '
     'Therefore, the answer is C.', 'en', 'C'),
    ('**Answer:** C\n\n**Explanation:** The animal has wings, which rules out A (cat), B '
     '(dog) and D (fish).', 'en', None),
    ('**Step 1:** Look at the image.\n**Step 2:** The animal barks.\n\nFinal answer: **B**', 'en', 'B'),
    ('The correct option is (A).', 'en', 'A'),
    ('I would pick option d.', 'en', None),
    ('B is the answer', 'en', 'B'),
    ('dog', 'en', 'B'),
    ('It is a dog.', 'en', 'B'),
    ('BIRD', 'en', 'C'),
    ('The image shows a bird sitting on a branch, which suggests the correct choice is '
     'C. bird.', 'en', 'C'),
    ("The correct answer is **D**. Here's why: fish live in water.", 'en', 'D'),
    ('<think>\nThe animal barks, so B.\n</think>\n\nB', 'en', 'B'),
    ('Answer: (A) cat\nA cat is the only animal here with whiskers.', 'en', None),
    ('Option B: dog', 'en', 'B'),
    ('The answer is b, the dog.', 'en', 'B'),
    ("Based on the image, I'd say C, a bird.", 'en', 'C'),
    ('Looking at options A, B, C and D, only C fits.', 'en', None),
    ('B\n\nExplanation: the animal in the picture is clearly a dog, since it has floppy '
     'ears and a wagging tail.', 'en', None),
    ('None of the options.', 'en', None),
    ('After careful analysis of the image, which shows a small furry animal with '
     'whiskers, pointed ears and a long tail sitting on a windowsill, I believe the '
     'answer is A.', 'en', 'A'),
    ('A', 'en', 'A'),
    ('The animal is not A, not B and not D, so it must be C', 'en', None),
    ('### Answer\nThe answer is (B).\n\n### Reasoning\nA dog barks; a cat (A) meows.', 'en', None),
    ("It's option C.", 'en', 'C'),
    ('Answer: C. The bird has wings.', 'en', None),
    ('答案是B，蓝色。', 'cn', 'B'),
    ("I'm sorry, but without the image provided, I cannot answer. Maybe B?", 'en', None),
    ('Honestly it might be the dog in this one', 'en', None),
    ('It is a fish', 'en', 'D'),
]

VQA = [  # (prediction, references, mmf TextVQAAccuracyEvaluator, VLMEvalKit vqa_score, vqaEval.py)
    ('dont', ["don't"] * 10, 1.0, 1.0, 0.0),
    ("don't", ['dont'] * 10, 1.0, 1.0, 0.0),
    ('U.S.A.', ['usa'] * 10, 1.0, 1.0, 0.0),
    ('e.g.', ['eg'] * 10, 1.0, 1.0, 0.0),
    ('Two', ['2'] * 10, 1.0, 1.0, 0.0),
    ('two', ['2'] * 3 + ['3'] * 7, 0.9, 0.9, 0.9),
    ('2', ['2'] * 2 + ['x'] * 8, 0.6, 0.6, 0.6),
    ('2', ['2'] * 10, 1.0, 1.0, 1.0),
    ('Yes', ['yes'] * 10, 1.0, 1.0, 0.0),
    ('Yes', ['yes'] * 9 + ['no'], 1.0, 1.0, 1.0),
    ('the cat', ['cat'] * 10, 1.0, 1.0, 0.0),
    ('A', ['the'] * 10, 1.0, 1.0, 0.0),
    ('57%', ['57%'] * 10, 1.0, 1.0, 1.0),
    ('57', ['57%'] * 10, 0.0, 0.0, 0.0),
    ('a&w', ['a&w'] * 10, 1.0, 1.0, 1.0),
    ('a & w', ['a&w'] * 10, 0.0, 0.0, 0.0),
    ('12:30', ['12:30'] * 10, 1.0, 1.0, 1.0),
    ('12:30', ['1230'] * 10, 0.0, 0.0, 0.0),
    ("man's", ["man's"] * 10, 1.0, 1.0, 1.0),
    ('mans', ["man's"] * 10, 0.0, 0.0, 0.0),
    ('coca-cola', ['coca cola'] * 10, 1.0, 1.0, 0.0),
    ('coca-cola', ['cocacola'] * 10, 0.0, 0.0, 0.0),
    ('coca - cola', ['cocacola'] * 10, 0.0, 0.0, 0.0),
    ('1,000', ['1000'] * 10, 1.0, 1.0, 0.0),
    ('1,000', ['1,000'] * 6 + ['1000'] * 4, 1.0, 1.0, 1.0),
    ('5.', ['5'] * 10, 1.0, 0.0, 0.0),
    ('5.', ['5'] * 5 + ['five'] * 5, 1.0, 0.0, 1.0),
    ('3.5', ['3.5'] * 10, 1.0, 1.0, 1.0),
    ('don’t', ["don't"] * 10, 0.0, 0.0, 0.0),
    ('“stop”', ['stop'] * 10, 0.0, 0.0, 0.0),
    ('"stop"', ['stop'] * 10, 1.0, 1.0, 0.0),
    ('stop sign', ['stop'] * 4 + ['stop sign'] * 6, 1.0, 1.0, 1.0),
    ('stop', ['stop'] * 4 + ['stop sign'] * 6, 1.0, 1.0, 1.0),
    ('The sign says STOP.', ['stop'] * 10, 0.0, 0.0, 0.0),
    ('**stop**', ['stop'] * 10, 0.0, 0.0, 0.0),
    ('stop\n', ['stop'] * 10, 1.0, 1.0, 1.0),
    ('可口可乐', ['可口可乐'] * 10, 1.0, 1.0, 1.0),
    ('hello, world', ['hello world'] * 10, 1.0, 1.0, 0.0),
    ('3,5', ['35'] * 10, 1.0, 1.0, 0.0),
    ('what?', ['what'] * 10, 1.0, 1.0, 0.0),
    ('(a) red', ['red'] * 10, 1.0, 1.0, 0.0),
    ('red/blue', ['red blue'] * 10, 1.0, 1.0, 0.0),
    ('red / blue', ['redblue'] * 10, 0.0, 0.0, 0.0),
    ('$12', ['$12'] * 10, 1.0, 1.0, 1.0),
    ('none', ['0'] * 10, 1.0, 1.0, 0.0),
    ('Nike', ['nike'] * 3 + ['adidas'] * 3 + ['puma'] * 4, 0.9, 0.9, 0.9),
    ("i'm", ['im'] * 10, 0.0, 0.0, 0.0),
    ('oclock', ["o'clock"] * 10, 1.0, 1.0, 0.0),
    ("somebody'd", ['somebodyd'] * 10, 1.0, 1.0, 0.0),
    ('v1.2.', ['v1.2'] * 10, 1.0, 0.0, 0.0),
    ('Dr.', ['dr'] * 5 + ['doctor'] * 5, 1.0, 1.0, 1.0),
    ("It's", ["it's"] * 5 + ['its'] * 5, 1.0, 1.0, 1.0),
    ('<think>\nThe sign is red.\n</think>\n\nred', ['red'] * 10, 1.0, 1.0, 1.0),
    ("." * 33 + "x", ['x'] * 10, 0.0, 0.0, 0.0),
    ("man's", ["man 's"] * 10, 1.0, 0.0, 0.0),
    ("what's that?", ['whats that'] * 10, 0.0, 1.0, 0.0),
    ("the 3 men's shoes", ["3 men's shoes"] * 10, 1.0, 1.0, 0.0),
]

ANLS = [  # (prediction, references, VLMEvalKit anls + hit_calculate on it as is, and stripped)
    ('Hello  World', ['hello world'], 1.0, 1.0),
    ('hello wrld', ['hello world'], 0.909091, 0.909091),
    ('abc', ['xyz'], 0.0, 0.0),
    ('abcd', ['abxy'], 0.5, 0.5),
    ('abcde', ['abxyz'], 0.0, 0.0),
    ('', ['a'], 0.0, 0.0),
    ('', [''], 1.0, 1.0),
    ('  padded ', ['padded'], 1.0, 1.0),
    ('padded', ['  padded  '], 1.0, 1.0),
    ('ß', ['ss'], 0.0, 0.0),
    ('JOHN SMITH', ['John Smith', 'J. Smith'], 1.0, 1.0),
    ('J. Smith', ['John Smith', 'J. Smith'], 1.0, 1.0),
    ('Smith', ['John Smith', 'J. Smith'], 0.625, 0.625),
    ('$1,234.56', ['$1,234.56'], 1.0, 1.0),
    ('1,234.56', ['$1,234.56'], 0.888889, 0.888889),
    ('The total is $1,234.56', ['$1,234.56'], 0.0, 0.0),
    ('12/05/2019', ['12/05/2019', '12 May 2019'], 1.0, 1.0),
    ('12 may 2019', ['12/05/2019', '12 May 2019'], 1.0, 1.0),
    ('2019', ['12/05/2019'], 0.0, 0.0),
    ('北京市', ['北京'], 0.666667, 0.666667),
    ('北京', ['北京市'], 0.666667, 0.666667),
    ('ＡＢＣ', ['ABC'], 0.0, 0.0),
    ('line one\nline two', ['line one line two'], 1.0, 1.0),
    ('tab\tsep', ['tab sep'], 1.0, 1.0),
    ('Yes', ['yes'], 1.0, 1.0),
    ('yes.', ['yes'], 0.75, 0.75),
    ('**yes**', ['yes'], 0.0, 0.0),
    ('Answer: 42', ['42'], 0.0, 0.0),
    ('42', ['42', 'forty-two'], 1.0, 1.0),
    ('forty two', ['42', 'forty-two'], 0.888889, 0.888889),
    ('Q3 2020', ['q3 2020'], 1.0, 1.0),
    ('0.5', ['0.50'], 0.75, 0.75),
    ('50%', ['50 %'], 0.75, 0.75),
    ('University of Oxford', ['Oxford University'], 0.0, 0.0),
    ('Oxford', ['University of Oxford'], 0.0, 0.0),
    ('İstanbul', ['istanbul'], 0.875, 0.875),
    ('ﬁle', ['file'], 0.5, 0.5),
    ('  paddex  ', ['padded'], 0.9, 0.833333),
    ('ß', ['s'], 0.5, 0.5),
    ('aaaaaaaaaa', ['aaaaaaaaaaaaaaaaaaaa'], 0.5, 0.5),
    ('aaaaaaaaaaa', ['aaaaaaaaaaaaaaaaaaaa'], 0.55, 0.55),
    ('The answer is not in the document.', ['unanswerable'], 0.0, 0.0),
]

RELAXED = [  # (prediction, reference, pix2struct relaxed_correctness as is, VLMEvalKit (stripped))
    ('12', '12', True, True),
    ('57%', '57', False, False),
    ('57%', '0.57', True, True),
    ('0.57', '57%', True, True),
    ('57', '57%', False, False),
    ('1,000', '1000', False, False),
    ('12 kg', '12', False, False),
    ('12.', '12', True, True),
    ('1e3', '1000', True, True),
    ('1_000', '1000', True, True),
    ('nan', 'nan', False, False),
    ('0', '0', True, True),
    ('0.0', '0', False, False),
    (' 12 ', '12', True, True),
    ('12', ' 12 ', True, True),
    ('Yes', 'yes', True, True),
    ('yes ', 'Yes', False, True),
    ('104.9', '100', True, True),
    ('105.1', '100', False, False),
    ('95', '100', True, True),
    ('94.9', '100', False, False),
    ('-3', '3', False, False),
    ('-3', '-3.1', True, True),
    ('inf', 'inf', False, False),
    ('$12', '12', False, False),
    ('12', '$12', False, False),
    ('3.5 million', '3.5', False, False),
    ('1,23', '123', False, False),
    ('about 12', '12', False, False),
    ('0.01', '0', False, False),
    ('+5', '5', True, True),
    ('5%', '5%', True, True),
    ('5.2%', '5%', True, True),
    ('٣', '3', True, True),
    ('12\n', '12', True, True),
    ('Canada', 'canada', True, True),
    ('Canada.', 'Canada', False, False),
    ('2019', '2018', True, True),
    ('2019', '2000', True, True),
    ('1.05', '1', False, False),
    ('-0', '0', False, False),
    ('0', '0.0', False, False),
    ('12%%', '0.12', True, True),
]

OCRBENCH = [  # (prediction, references, category, VLMEvalKit OCRBench.evaluate's hit)
    ('Hello World', ['hello world'], 'Regular Text Recognition', 1),
    ('Hello\nWorld', ['hello world'], 'Regular Text Recognition', 1),
    ('The text reads: HELLO WORLD!', ['hello world'], 'Irregular Text Recognition', 1),
    ('helloworld', ['hello world'], 'Artistic Text Recognition', 0),
    ('hello  world', ['hello world'], 'Handwriting Recognition', 0),
    ('1234 5678', ['12345678'], 'Digit String Recognition', 0),
    ('12345678', ['1234 5678'], 'Digit String Recognition', 0),
    ('xqzv', ['XQZV'], 'Non-Semantic Text Recognition', 1),
    ('stop', ['STOP', 'stop sign'], 'Scene Text-centric VQA', 1),
    ('It says stop sign', ['STOP SIGN'], 'Scene Text-centric VQA', 1),
    ('no', ['yes'], 'Scene Text-centric VQA', 0),
    ('The date is 12/05/2019.', ['12/05/2019'], 'Doc-oriented VQA', 1),
    ('12.05.2019', ['12/05/2019'], 'Doc-oriented VQA', 0),
    ('Total: $45.00', ['45.00', '$45'], 'Key Information Extraction', 1),
    ('45', ['45.00'], 'Key Information Extraction', 0),
    ('\\frac{1}{2}', ['\\frac { 1 } { 2 }'], 'Handwritten Mathematical Expression Recognition', 1),
    ('\\frac { 1 } { 2 }', ['\\frac{1}{2}'], 'Handwritten Mathematical Expression Recognition', 1),
    ('x^{2}+y^{2}', ['x ^ { 2 } + y ^ { 2 }'], 'Handwritten Mathematical Expression Recognition', 1),
    ('X^{2}', ['x ^ { 2 }'], 'Handwritten Mathematical Expression Recognition', 0),
    ('$x^2$', ['x ^ 2'], 'Handwritten Mathematical Expression Recognition', 1),
    ('The expression is $a+b=c$', ['a + b = c'], 'Handwritten Mathematical Expression Recognition', 1),
    ('a +\nb', ['a+b'], 'Handwritten Mathematical Expression Recognition', 1),
    ('\\alpha', ['\\Alpha'], 'Handwritten Mathematical Expression Recognition', 0),
    ('', ['a'], 'Regular Text Recognition', 0),
    ('anything', [''], 'Regular Text Recognition', 1),
    ('北京欢迎你', ['欢迎'], 'Scene Text-centric VQA', 1),
    ('ＡＢＣ', ['abc'], 'Regular Text Recognition', 0),
    ('Straße', ['STRASSE'], 'Regular Text Recognition', 0),
    ('İstanbul', ['istanbul'], 'Regular Text Recognition', 0),
    ('**Answer:** 42', ['42'], 'Doc-oriented VQA', 1),
    ('4 2', ['42'], 'Doc-oriented VQA', 0),
    ('line1\nline2', ['line1 line2'], 'Key Information Extraction', 1),
    ('line1 line2', ['line1\nline2'], 'Key Information Extraction', 1),
    ('ab', ['abc', 'b'], 'Regular Text Recognition', 1),
    ('  Cat  ', ['cat '], 'Regular Text Recognition', 1),
    ('\\sqrt{x}', ['\\sqrt { x }', 'sqrt x'], 'Handwritten Mathematical Expression Recognition', 1),
    ('sqrtx', ['\\sqrt { x }'], 'Handwritten Mathematical Expression Recognition', 0),
    ('A\tB', ['a b'], 'Regular Text Recognition', 0),
    ('<think>\nhm\n</think>\n\nHELLO', ['hello'], 'Regular Text Recognition', 1),
    ('x', ['X'], 'Unknown category', 1),
]

EXACT = [  # (prediction, references, VLMEvalKit process_line 'accuracy' + hit_calculate (OCRVQA))
    ('A', ['the'], 0.0),
    ('the', ['the'], 1.0),
    (' Yes ', ['yes'], 1.0),
    ('yes.', ['yes'], 0.0),
    ('YES', ['yes', 'y'], 1.0),
    ('y', ['yes', 'y'], 1.0),
    ('Harry Potter', ['harry potter'], 1.0),
    ('Harry  Potter', ['harry potter'], 0.0),
    ('harry potter\n', ['Harry Potter'], 1.0),
    ('The Hobbit', ['hobbit'], 0.0),
    ('Hobbit', ['The Hobbit'], 0.0),
    ('2', ['two'], 0.0),
    ('two', ['Two'], 1.0),
    ('1,000', ['1000'], 0.0),
    ("don't", ['dont'], 0.0),
    ('', [''], 1.0),
    ('', ['a'], 0.0),
    ('a', [''], 0.0),
    ('café', ['CAFÉ'], 1.0),
    ('ΣΊΣΥΦΟΣ', ['σίσυφος'], 1.0),
    ('Straße', ['STRASSE'], 0.0),
    ('北京', ['北京'], 1.0),
    ('北京 ', [' 北京'], 1.0),
    ('Is it?', ['is it?'], 1.0),
    ('is it', ['is it?'], 0.0),
    ('Romance', ['Romance', 'Literature & Fiction'], 1.0),
    ('literature & fiction', ['Romance', 'Literature & Fiction'], 1.0),
    ('Literature and Fiction', ['Literature & Fiction'], 0.0),
    ('**yes**', ['yes'], 0.0),
    ('Answer: yes', ['yes'], 0.0),
    ('yes\n\nThe image shows a dog.', ['yes'], 0.0),
    ('no', ['yes'], 0.0),
    ('İ', ['i̇'], 1.0),
    ('ﬁ', ['fi'], 0.0),
    ('\tleft', ['left'], 1.0),
    ('right\t', ['right'], 1.0),
    ('A', ['a'], 1.0),
    ('B', ['a'], 0.0),
    ('1.0', ['1'], 0.0),
    ('left side', ['left'], 0.0),
    ('<think>\nhm\n</think>\n\nyes', ['yes'], 1.0),
]


# ---- each scorer == its reference ------------------------------------------------------------------------------


@pytest.mark.parametrize("pred, opts, want", MCQ)
def test_vlmevalkit_rules(pred, opts, want):
    assert S.vlmevalkit_choice(prep(pred), OPTS[opts]) == want
    got = S.score(pred, [want or "A"], OPTS[opts], "mcq")
    assert got["choice"] == want and got["acc"] == float(want is not None)


@pytest.mark.parametrize("pred, opts, want", MCQ)
def test_extractor_never_reads_another_letter_where_the_rules_read_one(pred, opts, want):
    ours = S.extract_choice(prep(pred), OPTS[opts])
    assert want is None or ours == want  # on its own, not only through score()'s rules-first order
    for ref in OPTS[opts]:
        got = S.score(pred, [ref], OPTS[opts], "mcq")
        assert got["acc_extracted"] >= got["acc"] and (want is None or got["choice_extracted"] == want)


@pytest.mark.parametrize("pred, refs, textvqa, vlmevalkit, vqav2", VQA)
def test_vqa_accuracy(pred, refs, textvqa, vlmevalkit, vqav2):
    assert S.vqa_score(prep(pred), refs, "textvqa-official") == pytest.approx(textvqa)
    assert S.vqa_score(prep(pred), refs, "vlmevalkit-vqa-score") == pytest.approx(vlmevalkit)
    assert S.vqa_score(prep(pred), refs, "vqav2-official") == pytest.approx(vqav2)
    got = S.score(pred, refs, {}, "textvqa")
    assert got == pytest.approx(dict(vqa_accuracy=textvqa, vqa_accuracy_vlmevalkit=vlmevalkit))
    assert S.score(pred, refs, {}, "generic")["vqa_accuracy"] == pytest.approx(vqav2)


@pytest.mark.parametrize("pred, refs, as_is, stripped", ANLS)
def test_anls(pred, refs, as_is, stripped):
    assert S.anls(pred, refs) == pytest.approx(as_is)  # the length is the raw one, spaces included
    assert S.score(pred, refs, {}, "docvqa") == pytest.approx(dict(anls=stripped))


@pytest.mark.parametrize("pred, ref, pix2struct, vlmevalkit", RELAXED)
def test_relaxed_accuracy(pred, ref, pix2struct, vlmevalkit):
    assert S.relaxed(pred, ref) is pix2struct
    got = S.score(pred, [ref], {}, "chartqa")
    assert got["relaxed_accuracy"] == float(vlmevalkit)
    assert got["relaxed_accuracy_lenient"] >= got["relaxed_accuracy"]


@pytest.mark.parametrize("pred, refs, category, want", OCRBENCH)
def test_ocrbench(pred, refs, category, want):
    assert S.ocrbench_hit(prep(pred), refs, category) == want
    assert S.score(pred, refs, {}, "ocrbench", category) == dict(ocrbench=float(want))


@pytest.mark.parametrize("pred, refs, want", EXACT)
def test_exact_match(pred, refs, want):
    assert S.exact_match(prep(pred), refs) == want
    assert S.score(pred, refs, {}, "exact") == dict(exact_match=want)


# ---- the issue's cases, by hand --------------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("B", "B"), ("b", "B"), (" (C) ", "C"), ("(c)", "C"), ("D.", "D"), ("[d]", "D"), ("**B**", "B"),
    ("B. dog", "B"), ("(c) bird, because it has wings", "C"), ("C) bird", "C"),
    ("The answer is B.", "B"), ("the answer is (c)", "C"), ("Answer: d", "D"), ("The correct option is (A).", "A"),
    ("I would pick option d.", "D"), ("\\boxed{B}", "B"), ("答案是B", "B"), ("选B", "B"),
    ("I think C is right.", "C"), ("B is the answer", "B"), ("A is right", "A"),
    ("A dog is shown, so the answer is B", "B"),  # "A" opening a sentence is an article
    ("A fish swims in the picture.", "D"),  # no letter: the one option text named
    ("the answer is a bird", "C"),  # a lower-case "a" is never a letter on its own
    ("Option A is wrong; the answer is B.", "B"),  # the stated answer wins over an earlier "option X"
    ("B. dog? No: the answer is C.", "C"), ("The answer is A. On reflection, the answer is D.", "D"),
    ("Both A and B look right.", None), ("E", None), ("", None), ("I don't know.", None),
    ("a cat or a dog", None),  # two option texts
])
def test_extract_choice(text, want):
    assert S.extract_choice(text, OPTS["en"]) == want


def test_extract_choice_finds_option_text_inside_cjk():
    assert S.extract_choice("答案是蓝色", OPTS["cn"]) == "B"
    assert S.extract_choice("图中是一只bird。", OPTS["en"]) == "C"
    assert S.extract_choice("这是一只catfish", OPTS["en"]) is None  # a Latin option text is still a whole word


def test_issue_cases():
    assert S.score("A", ["the"], {}, "exact")["exact_match"] == 0.0  # no longer "" == ""
    for pred, ref in (("dont", "don't"), ("U.S.A.", "usa"), ("e.g.", "eg")):
        assert S.score(pred, [ref] * 10, {}, "textvqa")["vqa_accuracy"] == 1.0
    assert S.score("Hello\nWorld", ["hello world"], {}, "ocrbench", "Regular Text Recognition")["ocrbench"] == 1.0
    assert S.score("x^{2}", ["x ^ { 2 }"], {}, "ocrbench", HME)["ocrbench"] == 1.0
    assert S.score("X^{2}", ["x ^ { 2 }"], {}, "ocrbench", HME)["ocrbench"] == 0.0  # case kept
    got = S.score("57%", ["57"], {}, "chartqa")  # pix2struct reads 57% as 0.57; ours also as 57
    assert got == dict(relaxed_accuracy=0.0, relaxed_accuracy_lenient=1.0)
    assert S.score("12 kg", ["12"], {}, "chartqa") == dict(relaxed_accuracy=0.0, relaxed_accuracy_lenient=1.0)
    assert S.score("1,000", ["1000"], {}, "chartqa")["relaxed_accuracy_lenient"] == 1.0
    assert S.score("don’t", ["don't"] * 10, {}, "textvqa")["vqa_accuracy"] == 0.0  # curly quote kept, as official


def test_mmmu_open_question_is_two_options():
    """VLMEvalKit MMMU_preproc: options (answer, "Other Answers"), reference A; read by the same rules."""
    assert S.score("The value is 1.25", ["1.25"], {}, "mmmu")["acc"] == 1.0
    assert S.score("1.3", ["1.25"], {}, "mmmu") == dict(choice=None, acc=0.0, choice_extracted=None, acc_extracted=0.0)


def test_benchmark_of():
    want = dict(MMStar="mcq", MMMU_DEV_VAL="mmmu", AI2D_TEST="mcq", RealWorldQA="mcq", MMBench_DEV_EN_V11="mmbench",
                MMBench_DEV_CN="mmbench", ScienceQA_TEST="mcq", ChartQA_TEST="chartqa", DocVQA_VAL="docvqa",
                InfoVQA_VAL="docvqa", TextVQA_VAL="textvqa", OCRBench="ocrbench", OCRBench_v2="generic",
                MMMU_Pro_10c="generic", GQA_TestDev_Balanced="exact", my_chat="generic")
    assert {k: S.benchmark_of(k) for k in want} == want


# ---- aggregation -----------------------------------------------------------------------------------------------


def rows(benchmark, items, options=OPTS["en"]):
    return [dict(index=i, category=c, **S.score(p, [ref], options, benchmark)) for i, c, p, ref in items]


def test_mmbench_circular():
    """mcq_circular_eval: index mod 1e6 groups the rotations; a question counts once, right only if every rotation
    is; its category is its first row's; a rotation whose question is missing is left out."""
    got = S.summarise(rows("mmbench", [
        (1, "ocr", "A", "A"), (1000001, "ocr", "B", "B"), (2000001, "ocr", "C", "C"),  # all right -> 1
        (2, "ocr", "A", "A"), (1000002, "ocr", "The answer is (c)", "C"),  # rules cannot read the rotation -> 0
        (3, "logic", "D", "D"), (1000003, "logic", "A", "B"),  # a wrong rotation -> 0
        (4, "logic", "B", "B"),  # no rotations -> as vanilla
        (1000005, "logic", "A", "A"),  # a rotation of no question here: left out
    ]), "mmbench")
    assert got["n"] == 4 and got["rows"] == 9 and got["unreadable"] == 1 and got["unreadable_extracted"] == 0
    assert got["scores"] == dict(acc=dict(value=50.0, protocol="vlmevalkit-rules-circular"),
                                 acc_extracted=dict(value=75.0, protocol="rules+extractor-circular"))
    assert got["per_category"]["ocr"]["scores"]["acc"]["value"] == 50.0
    assert got["per_category"]["logic"] == dict(n=2, scores=dict(
        acc=dict(value=50.0, protocol="vlmevalkit-rules-circular"),
        acc_extracted=dict(value=50.0, protocol="rules+extractor-circular")))
    with pytest.raises(ValueError, match="MMBench row index 'q7' is not an integer"):
        S.summarise(rows("mmbench", [("q7", "", "A", "A")]), "mmbench")


def test_vanilla_mcq_summary_and_table():
    got = S.summarise(rows("mcq", [(0, "colour", "A", "A"), (1, "colour", "I cannot tell.", "B"),
                                   (2, "compare", "the answer is (b)", "B"), (3, "", "B", "C")]), "mcq")
    assert got["n"] == 4 and got["unreadable"] == 2 and got["unreadable_extracted"] == 1
    assert got["scores"]["acc"] == dict(value=25.0, protocol="vlmevalkit-rules")
    assert got["scores"]["acc_extracted"] == dict(value=50.0, protocol="rules+extractor")
    assert got["per_category"].keys() == {"colour", "compare"} and got["per_category"]["colour"]["n"] == 2
    table = S.format_table(got, "MMStar.tsv")
    assert "acc" in table and "25.00  vlmevalkit-rules" in table and "unreadable" in table


def test_ocrbench_sums_in_vlmevalkit_groups():
    items = [("Regular Text Recognition", "hello", "hello"), ("Digit String Recognition", "12", "13"),
             ("Artistic Text Recognition", "Cat", "cat"), ("Doc-oriented VQA", "It is 42.", "42"), (HME, "X", "x")]
    r = [dict(index=i, category=c, **S.score(p, [a], {}, "ocrbench", c)) for i, (c, p, a) in enumerate(items)]
    got = S.summarise(r, "ocrbench")
    assert got["scores"] == dict(ocrbench=dict(value=3, protocol="ocrbench-official"))
    assert {c: v["scores"]["ocrbench"]["value"] for c, v in got["per_category"].items()} == {
        "Text Recognition": 2, "Doc-oriented VQA": 1, HME: 0}
    assert "3 / 5" in S.format_table(got)


def test_short_answer_summary_names_each_protocol():
    r = [dict(index=i, category="", **S.score(p, refs, {}, "textvqa")) for i, (p, refs, *_) in enumerate(VQA)]
    got = S.summarise(r, "textvqa")
    assert got["scores"]["vqa_accuracy"]["protocol"] == "textvqa-official"
    assert got["scores"]["vqa_accuracy"]["value"] == round(100 * sum(v[2] for v in VQA) / len(VQA), 2)
    assert got["scores"]["vqa_accuracy_vlmevalkit"]["protocol"] == "vlmevalkit-vqa-score"
    g = S.summarise([dict(index=0, category="", **S.score("red", ["red"], {}, "generic"))], "generic")
    assert {k: v["protocol"] for k, v in g["scores"].items()} == dict(
        exact_match="exact-strip-lower", relaxed_accuracy="relaxed@0.05", anls="anls@0.5", contains="ocrbench-official")
