"""LoRA (llava_next/model/lora.py) and PEFT-format adapters (llava_next_weights/adapters.py) against PEFT.

The reference is PEFT's ``LoraModel`` (``get_peft_model``) on transformers' LlavaNext(Video)ForConditionalGeneration
with the same base weights: a tiny llava-hf checkpoint saved by transformers, converted and loaded by our loader
(tests/checkpoints.py). fp32, eager attention. Every adapter has random non-zero A and B (PEFT initialises B to
zero, which would hide a wrong B, a wrong scaling or a wrong name).

Tolerance: max |ours - theirs| <= 1e-5 x max |theirs| (logits, and each LoRA weight's gradient).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from checkpoints import make_llava_hf_checkpoint
from media import real_photo
from llava_next.inputs.image import preprocess_image
from llava_next.inputs.prompt import expand_placeholders
from llava_next.inputs.tokens import image_tokens
from llava_next.model.llava import LlavaNextModel
from llava_next.model.lora import (LoraConfig, LoraError, LoraLinear, apply_lora, lora_layers, lora_state_dict,
                                   merge_and_unload, merge_lora, unmerge_lora)
from llava_next_weights.adapters import (AdapterError, from_peft_key, load_adapter, read_adapter, save_adapter,
                                         to_peft_key)
from llava_next_weights.convert import convert
from llava_next_weights.load import load_into, read_config

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

TEXT = [1, 5, 17, 33, 7, 9, 21, 3, 44]
TOL = 1e-5
DECODER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# PEFT targets equivalent to LoraConfig(projector="lora", vision="lora") on the llava-hf module names
PEFT_ALL = (r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
            r"|model\.vision_tower\.encoder\.layers\.[01]\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
            r"|model\.multi_modal_projector\.linear_[12]")
PEFT_HEAD = PEFT_ALL + r"|lm_head"  # ... and the output layer (target "lm_head")
PEFT_DECODER = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(converted llava-next directory, transformers model, llava-hf directory) of a tiny LLaVA-NeXT (Mistral)."""
    root = tmp_path_factory.mktemp("lora")
    hf_dir, hf = make_llava_hf_checkpoint(root / "hf", kind="image", text="mistral")
    hf.set_attn_implementation("eager")
    return convert(hf_dir, root / "ours", progress=False), hf, hf_dir


def ours_model(directory) -> LlavaNextModel:
    with torch.device("meta"):
        model = LlavaNextModel(read_config(directory))
    return load_into(model, directory).eval()


@pytest.fixture(scope="module")
def image_inputs(tiny):
    cfg = read_config(tiny[0])
    im = preprocess_image(real_photo("chelsea"), cfg)
    ids = [TEXT[0], cfg.image_token_id] + TEXT[1:]
    ids = torch.tensor([expand_placeholders(ids, cfg.image_token_id, None, [image_tokens(im.image_size, cfg)], [])])
    return ids, {"images": [im]}, {"pixel_values": im.pixel_values[None], "image_sizes": torch.tensor([im.image_size])}


def peft_model(hf, target_modules: str, modules_to_save=None, r: int = 4, alpha: float = 8.0, rslora: bool = False):
    """PEFT's LoraModel on a copy of ``hf``, every lora_A / lora_B random (seeded)."""
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, modules_to_save=modules_to_save,
                          use_rslora=rslora)
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return pm


def peft_adapter(pm) -> dict[str, torch.Tensor]:
    """PEFT's own adapter state (its saved names), less the copy of a targeted lm_head's base weight it adds
    (``save_embedding_layers="auto"``; load_adapter leaves it out: test_peft_key_names)."""
    return {k: v for k, v in peft.get_peft_model_state_dict(pm).items() if k != "base_model.model.lm_head.base_layer.weight"}


def copy_from_peft(ours: LlavaNextModel, pm) -> None:
    theirs = {from_peft_key(k): v for k, v in peft_adapter(pm).items()}
    mine = lora_state_dict(ours)
    assert set(mine) == set(theirs)
    with torch.no_grad():
        for k, v in mine.items():
            v.copy_(theirs[k])


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str = "logits") -> float:
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL * scale, f"{what}: max |diff| {diff:.3g} > {TOL} x scale {scale:.3g}"
    return diff


# ---- names -----------------------------------------------------------------------------------------
def test_peft_key_names(tiny):
    """PEFT's saved names for llava-hf under transformers 5, as get_peft_model + get_peft_model_state_dict
    produce them, and our mapping in both directions."""
    _, hf, _ = tiny
    keys = set(peft_adapter(peft_model(hf, PEFT_HEAD, modules_to_save=None)))
    for key in ("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight",
                "base_model.model.lm_head.lora_B.weight",
                "base_model.model.model.language_model.layers.1.mlp.down_proj.lora_B.weight",
                "base_model.model.model.vision_tower.encoder.layers.0.self_attn.out_proj.lora_A.weight",
                "base_model.model.model.vision_tower.encoder.layers.1.mlp.fc2.lora_B.weight",
                "base_model.model.model.multi_modal_projector.linear_1.lora_A.weight"):
        assert key in keys
    for key in keys:
        assert to_peft_key(from_peft_key(key)) == key
    with_copy = peft.get_peft_model_state_dict(peft_model(hf, PEFT_HEAD, modules_to_save=None))
    assert set(with_copy) - keys == {"base_model.model.lm_head.base_layer.weight"}  # PEFT saves lm_head's base too
    assert from_peft_key("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight") == \
        "language_model.layers.0.self_attn.q_proj.lora_A.weight"
    full = set(peft_adapter(peft_model(hf, PEFT_DECODER, modules_to_save=["multi_modal_projector"])))
    assert "base_model.model.model.multi_modal_projector.linear_1.weight" in full
    assert from_peft_key("base_model.model.model.multi_modal_projector.linear_2.bias") == "projector.linear_2.bias"


# ---- the layer -------------------------------------------------------------------------------------
def test_lora_linear_is_pefts_linear():
    """One layer against peft.tuners.lora.Linear: init (same RNG draws), forward, rsLoRA scaling, dropout's place."""
    from peft.tuners.lora import Linear as PeftLinear

    base = torch.nn.Linear(12, 10)
    torch.manual_seed(3)
    mine = LoraLinear(copy.deepcopy(base), r=4, alpha=6, use_rslora=True)
    torch.manual_seed(3)
    theirs = PeftLinear(copy.deepcopy(base), "default", r=4, lora_alpha=6, use_rslora=True)
    assert torch.equal(mine.lora_A.weight, theirs.lora_A["default"].weight)
    assert not mine.lora_B.weight.any()
    with torch.no_grad():
        b = torch.randn(10, 4)
        mine.lora_B.weight.copy_(b)
        theirs.lora_B["default"].weight.copy_(b)
    x = torch.randn(3, 5, 12)
    assert mine.scaling == theirs.scaling["default"] == 6 / 2
    assert torch.equal(mine(x), theirs(x))


def test_apply_lora_freezes_all_but_the_adapter(tiny):
    model = ours_model(tiny[0])
    apply_lora(model, LoraConfig(r=2, projector="full"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {*(f"{n}.lora_{w}.weight" for n in lora_layers(model) for w in "AB"),
                         "projector.linear_1.weight", "projector.linear_1.bias", "projector.linear_2.weight",
                         "projector.linear_2.bias"}
    assert len(lora_layers(model)) == 2 * len(DECODER)  # 2 layers x 7, nothing in the tower
    assert "language_model.layers.0.self_attn.q_proj.base_layer.weight" in dict(model.named_parameters())
    with pytest.raises(LoraError, match="already has LoRA"):
        apply_lora(model, LoraConfig())
    with pytest.raises(LoraError, match="target_modules"):
        LoraConfig(target_modules=("qkv",))


# ---- parity with PEFT ------------------------------------------------------------------------------
def test_forward_equals_peft(tiny, image_inputs):
    """Decoder + lm_head + vision tower + projector LoRA, a real photo: logits equal PEFT's LoraModel's."""
    directory, hf, _ = tiny
    ids, mine, theirs = image_inputs
    pm = peft_model(hf, PEFT_HEAD, r=4, alpha=8)
    ours = ours_model(directory)
    apply_lora(ours, LoraConfig(r=4, alpha=8, projector="lora", vision="lora", target_modules=(*DECODER, "lm_head")))
    copy_from_peft(ours, pm)
    with torch.no_grad():
        ref = pm(input_ids=ids, **theirs).logits
        out = ours(ids, **mine)
        base = hf(input_ids=ids, **theirs).logits
    assert (ref - base).abs().max() > 100 * TOL * ref.abs().max()  # the adapter changes the answer
    print(f"forward max |diff| {assert_close(out, ref):.3g} (scale {ref.abs().max():.3g})")


def test_gradients_equal_pefts(tiny):
    """One backward of the same next-token loss (text: the decoder path): every LoRA weight's gradient and the
    loss equal PEFT's."""
    directory, hf, _ = tiny
    ids = torch.tensor([TEXT + TEXT[::-1]])
    pm = peft_model(hf, PEFT_DECODER, r=4, alpha=8)
    pm.train()  # dropout 0: train mode only turns gradients on in PEFT's layers
    ours = ours_model(directory)
    apply_lora(ours, LoraConfig(r=4, alpha=8))
    copy_from_peft(ours, pm)

    def loss_of(logits):
        return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])

    ref = loss_of(pm(input_ids=ids).logits)
    ref.backward()
    loss = loss_of(ours(ids))
    loss.backward()
    assert_close(loss.detach(), ref.detach(), "loss")
    grads = {from_peft_key(n.replace(".default", "")): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(mine) == set(grads) and len(mine) == 4 * len(DECODER)
    worst = max(assert_close(mine[n], grads[n], n) / grads[n].abs().max().item() for n in mine)
    print(f"gradients: worst max |diff| / scale {worst:.3g}")


def test_adapter_saved_here_loads_in_peft(tiny, image_inputs, tmp_path):
    """Ours -> save_adapter -> PeftModel.from_pretrained on the llava-hf model: the same logits (decoder LoRA,
    projector trained fully: modules_to_save)."""
    from peft import PeftModel

    directory, hf, _ = tiny
    ids, mine, theirs = image_inputs
    ours = ours_model(directory)
    apply_lora(ours, LoraConfig(r=3, alpha=5, projector="full", use_rslora=True))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for v in lora_state_dict(ours).values():
            v.copy_(0.2 * torch.randn(v.shape, generator=gen))
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["multi_modal_projector"]
    pm = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = pm(input_ids=ids, **theirs).logits
        out = ours(ids, **mine)
    print(f"saved here, run in PEFT: max |diff| {assert_close(out, ref):.3g}")


def test_adapter_saved_by_peft_loads_here(tiny, image_inputs, tmp_path):
    """PEFT's save_pretrained -> load_adapter: the same logits (decoder + lm_head + vision tower + projector LoRA)."""
    directory, hf, _ = tiny
    ids, mine, theirs = image_inputs
    pm = peft_model(hf, PEFT_HEAD, r=4, alpha=16)
    pm.save_pretrained(tmp_path / "peft")
    ours = ours_model(directory)
    cfg = load_adapter(ours, tmp_path / "peft")
    assert (cfg.r, cfg.alpha, cfg.projector, cfg.vision) == (4, 16, "lora", "lora")
    assert cfg.target_modules == (*DECODER, "lm_head")
    with torch.no_grad():
        ref = pm(input_ids=ids, **theirs).logits
        out = ours(ids, **mine)
    print(f"saved by PEFT, run here: max |diff| {assert_close(out, ref):.3g}")


def test_merge_then_unmerge_restores_the_base(tiny, image_inputs):
    directory, _, _ = tiny
    ids, mine, _ = image_inputs
    ours = ours_model(directory)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    apply_lora(ours, LoraConfig(r=4, alpha=8, vision="lora", projector="lora"))
    with torch.no_grad():
        for v in lora_state_dict(ours).values():
            v.normal_(0, 0.2)
        separate = ours(ids, **mine)
        merge_lora(ours)
        merged = ours(ids, **mine)
        changed = ours.language_model.layers[0].self_attn.q_proj.base_layer.weight.clone()
        unmerge_lora(ours)
    assert not torch.allclose(changed, before["language_model.layers.0.self_attn.q_proj.weight"])
    assert_close(merged, separate)
    after = {k.replace(".base_layer", ""): v for k, v in ours.state_dict().items() if ".lora_" not in k}
    assert set(after) == set(before)
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-6, msg=k)
    plain = merge_and_unload(ours)
    assert not lora_layers(plain)
    with torch.no_grad():
        assert_close(plain(ids, **mine), separate)


# ---- refusals --------------------------------------------------------------------------------------
def test_pickled_adapter_is_refused_unopened(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    with pytest.raises(AdapterError) as e:
        read_adapter(tmp_path)
    message = str(e.value)
    assert "\n" not in message and "adapter_model.bin" in message
    assert "torch.load(" in message and "weights_only=True" in message and "save_file(" in message


@pytest.mark.parametrize("config, field", [
    ({"r": 4, "lora_alpha": 8}, "'peft_type'"),
    ({"peft_type": "IA3", "r": 4, "lora_alpha": 8}, "'peft_type'"),
    ({"peft_type": "LORA", "lora_alpha": 8}, "'r'"),
    ({"peft_type": "LORA", "r": 0, "lora_alpha": 8}, "'r'"),
    ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True}, "'use_dora'"),
    ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]}, "'modules_to_save'"),
])
def test_bad_config_names_file_and_field(tmp_path, config, field):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=f"adapter_config.json: field {field}"):
        read_adapter(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(AdapterError, match="no such adapter directory"):
        read_adapter(tmp_path / "nowhere")
    with pytest.raises(AdapterError, match="adapter_config.json: not found"):
        read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    with pytest.raises(AdapterError, match="adapter_model.safetensors: not found"):
        read_adapter(tmp_path)


# ---- inference with an adapter: the command line against transformers + PEFT --------------------------
def _tiny_random_in_transformers(cache):
    """tiny-random (runtime/tiny.py) as a transformers LlavaNextVideoForConditionalGeneration: our weights under
    transformers 5's names (keymaps' llava_hf_5, read backwards)."""
    from transformers import LlavaNextVideoForConditionalGeneration

    from checkpoints import transformers_config
    from llava_next.model.keymaps import source_key
    from llava_next.runtime import tiny
    from llava_next_weights.load import load_state_dict_mmap

    directory = tiny.ensure(cache, name="tiny-random")
    config = read_config(directory)
    hf = LlavaNextVideoForConditionalGeneration(transformers_config(config, kind="video")).eval()
    state = {source_key("llava_hf_5", k): v for k, v in load_state_dict_mmap(directory).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    unused = (f"model.vision_tower.encoder.layers.{config.vision.layers_used}.", "model.vision_tower.post_layernorm.")
    assert not unexpected and all(k.startswith(unused) for k in missing), (missing, unexpected)  # never computed
    hf.set_attn_implementation("eager")
    return hf


@pytest.mark.parametrize("quantized", [False, True], ids=["merged", "int8-separate"])
def test_cli_run_with_a_peft_adapter_matches_transformers_peft(tmp_path, monkeypatch, capsys, quantized):
    """``llava-next run --model tiny-random --adapter DIR`` (DIR saved by PEFT on tiny-random's llava-hf form):
    greedy tokens equal transformers + PEFT's; merged into fp32 weights, and kept beside int8 ones (the first
    tokens, as int8 rounds the base)."""
    from llava_next.cli import main as cli
    from llava_next.runtime.pipeline import Pipeline

    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path / "cache"))
    hf = _tiny_random_in_transformers(tmp_path / "cache")
    pm = peft_model(hf, PEFT_DECODER, r=8, alpha=16)
    with torch.no_grad():  # a strong adapter, so that its answer is not the base model's
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(5)
    pm.save_pretrained(tmp_path / "adapter")
    prompt, n = "What is this?", 8
    args = ["run", "--model", "tiny-random", "--adapter", str(tmp_path / "adapter"), "--image", "sample:cat",
            "--max-new-tokens", str(n), "--dtype", "fp32", "--json", prompt]
    if quantized:
        args += ["--quantize", "int8"]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapter"]["r"] == 8 and result["adapter"]["layers"] == 32 * 7

    pipe = Pipeline.from_pretrained("tiny-random", dtype=torch.float32, progress=False)
    request = pipe.prepare(prompt, images=[_sample("sample:cat")])
    im = request.images[0]
    ids = torch.tensor([request.input_ids])
    hf_inputs = {"pixel_values": im.pixel_values[None], "image_sizes": torch.tensor([im.image_size])}
    with torch.no_grad():
        theirs = pm.generate(input_ids=ids, **hf_inputs, max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
        base = hf.generate(input_ids=ids, **hf_inputs, max_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert theirs != base  # the adapter changes the answer
    mine = result["tokens"]
    if quantized:
        assert mine[:2] == theirs[:2], (mine, theirs)
    else:
        assert mine == theirs[:len(mine)] and len(mine) >= 1, (mine, theirs)


def _sample(name: str) -> str:
    from llava_next.cli.options import sample_path

    return sample_path(name)
