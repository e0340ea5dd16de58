"""The token plan as data: one format for every command that prints one (``inspect --json``, ``run --json``).

``inspect`` builds its plan without weights, ``run`` from the request it actually ran; both describe it
through these functions, so for the same files and switches the two JSON plans are equal field by field
(tests/test_cli_options.py checks this for every switch):

    image_entry(path, ImagePlan)                  canvas, tiles, unpadded map, newlines, tokens
    video_entry(VideoClip, VideoPlan, sampling)   frames, timestamps, pooling, newlines, tokens
    switches(config, rope_scale, sampling)        the value of every token-plan switch this plan used
    media_plan(images, videos, config, ...)       {"images": [...], "videos": [...], "visual_tokens", "switches"}
    overflow(ContextPlan)                         by how much a prompt exceeds the RoPE context (None: it fits)

Sizes are (height, width).
"""

from __future__ import annotations

from typing import Sequence

from ..config import LlavaNextConfig


def image_entry(path: str, plan) -> dict:
    return {"path": str(path), "tokens": plan.total, "image_hw": plan.image_hw, "canvas_hw": plan.canvas_hw,
            "grid_hw": plan.grid_hw, "num_tiles": plan.num_tiles, "resized_hw": plan.resized_hw,
            "base_tokens": plan.base_tokens, "feature_map_hw": plan.feature_map_hw,
            "unpadded_hw": plan.unpadded_hw, "newline_tokens": plan.newline_tokens,
            "aspect": plan.aspect}  # "resize" / "pad": one untiled tile (interleave, OneVision's multi-image)


def video_entry(clip, plan, sampling: str) -> dict:
    return {"path": str(clip.path), "tokens": plan.total, "size_hw": clip.size_hw, "total_frames": clip.total_frames,
            "fps": clip.fps, "duration": clip.duration, "sampling": sampling, "num_frames": clip.num_frames,
            "frame_indices": clip.frame_indices, "timestamps": clip.timestamps,
            "tokens_per_frame": plan.tokens_per_frame, "patch_grid_hw": plan.patch_grid_hw,
            "pooled_hw": plan.pooled_hw, "pool_stride": plan.stride, "pool_mode": plan.mode,
            "newline": plan.newline, "newline_tokens": plan.newline_tokens, "notes": clip.notes(),
            **({} if clip.cuts is None else {"scene_cuts": list(clip.cuts), "scene_cut_times": list(clip.cut_times)})}


def switches(config: LlavaNextConfig, rope_scale, sampling: str) -> dict:
    """Every token-plan switch with the value the plan used (docs/usage.md: 'Divergences ... as switches')."""
    return {"sampling": sampling, "pool_stride": config.spatial_pool_stride, "pool_mode": config.spatial_pool_mode,
            "newline": config.video_newline, "pool_position": config.pool_position,
            "anyres_compat": config.anyres_compat, "rope_scale": rope_scale}


def media_plan(images: Sequence[tuple[str, object]], videos: Sequence[tuple[object, object]], config: LlavaNextConfig,
               rope_scale, sampling: str) -> dict:
    """``images``: (path, ImagePlan) pairs; ``videos``: (VideoClip, VideoPlan) pairs."""
    image_entries = [image_entry(path, plan) for path, plan in images]
    video_entries = [video_entry(clip, plan, sampling) for clip, plan in videos]
    return {"images": image_entries, "videos": video_entries,
            "visual_tokens": sum(e["tokens"] for e in image_entries + video_entries),
            "switches": switches(config, rope_scale, sampling)}


def overflow(context) -> dict | None:
    """How far past ``max_position_embeddings x factor`` the prompt goes (None when it fits)."""
    if context.fits:
        return None
    over = context.tokens_needed - context.positions_available
    return {"positions_needed": context.tokens_needed, "positions_available": context.positions_available,
            "exceeded_by": over, "ratio": round(context.tokens_needed / context.positions_available, 4)}


def overflow_warning(context) -> str:
    """The stderr line for a run that goes past the context on purpose (--allow-overflow)."""
    o = overflow(context)
    return (f"warning: --allow-overflow: the prompt needs {o['positions_needed']} positions but "
            f"max_position_embeddings {context.max_position_embeddings} x RoPE factor {context.factor:g} = "
            f"{o['positions_available']}: the context is exceeded by {o['exceeded_by']} positions ({o['ratio']:g}x); "
            f"positions past {o['positions_available']} were never trained, so the answer may be garbage")


def rope_note(context) -> str | None:
    """Why ``--rope-scale auto`` uses another factor than the checkpoint's config (None otherwise)."""
    if context.factor_source != "auto" or context.factor == context.config_factor:
        return None
    return (f"--rope-scale auto: using linear RoPE factor {context.factor:g}, the smallest that holds the "
            f"{context.tokens_needed} positions ({context.max_position_embeddings} x {context.factor:g} = "
            f"{context.positions_available}), instead of the config's {context.config_factor:g}; pass "
            f"--rope-scale config to keep the checkpoint's factor")


def growth_note(methods: Sequence[str], unreduced: int, into: int, per_crop: int | None = None) -> str | None:
    """Why a token reducer sends *more* visual tokens into the decoder than none would (None otherwise):
    VisionZip's budget per frame or crop can exceed what the model makes of it unreduced (a pooled frame)."""
    if into <= unreduced:
        return None
    budget = f" ({per_crop} tokens)" if per_crop else ""
    return (f"{', '.join(methods)}: {into} visual tokens into the decoder, more than the {unreduced} without "
            f"reduction: its budget per frame or crop{budget} exceeds what this model uses unreduced; lower its "
            f"knobs (docs/reduction.md) or drop --reduce")


def per_crop(reduction, config) -> int | None:
    """A token reducer's fixed budget per frame or crop (VisionZip's dominant + contextual), if it has one."""
    fn = getattr(getattr(reduction, "reducer", None), "per_crop", None)
    try:
        return fn(config) if fn else None
    except ValueError:
        return None
