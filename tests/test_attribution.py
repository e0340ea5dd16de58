"""Gradient attribution (issue 28.1) against direct references on tiny llava-hf models (float64, the same weights,
a real photo and the real test video: tests/research_models.py):

- input x gradient equals autograd through transformers' model (pixels and decoder-input embeddings);
- integrated gradients on pixels are complete (sum of attributions == f(x) - f(x0)) and on tokens equal the same
  Riemann sum of gradients computed through transformers' decoder;
- attention rollout equals the dense product computed by hand from transformers' eager ``output_attentions``;
- relevancy equals Chefer et al.'s rule computed by hand from those attentions and their ``retain_grad`` gradients;
  carried through the vision tower, it equals the decoder's row mapped to patches by transformers' own packing /
  pooling, then Chefer's rule on its CLIPVisionModel's eager attentions and their gradients, per tile / frame;
- attribution patching equals real patching for a metric linear in the activation and is close for small patches;
- pixel attributions land on the tokens (and the original pixels) that read them;
- ``llava-next trace --attribute`` writes the scores, the reproducibility record and the pictures.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json

import pytest
import torch

from research_models import tiny_pair
from llava_next.research import (Inputs, Target, activation_patching, attribution_patching, input_x_gradient,
                                 integrated_gradients, relevancy, rollout)
from llava_next.research.attribution import embeddings, path_points

pytest.importorskip("transformers")


@functools.cache
def pair64(kind: str):
    """(ours, transformers, Inputs, transformers' media kwargs) in float64, and a 3-token answer target."""
    ours, hf, ids, mine, theirs = tiny_pair(kind)
    ours, hf = copy.deepcopy(ours).double(), copy.deepcopy(hf).double()
    if kind == "image":
        inputs = Inputs(ids, images=[dataclasses.replace(im, pixel_values=im.pixel_values.double())
                                     for im in mine["images"]])
    else:
        inputs = Inputs(ids, videos=[v.double() for v in mine["videos"]])
    theirs = {k: v.double() if v.is_floating_point() else v for k, v in theirs.items()}
    return ours, hf, inputs, theirs


TARGET = Target(answer=3)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def hf_pixels_key(kind: str) -> str:
    return "pixel_values" if kind == "image" else "pixel_values_videos"


@pytest.mark.parametrize("kind", ["image", "video"])
def test_input_x_grad_equals_transformers_autograd(kind):
    ours, hf, inputs, theirs = pair64(kind)
    ids = inputs.ids
    # pixels: d f / d pixel_values through transformers' whole model
    key = hf_pixels_key(kind)
    pv = theirs[key].clone().requires_grad_(True)
    f = TARGET.score(hf(input_ids=ids, **{**theirs, key: pv}).logits, ids)
    (g,) = torch.autograd.grad(f, pv)
    ref = (pv.detach() * g).sum(2)[0]  # (tiles | frames, H, W)
    got = input_x_gradient(ours, inputs, TARGET, space="pixels")
    assert abs(got.f - f.item()) <= 1e-7 * abs(f.item())
    assert rel(got.pixels[0], ref) <= 1e-5
    # tokens: d f / d inputs_embeds of transformers' decoder (the merged embeddings it receives)
    seen = {}

    def grab(module, args, kwargs):
        kwargs["inputs_embeds"].retain_grad()
        seen["e"] = kwargs["inputs_embeds"]
    handle = hf.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        f = TARGET.score(hf(input_ids=ids, **theirs).logits, ids)
        f.backward()
    finally:
        handle.remove()
    ref = (seen["e"].detach() * seen["e"].grad).sum(-1)[0]  # (T,)
    got = input_x_gradient(ours, inputs, TARGET, space="tokens")
    assert rel(got.scores, ref) <= 1e-5


def test_pixel_gradients_recompute_the_tower_a_few_frames_at_a_time():
    """A gradient to a video's pixels keeps no tower activations: the frames go through the tower
    RECOMPUTE_FRAME_BATCH at a time and each batch runs again when the backward reaches it; the gradient is the
    one autograd gives through the whole tower at once."""
    from llava_next.model import policy
    from llava_next.research.attribution import embeddings, logits

    ours, _, inputs, _ = pair64("video")
    F = inputs.videos[0].shape[0]
    assert F > policy.RECOMPUTE_FRAME_BATCH  # more than one batch
    sizes, forward = [], ours.vision_tower.forward

    def counted(pixels: torch.Tensor) -> torch.Tensor:  # (a module hook does not see checkpoint's reruns)
        sizes.append(pixels.shape[0])
        return forward(pixels)
    ours.vision_tower.forward = counted  # an instance attribute shadows the class's
    try:
        got = input_x_gradient(ours, inputs, TARGET, space="pixels")
    finally:
        del ours.vision_tower.forward
    batches = [min(policy.RECOMPUTE_FRAME_BATCH, F - i) for i in range(0, F, policy.RECOMPUTE_FRAME_BATCH)]
    assert sizes == batches + batches[::-1]  # the forward, then the backward's reruns (last batch first)
    leaf = inputs.videos[0].clone().requires_grad_(True)
    f = TARGET.score(logits(ours, embeddings(ours, dataclasses.replace(inputs, videos=[leaf]))), inputs.ids)
    (g,) = torch.autograd.grad(f, leaf)  # every activation kept, one tower call
    assert rel(got.pixels[0], (leaf.detach() * g).sum(1)) <= 1e-6  # (the attribution stores float32)


def test_integrated_gradients_on_pixels_are_complete():
    """sum of attributions == f(x) - f(black) for enough path points, with both rules (the real test video)."""
    ours, _, inputs, _ = pair64("video")
    for rule, tol in (("riemann", 2e-3), ("trapezoid", 5e-3)):  # 16 points: the midpoint rule's error is smaller
        a = integrated_gradients(ours, inputs, TARGET, space="pixels", baseline="black", steps=16, rule=rule)
        gap = a.f - a.f_baseline
        total = float(a.pixels[0].double().sum())
        assert abs(gap) > 1e-4  # the black video changes the answer's log-probability: something to attribute
        assert abs(total - gap) <= tol * abs(gap), (rule, total, gap)
        assert a.delta == pytest.approx(total - gap, abs=1e-12)
        # the per-token scores carry the same total (each pooled cell sums the pixels of its patches)
        assert float(a.scores.sum()) == pytest.approx(total, rel=1e-9)
    w_r, w_t = path_points(4, "riemann")[1], path_points(4, "trapezoid")[1]
    assert sum(w_r) == pytest.approx(1.0) and sum(w_t) == pytest.approx(1.0) and len(w_t) == 5


def test_integrated_gradients_on_tokens_equal_the_riemann_sum_through_transformers():
    ours, hf, inputs, _ = pair64("image")
    steps = 3
    a = integrated_gradients(ours, inputs, TARGET, space="tokens", steps=steps)
    with torch.no_grad():
        x = embeddings(ours, inputs)  # our merged embeddings (equal to transformers': tests/test_model.py)
    vis = (inputs.ids[0] == ours.config.image_token_id)[None, :, None]
    x0 = x.masked_fill(vis, 0.0)
    total = torch.zeros_like(x)
    for k in range(steps):
        e = (x0 + (k + 0.5) / steps * (x - x0)).requires_grad_(True)
        hidden = hf.model.language_model(inputs_embeds=e).last_hidden_state
        f = TARGET.score(hf.lm_head(hidden), inputs.ids)
        total += torch.autograd.grad(f, e)[0] / steps
    ref = ((x - x0) * total).sum(-1)[0]
    assert rel(a.scores, ref) <= 1e-5
    assert float(a.scores[~vis[0, :, 0]].abs().max()) == 0.0  # text rows are not on the path


def hf_attentions(kind: str, grads: bool):
    """transformers' eager attention probabilities per layer [(H, T, T)] (and their gradients of f)."""
    _, hf, inputs, theirs = pair64(kind)
    with torch.set_grad_enabled(grads):
        out = hf(input_ids=inputs.ids, output_attentions=True, **theirs)
        attn = list(out.attentions)
        if grads:
            for A in attn:
                A.retain_grad()
            TARGET.score(out.logits, inputs.ids).backward()
    return [A.detach()[0] for A in attn], [A.grad[0] for A in attn] if grads else None


@pytest.mark.parametrize("kind", ["image", "video"])
def test_rollout_equals_the_dense_product_of_transformers_attentions(kind):
    ours, _, inputs, _ = pair64(kind)
    attn, _ = hf_attentions(kind, grads=False)
    T = attn[0].shape[-1]
    R = torch.eye(T, dtype=torch.float64)
    for A in attn:  # Abnar & Zuidema: (mean over heads + I), rows normalised, product
        a_bar = A.mean(0) + torch.eye(T, dtype=torch.float64)
        R = (a_bar / a_bar.sum(-1, keepdim=True)) @ R
    q = TARGET.queries(T)
    got = rollout(ours, inputs, TARGET)
    assert torch.equal(got.queries, q)
    assert rel(got.scores, R[q].mean(0)) <= 1e-6
    assert float(got.scores.sum()) == pytest.approx(1.0)  # rows of a product of row-stochastic matrices


@pytest.mark.parametrize("kind", ["image", "video"])
def test_relevancy_equals_chefer_rule_on_transformers_attentions_and_gradients(kind):
    ours, _, inputs, _ = pair64(kind)
    attn, grads = hf_attentions(kind, grads=True)
    T = attn[0].shape[-1]
    R = torch.eye(T, dtype=torch.float64)
    for A, dA in zip(attn, grads):  # R = I; A_bar = mean_heads(clamp(dA * A, 0)); R = R + A_bar @ R
        R = R + (dA * A).clamp(min=0).mean(0) @ R
    q = TARGET.queries(T)
    got = relevancy(ours, inputs, TARGET)
    assert rel(got.scores, R[q].mean(0)) <= 1e-5


def hf_token_patch_weights(kind: str, hf, theirs: dict, n: int, P: int) -> torch.Tensor:
    """(visual tokens, n * P): how much each visual token reads each (tile | frame, patch) tower output, from
    transformers' own packing (AnyRes unpad + newlines) or video pooling fed one-hot channels."""
    if kind == "image":
        eye = torch.eye(n * P, dtype=torch.float64).reshape(n, P, n * P)
        packed, _ = hf.model.pack_image_features([eye], theirs["image_sizes"], "default",
                                                 torch.zeros(n * P, dtype=torch.float64))
        return torch.cat(packed) if isinstance(packed, (list, tuple)) else packed  # (tokens, n * P): newlines 0
    pooled = hf.model.vision_resampler(torch.eye(P, dtype=torch.float64).expand(n, P, P))  # (F, P', P)
    return torch.block_diag(*pooled)  # frame-major tokens


@pytest.mark.parametrize("kind", ["image", "video"])
def test_relevancy_through_the_tower_equals_chefer_rule_on_transformers_clip(kind):
    ours, hf, inputs, theirs = pair64(kind)
    key, seen = hf_pixels_key(kind), []

    def grab(module, args, out):  # CLIPAttention (eager) returns (output, attention probabilities)
        out[1].retain_grad()
        seen.append(out[1])
    layers = hf.model.vision_tower.encoder.layers
    handles = [layer.self_attn.register_forward_hook(grab) for layer in layers]
    try:  # pixels as a leaf: the tower's attention is on the graph of f
        out = hf(input_ids=inputs.ids, output_attentions=True, **{**theirs, key: theirs[key].clone().requires_grad_()})
        for A in out.attentions:
            A.retain_grad()
        TARGET.score(out.logits, inputs.ids).backward()
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(layers)  # one tower call: every tile (frame) at once
    used = [A for A in seen if A.grad is not None]  # the last layer (after the feature layer -2) reads nothing
    assert len(used) == len(ours.vision_tower.layers) == len(layers) - 1
    T = inputs.ids.shape[1]
    R = torch.eye(T, dtype=torch.float64)
    for A in out.attentions:  # the decoder's relevancy, as in the test above
        R = R + (A.grad[0] * A.detach()[0]).clamp(min=0).mean(0) @ R
    row = R[TARGET.queries(T)].mean(0)  # (T,)
    n, S = seen[0].shape[0], seen[0].shape[-1]
    P = S - 1  # CLIP: the CLS token first
    vis = (inputs.ids[0] == (ours.config.image_token_id if kind == "image" else ours.config.video_token_id))
    v = (row[vis] @ hf_token_patch_weights(kind, hf, theirs, n, P)).reshape(n, P)  # the decoder row on patches
    ref = []
    for t in range(n):  # Chefer on the tower: R_v = I; R_v = R_v + mean_h(clamp(dA * A, 0)) @ R_v, layer by layer
        Rv = torch.eye(S, dtype=torch.float64)
        for A in used:
            Rv = Rv + (A.grad[t] * A.detach()[t]).clamp(min=0).mean(0) @ Rv
        ref.append((torch.cat([torch.zeros(1, dtype=torch.float64), v[t]]) @ Rv)[1:])  # onto the patch inputs
    ref = torch.stack(ref)  # (n, P)
    got = relevancy(ours, inputs, TARGET, space="pixels")
    side = int(P ** 0.5)
    p = got.pixels[0].shape[-1] // side
    patches = got.pixels[0][:, :side * p, :side * p].reshape(n, side, p, side, p).sum((2, 4)).reshape(n, P)
    assert got.space == "pixels" and got.settings["tower_layers"] == len(ours.vision_tower.layers)
    assert ref.abs().max() > 0 and rel(patches, ref) <= 1e-5
    if kind == "video":  # every patch is in a pooled cell (AnyRes unpadding drops some: the tower spreads onto them)
        assert float(got.scores.sum()) == pytest.approx(float(got.pixels[0].sum()), rel=1e-9)


class LinearLogit:
    """A metric linear in ``ln_final.hook_normalized``: one logit (the lm head after the final norm's weight)."""

    def __init__(self, token: int) -> None:
        self.token = token

    def score(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, self.token]


def test_attribution_patching_against_real_patching():
    ours, _, clean, _ = pair64("video")
    gen = torch.Generator().manual_seed(0)
    noisy = [v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for v in clean.videos]
    corrupt = Inputs(clean.ids, videos=noisy)
    T = clean.ids.shape[1]
    # linear in the activation: the first-order estimate is the real effect at every position
    metric = LinearLogit(token=5)
    est = attribution_patching(ours, "ln_final.hook_normalized", clean, corrupt, metric)
    real = activation_patching(ours, "ln_final.hook_normalized", clean, corrupt, metric)
    assert rel(est, real) <= 1e-6
    # the answer's log-probability, a small patch at a decoder layer's residual: close to real patching
    positions = torch.arange(1, T - 3)
    est = attribution_patching(ours, "blocks.1.hook_resid_pre", clean, corrupt, TARGET)
    real = activation_patching(ours, "blocks.1.hook_resid_pre", clean, corrupt, TARGET, positions=positions)
    assert real[positions].abs().max() > 1e-6  # the patches matter
    assert rel(est[positions], real[positions]) <= 0.05, (est[positions], real[positions])
    assert real[0].isnan() and real[-1].isnan()  # positions not asked are not run


def test_pixel_scores_land_on_the_tokens_and_original_pixels():
    from llava_next.research import Provenance
    from llava_next.research.attribution import pixels_to_positions

    ours, _, inputs, _ = pair64("image")
    im = inputs.images[0]
    px = torch.zeros(im.pixel_values.shape[0], *im.pixel_values.shape[2:], dtype=torch.float64)
    px[0, 14:28, 28:42] = 1.0  # one patch of the base tile: patch row 1, column 2
    scores = pixels_to_positions(ours, inputs, [px])
    prov = Provenance.build(inputs.ids[0].tolist(), ours.config, image_sizes=[im.image_size])
    (hit,) = scores.nonzero().flatten().tolist()
    assert prov.kind_name(hit) == "image_base" and (int(prov.row[hit]), int(prov.col[hit])) == (1, 2)
    assert float(scores[hit]) == pytest.approx(196.0)  # the patch's 14 x 14 pixels
    pic = prov.to_pixels(scores, media=0, part="base")
    assert pic.shape == tuple(im.image_size)  # the original photo's (height, width)
    x0, y0, x1, y1 = prov.box[hit].tolist()
    assert pic[int((y0 + y1) / 2), int((x0 + x1) / 2)] == pytest.approx(196.0)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    from checkpoints import make_runnable_checkpoint
    from media import real_photo, real_video

    root = tmp_path_factory.mktemp("attr")
    directory, _ = make_runnable_checkpoint(root / "tiny-video-hf", kind="video")
    mp = pytest.MonkeyPatch()
    mp.setenv("LLAVA_NEXT_CACHE", str(root / "cache"))
    mp.setenv("LLAVA_NEXT_COMPILE", "0")
    base = ["trace", "--model", str(directory), "--image", str(real_photo("chelsea")), "--video", str(real_video()),
            "--frames", "2", "--dtype", "fp32", "--layers", "0", "--max-new-tokens", "2", "--json"]
    from test_cli_trace import _main
    out = _main(base + ["--attribute", "integrated_gradients", "--attribute-space", "pixels", "--baseline", "black",
                        "--ig-steps", "4", "--png", str(root / "png"), "What is the rabbit doing?"])
    rel_pixels = _main(base + ["--attribute", "relevancy", "--attribute-space", "pixels", "?"])
    bad = [_main(base + extra + ["?"]) for extra in (["--attribute", "input_x_grad", "--baseline", "black"],
                                                     ["--ig-steps", "4"], ["--attribute", "rollout", "--attribute-space",
                                                                           "pixels"],
                                                     ["--attribute", "rollout", "--activations", "int8"])]
    mp.undo()
    return root, out, bad, rel_pixels


def test_cli_trace_attribute_writes_scores_record_and_pictures(cli_run):
    from PIL import Image

    root, (code, stdout), bad, _ = cli_run
    assert code == 0, stdout
    out = json.loads(stdout)
    a = out["attribution"]
    assert a["method"] == "integrated_gradients" and a["space"] == "pixels" and a["baseline"] == "black"
    assert len(a["scores"]) == out["positions_total"] and a["target"]["answer_tokens"] == 2
    assert a["queries"] == [out["positions_total"] - 3, out["positions_total"] - 2]
    assert sum(a["scores"]) == pytest.approx(sum(a["sums"]["segments"].values()))
    rec = a["reproducibility"]
    assert {"version", "commit", "torch", "dtype", "device", "seed", "checkpoint_sha256", "switches"} <= set(rec)
    assert rec["switches"]["ig_steps"] == 4 and len(rec["checkpoint_sha256"]) == 64
    pngs = [p for p in out["png"] if "integrated_gradients" in p]
    assert sorted(p.rsplit("/", 1)[1] for p in pngs) == ["image0_integrated_gradients.png",
                                                          "video0_integrated_gradients.png",
                                                          "video0_integrated_gradients_original.png"]
    for png in pngs:
        with Image.open(png) as im:
            assert json.loads(im.text["llava-next"])["switches"]["attribute"] == "integrated_gradients"
    # the whole frames (as the file stores them, the crop outlined) and the model's view: two figures
    with Image.open(root / "png" / "video0_integrated_gradients_original.png") as whole, \
            Image.open(root / "png" / "video0_integrated_gradients.png") as seen:
        assert whole.size != seen.size
    said = ["act with --attribute integrated_gradients", "act with --attribute METHOD", "tokens only",
            "drop --quantize / --activations / --adapter"]
    for (bad_code, bad_out), words in zip(bad, said):  # a switch without its method is refused, not ignored
        assert bad_code == 2 and words in bad_out, bad_out


def test_cli_trace_relevancy_through_the_tower(cli_run):
    code, stdout = cli_run[3]
    assert code == 0, stdout
    out = json.loads(stdout)
    a = out["attribution"]
    assert a["method"] == "relevancy" and a["space"] == "pixels" and a["settings"]["through"] == "decoder+vision"
    assert a["settings"]["tower_layers"] >= 1 and len(a["scores"]) == out["positions_total"]
    assert a["sums"]["segments"]["video"] > 0 and a["sums"]["segments"]["image_base"] > 0  # both media reached
    assert a["reproducibility"]["switches"]["attribute_space"] == "pixels"
