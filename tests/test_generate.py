"""Generation: greedy decoding token-identical to transformers' generate, seeded sampling, top-p, EOS,
left-padded batches and streaming."""

import pytest
import torch

from llava_next.model.generate import generate, positions_from_mask, sample, stream, top_p_filter
from test_decoder import hf_and_ours, ids

N = 32


def left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(r.shape[-1] for r in rows)
    batch = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, T - r.shape[-1]:], mask[i, T - r.shape[-1]:] = r, 1
    return batch, mask


@pytest.mark.parametrize("kind,factor", [("llama", 1.0), ("mistral", 2.0)])
def test_greedy_matches_transformers_generate(kind, factor):
    hf, ours = hf_and_ours(kind, factor)
    x = ids(1, 12)
    with torch.no_grad():
        ref = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=N,
                          eos_token_id=None, pad_token_id=0)[:, x.shape[1]:]
    out = generate(ours, x, max_new_tokens=N, eos_token_id=())
    assert ref.shape == (1, N) and len(set(ref[0].tolist())) > 3  # a real sequence, not one token repeated
    assert torch.equal(out, ref)
    assert torch.equal(generate(ours, input_embeds=ours.embed_tokens(x), max_new_tokens=N, eos_token_id=()), ref)


def test_left_padded_batch_matches_transformers_and_single_rows():
    hf, ours = hf_and_ours("mistral", 2.0)
    rows = [ids(1, 14, seed=3)[0], ids(1, 5, seed=4)[0], ids(1, 9, seed=5)[0]]
    batch, mask = left_pad(rows)
    with torch.no_grad():
        ref = hf.generate(batch, attention_mask=mask, do_sample=False, max_new_tokens=N,
                          eos_token_id=None, pad_token_id=0)[:, batch.shape[1]:]
    out = generate(ours, batch, attention_mask=mask, max_new_tokens=N, eos_token_id=())
    assert torch.equal(out, ref)
    for i, r in enumerate(rows):
        assert torch.equal(generate(ours, r[None], max_new_tokens=N, eos_token_id=()), out[i:i + 1])


def test_positions_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_sampling_is_deterministic_given_a_seed():
    _, ours = hf_and_ours()
    x = ids(2, 6)
    kw = dict(max_new_tokens=16, temperature=1.5, top_p=0.95, eos_token_id=())
    a, b = generate(ours, x, seed=7, **kw), generate(ours, x, seed=7, **kw)
    c = generate(ours, x, seed=8, **kw)
    greedy = generate(ours, x, max_new_tokens=16, eos_token_id=())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, greedy)


def test_tiny_top_p_is_greedy():
    _, ours = hf_and_ours()
    x = ids(2, 6)
    greedy = generate(ours, x, max_new_tokens=16, eos_token_id=())
    assert torch.equal(generate(ours, x, max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=0, eos_token_id=()),
                       greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    assert top_p_filter(probs, 0.5).nonzero()[:, 1].tolist() == [1]  # 0.5 alone reaches 0.5
    assert top_p_filter(probs, 0.7).nonzero()[:, 1].tolist() == [1, 3]
    assert top_p_filter(probs, 0.85).nonzero()[:, 1].tolist() == [0, 1, 3]
    assert top_p_filter(probs, 1.0).nonzero()[:, 1].tolist() == [0, 1, 2, 3]
    # and sampling draws only from the kept set, in proportion
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(probs.log(), 1.0, 0.7, g) for _ in range(4000)]).flatten()
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - 0.5 / 0.8) < 0.03


def test_eos_stops_rows_and_pads_them():
    _, ours = hf_and_ours()
    x = ids(2, 6)
    free = generate(ours, x, max_new_tokens=12, eos_token_id=())
    eos = int(free[0, 3])  # row 0 emits it at step 3 (or earlier)
    first = [int((free[r] == eos).nonzero()[0]) if (free[r] == eos).any() else None for r in range(2)]
    out = generate(ours, x, max_new_tokens=12, eos_token_id=[eos], pad_token_id=-1)
    stop = [f if f is not None else 11 for f in first]
    assert out.shape[1] == max(stop) + 1  # the loop ends when every row has stopped
    for r in range(2):
        assert torch.equal(out[r, :stop[r] + 1], free[r, :stop[r] + 1])
        assert (out[r, stop[r] + 1:] == -1).all()


def test_streaming_yields_the_same_tokens():
    _, ours = hf_and_ours()
    x = ids(1, 6)
    seen = []
    out = generate(ours, x, max_new_tokens=8, eos_token_id=(), on_token=seen.append)
    streamed = list(stream(ours, x, max_new_tokens=8, eos_token_id=()))
    assert len(seen) == len(streamed) == 8
    assert torch.equal(torch.stack(seen, 1), out) and torch.equal(torch.stack(streamed, 1), out)


def test_bad_arguments_raise_clear_errors():
    _, ours = hf_and_ours()
    x = ids(1, 4)
    for kw, match in [(dict(temperature=-1), "temperature"), (dict(top_p=0.0), "top_p"),
                      (dict(max_new_tokens=0), "max_new_tokens"),
                      (dict(attention_mask=torch.tensor([[1, 1, 1, 0]])), "left padding"),
                      (dict(attention_mask=torch.ones(1, 3)), "attention_mask must have shape")]:
        with pytest.raises(ValueError, match=match):
            generate(ours, x, **{"max_new_tokens": 2, **kw})
