"""Every ``llava-next`` command and every Python recipe in README.md and docs/*.md runs as written, on the
built-in models (runtime/tiny.py), offline.

What is collected (``collect_commands`` / ``collect_recipes``):
- every ``llava-next ...`` line of a fenced shell block (```bash, or a bare ``` block's ``$ llava-next`` lines,
  whose following lines are the documented output and are compared), backslash continuations and
  multi-line quotes joined, ``A && B`` split, ``| python -c ...`` pipes and ``> FILE`` redirects kept;
- every inline code span that is a whole command (`` `llava-next SUB ARGS` ``);
- every ```python block, run in a subprocess per document, blocks in document order in one namespace (as a
  reader pastes them into one session), after the preludes named in ``PRELUDES``.

The only changes made to what the docs say are these tables, each explicit:
- ``MODELS``: a real checkpoint id -> the built-in model of its family; a command that loads weights
  (run, trace, batch, convert) with no ``--model`` (the default, LLaVA-NeXT-Video-7B) gets
  ``--model tiny-random``. ``inspect`` needs no weights and runs unchanged against the real presets.
- ``MEDIA``: the placeholder file names the docs use -> real files, copied under those names into the
  directory each command runs in (so the command line itself is unchanged).
- ``SKIP``: commands that need several processes, a GPU or a long training run, each with its reason.
- ``EXPECT``: commands whose documented outcome is not exit 0.
- ``UNSAID_ANSWER_TOKENS``: ``run`` / ``batch`` commands that leave ``--max-new-tokens`` unsaid get that many
  instead of the CLI's default 256 (the command line is unchanged; a built-in model's answer is noise, and 256
  of its tokens through 32 layers cost ~6 s a command, most of this test). inspect keeps counting 256.
- ``SEQUENCES``: documents whose commands are one workflow (each reads what the one before wrote): they run in
  one directory, in document order (so run the whole document, not one of its commands alone).
- ``CLIP_FOLDERS``: folders of real clips the docs caption (``--videos clips/``).
- ``SHORT_TRAINING``: ``train`` commands of a workflow that run as written but for ``--steps 1`` (each step of
  the built-in model costs seconds; what is checked is that the command takes the files made before it).
Commands run in-process (``cli.main``) in a fresh directory each (a ``SEQUENCES`` document: one for all), with ``LLAVA_NEXT_CACHE`` pointing at a
cache shared by this module (each built-in model is built once) and the hub offline.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import media
from llava_next.cli import main as cli
from llava_next.cli.options import sample_path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# ---- the substitution tables ------------------------------------------------------------------------
MODELS = {  # real checkpoint (hub id or preset name) -> the built-in model of the same family
    "llava-hf/LLaVA-NeXT-Video-7B-hf": "tiny-random",
    "llava-hf/LLaVA-NeXT-Video-34B-hf": "tiny-random",
    "llava-hf/llava-v1.6-mistral-7b-hf": "tiny-random",
    "llava-hf/llava-v1.6-vicuna-13b-hf": "tiny-random",
    "llava-hf/llava-interleave-qwen-0.5b-hf": "tiny-random-interleave",
    "llava-hf/llava-interleave-qwen-7b-hf": "tiny-random-interleave",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": "tiny-random-onevision",  # (and LLaVA-Video-7B-Qwen2: the same)
}
LOADS_WEIGHTS = ("run", "trace", "batch", "score", "eval")  # without --model these would download the default model
# convert reads a llava-hf / original checkpoint (the built-in models exist only in llava-next's layout, which
# convert takes only to quantize it): a tiny llava-hf checkpoint of the same family (tests/checkpoints.py)
CONVERT_SOURCES = {"llava-hf/LLaVA-NeXT-Video-7B-hf": "video"}


def _sample(name):
    return lambda: Path(sample_path(f"sample:{name}"))


MEDIA = {  # placeholder name in the docs -> the real file it stands for
    "photo.jpg": _sample("cat"),
    "a.jpg": lambda: media.real_photo("astronaut"),
    "b.jpg": lambda: media.real_photo("coffee"),
    "rocket.jpg": lambda: media.real_photo("rocket"),
    "bigbuckbunny.mp4": media.real_video,  # the 720x1280 original: README's inspect output is checked against it
    "clip.mp4": _sample("bunny"),
    "a.mp4": _sample("bunny"),
    "b.mp4": lambda: media.cached_video("docs_b", frames=24, size_hw=(90, 160), fps=12, photo="coffee"),
    "long.mp4": _sample("bunny"),
}
CLIP_FOLDERS = {  # folder name in the docs -> {file name: the real clip it stands for}
    "clips": {"a.mp4": _sample("bunny"), "b.mp4": MEDIA["b.mp4"]},
}
SEQUENCES = {"captioning.md"}  # one workflow: zero-shot captions -> conversion -> training -> pairs
SHORT_TRAINING = {("captioning.md", "llava-next train"): ["--steps", "1"]}
BATCH_INPUTS = {  # batch input files the docs name but do not show whole (jobs.jsonl's lines are parallel.md's own)
    "videos.jsonl": [{"id": "clip-0001", "video": "clip.mp4"}, {"id": "clip-0002", "video": "a.mp4"}],
}

SKIP = {  # (document, start of the command) -> why it cannot run here
    ("README.md", "OMP_NUM_THREADS=8 torchrun"): "several processes (torchrun): tests/test_tensor_parallel.py runs it",
    ("parallel.md", "OMP_NUM_THREADS=8 torchrun"): "several processes (torchrun): tests/test_tensor_parallel.py runs it",
    ("parallel.md", "torchrun --nnodes 2"): "two machines with 4 GPUs each (--device cuda)",
    ("parallel.md", "torchrun --nproc-per-node 4"): "several processes (torchrun): tests/test_batch.py runs batch ranks",
    ("training.md", "llava-next train"): "hundreds of training steps on a dataset of one's own: tests/test_train.py "
                                         "runs the command on the built-in model for two steps",
    ("training.md", "llava-next run --model llava-hf/LLaVA-NeXT-Video-7B-hf --adapter runs/ko"):
        "needs the adapter of the training run above it: tests/test_lora.py runs --adapter",
    ("training.md", "torchrun --nproc-per-node 2"): "several processes (torchrun): tests/test_train.py runs 2 ranks",
    ("evaluation.md", "llava-next eval --task videomme"): "needs the Video-MME download: "
                                                            "tests/test_eval_benchmarks.py runs it on a fixture file",
    ("evaluation.md", "llava-next eval --task mvbench_episodic_reasoning"): "needs the MVBench download: "
                                              "tests/test_eval_benchmarks.py runs it on a fixture folder of frames",
}
EXPECT: dict[tuple[str, str], tuple[int, str]] = {}  # (document, start of the command) -> (exit code, message)

# ```python blocks that are not recipes: tour.md quotes the source (tests/test_tour.py checks each quote)
NOT_RECIPES = {"tour.md": "quotes of the source code, checked against it by tests/test_tour.py"}
# (document, index of a python block) -> blocks run first in the same namespace (the doc says so beside it)
PRELUDES = {("reduction.md", 1): [("research.md", 1)]}


# ---- collecting -------------------------------------------------------------------------------------
@dataclass
class Command:
    doc: str  # file name
    line: int  # 1-based line of the command's start
    text: str  # the command as written (continuations joined)
    output: list[str] | None = None  # documented output lines (bare ``` blocks with $ prompts)

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def _fences(text: str):
    """(language, first line number of the body, body lines) of every fenced block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            yield m.group(1), i + 2, lines[i + 1:j]
            i = j
        i += 1


def _logical_lines(body: list[str], first: int):
    """(line number, text) with backslash continuations and open quotes joined."""
    i = 0
    while i < len(body):
        start, text = first + i, body[i]
        while True:
            if text.endswith("\\"):
                i += 1
                text = text[:-1] + " " + body[i].lstrip()
                continue
            try:
                shlex.split(text, comments=True)
            except ValueError:  # a quote spans lines (python -c "...")
                i += 1
                text = text + "\n" + body[i]
                continue
            break
        yield start, text
        i += 1


def collect_commands() -> list[Command]:
    commands = []
    for path in DOCS:
        text = path.read_text()
        for lang, first, body in _fences(text):
            if lang in ("bash", "sh", "shell"):
                for n, line in _logical_lines(body, first):
                    for part in re.split(r"\s&&\s", line):
                        part = part.strip()
                        if part.startswith("llava-next ") or (" llava-next " in part and "torchrun" in part):
                            commands.append(Command(path.name, n, part))
            elif lang == "":
                current = None  # a command's documented output is the rest of its own block
                for n, line in _logical_lines(body, first):
                    if line.startswith("$ llava-next "):
                        current = Command(path.name, n, line[2:], output=[])
                        commands.append(current)
                    elif current is not None and not line.startswith("$ "):
                        current.output.append(line)
        for m in re.finditer(r"`(llava-next (?:run|inspect|trace|convert|batch) [^`]+)`", text):
            commands.append(Command(path.name, text.count("\n", 0, m.start()) + 1, m.group(1)))
    return commands


def collect_recipes() -> dict[str, list[tuple[int, str]]]:
    """{document: [(line, code), ...]} of its ```python blocks."""
    out = {}
    for path in DOCS:
        blocks = [(n, "\n".join(body)) for lang, n, body in _fences(path.read_text()) if lang == "python"]
        if blocks and path.name not in NOT_RECIPES:
            out[path.name] = blocks
    return out


COMMANDS = collect_commands()


def _skip_reason(cmd: Command) -> str | None:
    return next((why for (doc, start), why in SKIP.items() if cmd.doc == doc and cmd.text.startswith(start)), None)


# ---- running ----------------------------------------------------------------------------------------
def substitute(argv: list[str], convert_sources: dict[str, str]) -> list[str]:
    """``CONVERT_SOURCES`` and ``MODELS`` applied to one llava-next argv (without the program name)."""
    if argv[0] == "convert":
        argv = [convert_sources.get(a, a) for a in argv]
    argv = [MODELS.get(a, a) for a in argv]
    if argv[0] in LOADS_WEIGHTS and "--model" not in argv:
        argv = [argv[0], "--model", "tiny-random", *argv[1:]]
    return argv


@pytest.fixture(scope="module")
def convert_sources(tmp_path_factory):
    from checkpoints import make_runnable_checkpoint

    root = tmp_path_factory.mktemp("docs-convert")
    return {real: str(make_runnable_checkpoint(root / kind, kind)[0]) for real, kind in CONVERT_SOURCES.items()}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Commands run in this process: one torch thread. The built-in models' ops are tiny, and two threads
    spinning against the other jobs of a shared 2-core machine made decoding 3.5x slower (measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs-media")
    for name, source in MEDIA.items():
        shutil.copyfile(source(), d / name)
    parallel = (ROOT / "docs" / "parallel.md").read_text()
    jobs = [line for line in parallel.split("# jobs.jsonl", 1)[1].split("# results.jsonl", 1)[0].splitlines()
            if line.startswith("{")]
    assert len(jobs) == 2, jobs  # docs/parallel.md's own example lines are the job file
    (d / "jobs.jsonl").write_text("\n".join(jobs) + "\n")
    for folder, clips in CLIP_FOLDERS.items():
        (d / folder).mkdir()
        for name, source in clips.items():
            shutil.copyfile(source(), d / folder / name)
    for name, items in BATCH_INPUTS.items():
        (d / name).write_text("".join(json.dumps(i) + "\n" for i in items))
    for name, body in doc_files(ROOT / "docs" / "evaluation.md").items():  # its items, tasks and data
        (d / name).write_text(body)
    return d


def doc_files(path: Path) -> dict[str, str]:
    """The input files a document shows whole: each fenced block whose first line is ``# NAME.jsonl`` or
    ``# NAME.yaml`` is the file NAME (the rest of the block)."""
    files = {}
    for _, _, body in _fences(path.read_text()):
        m = re.match(r"^# (\S+\.(?:jsonl|yaml))$", body[0]) if body else None
        if m:
            files[m.group(1)] = "\n".join(body[1:]) + "\n"
    return files


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("docs-cache")
    return {"LLAVA_NEXT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache / "hf"),
            "LLAVA_NEXT_COMPILE": "0"}  # the compiled decode attention costs more than a tiny answer


UNSAID_ANSWER_TOKENS = 16


@pytest.fixture(autouse=True)
def _short_unsaid_answers(monkeypatch):
    """run / batch parsers get ``UNSAID_ANSWER_TOKENS`` as their --max-new-tokens default (see the docstring)."""
    from llava_next.cli import options

    real = options.add_prompt_options

    def shorter(p, *, positional=True, max_new_tokens=options.ANSWER_TOKENS):
        if max_new_tokens == options.ANSWER_TOKENS:  # run's and batch's default; inspect passes None
            max_new_tokens = UNSAID_ANSWER_TOKENS
        real(p, positional=positional, max_new_tokens=max_new_tokens)

    monkeypatch.setattr(options, "add_prompt_options", shorter)


def _workdir(tmp_path: Path, media_dir: Path) -> Path:
    for f in media_dir.iterdir():
        (tmp_path / f.name).symlink_to(f)
    return tmp_path


def _split_shell(text: str) -> list[list[str]]:
    """One logical command line -> its pipeline stages (argv lists); ``> FILE`` kept as [">", FILE]."""
    lex = shlex.shlex(text, posix=True, punctuation_chars="|>")
    lex.whitespace_split, lex.commenters = True, "#"
    stages, cur = [], []
    for tok in lex:
        if tok == "|":
            stages.append(cur)
            cur = []
        else:
            cur.append(tok)
    stages.append(cur)
    return stages


def run_command(cmd: Command, cwd: Path, env: dict, monkeypatch, convert_sources) -> tuple[int, str, str]:
    stages = _split_shell(cmd.text)
    first, redirect = stages[0], None
    if ">" in first:
        k = first.index(">")
        first, redirect = first[:k], first[k + 1]
    assert first[0] == "llava-next", cmd.text
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(substitute(first[1:], convert_sources) + next(
            (extra for (doc, start), extra in SHORT_TRAINING.items() if cmd.doc == doc and cmd.text.startswith(start)),
            []))
    stdout = out.getvalue()
    if redirect:
        (cwd / redirect).write_text(stdout)
        stdout = ""
    for stage in stages[1:]:  # `| python -c ...`: the next stages of the pipe, as the shell would run them
        assert code == 0, err.getvalue()
        assert stage[0] == "python", stage
        r = subprocess.run([sys.executable, *stage[1:]], input=stdout, capture_output=True, text=True, cwd=cwd,
                           timeout=120)
        code, stdout = r.returncode, r.stdout
        err.write(r.stderr)
    return code, stdout, err.getvalue()


@pytest.fixture(scope="module")
def sequence_dirs() -> dict[str, Path]:
    return {}


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_runs_as_written(cmd, media_dir, env, tmp_path, monkeypatch, request, sequence_dirs):
    reason = _skip_reason(cmd)
    if reason:
        pytest.skip(reason)
    sources = request.getfixturevalue("convert_sources") if cmd.text.startswith("llava-next convert") else {}
    if cmd.doc in SEQUENCES:  # one directory for the whole document, made by its first command
        cwd = sequence_dirs.setdefault(cmd.doc, _workdir(tmp_path, media_dir))
    else:
        cwd = _workdir(tmp_path, media_dir)
    code, stdout, stderr = run_command(cmd, cwd, env, monkeypatch, sources)
    want_code, want_message = EXPECT.get(next((k for k in EXPECT if cmd.doc == k[0] and cmd.text.startswith(k[1])),
                                              None), (0, ""))
    assert code == want_code, f"{cmd.id}: {cmd.text}\nexit {code}\n{stderr[-3000:]}"
    assert want_message in stderr
    assert "Traceback" not in stderr, stderr
    if cmd.output:  # the documented output, line for line
        assert [line.rstrip() for line in stdout.strip("\n").splitlines()] == [line.rstrip() for line in cmd.output]


RECIPES = collect_recipes()


def _recipe_script(doc: str) -> str:
    blocks = []
    for k, (line, code) in enumerate(RECIPES[doc]):
        for prelude_doc, j in PRELUDES.get((doc, k), []):
            blocks.append((prelude_doc, *RECIPES[prelude_doc][j]))
        blocks.append((doc, line, code))
    script = ["import sys, torch", "torch.set_num_threads(1)", "ns = {'__name__': '__main__'}"]
    for name, line, code in blocks:
        for real, tiny in MODELS.items():
            code = code.replace(f'"{real}"', f'"{tiny}"')
        script += [f"print('--- {name}:{line}', file=sys.stderr, flush=True)",
                   f"exec(compile({code!r}, '{name}:{line}', 'exec'), ns)"]
    return "\n".join(script) + "\n"


@pytest.fixture(scope="module", autouse=True)
def recipe_runs(media_dir, env, tmp_path_factory, request):
    """Each selected document's recipes, one subprocess per document, all started when this module starts:
    they run on one torch thread each, as do the commands run in this process (``_one_thread``), so they use
    the core those leave idle instead of running one after another at the end. doc -> (process, stderr file)."""
    selected = {item.callspec.params["doc"] for item in request.session.items
                if item.originalname == "test_documented_python_recipes_run_as_written"}
    runs = {}
    for doc in sorted(selected):
        cwd = _workdir(tmp_path_factory.mktemp(f"recipes-{doc}"), media_dir)
        (cwd / "recipes.py").write_text(_recipe_script(doc))
        err = open(cwd / "stderr.txt", "w")
        runs[doc] = (subprocess.Popen([sys.executable, "recipes.py"], cwd=cwd, env={**os.environ, **env},
                                      stdout=subprocess.DEVNULL, stderr=err), cwd / "stderr.txt")
        err.close()
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("doc", sorted(RECIPES))
def test_documented_python_recipes_run_as_written(doc, recipe_runs):
    proc, stderr = recipe_runs[doc]
    code = proc.wait(timeout=600)
    assert code == 0, stderr.read_text()[-4000:]


def test_every_doc_is_collected_and_the_tables_are_used():
    """The collector finds the commands it should (so a doc test cannot pass by collecting nothing), and every
    table entry still matches something in the docs (a stale entry would hide a change)."""
    docs = {c.doc for c in COMMANDS}
    assert {"README.md", "research.md", "reduction.md", "tour.md", "usage.md", "quantization.md", "parallel.md"} <= docs, docs
    assert len(COMMANDS) >= 40, len(COMMANDS)
    assert {"README.md", "research.md", "reduction.md", "usage.md"} <= set(RECIPES), set(RECIPES)
    texts = " ".join(c.text for c in COMMANDS) + " ".join(code for blocks in RECIPES.values() for _, code in blocks)
    for real in MODELS:
        assert real in texts, f"MODELS entry {real} no longer appears in the docs"
    for doc, start in [*SKIP, *EXPECT]:
        assert any(c.doc == doc and c.text.startswith(start) for c in COMMANDS), (doc, start)
    for name in MEDIA:
        assert name in texts, f"MEDIA entry {name} no longer appears in the docs"
    for folder in CLIP_FOLDERS:
        assert f"{folder}/" in texts, f"CLIP_FOLDERS entry {folder} no longer appears in the docs"
    for doc, start in SHORT_TRAINING:
        assert any(c.doc == doc and c.text.startswith(start) for c in COMMANDS), (doc, start)
    for (doc, k), preludes in PRELUDES.items():  # the prelude is still the setup the block continues
        assert k < len(RECIPES[doc]) and "research.md#recipes" in (ROOT / "docs" / doc).read_text()
        for prelude_doc, j in preludes:
            assert "pipe = Pipeline.from_pretrained" in RECIPES[prelude_doc][j][1]
            assert "videos = " in RECIPES[prelude_doc][j][1]
