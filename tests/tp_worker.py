"""Run by test_tensor_parallel.py on every rank under torchrun (2 processes, gloo on 127.0.0.1); not a test module.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp_worker.py OUT VIDEO NAME=DIR ...

For each converted checkpoint NAME=DIR it loads the decoder split over the ranks (fp32) and saves, per
rank, into OUT/NAME-rank{r}.pt: full-sequence logits of an image prompt, a video prompt and the two as
one left-padded batch; the greedy tokens of each; the decoder bytes this rank holds and its KV cache's
shape. Then it runs ``llava-next run --json`` (the CLI's main, in this process) with stdout to
OUT/cli-rank{r}.txt: rank 0 must print the answer, rank 1 nothing.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from media import real_photo  # noqa: E402

from llava_next.model.generate import positions_from_mask  # noqa: E402
from llava_next.parallel.launch import dist_env, init_mesh  # noqa: E402
from llava_next.parallel.tensor_parallel import load_tensor_parallel, local_decoder_bytes  # noqa: E402

PROMPTS = {"image": dict(prompt="Describe the picture.", images=[real_photo("chelsea")]),
           "video": dict(prompt="What is happening?", frames=3)}  # odd: the frames split unevenly over 2 ranks
NEW_TOKENS = 8


def run_prompts(pipe, video: str) -> dict:
    image = pipe.prepare(**PROMPTS["image"])
    clip = pipe.prepare(**PROMPTS["video"], video=video)
    out = {}
    with torch.no_grad():
        for name, reqs in (("image", [image]), ("video", [clip]), ("batch", [image, clip])):
            embeds, mask = pipe.embed(reqs)  # (B, T, D) left-padded
            out[f"{name}_logits"] = pipe.model.language_model(
                input_embeds=embeds, position_ids=positions_from_mask(mask), key_mask=mask)
            out[f"{name}_tokens"] = pipe.generate_batch(reqs, max_new_tokens=NEW_TOKENS)
    out["decoder_bytes"] = local_decoder_bytes(pipe.model)
    out["kv_cache_shape"] = tuple(pipe.model.language_model.layers[0].self_attn.kv_cache.k.shape)
    return out


def main() -> None:
    out_dir, video, *checkpoints = sys.argv[1:]
    out_dir = Path(out_dir)
    env = dist_env()
    mesh = init_mesh("cpu")
    for item in checkpoints:
        name, directory = item.split("=", 1)
        pipe = load_tensor_parallel(directory, mesh, dtype=torch.float32, progress=False)
        torch.save(run_prompts(pipe, video), out_dir / f"{name}-rank{env.rank}.pt")
    name, directory = checkpoints[0].split("=", 1)
    from llava_next.cli.main import main as cli_main

    with open(out_dir / f"cli-rank{env.rank}.txt", "w") as f:
        sys.stdout = f
        code = cli_main(["run", "--model", directory, "--video", video, "--frames", "4", "--dtype", "fp32",
                         "--max-new-tokens", str(NEW_TOKENS), "--json", PROMPTS["video"]["prompt"]])
        sys.stdout = sys.__stdout__
    (out_dir / f"cli-rank{env.rank}.code").write_text(str(code))


if __name__ == "__main__":
    main()
