"""Korean text end to end (issue 27 item 3): streamed byte-exact, kept intact in prompts, templates, ``--json``
and batch JSONL (training labels: test_train_data.py's Korean answers; conversion to training data:
test_captions.py).

The answer streams through ``StreamDecoder`` (inputs/prompt.py). On a SentencePiece tokenizer with byte fallback
(the built-in model's, laid out as Llama's) every Hangul syllable the tokenizer never learned is three
``<0x..>`` pieces, shown when their run ends (a word: the decoder turns a whole run that holds one invalid byte
into U+FFFD, so nothing of a run is final before it ends); on a byte-level BPE (GPT-2 / Qwen style) a token can end inside a syllable. Either way a piece
that would end in a partial character is held back, so: the pieces concatenate to the final decode byte for
byte, no piece holds U+FFFD when the final text has none, and ``llava-next run``'s stdout is those bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_next.inputs.prompt import TEMPLATES, Tokenizer, build_input_ids, render_prompt

ANSWER = "이 영상은 강아지가 공원에서 뛰어노는 모습을 보여줍니다."
PROMPT = "이 영상을 한국어로 상세히 묘사해주세요."
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("korean-cache")


@pytest.fixture(scope="module")
def tiny_dir(cache):
    from llava_next.runtime import tiny

    return tiny.ensure(cache_dir=cache)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.load(tiny_dir)


@pytest.fixture(scope="module")
def byte_level():
    """A GPT-2-style byte-level BPE trained on text with Korean, so that its merges cut syllables apart."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    from tokenizers_fixture import CORPUS

    backend = Backend(models.BPE())
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    corpus = [CORPUS, "강아지 공원 영상 모습 보여 뛰어 노는 이 은 가 에서 을 줍니다 " * 3]
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=420, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(backend)


def _check_stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    pieces = list(tok.decode_stream(ids))
    final = tok.decode(ids)
    assert "".join(pieces).encode("utf-8") == final.encode("utf-8")
    if "\ufffd" not in final:
        assert not [p for p in pieces if "\ufffd" in p], pieces
    return pieces


def test_byte_fallback_pieces_hold_back_each_syllable_until_whole(tok):
    ids = tok.encode(ANSWER, add_special_tokens=False)
    assert tok.decode(ids) == ANSWER
    bytes_run = [i for i in ids if i in tok.byte_ids]
    assert len(bytes_run) >= 3 * 20  # the Hangul syllables are all <0x..> pieces: three per syllable
    pieces = _check_stream(tok, ids)
    # a run of byte pieces is shown when it ends (here at each "▁"): the decoder turns a whole run with one bad
    # byte into U+FFFD, so a syllable shown earlier could be taken back; word by word, never one lump at the end
    words = ANSWER.split(" ")
    assert pieces == [w + " " for w in words[:-1]] + [words[-1]]
    decoder = tok.stream()  # <0xEC> <0x9D> <0xB4>: nothing shown until the run ends, then "이" whole
    first = tok.encode("이", add_special_tokens=False)[-3:]
    assert [tok.backend.id_to_token(i) for i in first] == ["<0xEC>", "<0x9D>", "<0xB4>"]
    assert [decoder.step(i) for i in first] == ["", "", ""]
    assert decoder.step(tok.token_id("▁")) == "이 " and decoder.finish() == ""


def test_byte_level_tokens_that_split_a_syllable_are_held_back(byte_level):
    ids = byte_level.encode(ANSWER, add_special_tokens=False)
    assert byte_level.decode(ids) == ANSWER
    split = [i for i in ids if "\ufffd" in byte_level.decode([i])]
    assert split, "the tokenizer must cut at least one syllable between tokens for this test to mean anything"
    pieces = _check_stream(byte_level, ids)
    assert len(pieces) >= 5


def test_random_korean_byte_sequences_stream_exactly(tok, byte_level):
    """Any ids (a random model's): the pieces concatenate to the decode; with U+FFFD only where the decode has it."""
    import random

    rng = random.Random(27)
    syllables = [i for ch in ANSWER for i in tok.encode(ch, add_special_tokens=False) if i in tok.byte_ids]
    for _ in range(200):
        ids = [rng.choice(syllables) if rng.random() < 0.8 else rng.randrange(tok.vocab_size) for _ in range(20)]
        _check_stream(tok, ids)
        _check_stream(byte_level, [rng.randrange(byte_level.vocab_size) for _ in range(12)])


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_korean_prompts_survive_every_template(tok, template):
    from llava_next.runtime.tiny import tiny_config

    config = tiny_config()
    text = render_prompt(PROMPT, n_videos=1, template=template, system="한국어로 대답하세요.")
    assert PROMPT in text and "한국어로 대답하세요." in text
    ids = build_input_ids(PROMPT, tok, config, n_videos=1, template=template)
    assert PROMPT in tok.decode(ids)


# ---- llava-next run, as a user runs it --------------------------------------------------------------
SCRIPTED = """
import sys, torch
from llava_next.runtime.pipeline import Pipeline
ids = [int(x) for x in sys.argv.pop(1).split(",")]

def stream_batch(self, requests, **kwargs):  # the model, scripted: these ids, then the end of the answer
    for i in ids + [self.tokenizer.eos_id]:
        yield torch.tensor([i])

Pipeline.stream_batch = stream_batch
from llava_next.cli.main import main
sys.exit(main())
"""


def _run(cache, tmp_path, *args, scripted: list[int] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, LLAVA_NEXT_CACHE=str(cache), HF_HUB_OFFLINE="1", LC_ALL="C", LANG="C",
               LLAVA_NEXT_COMPILE="0")
    env.pop("PYTHONIOENCODING", None)
    if scripted is None:
        cmd = [sys.executable, "-m", "llava_next.cli.main"]
    else:
        (tmp_path / "scripted.py").write_text(SCRIPTED)
        cmd = [sys.executable, str(tmp_path / "scripted.py"), ",".join(map(str, scripted))]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, timeout=600, cwd=tmp_path)


@pytest.fixture(scope="module")
def clip():
    from media import cached_video

    return cached_video("korean", frames=12, size_hw=(64, 96), fps=12, photo="coffee")


def test_run_prints_a_korean_answer_byte_exact(cache, tiny_dir, tok, clip, tmp_path):
    """The real CLI and streaming decoder, the generated ids scripted (a random model cannot be asked for a
    sentence): stdout is the answer's UTF-8 bytes and a newline, in the C locale too."""
    ids = tok.encode(ANSWER, add_special_tokens=False)
    args = ("run", "--model", "tiny-random", "--video", str(clip), "--frames", "2", "--max-new-tokens",
            str(len(ids) + 1), PROMPT)
    r = _run(cache, tmp_path, *args, scripted=ids)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert r.stdout == ANSWER.encode("utf-8") + b"\n"
    last = max(k for k, i in enumerate(ids) if i in tok.byte_ids)
    cut = ids[:last]  # the answer stops inside its last syllable: shown at the end as U+FFFD, as decode has it
    r = _run(cache, tmp_path, *args, scripted=cut)
    assert r.stdout == tok.decode(cut).encode("utf-8") + b"\n" and r.stdout.endswith("\ufffd\n".encode("utf-8"))


def test_run_json_writes_korean_as_utf8(cache, tiny_dir, tok, monkeypatch):
    """``run --json`` (its ``main``, in this process) with the answer scripted as above and stdout in ASCII, as
    in a locale that cannot encode Hangul (the C locale itself is UTF-8 to Python, PEP 540): one JSON object
    whose text is the answer's own UTF-8 bytes, not ``\\uXXXX`` escapes (a text-only prompt: the media are not
    the subject)."""
    import io

    import torch

    from llava_next.cli.main import main
    from llava_next.runtime.pipeline import Pipeline

    ids = tok.encode(ANSWER, add_special_tokens=False)

    def stream_batch(self, requests, **kwargs):  # the model, scripted: these ids, then the end of the answer
        for i in ids + [self.tokenizer.eos_id]:
            yield torch.tensor([i])
    monkeypatch.setattr(Pipeline, "stream_batch", stream_batch)
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(cache))
    raw = io.BytesIO()
    monkeypatch.setattr("sys.stdout", io.TextIOWrapper(raw, encoding="ascii"))
    assert main(["run", "--model", "tiny-random", "--max-new-tokens", str(len(ids) + 1), "--json", "--quiet",
                 PROMPT]) in (0, None)
    out = raw.getvalue()
    assert ANSWER.encode("utf-8") in out and b"\\u" not in out, out[:300]
    assert json.loads(out)["text"] == ANSWER and out.count(b"\n") == 1


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1", "ascii", None])
def test_print_json_writes_utf8_on_any_stdout(monkeypatch, encoding):
    """What every ``--json`` prints (cli/options.py ``print_json``): UTF-8 bytes on a stdout of any encoding (a
    Latin-1 or ASCII locale's: through its byte buffer); text on an in-memory one without bytes (None); a lone
    surrogate (an undecodable file name) escaped rather than an encoding error."""
    import io

    from llava_next.cli.options import print_json

    raw = io.BytesIO()
    out = io.StringIO() if encoding is None else io.TextIOWrapper(raw, encoding=encoding, write_through=True)
    monkeypatch.setattr("sys.stdout", out)
    out.write("a")  # text written before the JSON stays before it
    print_json({"text": ANSWER}, flush=True)
    print_json({"path": "\udceb.mp4"}, flush=True)
    said = out.getvalue() if encoding is None else raw.getvalue().decode("utf-8")
    assert said == "a" + json.dumps({"text": ANSWER}, ensure_ascii=False) + "\n" + '{"path": "\\udceb.mp4"}\n'


def test_run_json_and_text_mode_agree_on_a_korean_prompt(cache, tiny_dir, tok, clip, tmp_path):
    """The built-in model's own (random) answer to a Korean prompt: the streamed stdout bytes are the --json
    text, which is the decode of the --json tokens; the prompt reaches the model intact."""
    args = ("run", "--model", "tiny-random", "--video", str(clip), "--frames", "2", "--max-new-tokens", "24", PROMPT)
    text_mode = _run(cache, tmp_path, *args)
    as_json = _run(cache, tmp_path, *args, "--json")
    assert text_mode.returncode == 0 and as_json.returncode == 0, (text_mode.stderr + as_json.stderr)[-3000:]
    out = json.loads(as_json.stdout)
    assert out["text"] == tok.decode(out["tokens"][:-1] if out["tokens"][-1] == tok.eos_id else out["tokens"])
    assert text_mode.stdout == out["text"].encode("utf-8") + b"\n"
    from llava_next.runtime.tiny import tiny_config

    prompt_ids = build_input_ids(PROMPT, tok, tiny_config(), n_videos=1)  # the <video> placeholder is one id
    assert out["plan"]["input_tokens"] == len(prompt_ids) - 1 + out["plan"]["video_tokens"][0]


def test_batch_jsonl_keeps_korean_as_utf8(cache, tiny_dir, clip, tmp_path):
    """The results file holds the prompt's own UTF-8 bytes (not \\u escapes), and the text parses back exactly."""
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"id": "영상-1", "video": str(clip), "prompt": PROMPT},
                                                    ensure_ascii=False) + "\n", encoding="utf-8")
    r = _run(cache, tmp_path, "batch", "--model", "tiny-random", "--inputs", "jobs.jsonl", "--out", "out.jsonl",
             "--frames", "2", "--max-new-tokens", "4", "--quiet")
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    raw = (tmp_path / "out.jsonl").read_bytes()
    assert PROMPT.encode("utf-8") in raw and "영상-1".encode("utf-8") in raw
    record = json.loads(raw)
    assert record["id"] == "영상-1" and record["prompt"] == PROMPT
