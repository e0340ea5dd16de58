"""VisionZip: per crop (image tile or video frame), keep the tokens the tower attends to most, merge the rest.

Source: dvlab-research/VisionZip @ 3151f6df4fca (the snapshot read here), visionzip/clip_encoder.py
``CLIPVisionTower_VisionZip.forward`` L31-85, visionzip/utils.py (``CLIPAttention_forward`` returns the
layer's raw keys, mean over heads, as ``metric``; ``apply_info`` marks layer 22 of 24 = CLIP layer -2),
visionzip/llava_arch.py (``prepare_inputs_labels_for_multimodal_visionzip`` L91-130 and
``restore_image_features_sorted`` L42-80: the LLaVA-NeXT AnyRes path), visionzip/main.py
``visionzip(model, dominant=191, contextual=30)``; README quick start ``dominant=54, contextual=10``;
paper arXiv:2412.04467.

Per crop, inside the vision tower, at the feature layer (CLIP layer -2 = the last layer LLaVA runs):
- a score per patch (``score``, below) -> the top patches; dominant tokens = the CLS token (CLIP) + the
  top ``dominant - 1`` patches, in sequence order (``masked_select``; ``main.py`` passes ``dominant - 1``);
  on a tower without CLS (SigLIP) all ``dominant`` tokens are patches;
- the other tokens: their keys (mean over heads, L2-normalised) pick ``contextual`` targets at a uniform
  stride (``step = max(1, n // contextual)``); every other token joins its most similar target;
  contextual token = target + mean(its members) (the target is not in the mean: the code's formula);
- output per crop: dominant (CLS first) then contextual, ``dominant + contextual`` tokens; then the
  projector.

``score`` — which attention ranks the patches:
- ``cls``: the CLS token's attention row of that layer, summed over heads (the official CLIP code).
- ``mean_received``: the attention each key receives, averaged over every query and every head of that
  layer (for towers without a CLS token). The official snapshot read here supports CLIP only (its
  ``CLIPVisionTower`` patch; issue dvlab-research/VisionZip#7 asks for SigLIP). This follows the
  published adaptation of VisionZip to SigLIP for LLaVA-OneVision / LLaVA-Video in cokeshao/HoliTom @
  e9b2972f6895 (LLaVA-NeXT/llava/model/multimodal_encoder/siglip_encoder.py L612-617:
  ``attentions[-1].mean(dim=1).mean(dim=1)`` of the feature layer, keys of the same layer as metric;
  visionzip/llava_arch.py L95: ``topk(dominant_num)``, no CLS); VisionZip's later Qwen2.5-VL release
  (not stored here; quoted in issue JIA-Lab-research/VisionZip#31 and ported in ModelTC/LightCompress)
  ranks by the attention summed over queries, mean over heads: the same order.
- ``auto`` (default): ``cls`` on a tower with a CLS token (CLIP), ``mean_received`` without (SigLIP).

Images (LLaVA-NeXT AnyRes), as ``prepare_inputs_labels_for_multimodal_visionzip`` does with
``mm_patch_merge_type="spatial_unpad"``: every crop (base + tiles) is reduced alone, then
- base: its reduced tokens as they are (CLS, dominant patches, contextual), no newline;
- tiles (``restore_image_features_sorted``): their dominant patches scattered back into the stitched
  (rows * g, cols * g) map and read row-major across tiles, then the tiles' CLS tokens, then the tiles'
  contextual tokens, tile by tile. The map is NOT unpadded and gets NO newline tokens: the function
  builds ``image_newline_expanded`` but never uses it, and never calls ``unpad_image``. A padding patch
  the score picks stays. The token count, ``(1 + tiles) * (dominant + contextual)``, is therefore known
  before any compute (prompt placeholders are expanded with it); an unpadded variant would not be.
- an untiled image (one crop: OneVision's multi-image "pad", Interleave): its reduced tokens, plus the
  newline when the model appends one (the code's single-crop branch appends ``image_newline``).
The code hard-codes 576 / 24 (CLIP-336); here the config's grid.

Videos: VisionZip replaces the 2 x 2 pooling per frame (64 tokens per frame at the README setting vs
144 pooled). VisionZip's LLaVA code applies it to images; per frame is this project's mapping, and
HoliTom's adaptation's for LLaVA-Video (which pools first; here the tower's full grid is used).

The scores and keys are recomputed exactly from the feature layer's input (no eager tower), in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..model import policy
from ..model.attention import attention_probs, iter_probs
from .stages import ReducedImage, ReducedVideo, ReductionError, TokenReducer

Score = Literal["auto", "cls", "mean_received"]


@dataclass(frozen=True)
class VisionZip(TokenReducer):
    dominant: int = 54  # CLS (if the tower has one) + dominant - 1 patches
    contextual: int = 10
    score: Score = "auto"

    name: ClassVar[str] = "visionzip"
    needs: ClassVar[str] = "tower"
    media: ClassVar[tuple[str, ...]] = ("video", "image")

    def __post_init__(self) -> None:
        if not isinstance(self.dominant, int) or self.dominant < 1 or not isinstance(self.contextual, int) \
                or self.contextual < 1:
            raise ReductionError(f"visionzip: dominant and contextual must be integers >= 1, got "
                                 f"{self.dominant!r}, {self.contextual!r}")
        if self.score not in ("auto", "cls", "mean_received"):
            raise ReductionError(f"visionzip: score must be auto, cls or mean_received, got {self.score!r}")

    # ---- counts (before any compute) ----------------------------------------------------------------
    def per_crop(self, config) -> int:
        """Tokens per crop (tile or frame), after checking they fit in the crop's patches."""
        patches = config.vision.num_patches
        cls = 1 if config.vision.has_cls else 0
        if self.score == "cls" and not cls:
            raise ReductionError("visionzip: score=cls reads the CLS token's attention; this model's tower (SigLIP) "
                                 "has no CLS token: use score=mean_received (or auto)")
        if self.dominant - cls + self.contextual > patches:
            raise ReductionError(f"visionzip: {'dominant - 1' if cls else 'dominant'} + contextual = "
                                 f"{self.dominant - cls + self.contextual} is more than the {patches} patches of a "
                                 f"{'frame or tile' if cls else 'frame or tile (no CLS token)'}")
        return self.dominant + self.contextual

    def num_tokens(self, num_frames: int, config) -> int:
        return num_frames * self.per_crop(config)

    def num_image_tokens(self, grid: tuple[int, int], config) -> int:
        if grid == (0, 0):  # one untiled crop (+ the newline the model appends to such an image)
            return self.per_crop(config) + (1 if config.untiled_image_newline else 0)
        return (1 + grid[0] * grid[1]) * self.per_crop(config)

    def resolved_score(self, config) -> str:
        if self.score != "auto":
            return self.score
        return "cls" if config.vision.has_cls else "mean_received"

    # ---- compute -----------------------------------------------------------------------------------
    def _check(self, config) -> None:
        v = config.vision
        if v.has_cls and v.feature_layer != -2:
            raise ReductionError(f"visionzip reads CLIP layer -2 (as its code does); this model's feature layer is "
                                 f"{v.feature_layer}")
        self.per_crop(config)

    @torch.no_grad()
    def crops(self, model, pixels: torch.Tensor, chunk: int = policy.FRAME_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 3, S, S) crops -> reduced tower features (n, dominant + contextual, C) and each token's patch
        index (n, dominant + contextual) (-1: CLS; a contextual token: its target's patch)."""
        cfg = model.config
        self._check(cfg)
        has_cls = cfg.vision.has_cls
        score = self.resolved_score(cfg)
        tokens, where = [], []
        for part in pixels.to(model.device, model.dtype).split(chunk):
            hidden, scores, metric = tower_scores(model.vision_tower, part, score, has_cls)
            for i in range(hidden.shape[0]):
                out, idx = merge(hidden[i], scores[i], metric[i], self.dominant - int(has_cls), self.contextual,
                                 has_cls)
                tokens.append(out)
                where.append(idx)
        return torch.stack(tokens), torch.stack(where)

    def reduce(self, pixels: torch.Tensor, config, model=None) -> ReducedVideo:
        tokens, patch = self.crops(model, pixels)
        feats = model.projector(tokens)  # (F, d + c, D)
        frame = torch.arange(len(pixels)).repeat_interleave(feats.shape[1])
        return ReducedVideo(feats.reshape(-1, feats.shape[-1]), frame, patch.reshape(-1))

    @torch.no_grad()
    def reduce_image(self, model, image) -> ReducedImage:
        """One AnyRes image (inputs.image.ImageInput: base + tiles) -> its tokens in the code's layout."""
        cfg = model.config
        tokens, patch = self.crops(model, image.pixel_values)
        feats = model.projector(tokens)  # (1 + tiles, d + c, D): the code projects before restoring
        if image.grid == (0, 0):
            out, tile, idx = feats[0], torch.zeros(feats.shape[1], dtype=torch.long), patch[0]
            if cfg.untiled_image_newline:
                out = torch.cat([out, model.image_newline.to(out.dtype)[None]])
                tile, idx = torch.cat([tile, torch.tensor([-1])]), torch.cat([idx, torch.tensor([-1])])
            out = ReducedImage(out, tile, idx)
        else:
            out = restore_tiles(feats, patch, image.grid, cfg.vision.grid_size, self.dominant, cfg.vision.has_cls)
        n = self.num_image_tokens(image.grid, cfg)
        if out.tokens.shape[0] != n:
            raise RuntimeError(f"visionzip returned {out.tokens.shape[0]} image tokens, num_image_tokens said {n} (a bug)")
        return out


def tower_scores(tower, pixels: torch.Tensor, score: str, has_cls: bool,
                 query_chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the tower to its feature layer. (n, 3, S, S) -> the feature layer's output (n, T, C), a score per
    patch (n, P) and the layer's keys averaged over heads (n, T, hd); scores and keys in fp32.
    T = P (+ 1 CLS first). ``score``: "cls" (CLS row, summed over heads) or "mean_received" (attention each
    key receives, mean over heads and all T queries, computed ``query_chunk`` queries at a time)."""
    x = tower.patch_embedding(pixels.to(tower.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
    if has_cls:  # VisionTower.forward / SiglipTower.forward, up to the feature layer's input
        x = torch.cat([tower.class_embedding.expand(x.shape[0], 1, -1), x], 1) + tower.position_embedding.weight
        x = tower.pre_layernorm(x)
    else:
        x = x + tower.position_embedding.weight
    for layer in tower.layers[:-1]:
        x = layer(x)
    last = tower.layers[-1]
    attn = last.self_attn
    n, T, _ = x.shape
    H, hd = attn.num_heads, attn.head_dim
    h = last.layer_norm1(x)
    k = attn.k_proj(h).view(n, T, H, hd).transpose(1, 2).float()  # (n, H, T, hd): raw keys
    if score == "cls":
        q = attn.q_proj(h[:, :1]).view(n, 1, H, hd).transpose(1, 2).float()
        probs = attention_probs(q, k, torch.zeros(1, dtype=torch.long, device=k.device), causal=False)  # (n, H, 1, T)
        s = probs[:, :, 0, 1:].sum(1)  # (n, P)
    else:
        q = attn.q_proj(h).view(n, T, H, hd).transpose(1, 2).float()  # (n, H, T, hd)
        received = torch.zeros(n, H, T, device=k.device)
        for _, p in iter_probs(q, k, torch.arange(T, device=k.device), chunk=query_chunk, causal=False):
            received += p.sum(2)  # never the whole (n, H, T, T) at once
        s = received.mean(1) / T  # (n, T): mean over heads and queries
        s = s[:, 1:] if has_cls else s
    return last(x), s, k.mean(1)


def merge(hidden: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, dominant_num: int,
          contextual_num: int, has_cls: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One crop: hidden (T, C), scores (P,), metric (T, hd), T = P (+ 1 CLS) -> (dominant_num (+ 1) +
    contextual_num, C) tokens and each one's patch index (-1: CLS; a contextual token: its target's patch)."""
    T = hidden.shape[0]
    off = 1 if has_cls else 0
    top = scores.topk(dominant_num).indices + off
    keep = torch.ones(T, dtype=torch.bool, device=hidden.device)
    if has_cls:
        keep[0] = False
    keep[top] = False  # ~keep = (CLS +) dominant
    dominant_idx = torch.nonzero(~keep).flatten()  # sequence order, CLS first
    rest_idx = torch.nonzero(keep).flatten()
    m = metric[rest_idx].to(torch.float32)
    m = m / m.norm(dim=-1, keepdim=True)
    n = len(rest_idx)
    step = max(1, n // contextual_num)
    targets = torch.arange(0, n, step, device=hidden.device)[:contextual_num]
    others = ~torch.isin(torch.arange(n, device=hidden.device), targets)
    assign = (m[others] @ m[targets].T).argmax(dim=1)  # (n - c,)
    one_hot = torch.zeros(int(others.sum()), len(targets), dtype=hidden.dtype, device=hidden.device)
    one_hot.scatter_(1, assign[:, None], 1)
    counts = one_hot.sum(0).clamp(min=1)[:, None]
    rest = hidden[rest_idx]
    contextual = rest[targets] + (one_hot.T @ rest[others]) / counts
    out = torch.cat([hidden[dominant_idx], contextual])
    idx = torch.cat([dominant_idx - off, rest_idx[targets] - off]).cpu()
    return out, idx


def restore_tiles(feats: torch.Tensor, patch: torch.Tensor, grid: tuple[int, int], side: int, dominant: int,
                  has_cls: bool) -> ReducedImage:
    """``restore_image_features_sorted`` + the base, for one AnyRes image. feats (1 + tiles, d + c, D)
    projected crop tokens (base first; per crop: [CLS], dominant patches in sequence order, contextual),
    patch (1 + tiles, d + c) their patch indices, grid (rows, cols), side = patches per tile side.
    -> base tokens, the tiles' dominant patches in stitched-map row-major order, the tiles' CLS tokens, the
    tiles' contextual tokens (tile-major). Each token's tile: 0 = base, k = tile k (1-based, row-major)."""
    rows, cols = grid
    cls = 1 if has_cls else 0
    base, tiles, tile_patch = feats[0], feats[1:], patch[1:]  # (d + c, D), (N, d + c, D), (N, d + c)
    N, per, D = tiles.shape
    dom_patch = tile_patch[:, cls:dominant]  # (N, d - cls): sorted within each tile (sequence order)
    t = torch.arange(N)[:, None]
    r, c = dom_patch // side, dom_patch % side
    map_pos = ((t // cols) * side + r) * (cols * side) + (t % cols) * side + c  # row-major in the stitched map
    order = map_pos.reshape(-1).argsort()
    dom = tiles[:, cls:dominant].reshape(-1, D)[order]
    dom_tile = (t + 1).expand_as(dom_patch).reshape(-1)[order]
    parts = [base, dom]
    tile_ids = [torch.zeros(per, dtype=torch.long), dom_tile]
    patch_ids = [patch[0], dom_patch.reshape(-1)[order]]
    if has_cls:
        parts.append(tiles[:, 0])
        tile_ids.append(torch.arange(1, N + 1))
        patch_ids.append(torch.full((N,), -1))
    parts.append(tiles[:, dominant:].reshape(-1, D))
    tile_ids.append(torch.arange(1, N + 1).repeat_interleave(per - dominant))
    patch_ids.append(tile_patch[:, dominant:].reshape(-1))
    return ReducedImage(torch.cat(parts), torch.cat(tile_ids), torch.cat(patch_ids))
