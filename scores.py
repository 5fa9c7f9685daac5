"""Scoring eval.py's answers as the benchmarks' published protocols do: pure functions of text, no torch.

Each number carries the name of the rule it follows (the `protocol` beside every value in a summary):
    vlmevalkit-rules        multiple choice: VLMEvalKit's rule-based matching (matching_util.can_infer) with no
                            judge model, an unreadable answer scored wrong      [MMStar, AI2D, RealWorldQA, ScienceQA]
    vlmevalkit-rules-circular   the same, MMBench's circular evaluation: a question counts only if every rotation
                            of its options is right (multiple_choice.mcq_circular_eval)               [MMBench]
    vlmevalkit-rules-mmmu   the same; an open question is the two options (answer, "Other Answers") as VLMEvalKit's
                            MMMU_preproc makes it                                                       [MMMU]
    rules+extractor         the rules' letter where they read one, else ours (extract_choice): never lower
    textvqa-official        TextVQA's scorer (facebookresearch/mmf m4c_evaluators, EvalAIAnswerProcessor)  [TextVQA]
    vlmevalkit-vqa-score    VLMEvalKit's VQA score (vqa_eval.process_answer), which TextVQA tables from VLMEvalKit use
    vqav2-official          the VQA challenge's scorer (GT-Vision-Lab/VQA vqaEval.py)         [jsonl, >= 3 references]
    anls@0.5                DocVQA's official ANLS (RRC script = VLMEvalKit anls_compute)        [DocVQA, InfoVQA]
    relaxed@0.05            ChartQA's relaxed accuracy (pix2struct metrics.relaxed_correctness)          [ChartQA]
    relaxed@0.05-lenient    the same, or numbers read through units, %, currency and 1,000s (ours)
    ocrbench-official       a reference inside the answer; handwritten maths: spaces out, case kept   [OCRBench]
    exact-strip-lower       stripped, lower-cased answer == a reference (VLMEvalKit's GQA / OCRVQA rule)
Percentages as VLMEvalKit prints them (OCRBench: a count of answers found); per-row scores are 0..1.
"""
from __future__ import annotations

import re
from collections import defaultdict

# ---- multiple choice -------------------------------------------------------------------------------------------

REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")  # as matching_util._VERBOSE_ANSWER_RE


def rules_option(pred: str, options: dict[str, str]) -> str | bool:
    """VLMEvalKit can_infer_option: the one option letter among the answer's words, if one of its last four; "Z" for
    a refusal; else "the answer is X"; else False."""
    if "Failed to obtain answer via API" in pred:
        return False
    if any(r in pred for r in REFUSALS):
        return "Z"
    words = re.sub(r"[.()\[\],:;!*#{}]", " ", pred).split()
    present = [c for c in options if c in words]
    if len(present) == 1:
        if words.index(present[0]) > len(words) - 5:
            return present[0]
    elif not present and "Z" in words:
        return "Z"
    m = VERBOSE_ANSWER.search(pred)
    return m[1].upper() if m and m[1].upper() in options else False


def rules_text(pred: str, options: dict[str, str]) -> str | bool:
    """VLMEvalKit can_infer_text: the one option whose text is inside a short answer (case-insensitive)."""
    p = pred.lower()
    if len(p) > 2 * sum(len(str(v)) for v in options.values()):
        return False
    hits = [k for k, v in options.items() if str(v).lower() in p]
    return hits[0] if len(hits) == 1 else False


def vlmevalkit_choice(pred: str, options: dict[str, str]) -> str | None:
    """VLMEvalKit can_infer (rule-based, as with `exact_matching`); None where VLMEvalKit would ask a judge model
    (its False) or found a refusal (its "Z"): both scored wrong."""
    c = rules_option(pred, options) or rules_text(pred, options)
    return c if c and c != "Z" else None


LETTER = r"(?:([A-Z])(?![A-Za-z0-9_'])|([a-z])(?=[)\].:;,*]|\s*$))"  # a lower-case letter only set off: "(b)", "b."
STATED = re.compile(  # an answer stated outright; the last one wins ("Option A is wrong; the answer is B.")
    r"(?i:\banswer\b)(?:\s+(?i:is|would be|should be|will be))?[\s:：*]*(?i:option\s+|choice\s+)?[(\[*]*" + LETTER
    + r"|(?i:correct|right|best)\s+(?i:option|choice)(?:\s+(?i:is))?[\s:：*]*[(\[*]*" + LETTER
    + r"|\\boxed\{\s*(?:\\text(?:bf)?\{)?\s*([A-Za-z])\s*\}"
    + r"|(?:答案|选项)\s*(?:应该是|应为|是|为)?\s*[:：]?\s*[(（【]?([A-Za-z])(?![A-Za-z])"
    + r"|选择?\s*[(（【]?([A-Za-z])(?![A-Za-z])")


def mentions(text: str, option: str) -> bool:
    """The option text inside the (lower-cased) answer: bounded as a word where it starts or ends with a Latin
    letter or digit, anywhere in CJK text ("答案是蓝色")."""
    v = str(option).lower().strip()
    pre = r"(?<![a-z0-9])" if re.match(r"[a-z0-9]", v) else ""
    post = r"(?![a-z0-9])" if re.search(r"[a-z0-9]$", v) else ""
    return bool(v) and re.search(pre + re.escape(v) + post, text) is not None


def extract_choice(text: str, options: dict[str, str]) -> str | None:
    """Our reading of the letter a free-text answer picks; None when it names none or several. In order: the answer
    is a letter ("b", "(C)", "**D**"); the last stated answer ("the answer is (b)", "**Answer:** C", "\\boxed{B}",
    "答案是B", "选B"); a leading letter ("B. a cat"); one "option X"; one capital option letter as a word that is
    not an article or pronoun ("A dog ...", "I think ..."); one option's text (also inside CJK text)."""
    t, letters = text.strip(), "".join(options)
    if (m := re.fullmatch(r"[\s(\[*]*([A-Za-z])[\s)\].:*]*", t)) and m[1].upper() in letters:
        return m[1].upper()
    stated = [next(g for g in m.groups() if g).upper() for m in STATED.finditer(t)]
    if stated := [c for c in stated if c in letters]:
        return stated[-1]
    if (m := re.match(r"[(\[*]*([A-Za-z])(?:[)\].:]|\*\*)\s", t)) and m[1].upper() in letters:
        return m[1].upper()
    named = {next(g for g in m.groups() if g).upper()
             for m in re.finditer(r"(?i:option|choice)\s*[(\[]?" + LETTER, t)} & set(letters)
    if len(named) == 1:
        return named.pop()

    def article(m):  # "A dog ..." opening a sentence, "I think ...": words, not options
        opens = m[1] == "I" or t[: m.start()].rstrip()[-1:] in ("", ".", "!", "?")
        return opens and re.match(r" (?!(?:is|was|and|or)\b)[a-z]", t[m.end():])
    words = {m[1] for m in re.finditer(rf"(?<![A-Za-z0-9_'])([{letters}])(?![A-Za-z0-9_'])", t) if not article(m)}
    if len(words) == 1:
        return words.pop()
    hits = [k for k, v in options.items() if mentions(t.lower(), v)]
    return hits[0] if len(hits) == 1 else None


# ---- short answers: VQA accuracy -------------------------------------------------------------------------------

PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
COMMA = re.compile(r"(\d)(,)(\d)")  # vqaEval.py commaStrip = VLMEvalKit's
PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # VLMEvalKit process_punctuation's periodStrip
PERIOD_OFFICIAL = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic, vqaEval.py and mmf: a lookahead, so "5." loses its "."
NUMBERS = dict(none="0", zero="0", one="1", two="2", three="3", four="4", five="5", six="6", seven="7", eight="8",
               nine="9", ten="10")
ARTICLES = ("a", "an", "the")
# vqaEval.py's contractions table: each key is its value with one apostrophe left out ("dont" -> "don't",
# "couldnt've" and "couldn'tve" -> "couldn't've"), and one entry backwards ("somebody'd" -> "somebodyd")
CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've
somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've
something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't
we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's
who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've""".split()
CONTRACTIONS = {w[:i] + w[i + 1:]: w for w in CONTRACTED for i, ch in enumerate(w) if ch == "'"}
CONTRACTIONS["somebody'd"] = "somebodyd"


def vqa_punctuation(s: str, period: re.Pattern = PERIOD, comma: re.Pattern = COMMA) -> str:
    """vqaEval.py processPunctuation (VLMEvalKit process_punctuation): a mark touching a space, or any mark in text
    with a digit,digit, is dropped; any other becomes a space; then periods not beside a digit go."""
    out, drop = s, comma.search(s) is not None
    for p in PUNCT:
        out = out.replace(p, "" if drop or p + " " in s or " " + p in s else " ")
    return period.sub("", out, count=32)  # sic: upstream passes re.UNICODE (32) as sub's count


def vqa_digit_article(s: str) -> str:
    """vqaEval.py processDigitArticle: lower case, number words zero..ten as digits, articles out, contractions."""
    words = [NUMBERS.get(w, w) for w in s.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vlmevalkit_answer(s: str) -> str:
    """VLMEvalKit vqa_eval.process_answer."""
    return vqa_digit_article(vqa_punctuation(s.replace("\n", " ").replace("\t", " ").strip()))


def textvqa_answer(s: str) -> str:
    """mmf EvalAIAnswerProcessor: commas and "?" out and "'s" split off first; the official period rule."""
    s = s.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return vqa_digit_article(vqa_punctuation(s, PERIOD_OFFICIAL, re.compile(r"(?<=\d)(\,)+(?=\d)")))


def leave_one_out(pred: str, refs: list[str]) -> float:
    """min(1, other references equal to the answer / 3), averaged over leaving each reference out."""
    return sum(min(1.0, sum(r == pred for j, r in enumerate(refs) if j != i) / 3) for i in range(len(refs))) / len(refs)


def vqa_score(pred: str, refs: list[str], protocol: str = "textvqa-official") -> float:
    """VQA accuracy under `protocol`: textvqa-official, vlmevalkit-vqa-score or vqav2-official (which normalises
    nothing, case included, when every reference is the same text)."""
    if protocol == "vqav2-official":
        p, *rs = [x.replace("\n", " ").replace("\t", " ").strip() for x in [pred, *refs]]
        if len(set(rs)) > 1:
            p, *rs = [vqa_digit_article(vqa_punctuation(x, PERIOD_OFFICIAL)) for x in [p, *rs]]
        return leave_one_out(p, rs)
    norm = textvqa_answer if protocol == "textvqa-official" else vlmevalkit_answer
    return leave_one_out(norm(pred), [norm(r) for r in refs])


# ---- short answers: ANLS, relaxed accuracy, OCRBench, exact match ---------------------------------------------


def levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(pred: str, refs: list[str], threshold: float = 0.5) -> float:
    """DocVQA's ANLS for one question (RRC script; VLMEvalKit anls_compute + hit_calculate): edit distance on
    stripped, lower-cased, space-collapsed text over the longer *raw* length; 1 - the best; 0 below 0.5."""
    def dist(r):
        n = max(len(r.upper()), len(pred.upper()))
        a, b = (" ".join(x.strip().lower().split()) for x in (r, pred))
        return levenshtein(a, b) / n if n else 0.0
    s = 1 - min(dist(r) for r in refs)
    return 0.0 if s < threshold else s


def pix2struct_float(s: str) -> float | None:
    """pix2struct relaxed_correctness._to_float: Python's float(), "x%" as x / 100; nothing else read."""
    try:
        return float(s.rstrip("%")) / 100 if s.endswith("%") else float(s)
    except ValueError:
        return None


def relaxed(pred: str, ref: str, tolerance: float = 0.05) -> bool:
    """pix2struct relaxed_correctness: within 5% of a non-zero numeric reference, else case-insensitive equality."""
    p, r = pix2struct_float(pred), pix2struct_float(ref)
    return abs(p - r) / abs(r) <= tolerance if p is not None and r else pred.lower() == ref.lower()


def lenient_number(s: str) -> float | None:
    """Ours: "1,234.5", "$12", "45%", "3.5 kg", "-2 million" -> the number (a percentage stays 45); else None."""
    m = re.fullmatch(r"[$€£¥]?\s*([-+]?[\d,]*\.?\d+)\s*%?\s*([^\W\d_]+\.?\s*){0,3}", s.strip().rstrip("."))
    ok = m and re.fullmatch(r"[-+]?(\d{1,3}(,\d{3})*|\d*)(\.\d+)?", m[1])  # commas only between thousands
    return float(m[1].replace(",", "")) if ok else None


def relaxed_lenient(pred: str, ref: str, tolerance: float = 0.05) -> bool:
    """relaxed(), or both read as numbers by lenient_number within 5%, "45%" meeting both 45 and 0.45."""
    if relaxed(pred, ref, tolerance):
        return True
    p, r = lenient_number(pred), lenient_number(ref)
    if p is None or r is None:
        return False
    ps, rs = [p, p / 100] if "%" in pred else [p], [r, r / 100] if "%" in ref else [r]
    return any(abs(a - b) <= tolerance * abs(b) if b else a == 0 for a in ps for b in rs)


HME = "Handwritten Mathematical Expression Recognition"


def ocrbench_hit(pred: str, refs: list[str], category: str) -> float:
    """OCRBench (MultimodalOCR example.py = VLMEvalKit OCRBench.evaluate): a reference inside the answer, newlines
    read as spaces; case-insensitive, except handwritten maths, where spaces are removed and case kept."""
    if category == HME:
        p = pred.strip().replace("\n", " ").replace(" ", "")
        return float(any(r.strip().replace("\n", " ").replace(" ", "") in p for r in refs))
    p = pred.lower().strip().replace("\n", " ")
    return float(any(r.lower().strip().replace("\n", " ") in p for r in refs))


def exact_match(pred: str, refs: list[str]) -> float:
    """VLMEvalKit process_line 'accuracy' (GQA, OCRVQA): stripped, lower-cased equality with a reference."""
    return float(any(r.strip().lower() == pred.strip().lower() for r in refs))


# ---- benchmarks: which protocol scores a file, per-row scores, aggregation -------------------------------------

FAMILIES = [  # (VLMEvalKit TSV stem, family): the first whose pattern opens the stem (case-insensitive)
    (r"MMBench|CCBench", "mmbench"), (r"MMMU(?!_Pro)", "mmmu"), (r"MMStar|AI2D|RealWorldQA|ScienceQA", "mcq"),
    (r"TextVQA", "textvqa"), (r"ChartQA", "chartqa"), (r"DocVQA|InfoVQA", "docvqa"), (r"OCRBench(_MINI)?$", "ocrbench"),
    (r"OCRVQA|GQA", "exact")]
SHORT = {  # short-answer family -> {score: protocol}; the first is the benchmark's published score
    "textvqa": {"vqa_accuracy": "textvqa-official", "vqa_accuracy_vlmevalkit": "vlmevalkit-vqa-score"},
    "chartqa": {"relaxed_accuracy": "relaxed@0.05", "relaxed_accuracy_lenient": "relaxed@0.05-lenient"},
    "docvqa": {"anls": "anls@0.5"},
    "ocrbench": {"ocrbench": "ocrbench-official"},
    "exact": {"exact_match": "exact-strip-lower"},
    "generic": {"exact_match": "exact-strip-lower", "relaxed_accuracy": "relaxed@0.05", "anls": "anls@0.5",
                "contains": "ocrbench-official", "vqa_accuracy": "vqav2-official"},
}
SCORERS = {  # score -> f(prediction, references, category, protocol)
    "vqa_accuracy": lambda p, refs, c, protocol: vqa_score(p, refs, protocol),
    "vqa_accuracy_vlmevalkit": lambda p, refs, c, protocol: vqa_score(p, refs, protocol),
    "relaxed_accuracy": lambda p, refs, c, protocol: any(relaxed(p, r) for r in refs),
    "relaxed_accuracy_lenient": lambda p, refs, c, protocol: any(relaxed_lenient(p, r) for r in refs),
    "anls": lambda p, refs, c, protocol: anls(p, refs),
    "ocrbench": lambda p, refs, c, protocol: ocrbench_hit(p, refs, c),
    "contains": lambda p, refs, c, protocol: ocrbench_hit(p, refs, ""),
    "exact_match": lambda p, refs, c, protocol: exact_match(p, refs),
}
OCRBENCH_GROUPS = {c + " Recognition": "Text Recognition" for c in (  # VLMEvalKit OCRBench.evaluate's final sums
    "Regular Text", "Irregular Text", "Artistic Text", "Handwriting", "Digit String", "Non-Semantic Text")}


def benchmark_of(data_file_stem: str) -> str:
    """A VLMEvalKit TSV stem ("MMBench_DEV_EN_V11", "DocVQA_VAL", ...) -> the family of protocols that scores it;
    any other file -> "generic" (multiple choice by VLMEvalKit's rules, short answers by each score, named)."""
    return next((f for pattern, f in FAMILIES if re.match(pattern, data_file_stem, re.I)), "generic")


def protocol(benchmark: str, key: str) -> str:
    if key in ("acc", "acc_extracted"):
        rule = "rules+extractor" if key == "acc_extracted" else "vlmevalkit-rules"
        return rule + {"mmbench": "-circular", "mmmu": "-mmmu"}.get(benchmark, "")
    return SHORT.get(benchmark, SHORT["generic"]).get(key) or SHORT["generic"][key]


def score(pred: str, refs: list[str], options: dict[str, str], benchmark: str, category: str = "") -> dict:
    """One answer's scores (0..1) after any leading <think> block (Qwen3's templates open answers with one).
    Multiple choice: `choice` (the rules' letter; None = unreadable, scored wrong), `acc`, `choice_extracted`,
    `acc_extracted`. Short answer: the benchmark's scores (SHORT)."""
    pred = re.sub(r"^\s*<think>.*?</think>", "", pred, flags=re.S).strip()
    if not options and benchmark == "mmmu":  # VLMEvalKit MMMU_preproc: an open question is a two-option one
        options, refs = dict(A=refs[0] if len(refs) == 1 else str(refs), B="Other Answers"), ["A"]
    if options:
        rules = vlmevalkit_choice(pred, options)
        ours = rules or extract_choice(pred, options)  # the rules' reading first: acc_extracted >= acc, row by row
        return dict(choice=rules, acc=float(rules == refs[0]), choice_extracted=ours,
                    acc_extracted=float(ours == refs[0]))
    fam = benchmark if benchmark in SHORT else "generic"
    out = {}
    for key in SHORT[fam]:
        if key == "vqa_accuracy" and fam == "generic" and len(refs) < 3:
            continue  # leave-one-out over fewer than 3 references never reaches 1 (0 for one reference)
        out[key] = float(SCORERS[key](pred, refs, category, SHORT[fam][key]))
    return out


def circular(rows: list[dict]) -> list[dict]:
    """MMBench's circular evaluation (VLMEvalKit mcq_circular_eval): rows whose indexes differ by multiples of 1e6 are
    one question with its options rotated; it is right only if every rotation is, and counts once, as its
    index < 1e6 row (a rotation without that row is left out, as VLMEvalKit leaves it out)."""
    groups = defaultdict(list)
    for r in rows:
        if not re.fullmatch(r"\d+", str(r["index"])):
            raise ValueError(f"MMBench row index {r['index']!r} is not an integer: circular evaluation groups rows "
                             "by index mod 1e6; score this file under another name to skip it")
        groups[int(r["index"]) % 1_000_000].append(r)
    return [dict(main, acc=min(r["acc"] for r in g), acc_extracted=min(r["acc_extracted"] for r in g), rotations=len(g))
            for i, g in groups.items() if (main := next((r for r in g if int(r["index"]) == i), None))]


def means(rows: list[dict], benchmark: str) -> dict:
    """Each score's mean over the rows that have it, in percent, with its protocol."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k in ("acc", "acc_extracted")
            or k in SHORT.get(benchmark, SHORT["generic"]) or k in SHORT["generic"]]
    return {k: dict(value=round(100 * sum(r[k] for r in rows if k in r) / sum(k in r for r in rows), 2),
                    protocol=protocol(benchmark, k)) for k in keys}


def summarise(rows: list[dict], benchmark: str) -> dict:
    """rows: a dict per answer, `index`, `category` and score()'s keys. -> n, `scores` {name: {value, protocol}}
    overall and per category, and for multiple choice the answers the rules (and we) could not read. MMBench: n
    questions, each all its rotations; OCRBench: answers found (of 1000 in the full set), in VLMEvalKit's groups."""
    out = dict(benchmark=benchmark, n=len(rows))
    if any("choice" in r for r in rows):
        out.update(unreadable=sum(r.get("choice", "") is None for r in rows),
                   unreadable_extracted=sum(r.get("choice_extracted", "") is None for r in rows))
    if benchmark == "mmbench":
        rows = circular(rows)
        out.update(rows=out["n"], n=len(rows))
    if benchmark == "ocrbench":
        groups = defaultdict(list)
        for r in rows:
            groups[OCRBENCH_GROUPS.get(r.get("category", ""), r.get("category", ""))].append(r)
        count = lambda rs: dict(ocrbench=dict(value=int(sum(r["ocrbench"] for r in rs)),  # noqa: E731
                                              protocol="ocrbench-official"))
        return dict(out, scores=count(rows), per_category={c: dict(n=len(rs), scores=count(rs))
                                                            for c, rs in sorted(groups.items()) if c})
    out["scores"] = means(rows, benchmark)
    cats = sorted({r.get("category", "") for r in rows} - {""})
    if cats:
        out["per_category"] = {c: dict(n=len(rs), scores=means(rs, benchmark))
                               for c in cats if (rs := [r for r in rows if r.get("category", "") == c])}
    return out


def format_table(summary: dict, title: str = "") -> str:
    """The console lines for one file's summary: each score beside its protocol."""
    s = summary
    rows = f" ({s['rows']} rows)" if "rows" in s else ""
    lines = [f"{title or s['benchmark']}: {s['benchmark']}, n {s['n']}{rows}"]
    for k, v in s["scores"].items():
        value = f"{v['value']} / {s['n']}" if k == "ocrbench" else f"{v['value']:.2f}"
        lines.append(f"  {k:<26}{value:>12}  {v['protocol']}")
    if "unreadable" in s:
        lines.append(f"  {'unreadable':<26}{s['unreadable']:>12}  by the rules (scored wrong in acc); "
                     f"{s['unreadable_extracted']} by rules+extractor")
    return "\n".join(lines)
