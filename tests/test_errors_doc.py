"""docs/errors.md says what llava-next prints: every message its tables quote is one the code produces.

Two checks:
- every quoted message (first column of each "message (shape)" table), with its placeholders (PATH, N,
  KEY, ... and "...": any text), is a piece of a message some string literal or f-string of the source can
  produce (an f-string's ``{...}`` fields: any text). It catches a doc that paraphrases, or a message
  changed in the code and not in the doc.
- the command-line cases a new user meets first are run, and what ``llava-next`` prints must match the
  message the doc quotes for them (so a message the library has but the CLI never shows, as the doc's old
  ``image file not found: 'PATH'`` for a missing ``--image``, is caught too).
"""

from __future__ import annotations

import ast
import bisect
import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
HOLE = "\x00"  # any text: a placeholder of the doc, an f-string field of the source
# in a quoted message: PATH, N, KEY, DIR, ... (words in capitals) and "..." stand for text the code fills in
PLACEHOLDER = re.compile(r"\b[A-Z](?:[A-Z_]*[A-Z])?(?:/[\w.-]*[\w])?\b")  # PATH, N, KEY, DIR/config.json
ELLIPSIS = re.compile(r" ?(?:\.\.\.|…)")  # text the doc left out: any length
SKIP = "\x02"
WORD = re.compile(r"[a-z]{4,}")


def to_pattern(message: str) -> str:
    """The doc's quoted message with its placeholders as HOLE and its elisions as SKIP."""
    return PLACEHOLDER.sub(HOLE, ELLIPSIS.sub(SKIP, message))


def quoted_messages() -> list[str]:
    """The backquoted texts of the first column of every table whose header is "message (shape)", less the
    class names, selector calls and environment variables those cells also mention."""
    found, header = [], None
    for line in DOC.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if header is None:
            header = cells[0]
            continue
        if header != "message (shape)" or set(cells[0]) <= set("-: "):
            continue
        for span in re.findall(r"`([^`]+)`", cells[0]):
            span = span.replace("\\|", "|")
            if (re.fullmatch(r"[A-Za-z_][\w.]*(\(.*\))?|--[\w-]+( [\w|]+)?", span)
                    or not re.search(r"[a-z]{3}", PLACEHOLDER.sub("", ELLIPSIS.sub("", span)))):
                continue  # `PromptError`, `sel.box(...)`, `--dtype int8`, `LLAVA_NEXT_DIST_TIMEOUT`: not messages
            found.append(span)
    return found


def source_templates() -> list[str]:
    """Every string constant and f-string of the package sources, an f-string's fields as HOLE (implicit
    concatenation is already one node in the AST)."""
    out = []
    for package in ("llava_next", "weights", "kernels"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.JoinedStr):
                    out.append("".join(v.value if isinstance(v, ast.Constant) else HOLE for v in node.values))
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    out.append(node.value)
    return out


FIELD_CHARS = 80  # the most doc text one template field stands for ("int4", a path, a list of names)
PLACEHOLDER_CHARS = 12  # the most template text one doc placeholder stands for (it stands for a field)
START_CHARS = 32  # the most doc text a field that the message starts inside may take
SHARE = 0.2  # the least share of the message's own characters that the template's text matches
ANCHOR = 8  # a message shares a literal run this long (or its longest, if shorter) with its template


def _shares(run: str, template: str, size: int) -> bool:
    """Whether ``run`` and ``template`` have ``size`` consecutive characters in common."""
    return any(run[k:k + size] in template for k in range(len(run) - size + 1))


def can_produce(template: str, message: str, rest=None) -> bool:
    """Whether ``message`` (HOLE: any text, SKIP: text left out) is a piece of some string ``template`` (HOLE:
    any text) can be. They must share a literal run of ANCHOR characters. A template field may stand for up
    to FIELD_CHARS characters of concrete doc text ("int4" for ``{method}``; START_CHARS if the message
    starts inside it) and a doc placeholder for up to PLACEHOLDER_CHARS characters of template text; longer
    runs would let a template of fields match anything, and SHARE of the message's characters must be the
    template's own text. A field that ends the template (``f"{src}: {e}"``:
    a message wrapping another) may take the whole rest of the message when ``rest(text)`` says that
    another template produces it. DP over the message: for each reachable template position, the fewest
    characters its current field has taken."""
    runs = [r for r in re.split(f"[{HOLE}{SKIP}]", message) if r]
    need = min(ANCHOR, max((len(r) for r in runs), default=0))  # some literal text in common, first
    if not any(len(r) >= need and _shares(r, template, need) for r in runs):
        return False
    n = len(template)
    last_field = n - 1 if template.endswith(HOLE) else None
    literal = list(itertools.accumulate((ch != HOLE for ch in template), initial=0))  # literal chars before k
    own = list(itertools.accumulate((ch not in (HOLE, SKIP) for ch in message), initial=0))  # the message's

    # reach: template position -> (characters its field has taken, message characters matched literally);
    # per position the most matched is kept (then the fewest taken)
    def better(a: tuple[int, int], b: tuple[int, int] | None) -> bool:
        return b is None or (a[1], -a[0]) > (b[1], -b[0])

    def put(reach: dict, j: int, state: tuple[int, int]) -> None:
        if better(state, reach.get(j)):
            reach[j] = state

    def closure(reach: dict) -> dict:  # a field may be empty: step over it
        for j in sorted(reach):
            if j < n and template[j] == HOLE:
                put(reach, j + 1, (0, reach[j][1]))
        return reach

    # the message may start anywhere in the template; inside a field, with only START_CHARS of it left
    reach = closure({j: (FIELD_CHARS - START_CHARS if j < n and template[j] == HOLE else 0, 0) for j in range(n + 1)})
    for i, c in enumerate(message):
        if (rest is not None and last_field in reach and i and reach[last_field][1] >= SHARE * own[i]
                and rest(message[i:])):
            return True
        nxt: dict[int, tuple[int, int]] = {}
        if c == SKIP:  # the doc left text out: any run of the template
            best = max(m for _, m in reach.values())
            nxt = {k: (0, best) for k in range(min(reach), n + 1)}
        elif c == HOLE:  # a doc placeholder: skip up to PLACEHOLDER_CHARS literal characters of the template,
            for j, (taken, m) in reach.items():  # or stay inside the field it is in (a placeholder within its text)
                if j < n and template[j] == HOLE and taken < FIELD_CHARS:
                    put(nxt, j, (taken + 1, m))
            for j, (_, m) in reach.items():
                stop = bisect.bisect_right(literal, literal[j] + PLACEHOLDER_CHARS)  # literal[k] - literal[j] <= P
                # it lands on template text or right after a field: never back into a field with a fresh budget
                for k in range(j, stop):
                    if k == n or template[k] != HOLE:
                        put(nxt, k, (0, m))
        else:
            for j, (taken, m) in reach.items():
                if j < n and template[j] == c:
                    put(nxt, j + 1, (0, m + 1))
                elif j < n and template[j] == HOLE and taken < FIELD_CHARS:
                    put(nxt, j, (taken + 1, m))
        if not nxt:
            return False
        reach = closure(nxt)
    return max(m for _, m in reach.values()) >= SHARE * own[-1]


@pytest.fixture(scope="module")
def templates():
    templates = source_templates()
    index: dict[str, list[int]] = {}
    anchors: dict[str, set[int]] = {}  # every ANCHOR-character run of literal text -> the templates that have it
    for i, t in enumerate(templates):
        for w in set(WORD.findall(t)) or {""}:  # "": templates of short words and fields (f"{x} is not one of {y}")
            index.setdefault(w, []).append(i)
        for k in range(len(t) - ANCHOR + 1):
            if HOLE not in t[k:k + ANCHOR]:
                anchors.setdefault(t[k:k + ANCHOR], set()).add(i)
    return templates, index, anchors


def sharing_an_anchor(pattern: str, anchors: dict[str, set[int]]) -> set[int] | None:
    """The templates that can pass ``can_produce``'s first test when it asks for ANCHOR characters in common
    (``pattern`` has a literal run that long): the same answer, found in the index instead of template by
    template; None when the pattern's runs are all shorter (can_produce then asks for less)."""
    runs = [r for r in re.split(f"[{HOLE}{SKIP}]", pattern) if len(r) >= ANCHOR]
    if not runs:
        return None
    return set().union(*(anchors.get(r[k:k + ANCHOR], ()) for r in runs for k in range(len(r) - ANCHOR + 1)))


def produced_by_source(message: str, templates, nested: bool = True) -> bool:
    """Some source string produces ``message`` (HOLE: any text); ``nested``: a template ending in a field
    may wrap a message another template produces."""
    strings, index, anchors = templates
    pattern = to_pattern(message) if nested else message
    votes: dict[int, int] = {}
    for w in set(WORD.findall(pattern)):
        for i in index.get(w, ()):
            votes[i] = votes.get(i, 0) + 1
    # every template sharing a word, most shared first (ties by index): no cut-off, and no order that depends on
    # the set's string hashing (a top-300 cut over hash-ordered ties dropped the right template on some runs)
    candidates = sorted(votes, key=lambda i: (-votes[i], i)) + index.get("", []) if votes else range(len(strings))
    anchored = sharing_an_anchor(pattern, anchors)
    if anchored is not None:  # the others fail can_produce's first test anyway
        candidates = [i for i in candidates if i in anchored]
    if not nested:
        return any(can_produce(strings[i], pattern) for i in candidates)
    inner: dict[str, bool] = {}

    def wrapped(text: str) -> bool:
        if text not in inner:
            inner[text] = produced_by_source(text, templates, nested=False)
        return inner[text]

    return any(can_produce(strings[i], pattern, wrapped) for i in candidates)


def test_the_matcher_tells_a_message_from_a_paraphrase():
    assert can_produce(f"{HOLE}: no such file", to_pattern("PATH: no such file"))
    assert can_produce(f"cannot quantize this checkpoint to {HOLE}: {HOLE}",
                       "cannot quantize this checkpoint to int4: ")
    assert not can_produce(f"{HOLE}", "a message that no template of fields alone may stand for")
    assert not can_produce(f"the {HOLE} of a {HOLE}", "the logits of generated token k ... and more words than a field")
    assert not can_produce(f"{HOLE}: no such file", to_pattern("PATH: file not found"))
    assert not can_produce(f"has none (SigLIP), and neither", "has none (SigLIP) and")
    assert not can_produce(f"{HOLE}: {HOLE} visual tokens into the decoder, more than the {HOLE} without",
                           to_pattern("maxinfo: embedding=cls needs a tower with a CLS token (CLIP); this model's"))


def test_every_quoted_message_is_one_the_code_produces(templates):
    messages = quoted_messages()
    assert len(messages) > 150  # the tables were found
    missing = [m for m in messages if not produced_by_source(m, templates)]
    assert not missing, "docs/errors.md quotes messages no source string produces:\n" + "\n".join(missing)


# ---- the first command-line errors a new user meets, run ----------------------------------------------------
def doc_regex(message: str) -> re.Pattern:
    """The quoted message as a regex over what is printed (placeholders: any text)."""
    return re.compile(".*?".join(re.escape(p) for p in re.split(f"[{HOLE}{SKIP}]", to_pattern(message))))


CASES = [  # (the docs/errors.md section that quotes the message, the message, the command line that must print it)
    ("Images", "PATH: no such file", ["inspect", "--model", "tiny-random", "--image", "rockett.jpg"]),
    ("Video", "PATH: no such file", ["inspect", "--model", "tiny-random", "--video", "missing.mp4"]),
    ("Video", "PATH: is an empty folder; give a video file or a folder of frame images (.jpg, .jpeg, .png)",
     ["inspect", "--model", "tiny-random", "--video", "DIR"]),
    ("Images", "PATH: is a directory, not an image file", ["inspect", "--model", "tiny-random", "--image", "DIR"]),
    ("Command line", "sample:NAME: no such sample; the samples are sample:bunny, sample:cat (llava_next/samples)",
     ["inspect", "--model", "tiny-random", "--image", "sample:dog"]),
    ("Command line", "no PROMPT given: put the question after the files (run --video clip.mp4 \"What happens?\") or "
     "pass --prompt TEXT", ["run", "--model", "tiny-random", "--image", "sample:cat"]),
    ("Command line", "two prompts given: PROMPT '...' and --prompt '...'; give one",
     ["run", "--model", "tiny-random", "--prompt", "a", "b"]),
    ("Command line", "--frames, --pool-stride: video options, but no --video was given",
     ["inspect", "--model", "tiny-random", "--image", "sample:cat", "--frames", "4", "--pool-stride", "4"]),
    ("Command line", "--png draws the plan of images or of one video; give only those",
     ["inspect", "--model", "tiny-random", "--image", "sample:cat", "--video", "sample:bunny", "--png", "x.png"]),
    ("Command line", "--text-tokens and --prompt: give one",
     ["inspect", "--model", "tiny-random", "--image", "sample:cat", "--text-tokens", "5", "--prompt", "hi"]),
    ("Command line", "--model NAME: planning needs the model's config without downloading it; give a preset name "
     "(...), the hub id of one, a checkpoint directory, or tiny-random / tiny-random-interleave / tiny-random-onevision",
     ["inspect", "--model", "xyzzy", "--image", "sample:cat"]),
    ("Token reduction", "unknown reduction method 'X'; the methods are: maxinfo, scene, pllava, slowfast, dycoke-ttm, "
     "visionzip, fastv, framefusion, dycoke",
     ["inspect", "--model", "tiny-random", "--image", "sample:cat", "--reduce", "zip"]),
    ("Token reduction", "fastv has no knob 'ratio'; its knobs: layer, keep, score",
     ["inspect", "--model", "tiny-random", "--image", "sample:cat", "--reduce", "fastv:ratio=2"]),
    ("Video", "--scene-threshold: these set scene sampling's cut detector, and sampling is not scene; add --sampling "
     "scene (train: --frame-sampling scene)",
     ["inspect", "--model", "tiny-random", "--video", "sample:bunny", "--scene-threshold", "20"]),
    ("Token reduction", "--select-frames picks a video's frames, but no --video was given",
     ["inspect", "--model", "tiny-random", "--image", "sample:cat", "--select-frames", "maxinfo"]),
]


def section(title: str) -> str:
    """The text of the docs/errors.md section whose heading starts with ``title``."""
    text = DOC.read_text().replace("\\|", "|")
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


@pytest.mark.parametrize("title, message, argv", CASES, ids=[" ".join(a[1:]) for _, _, a in CASES])
def test_the_cli_prints_the_documented_message(title, message, argv, tmp_path, monkeypatch, capsys):
    from llava_next.cli.main import main

    assert f"`{message}`" in section(title), f"not quoted in the section {title!r} of docs/errors.md: {message}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "DIR").mkdir()
    assert main(argv) == 2
    err = capsys.readouterr().err
    line, = [line for line in err.splitlines() if line.startswith(f"llava-next {argv[0]}: error: ")]
    printed = line.split(": error: ", 1)[1]
    # the doc may stop early ("shape"): what it quotes is how the printed message begins
    assert doc_regex(message).match(printed), f"printed: {printed}\ndocumented: {message}"
