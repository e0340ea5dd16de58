"""The built-in ``tiny-random`` model (runtime/tiny.py): deterministic from its seed, built atomically into
``$LLAVA_NEXT_CACHE`` on first use, loadable as a converted llava-next directory, saying plainly that its
weights are random; plus the packaged sample media (llava_next/samples). The installed script running it
offline right after install is tests/test_readme.py (the README's first command)."""

from __future__ import annotations

import json
from pathlib import Path

from llava_next.cli import main as cli
from llava_next.cli.options import SAMPLES, sample_path
from llava_next.runtime import tiny


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a, b, c = tiny.write(tmp_path / "a"), tiny.write(tmp_path / "b"), tiny.write(tmp_path / "c", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_loads_as_a_converted_checkpoint_with_its_tokenizer(tmp_path):
    import torch

    from llava_next.inputs.prompt import Tokenizer, build_input_ids
    from llava_next_weights.load import read_config
    from llava_next_weights.shapes import expected_shapes
    from safetensors.torch import load_file

    path = tiny.ensure(tmp_path)
    assert path == tmp_path / "tiny-random" / f"{tiny.VERSION}-seed0"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".partial")]
    config = read_config(path)
    assert config == tiny.tiny_config() and config.video_token_id == 672 and config.template == "llava_next_video"
    weights = load_file(path / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected_shapes(config)
    assert all(torch.isfinite(t).all() for t in weights.values())
    tok = Tokenizer.load(path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 674)
    ids = build_input_ids("What happens in this video?", tok, config, 0, 1)
    assert ids[0] == 1 and ids.count(config.video_token_id) == 1 and max(ids) < config.text.vocab_size
    assert tok.decode(tok.encode("What happens in this video?"), skip_special_tokens=True) == \
        "What happens in this video?"
    assert tiny.ensure(tmp_path) == path  # reused, not rebuilt


def test_json_and_inspect_say_random_weights(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path))
    assert cli.main(["run", "--model", "tiny-random", "--image", "sample:cat", "--max-new-tokens", "2",
                     "--dtype", "fp32", "--json", "What is this?"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["random_weights"] is True and "RANDOM" in result["notice"] and "RANDOM weights" in err
    assert result["plan"]["images"][0]["path"] == sample_path("sample:cat")
    assert cli.main(["inspect", "--model", "tiny-random", "--video", "sample:bunny"]) == 0
    out, _ = capsys.readouterr()
    assert "tiny-random (built in, RANDOM weights" in out and "132 frames, 25.00 fps, 5.28 s" in out


def test_sample_media_decode_and_unknown_names_are_errors(capsys):
    from llava_next.inputs.image import load_image
    from llava_next.inputs.video import load_video

    assert set(SAMPLES) == {"bunny", "cat"}
    clip = load_video(sample_path("sample:bunny"), 4)
    assert (clip.size_hw, clip.total_frames, clip.fps) == ((360, 640), 132, 25.0)
    assert load_image(sample_path("sample:cat")).size == (451, 300)
    readme = (Path(sample_path("sample:cat")).parent / "README.md").read_text()
    assert "CC-BY 3.0" in readme and "Blender Foundation" in readme and "CC0" in readme
    assert cli.main(["inspect", "--video", "sample:nope"]) == 2
    assert "sample:nope: no such sample; the samples are sample:bunny, sample:cat" in capsys.readouterr().err


def test_wheel_ships_the_samples():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    for name in SAMPLES.values():
        assert name.rsplit(".", 1)[1] in text.split("[tool.setuptools.package-data]")[1].split("\n\n")[0]


def test_every_builtin_model_runs_every_documented_layer_index_and_int4():
    """32 decoder layers (every layer index the docs use for a 7B model: --layers 2,15,31, fastv:layer=2,
    range(8, 17)) and linear shapes the int4 kernel takes at group sizes up to 128; the vision side of
    tiny-random unchanged (a frame 16 tokens, README's numbers); ids that print nothing have zero output
    rows (so greedy decoding never picks them)."""
    from llava_next.cli.options import TINY_MODELS
    from llava_next.inputs.tokens import video_plan
    from llava_next.model.quant import GROUP_SIZES, check_int4_shape
    from llava_next_weights.shapes import expected_shapes

    assert TINY_MODELS == tiny.NAMES  # the CLI's copy of the names (kept torch-free for --help)
    for name in tiny.NAMES:
        config = tiny.tiny_config(name)
        assert config.text.num_layers == 32 and config.text.hidden_size == 128, name
        for key, shape in expected_shapes(config).items():
            decoder_linear = key.startswith(("language_model.layers.", "language_model.lm_head"))
            if decoder_linear and key.endswith(".weight") and len(shape) == 2:
                for g in (g for g in GROUP_SIZES if g <= 128):  # 128: the default and the docs' --group-size
                    check_int4_shape(key, *shape, g)
        assert name in tiny.notice(name) and "RANDOM weights" in tiny.notice(name)
    assert video_plan(8, tiny.tiny_config()).total == 8 * 16
    for name in tiny.NAMES:
        config, tok = tiny.tiny_config(name), tiny.builtin(name).tokenizer()
        weights = tiny.random_weights(config, 0, tiny.silent_ids(tok, config.text.vocab_size))
        head = weights["language_model.embed_tokens.weight" if config.text.tie_word_embeddings
                       else "language_model.lm_head.weight"]
        silent = tiny.silent_ids(tok, config.text.vocab_size)
        assert len(silent) >= 30 and not head[silent].any() and head[:200].abs().min(1).values.gt(0).all()


def test_siglip_qwen_builtins_are_their_family(tmp_path):
    """tiny-random-interleave / -onevision: SigLIP + Qwen with the llava-hf switches of their presets (the
    same switch values as config/presets.py, only the sizes differ), Qwen's tokenizer layout (no BOS, eos
    <|im_end|>), same seed same bytes, and each loads and answers through the pipeline."""
    import torch

    from llava_next.config import PRESETS
    from llava_next.inputs.prompt import Tokenizer
    from llava_next.inputs.tokens import video_plan
    from llava_next.runtime.pipeline import Pipeline
    from llava_next.runtime.tiny_qwen import EOS_ID, IMAGE_ID, VIDEO_ID

    family = {tiny.INTERLEAVE: "llava-interleave-qwen-0.5b", tiny.ONEVISION: "llava-onevision-qwen2-0.5b-ov"}
    switches = ("image_aspect_ratio", "anyres_max_patches", "multi_image_aspect_ratio", "untiled_image_newline",
                "video_as_images", "pool_position", "video_newline", "spatial_pool_mode", "template",
                "uses_image_newline")
    for name, preset in family.items():
        config, real = tiny.tiny_config(name), PRESETS[preset].config
        assert {s: getattr(config, s) for s in switches} == {s: getattr(real, s) for s in switches}, name
        assert config.vision.kind == "siglip" and config.vision.grid_size == 7 and config.vision.has_cls is False
        assert (config.text.qkv_bias, config.text.tie_word_embeddings, config.text.bos_token_id) == (True, True, None)
        assert config.text.num_kv_heads == (2 if name == tiny.ONEVISION else 4)
        a, b = tiny.write(tmp_path / name / "a", name=name), tiny.write(tmp_path / name / "b", name=name)
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
        path = tiny.ensure(tmp_path / "cache", name=name)
        assert path == tmp_path / "cache" / name / f"{tiny.VERSION}-seed0"
        tok = Tokenizer.load(path)
        assert (tok.bos_id, tok.eos_id) == (None, EOS_ID) and tok.encode("<image>") == [IMAGE_ID]
        pipe = Pipeline.from_pretrained(name, dtype=torch.float32, cache_dir=tmp_path / "cache", progress=False)
        req = pipe.prepare("What happens?", video=sample_path("sample:bunny"), frames=4, max_new_tokens=3)
        pipe.generate(req, max_new_tokens=3)
        assert len(req.tokens) == 3
    ov = tiny.tiny_config(tiny.ONEVISION)
    assert ov.video_token_id == VIDEO_ID and video_plan(8, ov).total == 8 * 16 + 1  # 7 -> 4 bilinear, one newline
