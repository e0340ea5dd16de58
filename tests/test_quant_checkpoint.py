"""Quantized checkpoints (weights/llava_next_weights/quantize.py): convert --quantize, mmapped loading, the
round trip against quantizing in memory, strict validation of the stored tensors, and the CLI switches."""

from __future__ import annotations

import json
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import make_llava_hf_checkpoint, make_runnable_checkpoint
from llava_next.model.llava import LlavaNextModel
from llava_next.model.quant import (DEQUANT_MIN_ROWS, Int4Linear, Int8Linear, QuantConfig, QuantizationError,
                                    set_activations)
from llava_next.model.quant_model import quantize_model
from llava_next_weights.convert import convert
from llava_next_weights.load import LoadError, is_file_mapped, load_into, read_config
from llava_next_weights.quantize import QUANT_FILE, prepare_quantized

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    src, _ = make_llava_hf_checkpoint(root / "hf", kind="video")
    out = {"float": convert(src, root / "float", dtype="bf16", progress=False)}
    for method in ("int8", "int4"):  # small shards: a weight and its scales may land in different files
        out[method] = convert(src, root / method, dtype="bf16", quantize=method, group_size=32, shard_bytes=30_000,
                              progress=False)
    return root, src, out


def load(path, dtype=torch.bfloat16) -> LlavaNextModel:
    with torch.device("meta"):
        model = LlavaNextModel(read_config(path))
    prepare_quantized(model, path, dtype)
    return load_into(model, path, dtype=dtype).eval()


def ids(T: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_round_trip_equals_quantizing_in_memory(dirs, method):
    root, src, out = dirs
    qc = json.loads((out[method] / QUANT_FILE).read_text())
    assert qc["method"] == method and qc.get("group_size", 32) == 32
    loaded = load(out[method])
    in_memory = quantize_model(load(out["float"]), QuantConfig(method, group_size=32))
    layer = loaded.language_model.layers[0].mlp.up_proj
    assert isinstance(layer, Int8Linear if method == "int8" else Int4Linear)
    assert is_file_mapped(layer.weight)  # integer weights come straight from the mmapped file
    assert type(loaded.vision_tower.layers[0].mlp.fc1) is torch.nn.Linear  # scope "decoder"
    for a, b in zip(loaded.state_dict().values(), in_memory.state_dict().values()):
        assert torch.equal(a, b)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded.language_model(x), in_memory.language_model(x))
    # the quantized files are smaller than the float ones by about what the method saves on the decoder
    size = {k: sum(f.stat().st_size for f in p.glob("*.safetensors")) for k, p in out.items()}
    assert size[method] < size["float"]


def test_int8_activations_over_an_int4_checkpoint(dirs):
    """``activations = "int8"`` over loaded int4 weights: every int4 layer is set; a decode-sized call (at most 8
    rows) takes int8 activations, so its logits move a little from the weight-only ones; a prompt's do not."""
    _, _, out = dirs
    model = load(out["int4"])
    short, prompt = ids(T=6), ids(T=DEQUANT_MIN_ROWS + 4, seed=1)
    with torch.no_grad():
        before, before_prompt = model.language_model(short).float(), model.language_model(prompt)
        layers = sum(isinstance(m, Int4Linear) for m in model.modules())
        assert layers and set_activations(model, "int8") == layers
        after, after_prompt = model.language_model(short).float(), model.language_model(prompt)
    diff = (after - before).abs().max() / before.abs().max()
    assert 0 < diff < 0.05, diff
    assert torch.equal(after_prompt, before_prompt)


def test_quantizing_a_converted_directory_equals_quantizing_the_source(dirs, tmp_path):
    root, src, out = dirs
    again = convert(out["float"], tmp_path / "again", quantize="int4", group_size=32, progress=False)
    a, b = load(again), load(out["int4"])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="already quantized"):
        convert(out["int4"], tmp_path / "twice", quantize="int8", progress=False)


def rewrite(directory, edit) -> None:
    """Apply ``edit(state) -> state`` to every shard and rewrite the index to match."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    weight_map = {}
    for f in sorted(directory.glob("*.safetensors")):
        state = edit(load_file(f))
        save_file(state, f, metadata={"format": "pt"})
        weight_map.update({k: f.name for k in state})
    index["weight_map"] = weight_map
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def copy_of(path, tmp_path):
    import shutil
    return shutil.copytree(path, tmp_path / path.name)


def test_bad_quantized_checkpoints_are_clear_errors(dirs, tmp_path):
    root, src, out = dirs
    key = "language_model.layers.1.self_attn.v_proj"
    # missing scales
    d = copy_of(out["int8"], tmp_path / "a")
    rewrite(d, lambda s: {k: v for k, v in s.items() if k != f"{key}.scales"})
    with pytest.raises(LoadError, match=rf"{key}.scales is missing"):
        load(d)
    # the group size in quantization.json is not the one the scales were written with
    d = copy_of(out["int4"], tmp_path / "b")
    (d / QUANT_FILE).write_text(json.dumps({"method": "int4", "group_size": 64}))
    with pytest.raises(LoadError, match=r"scales has shape \(\d+, 2\), expected \(\d+, 1\) \(written with group_size 32\?\)"):
        load(d)
    # int4 where the kernel cannot take the shape (K = 64 is no multiple of 128)
    (d / QUANT_FILE).write_text(json.dumps({"method": "int4", "group_size": 128}))
    with pytest.raises(LoadError, match=r"q_proj.weight: a \(64, 64\) weight cannot be quantized to int4"):
        load(d)
    with pytest.raises(QuantizationError, match=r"q_proj.weight: a \(64, 64\) weight cannot be quantized to int4"):
        convert(src, tmp_path / "c", quantize="int4", progress=False)  # default group_size 128
    assert not (tmp_path / "c").exists()
    # integer weights stored as floats, and integers without quantization.json
    d = copy_of(out["int8"], tmp_path / "d")
    rewrite(d, lambda s: {k: (v.float() if k == f"{key}.weight" else v) for k, v in s.items()})
    with pytest.raises(LoadError, match=rf"{key}.weight is float32, expected int8"):
        load(d)
    d = copy_of(out["int8"], tmp_path / "e")
    (d / QUANT_FILE).unlink()
    with pytest.raises(LoadError, match=r"quantized tensor but the directory has no quantization.json"):
        load(d)
    (d / QUANT_FILE).write_text(json.dumps({"method": "int4"}))
    with pytest.raises(LoadError, match=r"quantization.json: an int4 quantization config must state its group_size"):
        load(d)


def test_cli_convert_and_run_quantized(tmp_path, monkeypatch, capsys):
    """``convert --quantize`` and ``run --quantize`` as the command line parses them (in process, to keep the
    suite fast): the tokens equal those of the float model quantized in memory (an independent path)."""
    from llava_next.cli.main import main
    from llava_next.runtime.pipeline import Pipeline

    directory, _ = make_runnable_checkpoint(tmp_path / "tiny-hf", kind="video")
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLAVA_NEXT_COMPILE", "0")
    assert main(["convert", str(directory), str(tmp_path / "q8"), "--quantize", "int8", "--dtype", "fp32"]) == 0
    assert json.loads((tmp_path / "q8" / QUANT_FILE).read_text()) == {"method": "int8", "scope": "decoder"}
    capsys.readouterr()
    assert main(["run", "--model", str(directory), "--quantize", "int8", "--dtype", "fp32", "--max-new-tokens", "8",
                 "--json", "Hello there"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    assert list((tmp_path / "cache" / "local").glob("tiny-hf-*-int8"))  # cached like a conversion

    pipe = Pipeline.from_pretrained(directory, dtype=torch.float32, cache_dir=tmp_path / "cache2", progress=False)
    quantize_model(pipe.model, QuantConfig("int8"))
    req = pipe.prepare("Hello there", max_new_tokens=8)
    pipe.generate(req, max_new_tokens=8)
    assert req.tokens == tokens and len(tokens) > 1
    assert main(["run", "--model", str(tmp_path / "q8"), "--quantize", "int4", "--json", "Hi"]) == 2
    assert "already quantized (int8)" in json.loads(capsys.readouterr().out)["error"]

    # int8 activations (--activations int8): every int8 layer set, and a long prompt's logits move
    logits = {}
    for mode in ("float", "int8"):
        pipe = Pipeline.from_pretrained(tmp_path / "q8", dtype=torch.float32, progress=False, activations=mode)
        layers = [m for m in pipe.model.modules() if isinstance(m, Int8Linear)]
        assert layers and {m.activations for m in layers} == {mode}
        with torch.no_grad():
            logits[mode] = pipe.model.language_model(torch.arange(3, 3 + 2 * DEQUANT_MIN_ROWS)[None] % 64).float()
    diff = (logits["int8"] - logits["float"]).abs().max() / logits["float"].abs().max()
    assert 0 < diff < 0.05, diff
