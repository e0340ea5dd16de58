"""The whole model: encode images and videos, splice them into the prompt's embeddings, decode.

    pixels ─ VisionTower ─┬─ (images) projector → pack_image_features (AnyRes: base, unpad, newlines)
                          └─ (videos) pool ↔ projector (order is a config switch) → newline mode
    input_ids (placeholders already expanded to one id per visual token)
        → embed_tokens, placeholder rows replaced by the visual features in order → Decoder

The prompt side (which ids, how many placeholders) lives in inputs/prompt.py; the token counts both sides
use come from tokens.py, so a prompt and its media cannot disagree silently: ``embed`` checks that
the number of placeholder positions equals the number of visual features, per kind, and says which
side is short.

CPU inference (``pack_for_cpu``): every ``nn.Linear`` can hold its weight in oneDNN's blocked layout,
prepacked once after loading (what ``torch.compile``'s CPU freezing pass does): bfloat16 gives the same
numbers as ``F.linear``, float32 differs from ``F.linear``'s MKL path only in summation order; the bias of
the vision and projector layers is added inside the GEMM instead of in a separate pass. What it gains:
benchmarks/bench_cpu.py, docs/performance.md ("CPU: llava-next against transformers"). Packed layers are
frozen and have no ``state_dict`` entries, so load (or save) weights before packing; gradients still flow
through them to the layers before (``PackedLinear``). bfloat16 linears are the exception in two cases, both
measured at first use: the decoder's where this CPU decodes faster with the C one-row loops
(``policy.gemv_choice("bf16")``), and all of them where it has no bf16 arithmetic and sums prompts faster in
fp32 (``policy.prompt_choice()``). They become ``DecodeLinear``, which keeps the plain (mmapped) weight, runs
prompts through ``F.linear`` (or the chunked fp32 GEMM) and decode steps through model/cpu_gemv.c, and
copies nothing.

Gradients flow through every path (vision tower, pooling, projector, splice, decoder): ``image_features``
and ``video_features`` build a graph when gradients are on, so inference callers (the pipeline, the
reducers, the research instruments) run them under ``torch.no_grad``.

Placeholders are spliced like transformers' ``masked_scatter``: the features of every image (then of
every video) fill the image (video) placeholder positions in flattened (batch, sequence) order — image
0 of row 0 first. Placeholder ids at or past the vocabulary (checkpoints converted from the original
format, which has no placeholder rows) are never looked up in the embedding table.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import cpu_gemv

from ..config import LlavaNextConfig
from . import policy
from .anyres import ImageInput, pack_image_features
from .clip import VisionTower
from .decoder import Decoder
from .hooks import HookPoint
from .pages import is_file_mapped, release_file_pages
from .pooling import add_video_newlines, pool_and_project, pooled_grid_hw
from .projector import Projector
from .quant import chunked_linear
from .siglip import SiglipTower


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is prepacked for oneDNN (CPU, float32 or bfloat16), frozen.

    The packed weight is a copy. The plain weight is usually a view of the mmapped checkpoint: its file
    pages are dropped from the process (they stay in the page cache for the next run) so the process does
    not hold the model twice, and the view is kept: a backward to the input (adapters training on a packed
    base) reads it, grad_x = grad_y @ W, its pages coming back from the file. A weight that was a copy in
    anonymous memory (a cast) is freed, and a backward through it raises (``PackedLinearFunction``)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # opaque oneDNN layout
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.plain: torch.Tensor | None = None  # (N, K) the mmapped weight, for a backward to the input
        if is_file_mapped(weight):  # (anonymous memory, e.g. a cast copy, is freed with the nn.Linear)
            release_file_pages(weight)
            self.plain = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return PackedLinearFunction.apply(x, self)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedLinearFunction(torch.autograd.Function):
    """y = x W^T + b through the packed weight; the backward gives x its gradient, grad_y @ W, from the kept
    mmapped weight (the layer's weights are frozen: they get none)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "PackedLinear") -> torch.Tensor:  # x (..., K) -> (..., N)
        ctx.layer = layer
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed, layer.bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        layer = ctx.layer
        if layer.plain is None:
            raise RuntimeError(f"a gradient through a prepacked ({layer.out_features}, {layer.in_features}) linear "
                               f"whose plain weight was a copy and was freed when it was packed: load the model "
                               f"without pack_for_cpu to train (llava-next train does)")
        return grad_y @ layer.plain.to(grad_y.dtype), None  # (..., K)


class DecodeLinear(nn.Linear):
    """A frozen bfloat16 ``nn.Linear`` on CPU whose decode steps (at most ``policy.GEMV_MAX_ROWS`` rows) run the
    C one-row product (model/cpu_gemv.c: fp32 sums rounded once, like ``F.linear``); prompts run ``F.linear``,
    or on a CPU without bf16 arithmetic (``policy.prompt_choice``) the weight widened to fp32 a chunk at a time
    (``quant.chunked_linear``); gradients and compiled graphs run ``F.linear``. The weight is used where it is
    (a view of the mmapped checkpoint): no copy, nothing to prepack."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DecodeLinear":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.requires_grad_(False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.numel() <= policy.GEMV_MAX_ROWS * self.in_features and x.dtype == torch.bfloat16
                and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and x.requires_grad)):
            return cpu_gemv.gemv_bf16(x, self.weight, self.bias)
        if (x.dtype == torch.bfloat16 and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and x.requires_grad) and policy.prompt_choice() == "fp32"):
            return chunked_linear(x, lambda start, stop, dtype, widen: self.weight[start:stop].to(
                torch.float32 if widen else dtype), self.out_features, self.bias)
        return nn.functional.linear(x, self.weight, self.bias)


def can_pack_for_cpu(dtype: torch.dtype, device: torch.device) -> bool:
    """True where ``pack_for_cpu`` does something: float32, or bfloat16 where oneDNN has bf16 kernels, on CPU."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class MultimodalHooks(nn.Module):
    """The named hook points of the multimodal stages (``mm.hook_*``, shapes in model/hooks.py). No parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_features, self.hook_pooled, self.hook_projected = HookPoint(), HookPoint(), HookPoint()
        self.hook_newline, self.hook_merged = HookPoint(), HookPoint()


class MediaMismatchError(ValueError):
    """The prompt's placeholders and the media given do not match; the message has both counts."""


class LlavaNextModel(nn.Module):
    def __init__(self, config: LlavaNextConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = SiglipTower(config.vision) if config.vision.kind == "siglip" else VisionTower(config.vision)
        self.projector = Projector(config.vision.hidden_size, config.text.hidden_size, config.projector_bias)
        # the learned row separator; llava-hf LLaVA-NeXT-Interleave has none (one tile per image, no newline)
        self.image_newline = nn.Parameter(torch.zeros(config.text.hidden_size)) if config.uses_image_newline else None
        self.language_model = Decoder(config.text)
        self.mm = MultimodalHooks()

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    @torch.no_grad()
    def pack_for_cpu(self) -> bool:
        """Prepack every linear layer for CPU inference, or make the decoder's bf16 ones ``DecodeLinear``
        where this CPU decodes faster with them (module docstring); False (and no change) where it does not
        apply. Call once, after loading the weights."""
        if not can_pack_for_cpu(self.dtype, self.device):
            return False
        decode_kernel = self.dtype == torch.bfloat16 and policy.gemv_choice("bf16") == "kernel"
        # no bf16 arithmetic on this CPU: every bf16 layer keeps its plain weight, for prompts widened to fp32
        wide_prompts = self.dtype == torch.bfloat16 and policy.prompt_choice() == "fp32"
        decoder = {id(m) for m in self.language_model.modules()}
        # (parent, name) pairs, not the layers: each plain weight is freed as soon as its layer is replaced
        slots = [(parent, name) for parent in self.modules() for name, child in parent.named_children()
                 if type(child) is nn.Linear and can_pack_for_cpu(child.weight.dtype, child.weight.device)]
        for parent, name in slots:
            linear = getattr(parent, name)
            use_kernel = linear.weight.dtype == torch.bfloat16 and (wide_prompts or decode_kernel and id(linear) in decoder)
            setattr(parent, name, DecodeLinear.from_linear(linear) if use_kernel else PackedLinear(linear))
        return True

    # ---- visual features (differentiable: inference callers run them under torch.no_grad) -------------
    def image_features(self, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        """One (tokens_i, D) tensor per image. All tiles of all images go through the tower as one batch."""
        if not images:
            return []
        pixels = torch.cat([im.pixel_values for im in images]).to(self.device, self.dtype)  # (sum tiles, 3, S, S)
        tiles = self.mm.hook_projected(self.projector(self.mm.hook_features(self.vision_tower(pixels))))  # (sum tiles, P, D), P = (tile // 14)^2
        newline = self.mm.hook_newline(self.image_newline)
        out, start = [], 0
        for im in images:
            n = 1 + im.num_tiles  # base + tiles
            if im.grid == (0, 0):  # one untiled image ("resize" / "pad"): its tile's tokens (+ one newline)
                one = tiles[start]
                if self.config.untiled_image_newline:
                    one = torch.cat([one, newline.to(one.dtype)[None]])
                out.append(one)
            else:
                out.append(pack_image_features(tiles[start:start + n], im.image_size, im.grid, newline,
                                               self.config.anyres_compat, self.config.anyres_max_patches))
            start += n
        return out

    def video_features(self, pixel_values: torch.Tensor, *, frame_batch: int = policy.FRAME_BATCH,
                       recompute: bool = False) -> torch.Tensor:
        """(F, 3, S, S) frames -> (tokens, D): per-frame tower features, pooled before or after the projector
        (``config.pool_position``), frame-major, with the config's newline mode. Frames go through the tower
        ``frame_batch`` at a time so activations stay small for long videos. ``recompute`` (a gradient that
        reaches the pixels): no batch's tower activations are kept for the backward, which runs each batch
        again when it reaches it (activation checkpointing), so it holds one batch's, not the whole video's
        (ViT-L in fp32: ~1 GiB a frame); the tower's own hooks then fire again during the backward."""
        cfg = self.config
        grid = (cfg.vision.grid_size, cfg.vision.grid_size)
        pixel_values = pixel_values.to(self.device, self.dtype)
        rerun = recompute and torch.is_grad_enabled()

        def tower(chunk: torch.Tensor) -> torch.Tensor:  # (n, 3, S, S) -> (n, P, Cv)
            return checkpoint(self.vision_tower, chunk, use_reentrant=False) if rerun else self.vision_tower(chunk)
        feats = torch.cat([tower(chunk) for chunk in pixel_values.split(frame_batch)])  # (F, P, Cv)
        feats = self.mm.hook_features(feats)
        hooks = self.mm
        if cfg.pool_position == "before_projector":  # mm.hook_pooled sees pool_frames' output in either order
            def project(x: torch.Tensor) -> torch.Tensor:
                return hooks.hook_projected(self.projector(hooks.hook_pooled(x)))
        else:
            def project(x: torch.Tensor) -> torch.Tensor:
                return hooks.hook_projected(self.projector(x))
        pooled = pool_and_project(feats, project, grid, cfg.spatial_pool_stride, cfg.spatial_pool_mode,
                                  cfg.pool_position)  # (F, h*w, D)
        if cfg.pool_position != "before_projector":
            pooled = hooks.hook_pooled(pooled)
        pooled_hw = pooled_grid_hw(grid, cfg.spatial_pool_stride, cfg.spatial_pool_mode)
        return add_video_newlines(pooled, pooled_hw, hooks.hook_newline(self.image_newline), cfg.video_newline)  # (T, D)

    # ---- prompt embeddings ------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_features: Sequence[torch.Tensor] = (),
              video_features: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """(B, T) ids with expanded placeholders + features -> (B, T, D) embeddings."""
        cfg = self.config
        input_ids = input_ids.to(self.device)
        is_image = input_ids == cfg.image_token_id
        is_video = (input_ids == cfg.video_token_id) if cfg.video_token_id is not None else torch.zeros_like(is_image)
        vocab = cfg.text.vocab_size
        safe_ids = input_ids.masked_fill(is_image | is_video | (input_ids >= vocab), 0)
        if bool(((input_ids >= vocab) & ~(is_image | is_video)).any()) or bool((input_ids < 0).any()):
            bad = input_ids[((input_ids >= vocab) & ~(is_image | is_video)) | (input_ids < 0)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab - 1}) and is not a placeholder")
        embeds = self.language_model.embed_tokens(safe_ids)  # (B, T, D)
        for kind, mask, feats in (("image", is_image, image_features), ("video", is_video, video_features)):
            n_slots = int(mask.sum())
            n_feats = sum(f.shape[0] for f in feats)
            if n_slots != n_feats:
                raise MediaMismatchError(
                    f"the prompt has {n_slots} {kind} placeholder tokens but the {len(feats)} {kind}(s) given "
                    f"produce {n_feats} {kind} features; expand each <{kind}> placeholder to its token count "
                    f"(llava_next.inputs.tokens) and give one {kind} per placeholder")
            if n_slots:
                embeds = embeds.masked_scatter(mask[..., None], torch.cat(list(feats)).to(embeds.dtype))
        return self.mm.hook_merged(embeds)

    # ---- one forward ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, *, images: Sequence[ImageInput] = (),
                videos: Sequence[torch.Tensor] = (), attention_mask: torch.Tensor | None = None,
                engine=None) -> torch.Tensor:
        """Full-sequence logits (B, T, V) without a KV cache — the parity-test entry point. ``videos`` are
        (F, 3, S, S) pixel tensors; ``attention_mask`` (B, T) marks real tokens in a left-padded batch.
        ``engine``: run the decoder with this engine's ``forward`` instead of the eager one (a reduced engine,
        llava_next/reduce/engine.py: logits in original positions, NaN where a position was pruned)."""
        embeds = self.embed(input_ids, self.image_features(images), [self.video_features(v) for v in videos])
        position_ids = key_mask = None
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device, torch.bool)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            key_mask = attention_mask
        if engine is not None:
            return engine.forward(self.language_model, embeds, position_ids, key_mask)
        return self.language_model(input_embeds=embeds, position_ids=position_ids, key_mask=key_mask)
