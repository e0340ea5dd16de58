"""Reading an answer out of generated text, and judging it: the letter parsers of lmms-eval's Video-MME and
MVBench tasks, and exact match.

- ``videomme_letter`` is the ``extract_characters_regex`` of lmms-eval's Video-MME before 0.7 (0.7.3's
  ``lmms_eval/tasks/videomme/utils.py`` calls the shared ``extract_mcq_answer`` instead: the ``mcq`` parser,
  which the bundled ``videomme`` task uses); kept for runs compared with older lmms-eval numbers:
  strip, delete the answer prefixes ("The best answer is", ...), give up ("") on more than 10 words that
  hold no A-D, else the first of A, B, C, D anywhere in the text. Kept exactly, its quirk included: two of
  its prefixes lack a comma in the source list, so Python joins them into "The best option isThe correct
  option is" and "Best answer:Best option:", which never match; the first capital A-D still decides.
- ``mvbench_letter`` is ``mcq_acc``'s ``process`` (``lmms_eval/tasks/mvbench/utils.py``): "B. text" -> "B";
  else newlines and tabs to spaces, punctuation handled as VQA's ``processPunctuation``, quotes and
  parentheses stripped, lower-cased, then the first standalone letter a-e (as a word) upper-cased, else the
  processed text itself. lmms-eval compares ``process(pred) == process(gold letter)``; so does ``correct``.
- ``nextqa_letter`` and ``egoschema_letter`` are MMMU's ``parse_multi_choice_response`` as two lmms-eval tasks
  copy it (``lmms_eval/tasks/nextqa/utils.py``, ``lmms_eval/tasks/egoschema/utils.py``, lmms-eval 0.7.3).
  Strip ``,.!?;:'`` from both ends, pad with spaces, then collect candidates: "(A)"; else (nextqa) / also
  (egoschema) "A " and "A."; with none and more than 5 words, the options whose text appears (lower case).
  Several candidates: nextqa takes the one found last (``rfind``, argmax), egoschema the one whose last
  occurrence comes first (argmin). No candidate: lmms-eval draws a random letter (``random.choice``); here
  the answer is "" (unparsed, wrong), so a run is deterministic — on a model that often answers without a
  letter, lmms-eval's score is higher by about (unparsed / options) / samples.
- ``longvideobench_letter`` is LongVideoBench's ``parse_multi_choice_response`` (``lmms_eval/tasks/
  longvideobench/utils.py``): Video-MME's extraction over A-E, its prefix list without the missing commas; a
  random letter there too where none is found ("" here).
- ``mlvu_letter`` is lmms-eval's shared ``extract_mcq_answer`` (``lmms_eval/tasks/_task_utils/mcq_extract.py``)
  over A-D, as 0.7.3's MLVU and Video-MME ``extract_characters_regex`` call it (parsers ``mlvu`` and ``mcq``): strip ``,.!?;:'"``, pad with spaces, collect
  candidates by format — "(A)", "A.", "A:", "A)", "A ", a letter after an answer phrase ("the answer is"),
  a standalone letter at the start or at the end — each at its last position (the phrase: its first after the
  phrase), else any A-D (fallback); the highest priority wins (start 10, end 9, phrase 7, parentheses 6,
  period 5, colon 4, right_paren 3, space 2), the later position breaking ties; none: "".
- ``mme_label`` is lmms-eval MME's ``parse_pred_ans`` (from Otter's eval; ``lmms_eval/tasks/mme/utils.py``):
  lower case, strip, delete "."; "yes" / "no" as such, one letter "y" / "n", else "yes" or "no" within the
  first 4 characters (yes first), else "other". ``yes_no`` judges it against the gold normalised the same way
  (``mme_process_results``); ``mme_scores`` is ``mme_aggregate_results``: per category, each image's two
  questions give acc (the share right, x100) plus acc+ (100 when both are right), averaged over the images;
  the categories' scores summed into the perception and the cognition score.
- ``mmbench_letter`` is MMBench's ``can_infer`` (``lmms_eval/tasks/mmbench/mmbench_evals.py``): split on
  whitespace; exactly one of A-E standing alone (not an "A" that may be a quantifier in more than 3 words),
  else exactly one of them wrapped as "A.", "A,", "A:", "A)", "A).", "(A)", "(A).", ":A", ":A,", ":A.", ":A)",
  ":A)."; else the one option (A-D) whose text the answer contains (lower case). Where it finds none lmms-eval
  asks GPT to match the answer to an option; here the answer is "" (unparsed, wrong). ``mmbench_circular`` is
  its circular evaluation (``eval_result``): a question counts only if it and each of its rotated copies (rows
  of the data with index + k * 1e6) are answered right.
- ``mlvu_scores`` is lmms-eval MLVU's ``mlvu_aggregate_results_dev``: the accuracy of each of the 7 dev
  ``task_type`` categories and their mean (the number MLVU reports, not the mean over samples).
- ``exact_match``: lm-evaluation-harness's ``exact_match`` metric with its ``ignore_case`` and
  ``ignore_punctuation`` options (both off by default there; here the task YAML sets them), after stripping
  surrounding whitespace.
"""

from __future__ import annotations

import re
import string

import numpy as np
from typing import Callable, Literal, Sequence

Parser = Literal["videomme", "mvbench", "nextqa", "egoschema", "longvideobench", "mlvu", "mcq", "mmbench"]

_VIDEOMME_PREFIXES = [
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is" "The correct option is",  # sic: lmms-eval's list (see the module docstring)
    "Best answer:" "Best option:",
]


def videomme_letter(text: str) -> str:
    """lmms-eval Video-MME's ``extract_characters_regex``: the answer letter A-D, or "" when none is found."""
    s = text.strip()
    for prefix in _VIDEOMME_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    match = re.search(r"[ABCD]", s)
    return "" if match is None else match[0]


_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: lmms-eval's (and VQA's) pattern
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def _vqa_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def mvbench_letter(text: str) -> str:
    """lmms-eval MVBench's ``process``: the option letter (upper case) or, failing that, the normalised text."""
    match = re.match(r"^([A-E])\.\s*(.+)$", text.strip(), re.IGNORECASE)
    if match:
        return match.group(1).upper()
    s = text.replace("\n", " ").replace("\t", " ").strip()
    s = _vqa_punctuation(s)
    s = s.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = re.search(r"\b([A-E])\b", s, re.IGNORECASE)
    return letter.group(1).upper() if letter else s


_LVB_PREFIXES = ["The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
                 "The correct option is", "Best answer:", "Best option:"]


def longvideobench_letter(text: str, options: Sequence[str] = ()) -> str:
    """lmms-eval LongVideoBench's ``parse_multi_choice_response``: Video-MME's extraction over A-E with the prefix
    list written out in full; "" where lmms-eval picks a random letter."""
    s = text.strip()
    for prefix in _LVB_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCDE]", s):
        return ""
    match = re.search(r"[ABCDE]", s)
    return "" if match is None else match[0]


def _mmmu_prepare(text: str, options: Sequence[str]) -> tuple[str, list[str], dict[str, str]]:
    response = text
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    letters = list(string.ascii_uppercase[:len(options)])
    return " " + response + " ", letters, {c: o.strip() for c, o in zip(letters, options)}


def _by_text(response: str, index2ans: dict[str, str]) -> list[str]:
    """With no letter found in a response of more than 5 words: the options whose text it contains."""
    if len(response.split()) <= 5:
        return []
    return [c for c, ans in index2ans.items() if ans.lower() in response.lower()]


def nextqa_letter(text: str, options: Sequence[str]) -> str:
    """lmms-eval NExT-QA's ``parse_multi_choice_response``: "(A)", else "A ", else "A.", else an option's text;
    of several, the one found last; none: "" (lmms-eval: a random letter)."""
    response, letters, index2ans = _mmmu_prepare(text, options)
    candidates = [c for c in letters if f"({c})" in response]
    brackets, index_ans = bool(candidates), True
    for pattern in ("{} ", "{}."):
        if not candidates:
            candidates = [c for c in letters if pattern.format(c) in response]
    if not candidates:
        candidates = _by_text(response, index2ans)
        index_ans = False
    if not candidates:
        return ""
    if len(candidates) == 1:
        return candidates[0]
    if not index_ans:
        where = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    else:
        where = [response.rfind(f"({c})" if brackets else f" {c} ") for c in candidates]
    return candidates[int(np.argmax(where))]


def egoschema_letter(text: str, options: Sequence[str]) -> str:
    """lmms-eval EgoSchema's ``parse_multi_choice_response``: every "(A)", "A " and "A." found, else the options'
    texts; of several, the one whose last occurrence comes first; none: "" (lmms-eval: a random letter)."""
    response, letters, index2ans = _mmmu_prepare(text, options)
    candidates = [f"({c})" for c in letters if f"({c})" in response]
    candidates += [f"{c} " for c in letters if f"{c} " in response]
    candidates += [f"{c}." for c in letters if f"{c}." in response]
    index_ans = True
    if not candidates:
        candidates = _by_text(response, index2ans)
        index_ans = False
    if not candidates:
        return ""
    if len(candidates) > 1:
        where = [response.rfind(c) if index_ans else response.lower().rfind(index2ans[c].lower()) for c in candidates]
        pick = candidates[int(np.argmin(where))]
    else:
        pick = candidates[0]
    return pick.replace("(", "").replace(")", "").replace(".", "").strip()


_MCQ_PHRASES = ["the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
                "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
                "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
                "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは"]
_MCQ_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
                 "space": 2, "fallback": 0}
_MCQ_FORMATS = [("({})", "parentheses"), ("{}.", "period"), ("{}:", "colon"), ("{})", "right_paren"), ("{} ", "space")]


def _mcq_candidates(text: str, choices: Sequence[str]) -> list[tuple[str, int, str]]:
    """(letter, position, format) of every format that holds a letter (``extract_mcq_answer``'s order)."""
    found = [(c, text.rfind(f.format(c)), name) for f, name in _MCQ_FORMATS for c in choices if f.format(c) in text]
    lower = text.lower()
    for phrase in _MCQ_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            found += [(c, text.find(c, at + len(phrase)), "phrase") for c in choices
                      if text.find(c, at + len(phrase)) != -1]
    stripped = text.strip()
    found += [(c, 0, "start") for c in choices
              if stripped.startswith(c) and (len(stripped) == 1 or not stripped[1].isalpha())]
    found += [(c, len(text) - 1, "end") for c in choices
              if stripped.endswith(c) and (len(stripped) == 1 or not stripped[-2].isalpha())]
    return found


def mlvu_letter(text: str, options: Sequence[str] = ()) -> str:
    """lmms-eval's ``extract_mcq_answer`` over A-D (MLVU's ``extract_characters_regex``): the letter of the
    highest-priority format, the later one of a tie; "" when none."""
    if not text or not text.strip():
        return ""
    s = text.strip()
    for char in [",", ".", "!", "?", ";", ":", "'", '"']:
        s = s.strip(char)
    s = " " + s + " "
    choices = ["A", "B", "C", "D"]
    found = _mcq_candidates(s, choices) or [(c, s.rfind(c), "fallback") for c in choices if c in s]
    if not found:
        return ""
    found.sort(key=lambda x: (_MCQ_PRIORITY[x[2]], x[1]), reverse=True)
    return found[0][0]


_MMB_WRAPS = [("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","),
              (":", "."), (":", ")"), (":", ").")]


def _mmbench_option(answer: str, choices: str = "ABCDE") -> str:
    """MMBench's ``can_infer_option``: the one letter standing alone or wrapped in the answer's words, else ""."""
    if "Failed to obtain answer via API" in answer:
        return ""
    splits = [x.strip() for x in answer.split()]
    alone = [c for c in choices if c in splits]
    if len(alone) == 1 and not ("A" in splits and len(splits) > 3):
        return alone[0]
    for prefix, suffix in _MMB_WRAPS:
        wrapped = [c for c in choices if prefix + c + suffix in splits]
        if len(wrapped) == 1:
            return wrapped[0]
    return ""


def mmbench_letter(text: str, options: Sequence[str] = ()) -> str:
    """lmms-eval MMBench's ``can_infer``: a letter from the answer's words, else the one option (A-D) whose text
    it contains; "" where lmms-eval would ask GPT."""
    letter = _mmbench_option(text)
    if letter:
        return letter
    found = [c for c, o in zip("ABCD", options) if str(o).lower() in text.lower()]
    return found[0] if len(found) == 1 else ""


PARSERS: dict[str, Callable[..., str]] = {
    "videomme": lambda text, options=(): videomme_letter(text),
    "mvbench": lambda text, options=(): mvbench_letter(text),
    "nextqa": nextqa_letter,
    "egoschema": egoschema_letter,
    "longvideobench": longvideobench_letter,
    "mlvu": mlvu_letter,
    "mcq": mlvu_letter,
    "mmbench": mmbench_letter,
}


def letter_correct(parser: Parser, prediction: str, gold_letter: str, options: Sequence[str] = ()) -> tuple[str, bool]:
    """(the parsed answer, whether it is the gold letter) as the parser's lmms-eval task judges it (``options``:
    the option texts, which the nextqa and egoschema parsers also match)."""
    parsed = PARSERS[parser](prediction, options)
    if parser == "mvbench":  # mcq_acc: process(pred) == process(gold)
        return parsed, parsed == mvbench_letter(gold_letter)
    return parsed, parsed.lower() == gold_letter.lower()  # videomme_process_results


def mme_label(text: str) -> str:
    """lmms-eval MME's ``parse_pred_ans``: "yes", "no" or "other"."""
    s = text.lower().strip().replace(".", "")
    if s in ("yes", "no"):
        return s
    if len(s) == 1:
        return {"y": "yes", "n": "no"}.get(s, "other")
    return "yes" if "yes" in s[:4] else "no" if "no" in s[:4] else "other"


def yes_no(prediction: str, golds: list[str]) -> tuple[str, bool]:
    """(the parsed "yes" / "no" / "other", whether it is the gold answer) as ``mme_process_results`` judges."""
    parsed = mme_label(prediction)
    return parsed, parsed == golds[0].lower().strip().replace(".", "")


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(rows: Sequence[tuple[str, str, bool]]) -> dict:
    """lmms-eval's ``mme_aggregate_results`` over (category, image id, correct) rows: per category the mean over
    its images of acc + acc+ (0-200); ``perception``: the sum over its 10 categories, ``cognition``: over the
    rest (lmms-eval's split). An image without exactly two answered questions (a ``--limit`` run), which lmms-eval
    refuses, is left out and counted in ``incomplete_images``."""
    pairs: dict[str, dict[str, list[float]]] = {}
    for category, image, correct in rows:
        pairs.setdefault(category, {}).setdefault(image, []).append(float(correct))
    categories, incomplete = {}, 0
    for category, images in pairs.items():
        scores = [v for v in images.values() if len(v) == 2]
        incomplete += len(images) - len(scores)
        if scores:
            categories[category] = sum(sum(v) / 2 * 100.0 + (sum(v) == 2) * 100.0 for v in scores) / len(scores)
    return {"perception": sum(v for k, v in categories.items() if k in MME_PERCEPTION),
            "cognition": sum(v for k, v in categories.items() if k not in MME_PERCEPTION),
            "categories": categories, "incomplete_images": incomplete}


CIRCULAR = 1_000_000  # MMBench: a question's rotated copies have index + k * 1e6 (in the data file itself)


def mmbench_circular(rows: Sequence[tuple[int, str, bool]]) -> dict:
    """lmms-eval MMBench's ``eval_result`` (circular evaluation) over (index, category, correct) rows: a question
    (index below 1e6) is a hit when every row with its index modulo 1e6 (itself and its rotated copies) is right;
    ``overall`` is the hit rate x100 (the score lmms-eval reports), ``category_acc`` each category's hit rate.
    An unparsed answer is wrong (lmms-eval asks GPT there; with ``eval_method="static"`` it tries
    ``extract_mcq_answer`` first); a question whose main row is not answered (a ``--limit`` run) is left out."""
    groups: dict[int, list[bool]] = {}
    for index, _, correct in rows:
        groups.setdefault(int(index) % CIRCULAR, []).append(bool(correct))
    main = {int(index): category for index, category, _ in rows if int(index) < CIRCULAR}
    hits = {index: all(groups[index]) for index in main}
    by_category: dict[str, list[bool]] = {}
    for index, category in main.items():
        by_category.setdefault(category, []).append(hits[index])
    overall = sum(hits.values()) / len(hits) if hits else None
    return {"overall": None if overall is None else 100.0 * overall, "overall_acc": overall,
            "category_acc": {c: sum(v) / len(v) for c, v in sorted(by_category.items())}, "questions": len(hits),
            "rows": len(rows)}


MLVU_TASK_TYPES = ("anomaly_reco", "count", "ego", "needle", "order", "plotQA", "topic_reasoning")


def mlvu_scores(rows: Sequence[tuple[str, bool]]) -> dict:
    """lmms-eval's ``mlvu_aggregate_results_dev`` over (task_type, correct) rows: each dev category's accuracy
    (x100, 0 for a category with no sample) and ``average``, their sum over the 7 categories (lmms-eval divides by
    7 even on a subset); ``average_present``: the mean over the categories that have samples."""
    counts = {t: [0, 0] for t in MLVU_TASK_TYPES}
    for task_type, correct in rows:
        if task_type not in counts:
            raise ValueError(f"MLVU task_type {task_type!r} is not one of the dev set's {', '.join(MLVU_TASK_TYPES)}")
        counts[task_type][0] += int(correct)
        counts[task_type][1] += 1
    categories = {t: 100.0 * right / seen if seen else 0.0 for t, (right, seen) in counts.items()}
    present = [categories[t] for t, (_, seen) in counts.items() if seen]
    return {"categories": categories, "average": sum(categories.values()) / len(MLVU_TASK_TYPES),
            "average_present": sum(present) / len(present) if present else None,
            "samples": {t: seen for t, (_, seen) in counts.items()}}


def normalize(text: str, *, ignore_case: bool, ignore_punctuation: bool) -> str:
    s = text.strip()
    if ignore_case:
        s = s.lower()
    if ignore_punctuation:
        s = s.translate(str.maketrans("", "", string.punctuation))
    return s


def exact_match(prediction: str, golds: list[str], *, ignore_case: bool = True,
                ignore_punctuation: bool = False) -> tuple[str, bool]:
    """(the normalised prediction, whether it equals any normalised gold answer)."""
    parsed = normalize(prediction, ignore_case=ignore_case, ignore_punctuation=ignore_punctuation)
    return parsed, any(parsed == normalize(g, ignore_case=ignore_case, ignore_punctuation=ignore_punctuation)
                       for g in golds)
