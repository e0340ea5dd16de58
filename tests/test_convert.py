"""Weight conversion: tiny transformers checkpoints in every format, real-size shapes on the meta device,
strictness (every bad key is named), pickle refusal, atomicity."""

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import llava_next_weights.convert as convert_mod
from checkpoints import (BASE_VOCAB, disk_to_original_key, make_llava_hf_checkpoint, make_original_checkpoint,
                         memory_to_disk_key, original_config, replace_text, transformers_config)
from llava_next.config import PRESETS, LlavaNextConfig
from llava_next_weights.convert import ConversionError, convert, plan
from llava_next_weights.load import load_state_dict_mmap, read_config
from llava_next_weights.shapes import expected_shapes


def shapes_of(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def hf_name(key: str) -> str:
    """llava-next key -> transformers' in-memory parameter name, written independently of keymaps.py."""
    if key.startswith("vision_tower."):
        rest = key.removeprefix("vision_tower.")
        if rest in ("class_embedding", "patch_embedding.weight", "position_embedding.weight"):
            rest = "embeddings." + rest
        elif rest.startswith("pre_layernorm."):
            rest = rest.replace("pre_layernorm.", "pre_layrnorm.")
        else:
            rest = "encoder." + rest
        return "model.vision_tower." + rest
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    if key.startswith("projector."):
        return "model.multi_modal_projector." + key.removeprefix("projector.")
    return "model." + key  # language_model.*, image_newline


def assert_matches_transformers(out, model, config):
    got = load_state_dict_mmap(out)
    assert shapes_of(got) == expected_shapes(config)
    hf = dict(model.named_parameters())
    for key, t in got.items():
        ref = hf[hf_name(key)]
        assert t.dtype == ref.dtype, key
        assert torch.equal(t, ref.detach()), key
    # everything transformers has is used, except what is dropped on purpose
    unused = {k for k in hf if k not in {hf_name(g) for g in got}}
    last = config.vision.num_layers - 1
    assert unused == {k for k in hf if "post_layernorm" in k or f"vision_tower.encoder.layers.{last}." in k}


# ---- end-to-end on tiny checkpoints ---------------------------------------------------------------
@pytest.mark.parametrize("kind, text, names, rope", [
    ("image", "llama", "hub", None), ("image", "mistral", "save", None),
    ("video", "llama", "memory", 2.5), ("video", "mistral", "hub", 2.0)])
def test_llava_hf_converts_to_the_transformers_weights(tmp_path, kind, text, names, rope):
    src, model = make_llava_hf_checkpoint(tmp_path / "hf", kind, text, rope, names=names)
    out = convert(src, tmp_path / "out", progress=False)
    config = read_config(out)
    assert (config.text.num_kv_heads, config.text.rope_scaling_factor) == (2 if text == "mistral" else 4, rope or 1.0)
    assert (config.image_token_id, config.video_token_id) == ((129, 128) if kind == "video" else (128, None))
    assert config.vision.layers_used == 2  # feature layer -2 of 3: the last layer is not converted
    assert_matches_transformers(out, model, config)
    assert json.loads((out / "conversion.json").read_text())["source_format"] == \
        {"hub": "llava_hf", "save": "llava_hf", "memory": "llava_hf_new"}[names]


@pytest.mark.parametrize("kind, text", [("image", "mistral"), ("video", "llama")])
def test_original_format_converts_to_the_same_weights(tmp_path, kind, text):
    src, model = make_llava_hf_checkpoint(tmp_path / "hf", kind, text, names="save")
    orig = make_original_checkpoint(tmp_path / "orig", src)
    with safe_open(orig / "model.safetensors", "pt") as f:
        assert "model.mm_projector.2.weight" in f.keys() and "lm_head.weight" in f.keys()
    from_hf = load_state_dict_mmap(convert(src, tmp_path / "a", progress=False))
    out = convert(orig, tmp_path / "b", progress=False)
    config = read_config(out)
    # the original vocabulary has no media rows; the media token ids are placeholders past it
    assert config.text.vocab_size == BASE_VOCAB <= config.image_token_id
    if kind == "video":
        assert config.video_token_id >= BASE_VOCAB and config.video_token_id != config.image_token_id
    else:
        assert config.video_token_id is None
    got = load_state_dict_mmap(out)
    assert shapes_of(got) == expected_shapes(config)
    for key, t in got.items():
        ref = from_hf[key][:BASE_VOCAB] if key.endswith(("embed_tokens.weight", "lm_head.weight")) else from_hf[key]
        assert torch.equal(t, ref), key


def test_dtype_is_kept_or_cast_and_output_is_sharded(tmp_path):
    src, model = make_llava_hf_checkpoint(tmp_path / "hf", "video", "mistral", names="hub", dtype=torch.bfloat16,
                                          max_shard_size="40KB")
    assert len(list(src.glob("*.safetensors"))) > 1  # the source is sharded too
    kept = convert(src, tmp_path / "kept", shard_bytes=30_000, progress=False)
    files = sorted(kept.glob("*.safetensors"))
    n = len(files)
    assert n > 2 and [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((kept / "model.safetensors.index.json").read_text())
    for f in files:  # every file readable by safetensors itself, each key where the index says
        tensors = load_file(f)
        assert tensors and all(index["weight_map"][k] == f.name for k in tensors)
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 30_000 or len(tensors) == 1
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in load_state_dict_mmap(kept).values())
    assert_matches_transformers(kept, model, read_config(kept))  # bf16 kept, values exact

    cast = load_state_dict_mmap(convert(src, tmp_path / "cast", dtype="float16", progress=False))
    for key, t in load_state_dict_mmap(kept).items():
        assert cast[key].dtype == torch.float16 and torch.equal(cast[key], t.to(torch.float16)), key


def test_mixed_dtypes_stay_mixed_and_aligned(tmp_path):
    src, _ = make_llava_hf_checkpoint(tmp_path / "hf", names="save", dtype=torch.bfloat16)
    file = src / "model.safetensors"
    state = {k: (v.float() if v.ndim == 1 else v) for k, v in load_file(file).items()}  # fp32 vectors
    save_file(state, file, metadata={"format": "pt"})
    out = convert(src, tmp_path / "out", shard_bytes=10**9, progress=False)
    got = load_state_dict_mmap(out)
    assert {t.dtype for t in got.values()} == {torch.float32, torch.bfloat16}
    with open(out / "model-00001-of-00001.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    for key, entry in header.items():
        if key != "__metadata__":  # every tensor starts at a multiple of its element size
            assert entry["data_offsets"][0] % {"F32": 4, "BF16": 2}[entry["dtype"]] == 0, key


def test_writer_keeps_every_tensor_aligned(tmp_path):
    # odd-sized narrow tensors before wide ones would misalign the wide ones: the writer orders them
    tensors = {"odd": torch.arange(3, dtype=torch.bfloat16), "f32": torch.tensor([1.5, -2.0]),
               "f64": torch.tensor([3.25], dtype=torch.float64), "u8": torch.arange(5, dtype=torch.uint8)}
    (shard,) = convert_mod._shards([(k, tuple(t.shape), t.dtype) for k, t in tensors.items()], 10**6)
    convert_mod._write_shard(tmp_path / "x.safetensors", shard, tensors.__getitem__, lambda n: None)
    with open(tmp_path / "x.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    size = {"F64": 8, "F32": 4, "BF16": 2, "U8": 1}
    assert all(e["data_offsets"][0] % size[e["dtype"]] == 0 for k, e in header.items() if k != "__metadata__")
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], t) for k, t in tensors.items())


def test_side_files_are_copied(tmp_path):
    src, _ = make_llava_hf_checkpoint(tmp_path / "hf")
    (src / "tokenizer.json").write_text('{"model": "tiny"}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    out = convert(src, tmp_path / "out", progress=False)
    assert (out / "tokenizer.json").read_text() == '{"model": "tiny"}'
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"


# ---- real sizes, shapes only (meta device) --------------------------------------------------------
@pytest.mark.parametrize("preset, text, kind", [
    ("llava-v1.6-vicuna-7b", "llama", "image"), ("llava-v1.6-vicuna-13b", "llama", "image"),
    ("llava-v1.6-mistral-7b", "mistral", "image"), ("llava-v1.6-34b", "llama", "image"),
    ("LLaVA-NeXT-Video-7B", "llama", "video")])
def test_tables_on_real_shapes(preset, text, kind):
    from transformers import LlavaNextForConditionalGeneration, LlavaNextVideoForConditionalGeneration

    config = PRESETS[preset].config
    hf_config = transformers_config(config, kind=kind, text=text)
    cls = LlavaNextVideoForConditionalGeneration if kind == "video" else LlavaNextForConditionalGeneration
    with torch.device("meta"):
        memory = shapes_of(cls(hf_config).state_dict())
    expected = expected_shapes(config)
    # literal numbers from docs/references.md (not derived from the same code)
    assert expected["vision_tower.position_embedding.weight"] == (577, 1024)
    assert "vision_tower.layers.22.mlp.fc2.bias" in expected and "vision_tower.layers.23.mlp.fc2.bias" not in expected
    kv = {"llava-v1.6-mistral-7b": 1024, "llava-v1.6-34b": 1024, "llava-v1.6-vicuna-13b": 5120}.get(preset, 4096)
    assert expected["language_model.layers.0.self_attn.k_proj.weight"][0] == kv
    assert len(expected) == 5 + 16 * 23 + 5 + 9 * config.text.num_layers + 3

    def converted(fmt, source, cfg):
        return {p.target: p.shape for p in plan(fmt, source, cfg)}

    hub_config = LlavaNextConfig.from_hf_config(hf_config.to_dict())
    assert converted("llava_hf_new", memory, hub_config) == expected
    for hub in (True, False):
        disk = {memory_to_disk_key(k, hub=hub): s for k, s in memory.items()}
        assert converted("llava_hf", disk, hub_config) == expected
    vocab = 64000 if "34b" in preset else 32000
    orig = {}
    for k, s in memory.items():
        name = disk_to_original_key(memory_to_disk_key(k))
        orig[name] = (vocab, *s[1:]) if name in ("model.embed_tokens.weight", "lm_head.weight") else s
    orig_config = LlavaNextConfig.from_original_config(original_config(hf_config.to_dict(), vocab))
    assert orig_config.text.vocab_size == vocab
    assert converted("original", orig, orig_config) == expected_shapes(orig_config)


# ---- strictness ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    src, _ = make_llava_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", "image", "mistral", names="save")
    with safe_open(src / "model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return src, shapes, LlavaNextConfig.from_hf_config(json.loads((src / "config.json").read_text()))


def test_plan_names_every_bad_key(tiny):
    _, shapes, config = tiny
    bad = dict(shapes)
    bad["language_model.model.layers.0.self_attn.extra.weight"] = (4, 4)  # unmapped
    del bad["language_model.model.norm.weight"]  # missing target
    bad["multi_modal_projector.linear_2.weight"] = (64, 63)  # wrong shape
    with pytest.raises(ConversionError) as e:
        plan("llava_hf", bad, config)
    msg = str(e.value)
    assert "language_model.model.layers.0.self_attn.extra.weight" in msg
    assert "language_model.norm.weight" in msg
    assert "projector.linear_2.weight" in msg and "(64, 63)" in msg and "(64, 64)" in msg
    with pytest.raises(ConversionError, match=r"language_model\.layers\.1\..* not part of llava-next's layout"):
        plan("llava_hf", shapes, replace_text(config, num_layers=1))  # more decoder layers than the config says
    with pytest.raises(ConversionError, match="not in the 'original' key table"):
        plan("original", shapes, config)


def test_convert_refuses_a_bad_checkpoint_without_writing(tmp_path, tiny):
    src, _, _ = tiny
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    state["multi_modal_projector.linear_1.weight"] = torch.zeros(64, 31)
    save_file(state, bad / "model.safetensors")
    with pytest.raises(ConversionError, match=r"projector\.linear_1\.weight.*\(64, 31\).*\(64, 32\)"):
        convert(bad, tmp_path / "out", progress=False)
    assert os.listdir(tmp_path) == ["bad"]


def test_format_detection_errors(tmp_path, tiny):
    src, _, _ = tiny
    out = convert(src, tmp_path / "ours", progress=False)
    with pytest.raises(ConversionError, match="already in llava-next's layout"):
        convert(out, tmp_path / "again", progress=False)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "config.json").write_text(json.dumps(original_config(json.loads((src / "config.json").read_text()), 128)))
    (mixed / "model.safetensors").symlink_to(src / "model.safetensors")
    with pytest.raises(ConversionError, match="mixes two checkpoints"):
        convert(mixed, tmp_path / "out", progress=False)


class _Trap:
    """Unpickling this creates a marker file: proof that a pickle was (not) loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_checkpoints_are_refused_unopened(tmp_path, tiny):
    src, _, _ = tiny
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    marker = tmp_path / "unpickled"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(marker))))
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin.*never unpickles.*safetensors"):
        convert(d, tmp_path / "out", progress=False)
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---- atomicity -------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_nothing(tmp_path, tiny, monkeypatch, error):
    src, _, _ = tiny
    calls = []
    real = convert_mod._write_tensor

    def failing(f, t):
        calls.append(1)
        if len(calls) == 20:
            raise error
        real(f, t)

    monkeypatch.setattr(convert_mod, "_write_tensor", failing)
    with pytest.raises(type(error)):
        convert(src, tmp_path / "out", shard_bytes=20_000, progress=False)
    assert len(calls) == 20 and os.listdir(tmp_path) == []  # no out_dir, no temporary directory
    monkeypatch.setattr(convert_mod, "_write_tensor", real)
    assert len(load_state_dict_mmap(convert(src, tmp_path / "out", progress=False))) == 63


def test_existing_out_dir_is_refused_unless_overwrite(tmp_path, tiny):
    src, _, _ = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert(src, out, progress=False)
    assert os.listdir(out) == ["keep.txt"]
    convert(src, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert os.listdir(tmp_path) == ["out"]
