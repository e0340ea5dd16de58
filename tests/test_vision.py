"""The CLIP vision tower against transformers' CLIPVisionModel and open_clip's VisionTransformer.

Every comparison loads the reference's own random weights through the real loader
(``VisionTower.from_state_dict``) and compares the selected hidden state, CLS dropped or kept.
Tolerance (fp32): max|ours - ref| <= 1e-4 * max|ref|.

The random weights are chosen so that a wrong implementation cannot hide: every LayerNorm has a
non-trivial affine, q/k weights give O(1) attention logits (attention is far from uniform), fc1
outputs are O(1) (quick-GELU and erf-GELU differ there), and the residual stream is kept small
(embeddings, pre-LayerNorm, out_proj and fc2 scaled down: variance ~1e-3) so that a wrong
``layer_norm_eps`` in any LayerNorm changes the result by more than the tolerance.
Mutations of model/clip.py seen to fail these tests are listed in the report of the commit that added them.
"""

import re

import pytest
import torch
from torch import nn

from llava_next.model.attention import use_backend
from llava_next.config import VisionConfig
from llava_next.model.clip import VisionTower

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")
from open_clip.transformer import QuickGELU, VisionTransformer  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402
from transformers.initialization import no_init_weights  # noqa: E402

RTOL = 1e-4  # max|diff| <= RTOL * max|ref|
TINY = dict(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, image_size=56, patch_size=14)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


RESIDUAL_WRITERS = ("out_proj", "fc2", "c_proj")  # layers that write into the residual stream
PRE_LAYERNORM = ("pre_layrnorm", "ln_pre")  # transformers / open_clip names
SMALL = 0.04  # scale of the residual stream


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (uniform: fast at 300M parameters), scaled as the module docstring says."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            small = SMALL if module_name.rsplit(".", 1)[-1] in RESIDUAL_WRITERS + PRE_LAYERNORM else 1.0
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, nn.LayerNorm) and name == "weight":
                    lo, hi = 0.5 * small, 1.5 * small
                elif name.endswith("bias"):
                    lo, hi = -0.1 * small, 0.1 * small
                elif p.ndim == 2 and isinstance(module, (nn.Linear, nn.MultiheadAttention)):
                    hi = small * (3 / p.shape[1]) ** 0.5  # std small/sqrt(fan_in): outputs keep the input's scale
                    lo = -hi
                elif isinstance(module, nn.Conv2d):
                    lo, hi = -0.002, 0.002  # patch features' variance ~8e-4 for N(0, 1) pixels
                else:  # class / position embeddings (variance ~8e-4), CLIP's output projection
                    lo, hi = -0.05, 0.05
                p.uniform_(lo, hi, generator=g)
    return model.eval()


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- references -------------------------------------------------------------------------------
def hf_config(cfg: VisionConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                            image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5, attn_implementation="eager")


def hf_checkpoint(model: CLIPVisionModel) -> dict:
    """The hub layout ("vision_model.*", transformers 4 and openai/clip-* files). transformers 5 keeps the
    flattened in-memory names (no prefix); the 'clip_hf' table maps the prefixed layout."""
    return {"vision_model." + k: v for k, v in model.state_dict().items()}


def hf_hidden_states(model: CLIPVisionModel, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(x, output_hidden_states=True).hidden_states  # [0] = pre-LN'd embeddings


def open_clip_hidden_states(visual: VisionTransformer, x: torch.Tensor) -> list[torch.Tensor]:
    """[0] = ln_pre output, [i] = output of resblocks[i - 1], all (N, T, C) as in transformers."""
    batch_first = visual.transformer.batch_first
    states = []

    def keep(module, args, out):
        states.append(out if batch_first or module is visual.ln_pre else out.transpose(0, 1))  # LND -> NLD

    hooks = [visual.ln_pre.register_forward_hook(keep)]
    hooks += [blk.register_forward_hook(keep) for blk in visual.transformer.resblocks]
    try:
        with torch.no_grad():
            visual(x)
    finally:
        for h in hooks:
            h.remove()
    return states


def tiny_open_clip(cfg: VisionConfig, seed: int) -> VisionTransformer:
    """open_clip's tower as ViT-L-14-336-quickgelu builds it (QuickGELU; LayerNorm eps 1e-5), tiny."""
    visual = VisionTransformer(image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.hidden_size,
                               layers=cfg.num_layers, heads=cfg.num_heads,
                               mlp_ratio=cfg.intermediate_size / cfg.hidden_size, output_dim=32,
                               act_layer=QuickGELU)
    return randomize_(visual, seed)


@pytest.fixture(scope="module")
def tiny_hf():
    model = randomize_(CLIPVisionModel(hf_config(VisionConfig(**TINY))), seed=1)
    x = pixels(2, TINY["image_size"])
    return hf_checkpoint(model), x, hf_hidden_states(model, x)


@pytest.fixture(scope="module")
def tiny_oc():
    visual = tiny_open_clip(VisionConfig(**TINY), seed=2)
    x = pixels(2, TINY["image_size"], seed=3)
    return visual.state_dict(), x, open_clip_hidden_states(visual, x)


def select(hidden_states, layer: int, strategy: str) -> torch.Tensor:
    h = hidden_states[layer]
    return h if strategy == "full" else h[:, 1:]


# ---- parity: tiny -----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("layer", [-1, -2, 2, 0])
def test_matches_transformers(tiny_hf, layer, strategy):
    sd, x, hs = tiny_hf
    cfg = VisionConfig(**TINY, feature_layer=layer, feature_strategy=strategy)
    tower = VisionTower.from_state_dict(sd, cfg, "clip_hf")
    with torch.no_grad():
        out = tower(x)
    assert out.shape == (2, cfg.tokens_per_tile, cfg.hidden_size)
    assert rel_err(out, select(hs, layer, strategy)) <= RTOL


@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("layer", [-1, -2, 1])
def test_matches_open_clip(tiny_oc, layer, strategy):
    sd, x, hs = tiny_oc
    cfg = VisionConfig(**TINY, feature_layer=layer, feature_strategy=strategy)
    tower = VisionTower.from_state_dict(sd, cfg, "clip_open_clip")
    with torch.no_grad():
        out = tower(x)
    assert rel_err(out, select(hs, layer, strategy)) <= RTOL


def test_parity_check_sees_wrong_eps_and_wrong_layer(tiny_hf):
    """The tolerance and the random weights are tight enough to catch a wrong eps or an off-by-one layer."""
    sd, x, hs = tiny_hf
    with torch.no_grad():
        wrong_eps = VisionTower.from_state_dict(sd, VisionConfig(**TINY, layer_norm_eps=1e-6))(x)
        one_layer_early = VisionTower.from_state_dict(sd, VisionConfig(**TINY, feature_layer=-3))(x)
    assert rel_err(wrong_eps, hs[-2][:, 1:]) > 10 * RTOL
    assert rel_err(one_layer_early, hs[-2][:, 1:]) > 10 * RTOL


# ---- structure --------------------------------------------------------------------------------
@pytest.mark.parametrize("layer, built", [(-2, 3), (-1, 4), (2, 2), (0, 0), (-5, 0)])
def test_builds_only_the_layers_it_uses(tiny_hf, layer, built):
    tower = VisionTower.from_state_dict(tiny_hf[0], VisionConfig(**TINY, feature_layer=layer))
    assert len(tower.layers) == built
    layer_keys = {int(k.split(".")[1]) for k in tower.state_dict() if k.startswith("layers.")}
    assert layer_keys == set(range(built))
    assert not any("post" in k for k in tower.state_dict())


def test_attention_goes_through_the_facade(tiny_hf, monkeypatch):
    import llava_next.model.clip as vision

    calls = []

    def spy(q, k, v, *, causal, mask=None):
        calls.append((tuple(q.shape), tuple(k.shape), causal, mask))
        return vision_attention(q, k, v, causal=causal, mask=mask)

    vision_attention = vision.attention
    monkeypatch.setattr(vision, "attention", spy)
    cfg = VisionConfig(**TINY)
    VisionTower.from_state_dict(tiny_hf[0], cfg)(tiny_hf[1])
    assert calls == [((2, 4, 17, 16), (2, 4, 17, 16), False, None)] * cfg.layers_used


def test_backends_and_bf16_agree(tiny_hf):
    sd, x, hs = tiny_hf
    tower = VisionTower.from_state_dict(sd, VisionConfig(**TINY))
    ref = hs[-2][:, 1:]
    with torch.no_grad(), use_backend("eager"):
        assert rel_err(tower(x), ref) <= RTOL
    with torch.no_grad():
        out = tower.to(torch.bfloat16)(x)  # fp32 pixels are cast to the weights' dtype
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 3e-2  # bf16 has 8 mantissa bits


# ---- loading errors ---------------------------------------------------------------------------
def test_missing_key_is_named(tiny_hf):
    sd = dict(tiny_hf[0])
    del sd["vision_model.encoder.layers.1.mlp.fc1.bias"]
    with pytest.raises(ValueError, match=r"missing: layers\.1\.mlp\.fc1\.bias"):
        VisionTower.from_state_dict(sd, VisionConfig(**TINY))


def test_unexpected_key_is_named(tiny_hf):
    sd = dict(tiny_hf[0], **{"vision_model.encoder.layers.0.mlp.fc3.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match=r"vision_model\.encoder\.layers\.0\.mlp\.fc3\.weight"):
        VisionTower.from_state_dict(sd, VisionConfig(**TINY))


def test_wrong_shape_is_named(tiny_hf):
    cfg = VisionConfig(**dict(TINY, intermediate_size=96))
    with pytest.raises(ValueError, match=r"wrong shape: layers\.0\.mlp\.fc1\.weight: checkpoint \(128, 64\), "
                                         r"expected \(96, 64\)"):
        VisionTower.from_state_dict(tiny_hf[0], cfg)


def test_layer_count_must_match_the_config(tiny_hf):
    # 4 layers in the checkpoint: feature_layer -2 of a 6-layer config would silently pick layer 5
    with pytest.raises(ValueError, match=r"has layers 0\.\.3 but VisionConfig\.num_layers is 6"):
        VisionTower.from_state_dict(tiny_hf[0], VisionConfig(**dict(TINY, num_layers=6)))


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(3, 56, 56), r"expects pixel_values of shape \(N, 3, 56, 56\), got \(3, 56, 56\)"),
    (torch.zeros(1, 3, 64, 56), r"got \(1, 3, 64, 56\): split images into 56 px tiles"),
    (torch.zeros(1, 3, 56, 56, dtype=torch.uint8), r"normalized float pixels, got dtype torch.uint8"),
])
def test_bad_pixels_are_explained(tiny_hf, bad, message):
    tower = VisionTower.from_state_dict(tiny_hf[0], VisionConfig(**TINY))
    with pytest.raises(ValueError, match=message):
        tower(bad)


# ---- real shape: ViT-L/14-336 -----------------------------------------------------------------
def test_real_checkpoint_layouts_on_meta():
    """Both real key layouts load onto the same tensors, shapes as docs/references.md (no data touched)."""
    cfg = VisionConfig()
    with torch.device("meta"):
        hf = CLIPVisionModel(hf_config(cfg))
        visual = open_clip.create_model("ViT-L-14-336-quickgelu", device="meta").visual
    towers = [VisionTower.from_state_dict(hf_checkpoint(hf), cfg, "clip_hf"),
              VisionTower.from_state_dict(visual.state_dict(), cfg, "clip_open_clip")]
    for tower in towers:
        shapes = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
        assert len(shapes) == 5 + 16 * 23
        assert shapes["position_embedding.weight"] == (577, 1024)
        assert shapes["patch_embedding.weight"] == (1024, 3, 14, 14)
        assert shapes["layers.22.self_attn.k_proj.weight"] == (1024, 1024)
        assert shapes["layers.22.mlp.fc1.weight"] == (4096, 1024)
        assert "layers.23.mlp.fc1.weight" not in shapes
    assert shapes == {k: tuple(v.shape) for k, v in towers[0].state_dict().items()}


def hf_to_open_clip(sd: dict, num_layers: int, proj: torch.Tensor) -> dict:
    """transformers CLIPVisionModel names (v5, unprefixed) -> open_clip model.visual names (test-side map)."""
    out = {"class_embedding": sd["embeddings.class_embedding"], "conv1.weight": sd["embeddings.patch_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"], "proj": proj,
           "ln_pre.weight": sd["pre_layrnorm.weight"], "ln_pre.bias": sd["pre_layrnorm.bias"],
           "ln_post.weight": sd["post_layernorm.weight"], "ln_post.bias": sd["post_layernorm.bias"]}
    for i in range(num_layers):
        h, o = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[o + f"attn.in_proj_{p}"] = torch.cat([sd[h + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
            pairs = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                     "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
            out.update({o + f"{a}.{p}": sd[h + f"{b}.{p}"] for a, b in pairs.items()})
    return out


def test_matches_transformers_and_open_clip_at_vit_l_336():
    """One 336x336 image through the real shape (24 layers, feature_layer -2 -> 23 computed), fp32."""
    cfg = VisionConfig()
    with no_init_weights():  # transformers' own init of 300M parameters takes ~12 s here
        hf = CLIPVisionModel(hf_config(cfg))
    randomize_(hf, seed=4)
    with torch.device("meta"):
        visual = open_clip.create_model("ViT-L-14-336-quickgelu", device="meta").visual
    assert isinstance(visual.transformer.resblocks[0].mlp.gelu, QuickGELU)  # the -quickgelu name enables it
    visual.load_state_dict(hf_to_open_clip(hf.state_dict(), cfg.num_layers, torch.zeros(1024, 768)),
                           strict=True, assign=True)
    tower = VisionTower.from_state_dict(hf_checkpoint(hf), cfg, "clip_hf")
    x = pixels(1, 336, seed=5)
    with torch.no_grad():
        out = tower(x)
        # open_clip's own layer selection: output of the second-to-last block, patches split from CLS
        oc = visual.forward_intermediates(x, indices=[-2], stop_early=True, intermediates_only=True,
                                          output_fmt="NLC", output_extra_tokens=True)
    assert out.shape == (1, 576, 1024)
    assert rel_err(out, hf_hidden_states(hf, x)[-2][:, 1:]) <= RTOL
    assert rel_err(out, oc["image_intermediates"][0]) <= RTOL

    # the open_clip layout loads the very same weights (q/k/v split back out of in_proj)
    from_oc = VisionTower.from_state_dict(visual.state_dict(), cfg, "clip_open_clip").state_dict()
    ours = tower.state_dict()
    assert all(torch.equal(from_oc[k], ours[k]) for k in ours if re.search(r"\.[qkv]_proj\.", k))
