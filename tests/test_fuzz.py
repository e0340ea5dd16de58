"""Fuzzing (issue 16): a fixed-seed bounded run over every parser, and one regression test per failure the
fuzzer found. The harness, its targets and outcome rules are tests/fuzzing.py; the long run is
``benchmarks/fuzz.py``. Every regression test feeds its input through the real entry point and asserts
the documented error: a ValueError subclass whose message names the file (docs/errors.md), and for the
CLI exit status 2 with one ``llava-next CMD: error: ...`` line and no traceback."""

from __future__ import annotations

import json
import random
import struct
import subprocess

import pytest

import checkpoints  # noqa: F401  (registers the tiny CLIP tower the original-format seed names)
import fuzzing
from fuzzing import TARGETS, Case, build_seeds, classify, join_safetensors, make_case, run_in_process, split_safetensors
from llava_next.cli.main import main
from llava_next.config import ConfigError, LlavaNextConfig
from llava_next_weights.load import LoadError, validate_safetensors_header

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def seeds():
    return build_seeds()


@pytest.fixture(autouse=True)
def _no_compile(monkeypatch):
    """Two generated tokens do not pay for the ~17 s decode-attention compile (the workers set it too)."""
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "0")


def case_with(seeds, tmp_path, target: str, edit, spec: str | None = None) -> Case:
    """A case of ``target`` whose file is changed by ``edit(bytes) -> bytes`` (instead of random mutations)."""
    return make_case(TARGETS[target], 0, 0, seeds, tmp_path / "case", spec=spec,
                     mutate=lambda rng, data: (edit(data), "regression"))


def header_edit(fn):
    """An edit of a safetensors file's parsed header (re-serialized with a consistent length)."""
    def edit(data: bytes) -> bytes:
        header, body = split_safetensors(data)
        fn(header)
        return join_safetensors(header, body)
    return edit


def first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


def last_tensor(header: dict) -> dict:
    """The entry whose data comes last (changing its size keeps the others' offsets consistent)."""
    return max((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"])


def assert_documented(case: Case, *fragments: str) -> str:
    result = run_in_process(TARGETS[case.target], case)
    assert result["outcome"] == "error", result
    for f in fragments:
        assert f in result["detail"], (f, result["detail"])
    return result["detail"]


# ---- the bounded run ---------------------------------------------------------------------------------
def test_unmutated_seeds_succeed(seeds, tmp_path):
    """Every target's seeds pass its entry point unchanged (so an 'error' outcome is the mutation's doing)."""
    for target in TARGETS.values():
        for k, spec in enumerate(target.seeds):
            if spec.endswith("bigbuckbunny.mp4"):
                continue  # 1.5 s; the bounded run decodes it
            case = make_case(target, 0, 0, seeds, tmp_path / f"{target.name}-{k}", spec=spec,
                             mutate=lambda rng, data: (data, "none"))
            assert run_in_process(target, case)["outcome"] == "ok", (target.name, spec)


def test_bounded_fuzz_run(seeds):
    """154 seeded cases over every parser (all 17 TARGETS) in 2 worker processes (timeout, RSS bound), 2 of
    them also through the CLI: no internal error, hang, signal, partial output, unnamed file or memory growth."""
    # timeout: 600 s per case, a hang guard only (the slowest case takes ~1.5 s on an idle core; a busy
    # machine must not turn a slow case into a "hang")
    report = fuzzing.run_campaign(154, seed=2026, cli_every=77, cli_workers=2, timeout=600, root=seeds, workers=2)
    print("\n" + report.table())
    assert report.cases == 156
    assert not report.failures, "\n\n".join(f"{f['outcome']} {f['target']} #{f['index']}: {f['mutation']}\n"
                                          f"{f['detail']}" for f in report.failures)
    assert {t for t, c in report.counts.items() if c["ok"] + c["error"]} == set(TARGETS)


def test_outcome_rules_catch_failures(tmp_path):
    """The classifier itself: a traceback, an unnamed message and a leftover output are failures."""
    case = Case("hf-config", 0, 0, tmp_path / "fz-ckpt-hf", tmp_path / "fz-ckpt-hf" / "config.json", tmp_path, "")
    assert classify(KeyError("x"), case)[0] == "internal"
    assert classify(ValueError("bad value"), case)[0] == "unnamed"
    assert classify(ValueError(f"{case.mutated}: bad"), case)[0] == "error"
    assert classify(fuzzing.PartialOutput("left"), case)[0] == "partial"
    cli = lambda code, err: fuzzing._classify_cli(subprocess.CompletedProcess([], code, "", err), "convert", case, None)
    named = f"llava-next convert: error: {case.mutated}: not valid JSON\n"
    assert cli(2, named)[0] == "cli-error"
    assert cli(2, "tempfile.tif: Using code not yet in table.\n" + named)[0] == "cli-error"  # a C library's warning
    assert cli(2, "llava-next convert: error: bad value\n")[0] == "cli-unnamed"
    assert cli(3, "Traceback (most recent call last):\n...\nllava-next convert: internal error (KeyError)")[0] \
        == "cli-internal"
    assert cli(2, named + named)[0] == "cli-internal"
    assert cli(-11, "")[0] == "cli-signal"
    assert cli(1, "")[0] == "cli-bad-exit"


def test_mutations_are_deterministic(seeds, tmp_path):
    for name in ("image", "hf-safetensors", "tokenizer-json"):
        a = make_case(TARGETS[name], 7, 3, seeds, tmp_path / "a")
        b = make_case(TARGETS[name], 7, 3, seeds, tmp_path / "b")
        assert a.mutation == b.mutation and a.mutated.read_bytes() == b.mutated.read_bytes()


# ---- safetensors headers (the reported SafetensorError and its relatives) -----------------------------
def test_misspelt_dtype_field_is_a_user_error(seeds, tmp_path, capsys):
    """The reported case: a header whose tensor has "Vtype" instead of "dtype" was
    `llava-next convert: internal error (SafetensorError)` with a traceback."""
    def vtype(h):
        entry = first_tensor(h)
        entry["Vtype"] = entry.pop("dtype")
    case = case_with(seeds, tmp_path, "hf-safetensors", header_edit(vtype))
    assert_documented(case, "model.safetensors", "has no 'dtype' field", "'Vtype'")
    assert main(["convert", str(case.input), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llava-next convert: error: ") and "model.safetensors" in err[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_ten_to_the_twelve_elements_are_refused_before_allocating(seeds, tmp_path):
    """A header that claims a 10^12-element tensor (offsets agreeing with it) is refused from the header:
    the case's peak RSS grows by far less than the 4 TB it claims (bounded by RSS_BOUND)."""
    def huge(h):
        entry = last_tensor(h)
        begin = entry["data_offsets"][0]
        entry.update(shape=[10**6, 10**6], data_offsets=[begin, begin + 4 * 10**12])
    for target, spec in (("hf-safetensors", None), ("converted-safetensors", None)):
        case = case_with(seeds, tmp_path / target, target, header_edit(huge), spec)
        result = run_in_process(TARGETS[target], case)
        assert result["outcome"] == "error" and "its header describes 4000000" in result["detail"], result
        assert result["rss_growth"] < fuzzing.RSS_BOUND


@pytest.mark.parametrize("name, edit, fragment", [
    ("shape of strings", lambda h: first_tensor(h).update(shape=["4"]), "a shape is a list of integers"),
    ("unknown dtype", lambda h: first_tensor(h).update(dtype="float32"), "not a safetensors dtype"),
    ("offsets of a string", lambda h: first_tensor(h).update(data_offsets=["0", 4]), "data_offsets"),
    ("shape and offsets disagree", lambda h: first_tensor(h).update(shape=[1]), "needs 4 bytes"),
    ("overlapping tensors", lambda h: h.update(dup=dict(first_tensor(h))), "without gaps or overlaps"),
    ("__metadata__ not strings", lambda h: h.update(__metadata__={"format": {"a": "b"}}), "__metadata__"),
    ("entry not an object", lambda h: h.update(x=3), "not an object"),
    ("shape past 2**64", lambda h: first_tensor(h).update(shape=[2**64]), "a shape is a list"),
])
def test_header_rules(name, edit, fragment):
    """validate_safetensors_header on each rule the safetensors library enforces (SafetensorError before)."""
    header = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}}
    assert validate_safetensors_header(json.loads(json.dumps(header))) is None
    edit(header)
    assert fragment in validate_safetensors_header(header)


def test_weights_stored_as_integers(seeds, tmp_path):
    """A dtype flipped to an integer type with the same width (F32 -> U32) was a RuntimeError from torch's
    load_state_dict ('Only Tensors of floating point ... can require gradients')."""
    def to_u32(h):
        entry = last_tensor(h)
        entry["dtype"] = {"F32": "U32", "BF16": "U16", "F16": "I16"}[entry["dtype"]]
    case = case_with(seeds, tmp_path / "a", "converted-safetensors", header_edit(to_u32))
    assert_documented(case, "dtype of the wrong kind", "torch.uint32")
    def to_i32(h):
        entry = last_tensor(h)
        entry["dtype"] = {"F32": "I32", "BF16": "I16", "F16": "I16"}[entry["dtype"]]
    case = case_with(seeds, tmp_path / "b", "hf-safetensors", header_edit(to_i32))
    assert_documented(case, "stored as integers", "I32")


def test_integer_rope_theta_runs(seeds, tmp_path):
    """rope_theta = 10^100 written as a JSON integer overflowed torch.pow (OverflowError) while generating;
    float fields now hold floats, so it runs (finite, if useless, RoPE)."""
    case = case_with(seeds, tmp_path, "converted-config", json_edit(lambda c: c["text"].update(rope_theta=10**100)))
    assert run_in_process(TARGETS[case.target], case)["outcome"] == "ok"


def test_trailing_bytes_and_lying_header_length(seeds, tmp_path):
    """Bytes spliced into the data (the file longer than its header describes; SafetensorError
    'incomplete metadata' before) and a header length field past the format's 100 MB limit."""
    case = case_with(seeds, tmp_path / "a", "orig-safetensors", lambda d: d[:-100] + b"\0" * 4 + d[-100:])
    assert_documented(case, "model.safetensors", "belong to no tensor")
    case = case_with(seeds, tmp_path / "b", "converted-safetensors",
                     lambda d: struct.pack("<Q", 100_000_001) + d[8:] + bytes(100_000_001))
    assert_documented(case, "over the format's limit")
    case = case_with(seeds, tmp_path / "c", "hf-safetensors", lambda d: d[:8] + b"\xff" + d[9:])
    assert_documented(case, "model.safetensors", "unreadable header")


# ---- config.json -------------------------------------------------------------------------------------
def json_edit(fn):
    def edit(data: bytes) -> bytes:
        obj = json.loads(data)
        fn(obj)
        return fuzzing.dump_json(obj)
    return edit


@pytest.mark.parametrize("target, edit, fragment", [
    ("hf-config", lambda c: c["text_config"].update(hidden_size="64"), "TextConfig.hidden_size = '64'"),
    ("hf-config", lambda c: c["text_config"].update(rms_norm_eps=float("inf")), "a finite number"),
    ("hf-config", lambda c: c.update(text_config="x"), "malformed llava-hf config"),
    ("hf-config", lambda c: c.update(image_grid_pinpoints=[[{}, 56]]), "image_grid_pinpoints"),
    ("hf-config", lambda c: c.update(vision_feature_layer=True), "feature_layer = True"),
    ("orig-config", lambda c: c.update(rope_theta=[1]), "malformed original LLaVA-NeXT config"),
    ("orig-config", lambda c: c.update(image_grid_pinpoints=[[float("-inf"), 56]]), "image_grid_pinpoints"),
    ("orig-config", lambda c: c.update(rope_scaling={"type": "linear"}), "missing field 'factor'"),
    ("converted-config", lambda c: c.update(text=[]), "must be JSON objects"),
    # 10^100 layers hung the key planner (expected_shapes) for minutes; 2**63 as well
    ("hf-config", lambda c: c["text_config"].update(num_hidden_layers=10**100), "below 2**31"),
    ("orig-config", lambda c: c.update(num_hidden_layers=2**30), "sanity limit of 1024"),
    ("converted-config", lambda c: c["text"].update(hidden_size=10**100), "below 2**31"),
    ("converted-config", lambda c: c["text"].update(num_layers=5000), "sanity limit of 1024"),
    # sliding_window = -1 was a NotImplementedError from the decoder while generating
    ("converted-config", lambda c: c["text"].update(sliding_window=-1), "sliding_window must be positive"),
    ("converted-config", lambda c: c["vision"].update(num_layers=2.5), "VisionConfig.num_layers"),
])
def test_config_values_of_the_wrong_type(seeds, tmp_path, target, edit, fragment):
    """Wrong types and shapes in config.json were TypeError / OverflowError tracebacks."""
    assert_documented(case_with(seeds, tmp_path, target, json_edit(edit)), "config.json", fragment)


def test_deeply_nested_and_non_utf8_json(seeds, tmp_path):
    """10^5-deep nesting was a RecursionError; a non-UTF-8 converted config.json an unnamed UnicodeDecodeError."""
    deep = lambda d: d.replace(b"{", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b",", 1)
    for k, target in enumerate(("hf-config", "orig-config", "converted-config", "converted-index")):
        assert_documented(case_with(seeds, tmp_path / str(k), target, deep), "not valid JSON")
    assert_documented(case_with(seeds, tmp_path / "utf8", "converted-config", lambda d: d[:20] + b"\xa0" + d[21:]),
                      "config.json")


def test_missing_tensor_names_the_directory(seeds, tmp_path):
    """A renamed key (a bit flip in a header name) gave 'cannot convert this checkpoint' without the path."""
    def rename(h):
        key = next(k for k in h if k != "__metadata__")
        h[key + "x"] = h.pop(key)
    case = case_with(seeds, tmp_path, "orig-safetensors", header_edit(rename))
    assert_documented(case, str(case.input), "not in the 'original' key table")


# ---- tokenizer files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("target, edit, fragment", [
    ("tokenizer-json", lambda d: d[:900], "not a tokenizer.json the tokenizers library can read"),
    ("tokenizer-json", lambda d: d.replace(b'"model"', b'"modl"', 1), "tokenizer.json"),
    ("tokenizer-json", lambda d: d[:50] + b"\xfe" + d[51:], "tokenizer.json"),
    ("tokenizer-config", lambda d: b"null", "expected a JSON object"),
    ("tokenizer-config", lambda d: d[:-20], "not valid JSON"),
    ("tokenizer-config", json_edit(lambda c: c.update(eos_token=["</s>"])), "eos_token must be a token string"),
])
def test_damaged_tokenizer_files(seeds, tmp_path, target, edit, fragment):
    """tokenizers' bare `Exception` (a traceback) and TypeErrors from tokenizer_config.json before."""
    assert_documented(case_with(seeds, tmp_path, target, edit), fragment)


def test_config_type_checks_accept_the_presets():
    from llava_next.config import PRESETS

    for preset in PRESETS.values():
        assert LlavaNextConfig.from_dict(json.loads(json.dumps(preset.config.to_dict()))) == preset.config
    with pytest.raises(ConfigError, match="an integer below 2"):
        LlavaNextConfig.from_dict({**PRESETS["LLaVA-NeXT-Video-7B"].config.to_dict(), "spatial_pool_stride": True})


def test_random_mutators_are_bounded():
    """Mutators never grow a file without bound (the harness's own memory) and keep JSON parseable-or-not."""
    rng = random.Random(0)
    constants = json.dumps(fuzzing.WRONG_VALUES)
    data = json.dumps({"a": [1, 2, {"b": "c"}], "d": 1.5}).encode()
    for _ in range(300):
        out, note = fuzzing.json_file_mutation(rng, data)
        assert len(out) < 3_000_000 and note
    # a mutation once stored WRONG_VALUES' own {} in a document and a later one added to it: the constant
    # grew into a cycle (RecursionError in the worker) and later cases depended on earlier ones
    assert json.dumps(fuzzing.WRONG_VALUES) == constants
    assert LoadError.__mro__[1] is ValueError


def test_damaged_metadata_tag_in_a_video(seeds, tmp_path):
    # long run seed 21, case 279: two bit flips and a spliced run left a stream's metadata tag with invalid
    # UTF-8, which PyAV decoded strictly (a bare UnicodeDecodeError naming no file); now the video decodes
    case = make_case(TARGETS["video"], 21, 279, seeds, tmp_path / "case")
    result = run_in_process(TARGETS["video"], case)
    assert result["outcome"] in ("ok", "error"), result
