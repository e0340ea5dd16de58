"""Key tables: every source checkpoint format, mapped key by key onto llava-next's own layout.

llava-next's layout is the module tree (``LlavaNextModel.state_dict()`` names), leaf names kept from
the checkpoints so that every table is a prefix rename:

    vision_tower.class_embedding                                   (C,)             CLIP only
    vision_tower.patch_embedding.weight                            (C, 3, 14, 14)
    vision_tower.patch_embedding.bias                              (C,)             SigLIP only
    vision_tower.position_embedding.weight                         (577, C)
    vision_tower.pre_layernorm.{weight,bias}                                        CLIP only
    vision_tower.layers.{i}.layer_norm{1,2}.{weight,bias}
    vision_tower.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
    vision_tower.layers.{i}.mlp.{fc1,fc2}.{weight,bias}
    projector.linear_{1,2}.{weight,bias}
    image_newline                                                  (D,)
    language_model.embed_tokens.weight                             (V, D)
    language_model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight
    language_model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    language_model.layers.{i}.self_attn.{q,k,v}_proj.bias                           Qwen only
    language_model.layers.{i}.mlp.{gate,up,down}_proj.weight
    language_model.norm.weight
    language_model.lm_head.weight                                  (V, D)           absent when tied

A table is a list of ``(source_template, target_template)``; ``{}`` stands for a layer index, and a
target of ``None`` means the key is dropped on purpose (say why beside it). Matching is exact on the
whole key: a source key that matches no template is an error, never silently skipped. One source
tensor may also be split into several targets (open_clip's fused in_proj) with ``Split``.

Vision layers after the selected feature layer are never computed, so llava-next does not build them;
``drop_unused_vision_layers`` removes them from a mapping, explicitly.

The tables live in the model layer (they name the model's own parameters; ``VisionTower.from_state_dict``
renames a standalone CLIP checkpoint through them); the converter (``llava_next_weights.convert``) reads
them from here (docs/architecture.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Split:
    """One source tensor cut into equal chunks along dim 0, one per target (q, k, v)."""

    targets: tuple[str, ...]


@dataclass(frozen=True)
class Squeeze:
    """One source tensor with a leading dimension of 1 dropped (timm's ``pos_embed`` (1, 729, C))."""

    target: str


Target = str | Split | Squeeze | None
Table = list[tuple[str, Target]]

# ---- CLIP vision tower ---------------------------------------------------------------------------
# transformers CLIPVisionModel, relative to its `vision_model.` prefix
_CLIP_HF: Table = [
    ("embeddings.class_embedding", "class_embedding"),
    ("embeddings.patch_embedding.weight", "patch_embedding.weight"),
    ("embeddings.position_embedding.weight", "position_embedding.weight"),
    ("embeddings.position_ids", None),  # a buffer arange(577), rebuilt
    ("pre_layrnorm.weight", "pre_layernorm.weight"),
    ("pre_layrnorm.bias", "pre_layernorm.bias"),
    *[(f"encoder.layers.{{}}.{n}", f"layers.{{}}.{n}") for n in (
        "layer_norm1.weight", "layer_norm1.bias", "layer_norm2.weight", "layer_norm2.bias",
        "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
        "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")],
    ("post_layernorm.weight", None),  # only used for the pooled CLS output, which LLaVA never reads
    ("post_layernorm.bias", None),
]

# open_clip VisionTransformer (`model.visual`), e.g. ViT-L-14-336
_CLIP_OPEN_CLIP: Table = [
    ("class_embedding", "class_embedding"),
    ("conv1.weight", "patch_embedding.weight"),
    ("positional_embedding", "position_embedding.weight"),
    ("ln_pre.weight", "pre_layernorm.weight"),
    ("ln_pre.bias", "pre_layernorm.bias"),
    ("transformer.resblocks.{}.ln_1.weight", "layers.{}.layer_norm1.weight"),
    ("transformer.resblocks.{}.ln_1.bias", "layers.{}.layer_norm1.bias"),
    ("transformer.resblocks.{}.attn.in_proj_weight", Split(("layers.{}.self_attn.q_proj.weight",
                                                            "layers.{}.self_attn.k_proj.weight",
                                                            "layers.{}.self_attn.v_proj.weight"))),
    ("transformer.resblocks.{}.attn.in_proj_bias", Split(("layers.{}.self_attn.q_proj.bias",
                                                          "layers.{}.self_attn.k_proj.bias",
                                                          "layers.{}.self_attn.v_proj.bias"))),
    ("transformer.resblocks.{}.attn.out_proj.weight", "layers.{}.self_attn.out_proj.weight"),
    ("transformer.resblocks.{}.attn.out_proj.bias", "layers.{}.self_attn.out_proj.bias"),
    ("transformer.resblocks.{}.ln_2.weight", "layers.{}.layer_norm2.weight"),
    ("transformer.resblocks.{}.ln_2.bias", "layers.{}.layer_norm2.bias"),
    ("transformer.resblocks.{}.mlp.c_fc.weight", "layers.{}.mlp.fc1.weight"),
    ("transformer.resblocks.{}.mlp.c_fc.bias", "layers.{}.mlp.fc1.bias"),
    ("transformer.resblocks.{}.mlp.c_proj.weight", "layers.{}.mlp.fc2.weight"),
    ("transformer.resblocks.{}.mlp.c_proj.bias", "layers.{}.mlp.fc2.bias"),
    ("ln_post.weight", None),  # pooled-output head, unused by LLaVA
    ("ln_post.bias", None),
    ("proj", None),  # CLIP's image-text projection, unused by LLaVA
]

# ---- SigLIP vision tower (docs/references.md: SigLIP vision tower, Checkpoint keys) -----------------
# transformers SiglipVisionModel, relative to its `vision_model.` prefix: CLIP's names without the CLS and
# pre-LayerNorm, plus the patch conv's bias; the attention-pooling head (google checkpoints,
# vision_use_head=True) and post_layernorm are never used by LLaVA (features are read before them)
_SIGLIP_HF: Table = [
    ("embeddings.patch_embedding.weight", "patch_embedding.weight"),
    ("embeddings.patch_embedding.bias", "patch_embedding.bias"),
    ("embeddings.position_embedding.weight", "position_embedding.weight"),
    ("embeddings.position_ids", None),  # a buffer arange(729), rebuilt
    *[(s, t) for s, t in _CLIP_HF if s.startswith("encoder.layers.")],
    ("post_layernorm.weight", None),  # LLaVA reads hidden states before it
    ("post_layernorm.bias", None),
    *[(f"head.{n}", None) for n in (  # the MAP head (probe + MultiheadAttention + LayerNorm + MLP): unused
        "probe", "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight",
        "attention.out_proj.bias", "layernorm.weight", "layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias")],
]

# open_clip ViT-SO400M-14-SigLIP-384 (`model.visual.state_dict()`): a timm trunk, fused qkv (order q, k, v)
_SIGLIP_OPEN_CLIP: Table = [
    ("trunk.patch_embed.proj.weight", "patch_embedding.weight"),
    ("trunk.patch_embed.proj.bias", "patch_embedding.bias"),
    ("trunk.pos_embed", Squeeze("position_embedding.weight")),  # (1, 729, C) -> (729, C)
    ("trunk.blocks.{}.norm1.weight", "layers.{}.layer_norm1.weight"),
    ("trunk.blocks.{}.norm1.bias", "layers.{}.layer_norm1.bias"),
    ("trunk.blocks.{}.attn.qkv.weight", Split(("layers.{}.self_attn.q_proj.weight", "layers.{}.self_attn.k_proj.weight",
                                               "layers.{}.self_attn.v_proj.weight"))),
    ("trunk.blocks.{}.attn.qkv.bias", Split(("layers.{}.self_attn.q_proj.bias", "layers.{}.self_attn.k_proj.bias",
                                             "layers.{}.self_attn.v_proj.bias"))),
    ("trunk.blocks.{}.attn.proj.weight", "layers.{}.self_attn.out_proj.weight"),
    ("trunk.blocks.{}.attn.proj.bias", "layers.{}.self_attn.out_proj.bias"),
    ("trunk.blocks.{}.norm2.weight", "layers.{}.layer_norm2.weight"),
    ("trunk.blocks.{}.norm2.bias", "layers.{}.layer_norm2.bias"),
    ("trunk.blocks.{}.mlp.fc1.weight", "layers.{}.mlp.fc1.weight"),
    ("trunk.blocks.{}.mlp.fc1.bias", "layers.{}.mlp.fc1.bias"),
    ("trunk.blocks.{}.mlp.fc2.weight", "layers.{}.mlp.fc2.weight"),
    ("trunk.blocks.{}.mlp.fc2.bias", "layers.{}.mlp.fc2.bias"),
    ("trunk.norm.weight", None),  # = transformers' post_layernorm: LLaVA reads features before it
    ("trunk.norm.bias", None),
    *[(f"trunk.attn_pool.{n}", None) for n in (  # the MAP head, unused by LLaVA
        "latent", "q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias", "norm.weight",
        "norm.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")],
]
# whole-model tables take both towers' names; the config decides which are expected (CLIP and SigLIP
# share every name they both have, so a key of the other tower is an error, never a silent load)
_VIT_HF: Table = _CLIP_HF + [(s, t) for s, t in _SIGLIP_HF if (s, t) not in _CLIP_HF]

# ---- Llama-style decoder -------------------------------------------------------------------------
# transformers LlamaForCausalLM / MistralForCausalLM, relative to the decoder's `model.` prefix
_DECODER_HF: Table = [
    ("embed_tokens.weight", "embed_tokens.weight"),
    *[(f"layers.{{}}.{n}", f"layers.{{}}.{n}") for n in (
        "input_layernorm.weight", "post_attention_layernorm.weight",
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")],  # biases: Qwen only
    ("layers.{}.self_attn.rotary_emb.inv_freq", None),  # old checkpoints store the RoPE buffer; rebuilt
    ("norm.weight", "norm.weight"),
]


def _prefixed(table: Table, src: str, dst: str) -> Table:
    def add(t: Target) -> Target:
        if t is None:
            return None
        if isinstance(t, Split):
            return Split(tuple(dst + x for x in t.targets))
        if isinstance(t, Squeeze):
            return Squeeze(dst + t.target)
        return dst + t
    return [(src + s, add(t)) for s, t in table]


# ---- whole-model formats -------------------------------------------------------------------------
_LLAVA_HF_5: Table = (_prefixed(_VIT_HF, "model.vision_tower.", "vision_tower.")
                      + _prefixed(_DECODER_HF, "model.language_model.", "language_model.")
                      + [("lm_head.weight", "language_model.lm_head.weight"),
                         ("model.multi_modal_projector.linear_1.weight", "projector.linear_1.weight"),
                         ("model.multi_modal_projector.linear_1.bias", "projector.linear_1.bias"),
                         ("model.multi_modal_projector.linear_2.weight", "projector.linear_2.weight"),
                         ("model.multi_modal_projector.linear_2.bias", "projector.linear_2.bias"),
                         ("model.image_newline", "image_newline")])
TABLES: dict[str, Table] = {
    # a standalone CLIPVisionModel / open_clip tower / Llama decoder, onto the sub-module's own names
    "clip_hf": _prefixed(_CLIP_HF, "vision_model.", "") + _CLIP_HF,  # transformers 5 drops `vision_model.`
    "clip_open_clip": _CLIP_OPEN_CLIP,
    "siglip_hf": _prefixed(_SIGLIP_HF, "vision_model.", "") + _SIGLIP_HF,  # transformers 5 drops `vision_model.`
    "siglip_open_clip": _SIGLIP_OPEN_CLIP,
    "llama_hf": _prefixed(_DECODER_HF, "model.", "") + [("lm_head.weight", "lm_head.weight")],
    # llava-hf on disk: language_model.model.*, and the CLIP tower as vision_tower.vision_model.* (hub
    # files) or vision_tower.* (what transformers 5 save_pretrained writes)
    "llava_hf": (_prefixed(_VIT_HF, "vision_tower.vision_model.", "vision_tower.")
                 + _prefixed(_VIT_HF, "vision_tower.", "vision_tower.")
                 + _prefixed(_DECODER_HF, "language_model.model.", "language_model.")
                 + [("language_model.lm_head.weight", "language_model.lm_head.weight"),
                    ("multi_modal_projector.linear_1.weight", "projector.linear_1.weight"),
                    ("multi_modal_projector.linear_1.bias", "projector.linear_1.bias"),
                    ("multi_modal_projector.linear_2.weight", "projector.linear_2.weight"),
                    ("multi_modal_projector.linear_2.bias", "projector.linear_2.bias"),
                    ("image_newline", "image_newline")]),
    # transformers >= 4.52 in-memory names (model.language_model.*, model.vision_tower.vision_model.*);
    # transformers 5 also flattens the CLIP prefix (model.vision_tower.embeddings.*)
    "llava_hf_new": (_prefixed(_VIT_HF, "model.vision_tower.vision_model.", "vision_tower.")
                     + _LLAVA_HF_5),
    # transformers 5's in-memory names alone: one source per target, so ``source_key`` can invert it
    # (PEFT names adapter weights by them: llava_next_weights/adapters.py)
    "llava_hf_5": _LLAVA_HF_5,
    # the original LLaVA-NeXT release (liuhaotian/llava-v1.6-*, lmms-lab/LLaVA-NeXT-Video-*)
    "original": (_prefixed(_VIT_HF, "model.vision_tower.vision_tower.vision_model.", "vision_tower.")
                 + _prefixed(_DECODER_HF, "model.", "language_model.")
                 + [("lm_head.weight", "language_model.lm_head.weight"),
                    ("model.mm_projector.0.weight", "projector.linear_1.weight"),  # index 1 is the GELU
                    ("model.mm_projector.0.bias", "projector.linear_1.bias"),
                    ("model.mm_projector.2.weight", "projector.linear_2.weight"),
                    ("model.mm_projector.2.bias", "projector.linear_2.bias"),
                    ("model.image_newline", "image_newline")]),
}


def _compile(table: Table) -> list[tuple[re.Pattern[str], Target]]:
    return [(re.compile("^" + re.escape(src).replace(r"\{\}", r"(\d+)") + "$"), tgt) for src, tgt in table]


_COMPILED = {name: _compile(t) for name, t in TABLES.items()}


class UnmappedKeyError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def map_key(fmt: str, key: str) -> Target:
    """The target(s) of one source key in format ``fmt``; raises naming the key if no template matches."""
    if fmt not in _COMPILED:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known formats: {', '.join(TABLES)}")
    for pattern, target in _COMPILED[fmt]:
        m = pattern.match(key)
        if m is None:
            continue
        if target is None:
            return None
        if isinstance(target, Split):
            return Split(tuple(t.format(*m.groups()) for t in target.targets))
        if isinstance(target, Squeeze):
            return Squeeze(target.target.format(*m.groups()))
        return target.format(*m.groups())
    raise UnmappedKeyError(f"checkpoint key {key!r} is not in the {fmt!r} key table: refusing to guess what it is")


def source_key(fmt: str, target: str) -> str:
    """The one source key of format ``fmt`` that ``map_key`` renames to ``target`` (the table read backwards);
    raises naming the key when no template, or more than one, gives it."""
    if fmt not in TABLES:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known formats: {', '.join(TABLES)}")
    found = []
    for src, tgt in TABLES[fmt]:
        if isinstance(tgt, str):
            m = re.match("^" + re.escape(tgt).replace(r"\{\}", r"(\d+)") + "$", target)
            if m is not None:
                found.append(src.format(*m.groups()))
    if len(found) != 1:
        raise UnmappedKeyError(f"key {target!r} has {'no' if not found else len(found)} source key(s) in the "
                               f"{fmt!r} key table{'' if not found else ': ' + ', '.join(found)}")
    return found[0]


def map_keys(fmt: str, keys: Iterable[str]) -> dict[str, Target]:
    return {k: map_key(fmt, k) for k in keys}


def drop_unused_vision_layers(target: str | None, layers_used: int, prefix: str = "vision_tower.") -> str | None:
    """None for a vision layer at or after ``layers_used`` (never computed, so never built)."""
    if target is None:
        return None
    m = re.match("^" + re.escape(prefix) + r"layers\.(\d+)\.", target)
    if m and int(m.group(1)) >= layers_used:
        return None
    return target


def rename_state_dict(fmt: str, state_dict: dict, *, vision_layers_used: int | None = None,
                      vision_prefix: str = "vision_tower.") -> dict:
    """A whole in-memory state dict renamed into llava-next's layout (tensors are not copied, only
    split views for ``Split``). Strict on the source side: every key must be in the table. Pair it
    with ``module.load_state_dict(out, strict=True)`` (or the converter) for the target side."""
    out = {}
    for key, tensor in state_dict.items():
        target = map_key(fmt, key)
        if isinstance(target, Split):
            for name, part in zip(target.targets, tensor.chunk(len(target.targets), dim=0)):
                if vision_layers_used is not None:
                    name = drop_unused_vision_layers(name, vision_layers_used, vision_prefix)
                if name is not None:
                    out[name] = part
            continue
        if isinstance(target, Squeeze):
            if tensor.shape[0] != 1:
                raise ValueError(f"checkpoint key {key!r} has shape {tuple(tensor.shape)}; expected a leading 1")
            target, tensor = target.target, tensor[0]
        if vision_layers_used is not None:
            target = drop_unused_vision_layers(target, vision_layers_used, vision_prefix)
        if target is not None:
            out[target] = tensor
    return out
