"""Tiny LLaVA-NeXT and LLaVA-NeXT-Video models shared by the research-instrument tests (built once per process).

Each is a transformers checkpoint (eager attention: the reference for attention probabilities) converted and
loaded by our loader, plus a prompt over a real photo (image) or the real test video (4 frames of
bigbuckbunny.mp4), as (ours, transformers, ids, media kwargs for ours, media kwargs for transformers).
The image model uses a Mistral (GQA) decoder, the video one a Llama decoder.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from checkpoints import make_llava_hf_checkpoint
from media import real_photo, real_video
from llava_next.inputs.image import preprocess_image
from llava_next.inputs.prompt import expand_placeholders
from llava_next.inputs.tokens import image_tokens, video_tokens
from llava_next.inputs.video import load_video
from llava_next.model.llava import LlavaNextModel
from llava_next_weights.convert import convert
from llava_next_weights.load import load_into, read_config

TEXT = [1, 5, 17, 33, 7, 9, 21]


@functools.cache
def _root() -> Path:
    return Path(tempfile.mkdtemp(prefix="llava_research_"))


@functools.cache
def tiny_pair(kind: str):
    root = _root() / kind
    hf_dir, hf = make_llava_hf_checkpoint(root / "hf", kind=kind, text="mistral" if kind == "image" else "llama")
    hf.set_attn_implementation("eager")
    directory = convert(hf_dir, root / "ours", progress=False)
    with torch.device("meta"):
        ours = LlavaNextModel(read_config(directory))
    ours = load_into(ours, directory).eval()
    cfg = ours.config
    if kind == "image":
        im = preprocess_image(real_photo("chelsea"), cfg)
        ids = [TEXT[0], cfg.image_token_id] + TEXT[1:]
        ids = expand_placeholders(ids, cfg.image_token_id, cfg.video_token_id, [image_tokens(im.image_size, cfg)], [])
        mine = {"images": [im]}
        theirs = {"pixel_values": im.pixel_values[None], "image_sizes": torch.tensor([im.image_size])}
    else:
        clip = load_video(real_video(), 4, size=cfg.tile_size)
        ids = [TEXT[0], cfg.video_token_id] + TEXT[1:]
        ids = expand_placeholders(ids, cfg.image_token_id, cfg.video_token_id, [], [video_tokens(clip.num_frames, cfg)])
        mine = {"videos": [clip.pixel_values]}
        theirs = {"pixel_values_videos": clip.pixel_values[None]}
    return ours, hf, torch.tensor([ids]), mine, theirs
