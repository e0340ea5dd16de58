"""Open-ended caption metrics over a corpus: BLEU-1..4, METEOR, ROUGE-L and CIDEr from pycocoevalcap (the
maintained COCO caption evaluation code, the one lmms-eval's captioning tasks call), with a bootstrap interval.

What it follows: lmms-eval 0.7.3's ``coco_aggregation_result`` (``lmms_eval/tasks/coco_cap/utils.py``; VATEX's
``vatex_aggregation_result`` is the same): each sample's prediction and its reference captions, both tokenized
by pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP's PTB tokenizer, lower case, run in Java, then the
punctuation tokens dropped), then each scorer's ``compute_score`` over the whole corpus: one number per metric,
0-1 as pycocoevalcap gives it (lmms-eval's coco tasks report it so; its YouCook2 task averages per video, x100,
which this module does not do). CIDEr is pycocoevalcap's ``Cider`` (CIDEr-D: document frequencies from the
references of the samples scored, so a subset's CIDEr is not the full set's).

Switches (the task file's keys, tasks.py):

- ``caption_tokenizer``: ``ptb`` (default: lmms-eval's; needs ``java`` on PATH) or ``python``, this module's
  re-implementation of the PTB rules that matter for captions (lower case; quotes dropped; brackets as -lrb-,
  -rrb-, -lsb-, -rsb-, -lcb-, -rcb-, which pycocoevalcap keeps, since its punctuation list has them in upper
  case; "n't", "'s", "'re", "'ve", "'ll", "'d", "'m" split off; single quotes around words dropped; "$" and
  "%" split off; commas, semicolons, colons, "?", "!", "--", "..." and a word-final period split off and
  dropped, except in words that hold another period, such as "u.s." and "p.m.", and in numbers such as "3.5"
  or "5:30"). A stated divergence: Stanford's abbreviation list ("mr.", "dr.", ...) is not copied, so "Mr."
  loses its period here; tests/test_eval_captions.py checks both agree on its sentences.
- ``caption_metrics``: which of ``METRICS`` to compute (default all). METEOR runs pycocoevalcap's
  ``meteor-1.5.jar`` (Java, 2 GB heap, 10-35 s to load its paraphrase table on a busy 2-core machine). SPICE
  is not offered: it needs Stanford CoreNLP models that pycocoevalcap downloads on first use, and lmms-eval has
  it commented out.
- Per sample: beside each corpus score, pycocoevalcap's scorers return one value per image, and
  ``caption_scores`` keeps them (``per_sample``): BLEU-n is that caption's sentence-level BLEU (pycocoevalcap's
  1e-15 / 1e-9 added to each n-gram precision's counts, the brevity penalty against its closest reference length), METEOR its segment
  score, ROUGE-L its own, CIDEr its CIDEr-D against document frequencies taken from the whole corpus scored (so a
  sample's CIDEr changes with the samples around it). The corpus ROUGE-L and CIDEr are the means of these; the
  corpus BLEU pools n-gram counts and the corpus METEOR pools its statistics, so neither is their mean.
- ``caption_bootstrap``: resamples for the percentile 95% interval of each corpus metric (samples drawn with
  replacement, each metric recomputed on the resample, CIDEr's document frequencies included; 0: none). METEOR
  has no interval (one Java pass per resample).

``pycocoevalcap`` is imported only here, and only when scoring (the ``eval`` extra brings it).
"""

from __future__ import annotations

import re
import shutil
from typing import Literal, Sequence

import numpy as np

Metric = Literal["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
METRICS: tuple[str, ...] = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
Tokenizer = Literal["ptb", "python"]
TOKENIZERS: tuple[str, ...] = ("ptb", "python")
NOT_RUN = {"SPICE": "needs Stanford CoreNLP models downloaded on first use (pycocoevalcap's get_stanford_models); "
                    "lmms-eval leaves it commented out too"}


class CaptionMetricError(ValueError):
    """A caption metric cannot run here (no Java, no pycocoevalcap); the message says what to install or set."""


def _needs_java(what: str) -> None:
    if shutil.which("java") is None:
        raise CaptionMetricError(f"{what} runs in Java (pycocoevalcap's jar) and java is not on PATH: install a "
                                 f"Java runtime (apt install default-jre-headless), or set caption_tokenizer: python "
                                 f"and leave METEOR out of caption_metrics in the task file (docs/evaluation.md)")


def _pycocoevalcap():
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise CaptionMetricError("caption metrics need pycocoevalcap: pip install 'llava-next[eval]'") from None
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    return Bleu, Cider, Meteor, Rouge, PTBTokenizer


def check_available(metrics: Sequence[str], tokenizer: Tokenizer) -> None:
    """Refuse before a run, not after its generations, when a chosen metric cannot be computed here."""
    _pycocoevalcap()
    if tokenizer == "ptb":
        _needs_java("caption_tokenizer: ptb")
    if "METEOR" in metrics:
        _needs_java("METEOR")


# ---- tokenization ---------------------------------------------------------------------------------
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
                ";"}  # pycocoevalcap's list, dropped after tokenizing (upper-case brackets: never matched)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CLITICS = {"s", "re", "ve", "ll", "d", "m"}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_SPLIT = re.compile(r"(\.\.\.|--|[()\[\]{}\"`;!?$%&,]|:(?!\d))")


def python_tokens(sentence: str) -> list[str]:
    """A caption's tokens by the PTB rules of the module docstring, punctuation dropped."""
    words = []
    for piece in _SPLIT.sub(r" \1 ", sentence.lower().replace("\n", " ")).split():
        piece = _BRACKETS.get(piece, piece)
        if piece.startswith("'") and piece[1:] not in _CLITICS:  # an opening single quote
            piece = piece[1:]
        if piece.endswith("'") and len(piece) > 1:  # a closing one (or the plural possessive "dogs'")
            piece = piece[:-1]
        if not piece:
            continue
        if piece.endswith(".") and len(piece) > 1 and "." not in piece[:-1]:
            words += [piece[:-1], "."]
            continue
        clitic = _CLITIC.match(piece)
        words += [clitic[1], clitic[2]] if clitic else [piece]
    return [w for w in words if w not in PUNCTUATIONS and w != '"']


def tokenize(captions: dict[int, list[str]], how: Tokenizer) -> dict[int, list[str]]:
    """{key: [caption, ...]} -> {key: [tokens joined by spaces, ...]}, as PTBTokenizer.tokenize returns."""
    if how == "python":
        return {k: [" ".join(python_tokens(c)) for c in v] for k, v in captions.items()}
    _needs_java("caption_tokenizer: ptb")
    *_, PTBTokenizer = _pycocoevalcap()
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


# ---- scores ---------------------------------------------------------------------------------------
def scores_with_samples(refs: dict[int, list[str]], preds: dict[int, list[str]],
                        metrics: Sequence[str]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each metric over the tokenized corpus, and each sample's own value (in the order of the keys): every
    pycocoevalcap scorer's ``compute_score`` returns both, (corpus score, per-image scores); BLEU-n from one
    Bleu(4) pass. A sample's CIDEr uses the corpus' document frequencies (module docstring)."""
    Bleu, Cider, Meteor, Rouge, _ = _pycocoevalcap()
    corpus: dict[str, float] = {}
    each: dict[str, list[float]] = {}
    if any(m.startswith("Bleu_") for m in metrics):
        bleu, per_image = Bleu(4).compute_score(refs, preds, verbose=0)  # 4 numbers; 4 lists, one value an image
        for n in range(1, 5):
            corpus[f"Bleu_{n}"], each[f"Bleu_{n}"] = float(bleu[n - 1]), [float(v) for v in per_image[n - 1]]
    scorers = {"METEOR": Meteor, "ROUGE_L": Rouge, "CIDEr": Cider}
    for metric in [m for m in scorers if m in metrics]:
        if metric == "METEOR":
            _needs_java("METEOR")
        score, per_image = scorers[metric]().compute_score(refs, preds)  # METEOR's Java process ends with it
        corpus[metric], each[metric] = float(score), [float(v) for v in per_image]
    return {m: corpus[m] for m in metrics}, {m: each[m] for m in metrics}


def corpus_scores(refs: dict[int, list[str]], preds: dict[int, list[str]], metrics: Sequence[str]) -> dict:
    """Each metric over the tokenized corpus (pycocoevalcap's compute_score)."""
    return scores_with_samples(refs, preds, metrics)[0]


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], *, metrics: Sequence[str] = METRICS,
                   tokenizer: Tokenizer = "ptb", resamples: int = 100, seed: int = 0) -> dict:
    """The corpus metrics of (prediction, its references) pairs, and their bootstrap 95% intervals.

    Returns {"metrics": {name: value}, "ci95": {name: [low, high]}, "tokenizer", "bootstrap_resamples",
    "not_run": {name: why}, "per_sample": {name: [each prediction's own value, in order]}}."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"caption_scores: {len(predictions)} prediction(s) for {len(references)} reference "
                         f"list(s); give one non-empty list of references per prediction")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown caption metric(s) {', '.join(unknown)}; the metrics are {', '.join(METRICS)}")
    refs = tokenize({i: list(r) for i, r in enumerate(references)}, tokenizer)
    preds = tokenize({i: [p] for i, p in enumerate(predictions)}, tokenizer)
    scores, each = scores_with_samples(refs, preds, metrics)
    return {"metrics": scores, "ci95": _bootstrap(refs, preds, [m for m in metrics if m != "METEOR"], resamples, seed),
            "tokenizer": tokenizer, "bootstrap_resamples": resamples, "not_run": dict(NOT_RUN), "per_sample": each}


def _bootstrap(refs: dict, preds: dict, metrics: list[str], resamples: int, seed: int) -> dict:
    """Percentile 95% interval of each metric over ``resamples`` resamples of the samples (with replacement)."""
    if resamples < 1 or not metrics:
        return {}
    rng = np.random.default_rng(seed)
    n = len(preds)
    draws = {m: [] for m in metrics}
    for picks in rng.integers(0, n, size=(resamples, n)):
        values = corpus_scores({j: refs[int(i)] for j, i in enumerate(picks)},
                               {j: preds[int(i)] for j, i in enumerate(picks)}, metrics)
        for m in metrics:
            draws[m].append(values[m])
    return {m: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for m, v in draws.items()}
