"""Pictures of a token plan, drawn with Pillow only (``llava-next inspect --png``).

- ``draw_image_plan``: the canvas the image is resized into (black padding as the model sees it),
  the 336 px tiles, the 14 px patch grid, the block of features kept after unpadding (green) and the
  padding rows/columns dropped (red), beside the squashed 336x336 base image; a header with the counts.
- ``draw_video_plan``: the sampled frames as the model sees them (336 px centre crops) with the pooled
  token grid on each, their stream index and timestamp, a timeline of where they sit in the video,
  and a header with tokens per frame, the total and the RoPE context verdict.

Layout only; every number comes from tokens.py, so the picture cannot disagree with the accounting.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ..inputs.tokens import ContextPlan, ImagePlan, VideoPlan

BG, FG, DIM = (250, 250, 250), (20, 20, 20), (110, 110, 110)
TILE, KEPT, DROP, PATCH = (255, 200, 0), (0, 200, 80), (230, 40, 40), (255, 255, 255)
PAD = 16  # px around panels


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_block(lines: Sequence[str], width: int, size: int = 16) -> Image.Image:
    font, gap = _font(size), 6
    width = max([width] + [int(font.getlength(line)) + 2 * PAD for line in lines])
    height = PAD + len(lines) * (size + gap)
    img = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        d.text((PAD, PAD // 2 + i * (size + gap)), line, fill=FG if i == 0 else DIM, font=font)
    return img


def _stack(parts: Sequence[Image.Image]) -> Image.Image:
    width = max(p.width for p in parts)
    out = Image.new("RGB", (width, sum(p.height for p in parts)), BG)
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height
    return out


def _hw(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------
def _draw_untiled_plan(image: Image.Image, plan: ImagePlan, name: str, max_side: int) -> Image.Image:
    """One tile for the whole image (LLaVA-NeXT-Interleave; OneVision with several images): squashed, or first
    padded to a square with the mean colour (``plan.aspect`` "pad"; SigLIP's mean, 127 grey)."""
    side = plan.canvas_hw[0]
    shown = image
    if plan.aspect == "pad":
        w, h = image.size
        shown = Image.new("RGB", (max(w, h), max(w, h)), (127, 127, 127))
        shown.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    shown = shown.resize((side, side), Image.BICUBIC).resize((min(side, max_side),) * 2, Image.BILINEAR)
    how = "padded to a square (grey), then resized" if plan.aspect == "pad" else "resized (aspect not kept)"
    newline = f" + {plan.newline_tokens} newline" if plan.newline_tokens else ", no newline"
    header = _text_block([
        f"{name}: {_hw(plan.image_hw)} px (h x w)  ->  {plan.total} visual tokens",
        f"one tile: the whole image {how} to {side}x{side} px; no AnyRes tiles",
        f"features: {plan.base_tokens}{newline} = {plan.total}",
    ], shown.width + 2 * PAD)
    body = Image.new("RGB", (shown.width + 2 * PAD, shown.height + PAD), BG)
    body.paste(shown, (PAD, 0))
    return _stack([header, body])


def draw_image_plan(image: Image.Image, plan: ImagePlan, name: str, tile: int = 336, patch: int = 14,
                    max_side: int = 720) -> Image.Image:
    """The AnyRes plan of one RGB image (``plan`` from ``tokens.image_plan``)."""
    if plan.num_tiles == 0:
        return _draw_untiled_plan(image, plan, name, max_side)
    ch, cw = plan.canvas_hw
    s = min(1.0, max_side / max(ch, cw))  # display scale
    rh, rw = plan.resized_hw
    canvas = Image.new("RGB", (cw, ch), (0, 0, 0))
    canvas.paste(image.resize((rw, rh), Image.BICUBIC), ((cw - rw) // 2, (ch - rh) // 2))
    canvas = canvas.resize((round(cw * s), round(ch * s)), Image.BILINEAR).convert("RGBA")
    canvas, kept = _mark_patches(canvas, plan, s, patch)
    _mark_tiles(canvas, plan, s, tile, kept)
    body = _beside_base(canvas, image, plan, s, tile)

    g = plan.grid_hw
    kh, kw = plan.unpadded_hw
    header = _text_block([
        f"{name}: {_hw(plan.image_hw)} px (h x w)  ->  {plan.total} visual tokens",
        f"canvas {_hw(plan.canvas_hw)} px = {g[0]}x{g[1]} tiles of {tile} px; image resized to "
        f"{_hw(plan.resized_hw)}, black padding around it",
        f"features: base {plan.base_tokens} + stitched map {_hw(plan.feature_map_hw)} patches -> unpadded "
        f"{kh}x{kw} = {kh * kw} + {plan.newline_tokens} newline = {plan.total}",
        "yellow: tiles   faint grid: 14 px patches   green: features kept   red: padding features dropped",
    ], body.width)
    return _stack([header, body])


def _mark_patches(canvas: Image.Image, plan: ImagePlan, s: float, patch: int) -> tuple[Image.Image, list[float]]:
    """The canvas (RGBA, display scale ``s``) with the faint patch grid and the padding whose features unpad
    drops shaded; also the kept box [left, top, right, bottom] in display px."""
    ch, cw = plan.canvas_hw
    over = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(over)
    fh, fw = plan.feature_map_hw
    kh, kw = plan.unpadded_hw
    top, left = (fh - kh) // 2, (fw - kw) // 2
    for r in range(fh + 1):  # patch grid, faint
        d.line([(0, r * patch * s), (cw * s, r * patch * s)], fill=PATCH + (40,))
    for c in range(fw + 1):
        d.line([(c * patch * s, 0), (c * patch * s, ch * s)], fill=PATCH + (40,))
    kept = [left * patch * s, top * patch * s, (left + kw) * patch * s, (top + kh) * patch * s]
    for box in ([0, 0, cw * s, kept[1]], [0, kept[3], cw * s, ch * s],  # dropped rows / columns
                [0, kept[1], kept[0], kept[3]], [kept[2], kept[1], cw * s, kept[3]]):
        if box[2] - box[0] > 0.5 and box[3] - box[1] > 0.5:
            d.rectangle(box, fill=DROP + (90,))
            if box[3] - box[1] > 24 and box[2] - box[0] > 150:
                d.text((box[0] + 8, (box[1] + box[3]) / 2 - 8), "padding: features dropped", fill=(255, 160, 160, 255),
                       font=_font(14))
    return Image.alpha_composite(canvas, over), kept


def _mark_tiles(canvas: Image.Image, plan: ImagePlan, s: float, tile: int, kept: list[float]) -> None:
    """Outline and number the tiles, and outline the kept features, on ``canvas`` in place."""
    d = ImageDraw.Draw(canvas)
    rows, cols = plan.grid_hw
    kh, kw = plan.unpadded_hw
    font = _font(15)
    for r in range(rows):
        for c in range(cols):
            box = [c * tile * s, r * tile * s, (c + 1) * tile * s - 1, (r + 1) * tile * s - 1]
            d.rectangle(box, outline=TILE, width=3)
            d.text((box[0] + 6, box[1] + 4), f"tile {r * cols + c}", fill=TILE, font=font, stroke_width=2,
                   stroke_fill=(0, 0, 0))
    d.rectangle(kept, outline=KEPT, width=3)
    d.text((kept[0] + 6, kept[3] - 22), f"kept {kh}x{kw} features (+{plan.newline_tokens} newline)", fill=KEPT,
           font=font, stroke_width=2, stroke_fill=(0, 0, 0))


def _beside_base(canvas: Image.Image, image: Image.Image, plan: ImagePlan, s: float, tile: int) -> Image.Image:
    """The marked canvas with the base tile (the whole image squashed to one tile) to its right."""
    base_side = round(tile * s)
    base = image.resize((tile, tile), Image.BICUBIC).resize((base_side, base_side), Image.BILINEAR)
    body = Image.new("RGB", (canvas.width + base_side + 3 * PAD, max(canvas.height, base_side + 40) + PAD), BG)
    body.paste(canvas.convert("RGB"), (PAD, 0))
    bx = canvas.width + 2 * PAD
    body.paste(base, (bx, 0))
    d = ImageDraw.Draw(body)
    d.text((bx, base_side + 6), f"base: whole image squashed to {tile}x{tile}", fill=DIM, font=_font(14))
    d.text((bx, base_side + 24), f"{plan.base_tokens} tokens, no newline", fill=DIM, font=_font(14))
    return body


def draw_images_plan(items: Sequence[tuple[Image.Image, ImagePlan, str]], context: ContextPlan | None = None,
                     tile: int = 336) -> Image.Image:
    """Several images one below the other, with the context verdict at the bottom."""
    parts = [draw_image_plan(img, plan, name, tile=tile) for img, plan, name in items]
    if context is not None:
        parts.append(_text_block(_context_lines(context), max(p.width for p in parts)))
    return _stack(parts)


def _context_lines(context: ContextPlan) -> list[str]:
    lines = [f"context: {context.summary()}"]
    if not context.fits:
        lines.append(context.fix())
    return lines


# --------------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------------
def draw_video_plan(frames, frame_indices: Sequence[int], timestamps: Sequence[float], duration: float,
                    plan: VideoPlan, name: str, context: ContextPlan | None = None,
                    source: str = "") -> Image.Image:
    """Sampled frames (F, S, S, 3) uint8 with their pooled token grid, index and time."""
    n = len(frame_indices)
    per_row = min(n, 8)
    thumb = 224 if n <= 4 else 168 if n <= 32 else 112
    rows = -(-n // per_row)
    cap = 40
    grid = Image.new("RGB", (PAD + per_row * (thumb + PAD), rows * (thumb + cap)), BG)
    d = ImageDraw.Draw(grid)
    ph, pw = plan.pooled_hw
    # sequence positions one frame occupies (its newline tokens included; one_token's comes after all frames)
    span = plan.tokens_per_frame + {"grid": ph, "frame": 1}.get(plan.newline, 0)
    font = _font(14)
    for k in range(n):
        x, y = PAD + (k % per_row) * (thumb + PAD), (k // per_row) * (thumb + cap)
        img = Image.fromarray(frames[k]).resize((thumb, thumb), Image.BICUBIC).convert("RGBA")
        over = Image.new("RGBA", img.size, (0, 0, 0, 0))
        od = ImageDraw.Draw(over)
        for r in range(1, ph):
            od.line([(0, r * thumb / ph), (thumb, r * thumb / ph)], fill=PATCH + (70,))
        for c in range(1, pw):
            od.line([(c * thumb / pw, 0), (c * thumb / pw, thumb)], fill=PATCH + (70,))
        grid.paste(Image.alpha_composite(img, over).convert("RGB"), (x, y))
        d.text((x, y + thumb + 4), f"#{frame_indices[k]}  {timestamps[k]:.2f} s", fill=FG, font=font)
        start = k * span
        d.text((x, y + thumb + 21), f"frame {k}: tokens {start}-{start + span - 1}", fill=DIM, font=_font(12))

    # timeline: where the sampled frames sit in the video
    tl = Image.new("RGB", (grid.width, 46), BG)
    d = ImageDraw.Draw(tl)
    x0, x1, y = PAD, grid.width - PAD, 20
    d.line([(x0, y), (x1, y)], fill=DIM, width=3)
    for t in timestamps:
        x = x0 + (x1 - x0) * (t / duration if duration > 0 else 0)
        d.line([(x, y - 9), (x, y + 9)], fill=DROP, width=2)
    d.text((x0, y + 10), "0 s", fill=DIM, font=_font(12))
    d.text((x1 - 50, y + 10), f"{duration:.2f} s", fill=DIM, font=_font(12))

    nl = f" + {plan.newline_tokens} newline ({plan.newline})" if plan.newline_tokens else " (no newline tokens)"
    lines = [f"{name}: {n} frames x {plan.tokens_per_frame} tokens{nl} = {plan.total} visual tokens",
             f"{source}" if source else "",
             f"each frame: {plan.patch_grid_hw[0]}x{plan.patch_grid_hw[1]} patches -> {plan.mode} pool stride "
             f"{plan.stride} -> {ph}x{pw} tokens (grid drawn on the frames); red ticks: sampled times"]
    if context is not None:
        lines += _context_lines(context)
    header = _text_block([line for line in lines if line], grid.width)
    return _stack([header, grid, tl])
