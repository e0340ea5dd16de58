"""Gradients through the whole model (issue 29.1): the loss and the gradients of the decoder's input embeddings
and of every weight equal transformers' (fp32, tiny llava-hf LLaVA-NeXT with a real photo and LLaVA-NeXT-Video
with real video frames, the same weights), with and without gradient checkpointing; the fast inference layers
(prepacked, quantized) pass a gradient to their input; nothing is ever a silent None."""

from __future__ import annotations

import copy

import pytest
import torch

from research_models import tiny_pair
from llava_next.model.keymaps import map_key
from llava_next.model.llava import PackedLinear
from llava_next.model.training import IGNORE_INDEX, TrainingEngine, causal_lm_loss


def labels_for(ids: torch.Tensor, cfg) -> torch.Tensor:
    """Supervise every text token after the media (what an answer is), -100 on the media placeholders."""
    labels = ids.clone()
    media = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
    labels[media] = IGNORE_INDEX
    labels[:, :2] = IGNORE_INDEX
    return labels


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_and_every_gradient_equal_transformers(kind, checkpointing):
    ours0, hf0, ids, mine, theirs = tiny_pair(kind)
    ours, hf = copy.deepcopy(ours0).float().train(), copy.deepcopy(hf0).float().train()
    for p in [*ours.parameters(), *hf.parameters()]:
        p.requires_grad_(True)
    labels = labels_for(ids, ours.config)

    seen = {}
    ours.language_model.hook_embed.add_hook(lambda x, hook: seen.setdefault("ours", x).retain_grad())

    def grab(module, args, kwargs):  # the merged embeddings transformers' decoder receives
        kwargs["inputs_embeds"].retain_grad()
        seen["hf"] = kwargs["inputs_embeds"]
    hf.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)

    loss = causal_lm_loss(ours(ids, **mine, engine=TrainingEngine(checkpointing=checkpointing)), labels)
    loss.backward()
    ref = hf(input_ids=ids, labels=labels, **theirs).loss
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert rel(seen["ours"].grad, seen["hf"].grad) <= 1e-5

    hf_params = dict(hf.named_parameters())
    # a gradient that is zero in exact arithmetic (a key bias: softmax ignores a shift of every score) is
    # rounding noise in both, so each comparison also allows 1e-9 of the largest gradient of the model
    noise = 1e-9 * max(p.grad.abs().max().item() for p in hf_params.values() if p.grad is not None)
    compared = 0
    our_params = dict(ours.named_parameters())
    for name, p in hf_params.items():
        target = map_key("llava_hf_new", name)
        if not isinstance(target, str) or target not in our_params:  # vision layers past the feature layer: we
            assert p.grad is None or not p.grad.any(), name  # never build them, transformers computes them unused
            continue
        mine_p = our_params[target]
        if p.grad is None or mine_p.grad is None:  # unused here (the newline of a video-only prompt): both zero
            assert (p.grad is None or not p.grad.any()) and (mine_p.grad is None or not mine_p.grad.any()), target
            continue
        err = (mine_p.grad - p.grad).abs().max().item()
        assert err <= 1e-5 * p.grad.abs().max().item() + noise, (target, err, p.grad.abs().max().item())
        compared += 1
    assert compared > 40  # vision tower, projector, newline (image), decoder, head


def test_checkpointing_recomputes_blocks_and_gives_the_same_gradients():
    ours0, _, ids, mine, _ = tiny_pair("video")
    labels = labels_for(ids, ours0.config)
    grads = []
    for checkpointing in (False, True):
        ours = copy.deepcopy(ours0).float().train()
        calls = []
        ours.language_model.layers[1].input_layernorm.register_forward_hook(lambda *a: calls.append(1))
        causal_lm_loss(ours(ids, **mine, engine=TrainingEngine(checkpointing)), labels).backward()
        grads.append(ours.language_model.layers[0].self_attn.q_proj.weight.grad.clone())
        assert len(calls) == (2 if checkpointing else 1)  # the block ran again in the backward
    assert torch.equal(grads[0], grads[1])


def test_packed_and_quantized_layers_pass_gradients_to_their_input(tmp_path):
    """A prepacked linear whose weight is a view of a mmapped file, int8 and int4: d(loss)/dx equals autograd
    through F.linear on the same (dequantized) weight; a packed copy (no plain weight kept) raises clearly."""
    from safetensors.torch import load_file, save_file

    from llava_next.model.quant import Int4Linear, Int8Linear

    w = torch.randn(64, 128)
    save_file({"w": w}, tmp_path / "w.safetensors")
    linear = torch.nn.Linear(128, 64, bias=False)
    linear.weight = torch.nn.Parameter(load_file(tmp_path / "w.safetensors")["w"], requires_grad=False)
    cases = [(PackedLinear(linear), w), (Int8Linear.from_linear(torch.nn.Linear(128, 64)), None),
             (Int4Linear.from_linear(torch.nn.Linear(128, 64), group_size=32), None),
             (Int8Linear.from_linear(torch.nn.Linear(128, 1200)), None)]  # 3 chunks of output rows, one short
    for layer, weight in cases:
        weight = layer.dequantized(torch.float32) if weight is None else weight
        for rows in (1, 3):  # a decode-sized call takes the int kernels' path without a gradient
            x = torch.randn(rows, 128, requires_grad=True)
            layer(x).pow(2).sum().backward()
            x2 = x.detach().clone().requires_grad_(True)
            torch.nn.functional.linear(x2, weight, layer.bias).pow(2).sum().backward()
            assert rel(x.grad, x2.grad) <= 1e-4, type(layer).__name__
    for layer in (cases[1][0], cases[2][0]):  # the frozen base keeps nothing for the backward (no float weight)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            layer(torch.randn(3, 128, requires_grad=True))
        assert saved == [], [tuple(t.shape) for t in saved]
    copy_linear = torch.nn.Linear(128, 64, bias=False)
    packed = PackedLinear(copy_linear)  # anonymous memory: the plain weight is freed
    x = torch.randn(2, 128, requires_grad=True)
    with pytest.raises(RuntimeError, match="load the model without pack_for_cpu to train"):
        packed(x).sum().backward()


def test_a_batch_without_padding_runs_the_causal_kernel(monkeypatch):
    """An all-true attention mask (what ``collate`` gives a batch without padding) is dropped: SDPA gets no mask
    (its causal kernel skips the upper triangle; a mask makes it compute all T x T), and the logits are the same."""
    import torch.nn.functional as F

    import llava_next.model.attention as attention

    ours, _, ids, mine, _ = tiny_pair("video")
    masks, sdpa = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        plain = ours(ids, **mine, engine=TrainingEngine())
        masked = ours(ids, **mine, attention_mask=torch.ones(ids.shape, dtype=torch.bool), engine=TrainingEngine())
    assert torch.equal(plain, masked)
    decoder_calls = masks[-len(ours.language_model.layers):]
    assert decoder_calls and all(m is None for m in decoder_calls)
