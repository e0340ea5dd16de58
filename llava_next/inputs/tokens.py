"""Token accounting: how many positions an image, a video and a whole prompt take, and whether they fit.

One module, used by the processor, the model and ``llava-next inspect``, so a prediction and the
features a model produces cannot disagree (users hit "features and tokens do not match" errors and
silent truncation when they do).

    image_plan(image_hw, config)  -> ImagePlan   canvas, tile grid, unpadded map, newlines, total
    image_tokens(image_hw, config) -> int         576 + h' * (w' + 1)   (640x480 -> 2340)
    video_plan(num_frames, config, stride, mode, newline) -> VideoPlan
    video_tokens(num_frames, config, stride, newline) -> int   F * (24 // s)^2 (+ newlines)
    plan_context(text_tokens, visual_tokens, config, rope_scale) -> ContextPlan
    check_context(plan, on_overflow="raise" | "warn")

RoPE and context (docs/references.md, Video). A position p is rotated as p / factor (linear scaling), so a
model trained on ``max_position_embeddings`` positions sees positions it was trained on only while
``tokens <= max_position_embeddings * factor``. Past that, answers degrade into empty or garbage text
without any error (32 frames of LLaVA-NeXT-Video-7B, 4608 visual tokens, need 2). The factor is a run-time
choice: ``rope_scale="config"`` takes the checkpoint's (2.5 for llava-hf Video-7B), ``"auto"`` the
smallest integer factor that holds the actual tokens (1 if they already fit), ``"original"`` the
original demo's rule ``ceil((visual + 1000) / max_pos)`` (it sets the factor when that is >= 2 and
otherwise leaves the lmms-lab config, which has no scaling: the same number), and a number is used
as given. ``check_context`` never lets an overflow pass silently: it raises (or warns) with the fixes
spelled out — what dominates first (a smaller ``--max-new-tokens``, fewer frames or a larger
``--pool-stride``, fewer images, a shorter prompt), then ``--rope-scale F``.

Sizes are (height, width).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Literal

from ..model.anyres import anyres_max_size, resized_size, tile_grid, unpadded_size
from ..config import ImageAspect, LlavaNextConfig, PoolMode, VideoNewline
from ..model.pooling import newline_count, pooled_grid_hw

Size = tuple[int, int]  # (height, width)
RopeScale = Literal["config", "auto", "original"] | float


# --------------------------------------------------------------------------------------------------
# Images (AnyRes, docs/references.md)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImagePlan:
    image_hw: Size  # original (height, width) px
    canvas_hw: Size  # best resolution (height, width) px, a pinpoint
    grid_hw: Size  # (rows, cols) of tiles
    resized_hw: Size  # the image inside the canvas before padding, px
    base_tokens: int  # the squashed whole-image tile: 576, no newline
    feature_map_hw: Size  # stitched tile features, patches: (24 * rows, 24 * cols)
    unpadded_hw: Size  # rows/cols of that map that hold the image (h', w')
    newline_tokens: int  # one per kept row: h'
    total: int  # base + h' * w' + h'
    aspect: str = "anyres"  # "resize" / "pad": one untiled tile, no map (grid (0, 0))

    @property
    def num_tiles(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]


def image_aspect(config: LlavaNextConfig, num_images: int = 1) -> ImageAspect:
    """How an image is tiled in a prompt with ``num_images`` images (OneVision pads each of several)."""
    if num_images > 1 and config.multi_image_aspect_ratio is not None:
        return config.multi_image_aspect_ratio
    return config.image_aspect_ratio


def image_plan(image_hw: Size, config: LlavaNextConfig, aspect: ImageAspect | None = None) -> ImagePlan:
    """Every number behind one image's token count (``aspect``: default the config's single-image one).

    "resize" / "pad" (LLaVA-NeXT-Interleave, OneVision's multi-image): one tile, no map; its tokens plus
    one newline when ``config.untiled_image_newline``. "anyres": base + unpadded tile map (downscaled
    under ``anyres_max_patches``) + one newline per row."""
    if config.vision.tokens_per_tile != config.vision.num_patches:
        raise ValueError("AnyRes images need vision.feature_strategy='default' (CLS dropped): tiles are "
                         f"stitched as square patch grids; got {config.vision.feature_strategy!r}")
    h, w = image_hw
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive (height, width), got {image_hw}")
    side = config.vision.grid_size
    base = side * side
    aspect = config.image_aspect_ratio if aspect is None else aspect
    if aspect != "anyres":
        tile = config.tile_size
        newline = int(config.untiled_image_newline)
        return ImagePlan(image_hw=(h, w), canvas_hw=(tile, tile), grid_hw=(0, 0), resized_hw=(tile, tile),
                         base_tokens=base, feature_map_hw=(0, 0), unpadded_hw=(0, 0), newline_tokens=newline,
                         total=base + newline, aspect=aspect)
    canvas, grid = tile_grid((h, w), config)
    fmap = (grid[0] * side, grid[1] * side)
    kept = anyres_max_size(unpadded_size((h, w), fmap, config.anyres_compat), side, config.anyres_max_patches)
    return ImagePlan(image_hw=(h, w), canvas_hw=canvas, grid_hw=grid, resized_hw=resized_size((h, w), canvas),
                     base_tokens=base, feature_map_hw=fmap, unpadded_hw=kept, newline_tokens=kept[0],
                     total=base + kept[0] * kept[1] + kept[0])


def image_tokens(image_hw: Size, config: LlavaNextConfig, aspect: ImageAspect | None = None) -> int:
    """Visual tokens for one image of ``image_hw`` (height, width) px."""
    return image_plan(image_hw, config, aspect).total


# --------------------------------------------------------------------------------------------------
# Video (docs/references.md)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoPlan:
    num_frames: int
    stride: int
    mode: PoolMode
    newline: VideoNewline
    patch_grid_hw: Size  # per frame, before pooling (24, 24)
    pooled_hw: Size  # per frame, after pooling (12, 12 at stride 2)
    tokens_per_frame: int  # pooled tokens of one frame, newlines not counted
    newline_tokens: int
    total: int


def video_plan(num_frames: int, config: LlavaNextConfig, stride: int | None = None, mode: PoolMode | None = None,
               newline: VideoNewline | None = None) -> VideoPlan:
    """Every number behind a video's token count; ``None`` takes the config's value."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got num_frames={num_frames}")
    if config.vision.tokens_per_tile != config.vision.num_patches:
        raise ValueError("video pooling needs vision.feature_strategy='default' (CLS dropped): frames are "
                         f"pooled as square patch grids; got {config.vision.feature_strategy!r}")
    grid = (config.vision.grid_size, config.vision.grid_size)
    if config.video_as_images:  # LLaVA-NeXT-Interleave: every frame is an image of its own, no pooling
        per = image_tokens(grid, config, "resize")
        return VideoPlan(num_frames=num_frames, stride=1, mode=config.spatial_pool_mode, newline="none",
                         patch_grid_hw=grid, pooled_hw=grid, tokens_per_frame=per, newline_tokens=0,
                         total=num_frames * per)
    stride = config.spatial_pool_stride if stride is None else stride
    mode = config.spatial_pool_mode if mode is None else mode
    newline = config.video_newline if newline is None else newline
    pooled = pooled_grid_hw(grid, stride, mode)
    per_frame = pooled[0] * pooled[1]
    extra = newline_count(num_frames, pooled, newline)
    return VideoPlan(num_frames=num_frames, stride=stride, mode=mode, newline=newline, patch_grid_hw=grid,
                     pooled_hw=pooled, tokens_per_frame=per_frame, newline_tokens=extra,
                     total=num_frames * per_frame + extra)


def video_tokens(num_frames: int, config: LlavaNextConfig, stride: int | None = None,
                 newline: VideoNewline | None = None, mode: PoolMode | None = None) -> int:
    """Visual tokens for a video of ``num_frames`` frames (8 -> 1152 with the Video-7B preset)."""
    return video_plan(num_frames, config, stride, mode, newline).total


# --------------------------------------------------------------------------------------------------
# The whole prompt against the RoPE context
# --------------------------------------------------------------------------------------------------
class ContextOverflowError(ValueError):
    """The prompt needs more positions than the model's RoPE context provides."""


@dataclass(frozen=True)
class ContextPlan:
    text_tokens: int
    visual_tokens: int
    new_tokens: int  # generation budget
    tokens_needed: int  # text + visual + new
    max_position_embeddings: int  # trained context, before scaling
    config_factor: float  # linear RoPE factor in the config
    factor: float  # the factor this run uses
    factor_source: str  # "config", "auto", "original" or "user"
    smallest_factor: float  # smallest integer factor whose context holds tokens_needed
    positions_available: int  # max_position_embeddings * factor
    fits: bool
    video_tokens: int = 0  # the videos' share of visual_tokens (pooled frames, or frames sent as images)
    video_pooled: bool = True  # False: the frames are sent as images (LLaVA-NeXT-Interleave), no --pool-stride

    def summary(self) -> str:
        """One line: the budget, the factor and whether it fits."""
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return (f"{self.tokens_needed} positions ({self.visual_tokens} visual + {self.text_tokens} text"
                f"{f' + {self.new_tokens} new' if self.new_tokens else ''}) vs {self.max_position_embeddings}"
                f" x RoPE factor {_fmt(self.factor)} ({self.factor_source}) = {self.positions_available}: {verdict}")

    def fix(self) -> str:
        """What to change when it does not fit ('' when it fits): the parts of the prompt that dominate
        (the answer budget, the videos' frames, the images, the text), largest first, then the RoPE factor."""
        if self.fits:
            return ""
        over = self.tokens_needed - self.positions_available
        room = self.positions_available - (self.tokens_needed - self.new_tokens)  # positions left for the answer
        images = self.visual_tokens - self.video_tokens
        levers = []  # (positions, advice): what the user controls, by how many positions it costs
        if self.new_tokens:
            levers.append((self.new_tokens, f"a smaller --max-new-tokens ({self.new_tokens} now; "
                                            + (f"at most {room} fit)" if room >= 1 else "the prompt alone does not fit)")))
        if self.video_tokens:
            levers.append((self.video_tokens, f"fewer frames (--frames; the video takes {self.video_tokens} positions)"
                                              + (", a larger --pool-stride" if self.video_pooled else "")))
        if images:
            levers.append((images, f"fewer or smaller images ({images} positions)"))
        if self.text_tokens:
            levers.append((self.text_tokens, f"a shorter prompt ({self.text_tokens} positions)"))
        levers.sort(key=lambda lever: -lever[0])
        named, covered = [], 0
        for size, advice in levers:  # the largest; others that alone could close the gap and matter
            if not named or covered < over or (size >= over and size * 10 >= self.tokens_needed):
                named.append(advice)
                covered += size
        return (f"{over} positions too many: use {', '.join(named)}, or --rope-scale {_fmt(self.smallest_factor)} "
                f"(the smallest linear factor that holds {self.tokens_needed} positions; the config's factor is "
                f"{_fmt(self.config_factor)}); or, to study this regime on purpose, --allow-overflow runs it anyway")

    def to_dict(self) -> dict:
        return asdict(self)


def _fmt(x: float) -> str:
    return f"{x:g}"


def smallest_rope_factor(tokens_needed: int, max_position_embeddings: int) -> float:
    """The smallest integer linear RoPE factor whose scaled context holds ``tokens_needed`` positions."""
    return float(max(1, math.ceil(tokens_needed / max_position_embeddings)))


def plan_context(text_tokens: int, visual_tokens: int, config: LlavaNextConfig, rope_scale: RopeScale = "config",
                 new_tokens: int = 0, video_tokens: int = 0) -> ContextPlan:
    """Positions a prompt needs against what the decoder's (scaled) RoPE provides. ``video_tokens``: the
    videos' share of ``visual_tokens`` (so the advice names frames only when there is a video)."""
    if min(text_tokens, visual_tokens, new_tokens, video_tokens) < 0 or video_tokens > visual_tokens:
        raise ValueError(f"token counts must be >= 0 (video <= visual), got text={text_tokens}, visual={visual_tokens}, "
                         f"new={new_tokens}, video={video_tokens}")
    max_pos = config.text.max_position_embeddings
    needed = text_tokens + visual_tokens + new_tokens
    smallest = smallest_rope_factor(needed, max_pos)
    if rope_scale == "config":
        factor, source = config.text.rope_scaling_factor, "config"
    elif rope_scale == "auto":
        factor, source = smallest, "auto"
    elif rope_scale == "original":  # playground/demo/video_demo.py: 1000 positions reserved for text
        factor, source = float(math.ceil((visual_tokens + 1000) / max_pos)), "original"
    elif isinstance(rope_scale, (int, float)) and not isinstance(rope_scale, bool) and rope_scale >= 1:
        factor, source = float(rope_scale), "user"
    else:
        raise ValueError(f"rope_scale must be 'config', 'auto', 'original' or a number >= 1, got {rope_scale!r}")
    available = int(max_pos * factor)
    return ContextPlan(text_tokens=text_tokens, visual_tokens=visual_tokens, new_tokens=new_tokens,
                       tokens_needed=needed, max_position_embeddings=max_pos,
                       config_factor=config.text.rope_scaling_factor, factor=factor, factor_source=source,
                       smallest_factor=smallest, positions_available=available, fits=needed <= available,
                       video_tokens=video_tokens, video_pooled=not config.video_as_images)


def check_context(plan: ContextPlan, on_overflow: Literal["raise", "warn"] = "raise") -> ContextPlan:
    """Raise ``ContextOverflowError`` (or warn) when the prompt does not fit; return the plan otherwise."""
    if not plan.fits:
        message = f"prompt does not fit the RoPE context: {plan.summary()}. {plan.fix()}"
        if on_overflow == "raise":
            raise ContextOverflowError(message)
        if on_overflow != "warn":
            raise ValueError(f"on_overflow must be 'raise' or 'warn', got {on_overflow!r}")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return plan
