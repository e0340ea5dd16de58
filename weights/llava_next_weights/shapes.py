"""The exact ``{key: shape}`` of llava-next's own checkpoint layout for a config.

This is the target side of every conversion and the contract the model module is checked against:
the key names are the ones documented at the top of ``llava_next/model/keymaps.py``; the shapes follow from the config
alone. Vision layers at or after ``config.vision.layers_used`` are never computed, so they are not
part of the layout (the converter drops them, the model does not build them).

Shapes are PyTorch's: a Linear weight is ``(out_features, in_features)``, the patch-embedding conv
weight is ``(C, channels, patch, patch)``.
"""

from __future__ import annotations

from llava_next.config import LlavaNextConfig

Shape = tuple[int, ...]


def expected_shapes(config: LlavaNextConfig) -> dict[str, Shape]:
    """Every tensor of llava-next's layout for ``config``, in module order."""
    v, t = config.vision, config.text
    C, I = v.hidden_size, v.intermediate_size  # vision width, vision MLP width
    D, F = t.hidden_size, t.intermediate_size  # decoder width, decoder MLP width
    q_out, kv_out = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    shapes: dict[str, Shape] = {}

    # ---- vision tower (only the layers that are computed): CLIP or SigLIP (no CLS / pre-LN, conv bias)
    vt = "vision_tower."
    if v.has_cls:
        shapes[vt + "class_embedding"] = (C,)
    shapes[vt + "patch_embedding.weight"] = (C, v.num_channels, v.patch_size, v.patch_size)
    if v.kind == "siglip":
        shapes[vt + "patch_embedding.bias"] = (C,)
    shapes[vt + "position_embedding.weight"] = (v.num_patches + v.has_cls, C)  # CLIP: +1, the CLS position
    if v.kind == "clip":
        shapes[vt + "pre_layernorm.weight"] = (C,)
        shapes[vt + "pre_layernorm.bias"] = (C,)
    for i in range(v.layers_used):
        p = f"{vt}layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[p + norm + ".weight"] = (C,)
            shapes[p + norm + ".bias"] = (C,)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (C, C)
            shapes[f"{p}self_attn.{proj}.bias"] = (C,)
        shapes[p + "mlp.fc1.weight"] = (I, C)
        shapes[p + "mlp.fc1.bias"] = (I,)
        shapes[p + "mlp.fc2.weight"] = (C, I)
        shapes[p + "mlp.fc2.bias"] = (C,)

    # ---- projector (C -> D -> D) and the AnyRes row separator
    shapes["projector.linear_1.weight"] = (D, C)
    if config.projector_bias:
        shapes["projector.linear_1.bias"] = (D,)
    shapes["projector.linear_2.weight"] = (D, D)
    if config.projector_bias:
        shapes["projector.linear_2.bias"] = (D,)
    if config.uses_image_newline:
        shapes["image_newline"] = (D,)

    # ---- decoder
    lm = "language_model."
    shapes[lm + "embed_tokens.weight"] = (t.vocab_size, D)
    for i in range(t.num_layers):
        p = f"{lm}layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "self_attn.q_proj.weight"] = (q_out, D)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, D)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, D)
        shapes[p + "self_attn.o_proj.weight"] = (D, q_out)
        if t.qkv_bias:  # Qwen
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
        shapes[p + "mlp.gate_proj.weight"] = (F, D)
        shapes[p + "mlp.up_proj.weight"] = (F, D)
        shapes[p + "mlp.down_proj.weight"] = (D, F)
    shapes[lm + "norm.weight"] = (D,)
    if not t.tie_word_embeddings:  # tied: lm_head is embed_tokens, stored once
        shapes[lm + "lm_head.weight"] = (t.vocab_size, D)
    return shapes


def describe_mismatch(actual: dict[str, Shape], expected: dict[str, Shape], *, limit: int = 10) -> str:
    """A readable report of missing / unexpected / mis-shaped keys ('' when they agree)."""
    def names(keys: list[str]) -> str:
        more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    missing = [k for k in expected if k not in actual]
    unexpected = [k for k in actual if k not in expected]
    wrong = [f"{k}: got {tuple(actual[k])}, expected {tuple(expected[k])}"
             for k in expected if k in actual and tuple(actual[k]) != tuple(expected[k])]
    lines = []
    if missing:
        lines.append(f"missing {len(missing)} key(s): {names(missing)}")
    if unexpected:
        lines.append(f"unexpected {len(unexpected)} key(s): {names(unexpected)}")
    if wrong:
        lines.append(f"{len(wrong)} wrong shape(s): " + "; ".join(wrong[:limit])
                     + (f"; ... ({len(wrong) - limit} more)" if len(wrong) > limit else ""))
    return "\n".join(lines)
