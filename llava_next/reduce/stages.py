"""The four places a token-reduction method plugs in, and the index map every method reads.

    H0 FrameSelector   candidate frames (pixels)            -> which frames to turn into tokens   (MaxInfo)
    H1 TokenReducer    one video's projector outputs        -> the tokens the decoder sees        (PLLaVA, SlowFast,
                       (or one image's crops: VisionZip)                                           DyCoke-TTM, VisionZip)
    H2 PrefillPruner   hidden states at decoder layer K     -> which rows survive into layer K    (FastV, FrameFusion)
    H3 DecodeSelector  each decode step's query at layer L  -> which cached keys layers >= L read  (DyCoke stage 2)

A ``Reduction`` holds at most one method per stage; the pipeline applies H0 and H1 while building the
prompt, and hands H2/H3 to ``engine.ReducedEngine``, which drives the decoder layer range by layer range
(``Decoder.forward_layers``).

Index map. ``VisualLayout`` says, for every position of a (left-padded)
batch, whether it is a visual token (a candidate for pruning), which frame of its video it came from,
and which patch of that frame's grid (row * width + col; -1 for newline tokens and text). Video tokens
are frame-major and row-major inside a frame (model/pooling.py); a ``TokenReducer`` that changes the
layout returns the (frame, patch) of each of its tokens itself (``ReducedVideo``). Nothing is hard-coded
(FastV's 35/576, FrameFusion's 28 layers, DyCoke's 14/196): everything comes from this map and the config.

Position ids: a pruned token's neighbours keep their original RoPE positions (gaps), and decode
continues at the unpruned length — what FastV's KV-cache implementation and FrameFusion do.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, Sequence

import torch

from ..model import policy
from ..model.pooling import pooled_grid_hw

if TYPE_CHECKING:
    from ..config import LlavaNextConfig
    from ..inputs.image import ImageInput
    from ..model.decoder import Decoder
    from ..model.llava import LlavaNextModel

Size = tuple[int, int]


class ReductionError(ValueError):
    """A reduction method or its settings cannot be used; the message says what exists / what is allowed."""


# ---- the index map ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReducedImage:
    """One image's tokens as the decoder will see them, and the crop and patch each came from."""

    tokens: torch.Tensor  # (N, D)
    tile: torch.Tensor  # (N,) long: 0 = the base image, k = AnyRes tile k (1-based, row-major); -1 newline
    patch: torch.Tensor  # (N,) long: row * width + col in its crop's patch grid; -1 for CLS / newline


@dataclass(frozen=True)
class ReducedVideo:
    """One video's tokens as the decoder will see them: features and where each token came from."""

    tokens: torch.Tensor  # (N, D)
    frame: torch.Tensor  # (N,) long: index into the video's frames; -1 for a token that is no frame's
    patch: torch.Tensor  # (N,) long: row * width + col in its frame's token grid; -1 for none


def native_video_layout(num_frames: int, config: LlavaNextConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame, patch) of every token ``LlavaNextModel.video_features`` produces (newline tokens: patch -1)."""
    h, w = pooled_grid_hw((config.vision.grid_size,) * 2, config.spatial_pool_stride, config.spatial_pool_mode)
    frame = torch.arange(num_frames).repeat_interleave(h * w)
    patch = torch.arange(h * w).repeat(num_frames)
    mode = config.video_newline
    if mode == "none":
        return frame, patch
    if mode == "grid":  # w patches then one newline, per row
        f = frame.view(num_frames * h, w)
        p = patch.view(num_frames * h, w)
        return (torch.cat([f, f[:, :1]], 1).reshape(-1),
                torch.cat([p, torch.full_like(p[:, :1], -1)], 1).reshape(-1))
    if mode == "frame":
        f, p = frame.view(num_frames, h * w), patch.view(num_frames, h * w)
        return (torch.cat([f, f[:, :1]], 1).reshape(-1),
                torch.cat([p, torch.full_like(p[:, :1], -1)], 1).reshape(-1))
    return torch.cat([frame, torch.tensor([-1])]), torch.cat([patch, torch.tensor([-1])])  # one_token


@dataclass
class VisualLayout:
    """Per position of a (B, T) batch: visual? frame? patch? tile? (-1 where not applicable)."""

    visual: torch.Tensor  # (B, T) bool: image or video token (pruning candidates)
    frame: torch.Tensor  # (B, T) long: a video token's frame
    patch: torch.Tensor  # (B, T) long: patch in its frame's grid (video) or its crop's grid (reduced image)
    tile: torch.Tensor | None = None  # (B, T) long: a reduced image token's crop (0 = base, k = tile k)

    @classmethod
    def build(cls, input_ids: torch.Tensor, config: LlavaNextConfig,
              videos: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
              images: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()) -> "VisualLayout":
        """From the (B, T) expanded ids and each video's (frame, patch) in the order videos fill the batch
        (row 0's first); ``images``: each image's (tile, patch) likewise (a token reducer's; -1 for an
        unreduced image). Image tokens have frame -1; without ``images`` tile/patch -1 too."""
        is_video = input_ids == config.video_token_id if config.video_token_id is not None else \
            torch.zeros_like(input_ids, dtype=torch.bool)
        visual = is_video | (input_ids == config.image_token_id)
        frame = torch.full_like(input_ids, -1)
        patch = torch.full_like(input_ids, -1)
        if videos:
            frame[is_video] = torch.cat([f for f, _ in videos]).to(frame.device)
            patch[is_video] = torch.cat([p for _, p in videos]).to(patch.device)
        tile = torch.full_like(input_ids, -1)
        if images:
            is_image = input_ids == config.image_token_id
            tile[is_image] = torch.cat([t for t, _ in images]).to(tile.device)
            patch[is_image] = torch.cat([p for _, p in images]).to(patch.device)
        return cls(visual, frame, patch, tile)

    def to(self, device: torch.device) -> "VisualLayout":
        return VisualLayout(self.visual.to(device), self.frame.to(device), self.patch.to(device),
                            None if self.tile is None else self.tile.to(device))


# ---- H0 ------------------------------------------------------------------------------------------------
class FrameSelector(ABC):
    """Pick frames before they become tokens: ``candidate_count`` frames are sampled uniformly first, then
    ``select`` keeps some of them (``Pipeline.prepare``)."""

    name: ClassVar[str]
    stage: ClassVar[str] = "select-frames"

    def spec(self) -> str:
        return method_spec(self)

    def budget(self, requested: int) -> int:
        """The most frames ``select`` returns for a request of ``requested`` frames."""
        return requested

    def video_sampling(self) -> dict | None:
        """``load_video`` keyword arguments when the selector is a rule over the whole decoded video (scene
        cuts: reduce/scene.py), which then replaces candidates + ``select``; None (the default): it is not."""
        return None

    @abstractmethod
    def candidate_count(self, requested: int, total_frames: int, fps: float) -> int:
        """How many candidate frames to decode for a request of ``requested`` frames."""

    @abstractmethod
    def select(self, pixel_values: torch.Tensor, model: LlavaNextModel, frames: int) -> list[int]:
        """(N, 3, S, S) candidate frames -> sorted indices into them (at most ``frames``)."""


# ---- H1 ------------------------------------------------------------------------------------------------
class TokenReducer(ABC):
    """Replace the model's own pooling: projector outputs of one video -> the decoder's tokens.

    ``needs``: "patches" = the projector applied to every patch of the full grid, (F, H*W, D) (PLLaVA,
    SlowFast: pooling after the projector, as in their code); "pooled" = the model's own pooled,
    projected features (F, h*w, D) (DyCoke's temporal merging); "tower" = the reducer runs the vision
    tower itself (VisionZip reads its attention). Reducers emit no newline tokens for videos.

    ``media``: what the reducer applies to. A video-only reducer (it works across frames: PLLaVA,
    SlowFast, DyCoke-TTM) refuses a request with images (``check_media``) rather than leave them
    unreduced silently; an image reducer (VisionZip) implements ``num_image_tokens`` / ``reduce_image``
    and reduces every image and video of the request, each on its own (text is never touched)."""

    name: ClassVar[str]
    stage: ClassVar[str] = "reduce"
    needs: ClassVar[Literal["patches", "pooled", "tower"]] = "patches"
    media: ClassVar[tuple[str, ...]] = ("video",)

    def check_media(self, num_images: int, frames_as_images: bool = False) -> None:
        """A clear error when a video-only reducer meets images (``frames_as_images``: the checkpoint reads
        videos as interleaved images, e.g. LLaVA-NeXT-Interleave)."""
        if num_images and "image" not in self.media:
            why = ("this checkpoint reads videos as interleaved images" if frames_as_images
                   else f"the request has {num_images} image(s)")
            raise ReductionError(f"{self.name} reduces videos only (it works across frames), but {why}: drop "
                                 f"--reduce {self.name}, or use a reducer for images: "
                                 f"{', '.join(image_reducers()) or 'none'}")

    def num_image_tokens(self, grid: Size, config: LlavaNextConfig) -> int:
        """Tokens ``reduce_image`` returns for an image cut into ``grid`` (rows, cols) tiles ((0, 0): untiled)."""
        self.check_media(1)
        raise NotImplementedError

    def reduce_image(self, model: LlavaNextModel, image: ImageInput) -> ReducedImage:
        """One preprocessed image (base + tiles) -> ReducedImage."""
        self.check_media(1)
        raise NotImplementedError

    def spec(self) -> str:
        return method_spec(self)

    @abstractmethod
    def num_tokens(self, num_frames: int, config: LlavaNextConfig) -> int:
        """Tokens ``reduce`` returns for a video of ``num_frames`` frames (known before any compute)."""

    @abstractmethod
    def reduce(self, features: torch.Tensor, config: LlavaNextConfig) -> ReducedVideo:
        """Features as ``needs`` says -> ReducedVideo."""

    def reduce_video(self, model: LlavaNextModel, pixel_values: torch.Tensor,
                     frame_batch: int = policy.FRAME_BATCH) -> ReducedVideo:
        """Run the tower (+ projector, + pooling) as ``needs`` says, then ``reduce``."""
        from ..model.pooling import pool_and_project

        cfg = model.config
        pixels = pixel_values.to(model.device, model.dtype)
        with torch.no_grad():
            if self.needs == "tower":
                out = self.reduce(pixels, cfg, model=model)  # type: ignore[call-arg]
                feats = None
            else:
                feats = torch.cat([model.vision_tower(c) for c in pixels.split(frame_batch)])  # (F, H*W, Cv)
            if feats is not None and self.needs == "patches":
                out = self.reduce(model.projector(feats), cfg)  # (F, H*W, D) in
            elif feats is not None:
                grid = (cfg.vision.grid_size,) * 2
                out = self.reduce(pool_and_project(feats, model.projector, grid, cfg.spatial_pool_stride,
                                                   cfg.spatial_pool_mode, cfg.pool_position), cfg)  # (F, h*w, D) in
        n = self.num_tokens(pixel_values.shape[0], cfg)
        if out.tokens.shape[0] != n:  # the promise prepare() expanded the placeholders with
            raise RuntimeError(f"{self.name} returned {out.tokens.shape[0]} tokens, num_tokens said {n} (a bug)")
        return out


def image_reducers() -> list[str]:
    """Names of the token reducers that apply to images."""
    from . import METHODS

    return [n for n, c in METHODS.items() if issubclass(c, TokenReducer) and "image" in c.media]


# ---- H2 ------------------------------------------------------------------------------------------------
class PrefillPruner(ABC):
    """Inside the prefill: after layer ``layer - 1`` has run on the full sequence, ``select_rows`` picks the rows
    that go on into layer ``layer`` (layers below keep the full KV cache, layers from ``layer`` on the
    pruned one). ``scores`` gets exact attention rows of layer ``layer - 1`` (``scores.cached_rows``)."""

    name: ClassVar[str]
    stage: ClassVar[str] = "reduce"

    def spec(self) -> str:
        return method_spec(self)
    layer: int

    def kept(self, visual_tokens: int) -> int | None:
        """Visual tokens kept from ``layer`` on, when known before running (None: data-dependent)."""
        return int(visual_tokens * self.keep) if hasattr(self, "keep") else None

    @abstractmethod
    def select_rows(self, decoder: Decoder, hidden_in: torch.Tensor, hidden_out: torch.Tensor,
             position_ids: torch.Tensor, key_mask: torch.Tensor | None, layout: VisualLayout) -> list[torch.Tensor]:
        """Per row, the sorted indices (into the padded T) of the tokens to keep: every real non-visual
        token and the chosen visual ones. ``hidden_in``/``hidden_out``: (B, T, C) into/out of layer - 1."""


# ---- H3 ------------------------------------------------------------------------------------------------
class DecodeSelector(ABC):
    """During decode: from layer ``layer`` on, each step's query reads only the cached keys ``select``
    leaves visible (the others are masked: exactly what gathering them out gives, softmax weight 0)."""

    name: ClassVar[str]
    stage: ClassVar[str] = "reduce"

    def spec(self) -> str:
        return method_spec(self)
    layer: int

    @abstractmethod
    def visible(self, decoder: Decoder, hidden_in: torch.Tensor, position_ids: torch.Tensor,
                key_mask: torch.Tensor, visual: torch.Tensor, step: int) -> torch.Tensor:
        """(B, kv_len) bool: which keys layers >= ``layer`` read at this step. ``hidden_in`` (B, 1, C) is
        the input of layer ``layer - 1`` (its keys are in that layer's cache); ``visual`` (B, kv_len)."""


# ---- composition ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reduction:
    """At most one method per stage. Empty = the unreduced model."""

    select_frames: FrameSelector | None = None
    reducer: TokenReducer | None = None
    pruner: PrefillPruner | None = None
    decode: DecodeSelector | None = None

    @property
    def in_decoder(self) -> bool:
        return self.pruner is not None or self.decode is not None

    def check(self, config: LlavaNextConfig) -> None:
        """Settings that depend on the model (a layer index past the decoder's depth ...)."""
        layers = config.text.num_layers
        for m in (self.pruner, self.decode):
            if m is not None and not 1 <= m.layer < layers:
                raise ReductionError(f"{m.name}: layer={m.layer} but the decoder has {layers} layers; use "
                                     f"1 <= layer <= {layers - 1} (the score is layer {m.layer}-1's attention)")

    def budget(self, config: LlavaNextConfig, frames: int, video_tokens: int, other_visual: int = 0) -> dict:
        """The visual-token budget of one video at each stage, known before running (``inspect``):
        ``video_tokens`` is the unreduced video's count, ``other_visual`` the images' tokens."""
        out: dict = {"methods": self.names(), "visual_tokens_unreduced": video_tokens + other_visual}
        if self.select_frames is not None:
            frames = self.select_frames.budget(frames)  # type: ignore[attr-defined]
            out["frames_at_most"] = frames
        n = self.reducer.num_tokens(frames, config) if self.reducer is not None else None
        if n is None:  # the model's own pooling of the (selected) frames
            from ..inputs.tokens import video_tokens as count

            n = count(frames, config)
        out["visual_tokens_into_decoder"] = n + other_visual
        return self._in_decoder(out, n + other_visual)

    def image_budget(self, config: LlavaNextConfig, grid: Size, image_tokens: int) -> dict:
        """The same for one image cut into ``grid`` tiles, ``image_tokens`` unreduced (``inspect``)."""
        out: dict = {"methods": self.names(), "media": "image", "visual_tokens_unreduced": image_tokens}
        n = image_tokens
        if self.reducer is not None:
            self.reducer.check_media(1)
            n = self.reducer.num_image_tokens(grid, config)
        out["visual_tokens_into_decoder"] = n
        return self._in_decoder(out, n)

    def _in_decoder(self, out: dict, n: int) -> dict:
        if self.pruner is not None:
            out["pruned_at_layer"] = self.pruner.layer
            kept = self.pruner.kept(n)
            out["visual_tokens_after_pruning"] = kept if kept is not None else "data-dependent"
        if self.decode is not None:
            out["decode_reads_from_layer"] = self.decode.layer
            survivors = n  # a prefill pruner below the selector's layer leaves fewer candidates
            if self.pruner is not None and self.pruner.layer < self.decode.layer:
                survivors = self.pruner.kept(survivors)
            out["visual_keys_read_per_step"] = (int(survivors * self.decode.keep)  # type: ignore[attr-defined]
                                                if survivors is not None else "data-dependent")
        return out

    def names(self) -> list[str]:
        return [m.spec() for m in (self.select_frames, self.reducer, self.pruner, self.decode) if m is not None]

    def __bool__(self) -> bool:
        return any(m is not None for m in (self.select_frames, self.reducer, self.pruner, self.decode))


def method_spec(method: object) -> str:
    """'name:knob=value,...' of a method dataclass (the CLI form; parse.parse_method reads it back)."""
    parts = []
    for f in dataclasses.fields(method):  # type: ignore[arg-type]
        if f.name.startswith("_"):
            continue  # run-time state, not a knob
        v = getattr(method, f.name)
        parts.append(f"{f.name}={'x'.join(map(str, v)) if isinstance(v, tuple) else v}")
    return f"{method.name}:{','.join(parts)}" if parts else method.name  # type: ignore[attr-defined]


@dataclass
class PruneReport:
    """What the in-decoder stage did, per batch row (filled by the reduced engine)."""

    method: str = ""
    visual_before: list[int] = field(default_factory=list)  # visual tokens entering the decoder
    visual_after: list[int] = field(default_factory=list)  # visual tokens from the pruning layer on
    kept_positions: list[list[int]] = field(default_factory=list)  # RoPE positions of kept visual tokens
    layer: int = 0
