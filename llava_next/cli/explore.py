"""``llava-next explore``: serve the interactive page (llava_next/explore/) for one model.

    llava-next explore --model tiny-random                 # http://127.0.0.1:7860/
    llava-next explore --model DIR --port 8000 --device cuda
    llava-next explore --model DIR --host 0.0.0.0          # reachable from the network: a warning is printed

Loads the model once, then serves until Ctrl-C. Binds 127.0.0.1 unless ``--host`` names another address,
which is then said on stderr (anyone who reaches the port can run the model and read the files it is given).
Gradio is the optional ``explore`` extra; without it the command says ``pip install 'llava-next[explore]'``
before loading anything. The page draws the token plan with this package's inspect picture (plan_png.py),
handed to the page as a function (the explore package sits below the command line), and where the model came
from (``ModelSource``), so that the page can load it with a LoRA adapter or as the float model gradient maps need.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_explore(sub, *, user_error) -> None:
    from . import options
    from .run import DTYPES

    p = sub.add_parser("explore", help="serve an interactive page to look inside the model (Gradio)",
                       description="Serve a local page: choose a sample or any image / video, ask (the answer "
                                   "streams), and look at the token plan, the attention that produced each answer "
                                   "token per layer and head on the original pixels, its gradient relevancy maps, "
                                   "the layer x frame chart, the positions each frame or tile became, the kept map "
                                   "of a reduced request and the logit lens; a LoRA adapter folder per question.")
    options.add_model_options(p, adapter=False)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; another address is reachable "
                        "from the network and prints a warning)")
    p.add_argument("--port", type=options.positive, default=7860, help="port (default 7860)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--max-new-tokens", type=options.positive, default=8,
                   help="answer tokens per question, the page's default (default 8)")
    p.add_argument("--cache-dir", default=None, help="hub cache directory (default: the hub's)")
    p.set_defaults(func=lambda args: _explore(args, user_error))


def _explore(args: argparse.Namespace, user_error) -> int:
    from ..config import PRESETS
    from ..explore.models import ModelSource
    from ..explore.server import is_local, require_gradio, serve
    from ..explore.session import ExploreError, Session
    from ..runtime.pipeline import Pipeline
    from .run import DTYPES, random_weights_notice

    try:
        require_gradio()  # before any loading
    except ExploreError as e:
        raise user_error(str(e)) from None
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise user_error("--device cuda: no CUDA device is available; use --device cpu")
    notice = random_weights_notice(args.model)
    if notice:
        print(f"[llava-next] {notice}", file=sys.stderr)
    model_id = PRESETS[args.model].hub_id if args.model in PRESETS else args.model
    pipe = Pipeline.from_pretrained(model_id, dtype=DTYPES[args.dtype], device=args.device, cache_dir=args.cache_dir)
    if not is_local(args.host):
        print(f"[llava-next] warning: --host {args.host}: the page is reachable from the network; anyone who "
              f"reaches port {args.port} can run the model and make it read files on this machine", file=sys.stderr)
    source = ModelSource(model_id, DTYPES[args.dtype], args.device, args.cache_dir)  # adapters, gradient maps
    server = serve(Session(pipe, max_new_tokens=args.max_new_tokens, source=source), host=args.host,
                   port=args.port, plan_picture=plan_picture, block=False)
    print(f"[llava-next] explore: serving {server.url} (Ctrl-C stops)", file=sys.stderr)
    server.blocks.block_thread()
    return 0


def plan_picture(request, path: str, tile: int):
    """The inspect picture of a prepared request's plan: its images' tiles, or its first video's frames."""
    from ..inputs.image import load_image
    from .plan_png import draw_images_plan, draw_video_plan

    if request.image_plans and not request.videos:
        return draw_images_plan([(load_image(path), request.image_plans[0], os.path.basename(path))], request.plan,
                                tile=tile)
    if not request.videos:
        return None
    clip, plan = request.videos[0], request.video_plans[0]
    source = (f"{clip.size_hw[0]}x{clip.size_hw[1]} px, {clip.total_frames} frames, {clip.fps:.2f} fps, "
              f"{clip.duration:.2f} s")
    return draw_video_plan(clip.frames, clip.frame_indices, clip.timestamps, clip.duration, plan,
                           os.path.basename(clip.path), request.plan, source)
