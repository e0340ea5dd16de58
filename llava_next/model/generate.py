"""Generation with the decoder's static KV cache: prefill, one-token decode, sampling, the loop.

    tokens = generate(decoder, input_ids=ids, max_new_tokens=64)                        # greedy
    tokens = generate(decoder, input_embeds=e, attention_mask=m, max_new_tokens=64,
                      temperature=0.7, top_p=0.9, seed=0, eos_token_id=[2])              # sampled, batch
    for step in stream(decoder, input_ids=ids, max_new_tokens=64): print(step)          # (B,) per step

The loop is the same for every engine (model/engines.py: eager, the compiled CPU decode; reduce/engine.py:
token reduction): ``engine.prefill`` runs the prompt and fills the cache, ``engine.decode`` one token per
row against it, and in between
- ``sample``: greedy when temperature == 0, else temperature + top-p (nucleus) sampling drawn with a
  seeded ``torch.Generator`` (the exponential-race trick: argmax(p / Exp(1)) ~ Categorical(p),
  no host sync).

Batches are left padded: ``attention_mask`` (B, T), 1/True for real tokens. Row r's RoPE positions are
cumsum(mask) - 1 (what transformers' ``generate`` does), and padded keys are masked out. The
multimodal model passes ``input_embeds`` (image features already spliced in) with the same mask.

Output: (B, n) new tokens, n <= max_new_tokens. With ``eos_token_id`` a row stops at its first EOS
(the EOS is kept) and is filled with ``pad_token_id`` afterwards; the loop ends when every row has
stopped. By default the EOS is ``decoder.config.eos_token_id``; pass ``eos_token_id=()`` to never stop.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from .decoder import Decoder
from .engines import Engine, choose_engine, decode_kernel

_FROM_CONFIG = object()  # default for eos_token_id / pad_token_id: read decoder.config


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. Greedy (argmax) when temperature == 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set of most likely tokens whose mass reaches ``top_p``
    (the most likely token is always kept). Not renormalised: ``sample`` does not need it."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens ranked above
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) left-padding mask -> (B, T) RoPE positions cumsum(mask) - 1 (0 on padding)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


@torch.no_grad()
def stream(model: Decoder, input_ids: torch.Tensor | None = None, *, input_embeds: torch.Tensor | None = None,
           attention_mask: torch.Tensor | None = None, max_new_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0, seed: int | None = None, eos_token_id: int | Sequence[int] | None | object = _FROM_CONFIG,
           pad_token_id: int | None | object = _FROM_CONFIG, compile_step: bool | None = None,
           engine: Engine | None = None,
           on_logits: Callable[[torch.Tensor, int], None] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next (B,) tokens, one step at a time (see the module docstring for the arguments).
    ``engine``: who runs the decoder (model/engines.py; default ``choose_engine``: the whole-step compiled
    graph when it pays for itself, ``compile_step`` True / False = always / never, else eager).
    ``on_logits(logits, step)``: called with every step's (B, V) logits before sampling (step 0: the prompt's)."""
    if not max_new_tokens >= 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if (input_ids is None) == (input_embeds is None):
        raise ValueError("pass exactly one of input_ids (B, T) or input_embeds (B, T, hidden_size)")
    embeds = model.embed_tokens(input_ids) if input_embeds is None else input_embeds  # (B, T, C)
    B, T, _ = embeds.shape
    device = embeds.device
    eos = _eos_ids(model, eos_token_id, device)
    pad = model.config.pad_token_id if pad_token_id is _FROM_CONFIG else pad_token_id
    if eos is not None and pad is None:
        pad = int(eos[0])
    key_mask, position_ids = _padding(attention_mask, B, T, device)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()  # nondeterministic
        else:
            generator.manual_seed(seed)

    engine = engine if engine is not None else choose_engine(model, max_new_tokens, device, compile_step)
    engine.setup_caches(model, B, T, max_new_tokens, embeds.dtype, device)
    kernel = decode_kernel(model, B, T, max_new_tokens, embeds.dtype, device)  # None: the facade
    logits = engine.prefill(model, embeds, position_ids, key_mask)
    next_pos = position_ids[:, -1:] + 1  # (B, 1) RoPE position of the next token
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        if on_logits is not None:
            on_logits(logits, step)
        token = sample(logits, temperature, top_p, generator)  # (B,)
        if eos is None:
            yield token
        else:  # stopped rows show pad_token_id (which may be no valid id) but keep decoding their sample
            yield token.masked_fill(done, pad)
            done = done | torch.isin(token, eos)
        if step == max_new_tokens - 1 or (eos is not None and bool(done.all())):
            return
        logits = engine.decode(model, token, step, next_pos, kernel)
        next_pos += 1


def generate(model: Decoder, input_ids: torch.Tensor | None = None, *, input_embeds: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, eos_token_id: int | Sequence[int] | None | object = _FROM_CONFIG,
             pad_token_id: int | None | object = _FROM_CONFIG,
             on_token: Callable[[torch.Tensor], None] | None = None, compile_step: bool | None = None,
             engine: Engine | None = None) -> torch.Tensor:
    """(B, n) new tokens, n <= max_new_tokens; ``on_token`` is called with each step's (B,) tokens."""
    steps = []
    for token in stream(model, input_ids, input_embeds=input_embeds, attention_mask=attention_mask,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id, compile_step=compile_step,
                        engine=engine):
        steps.append(token)
        if on_token is not None:
            on_token(token)
    return torch.stack(steps, dim=1)


def _padding(attention_mask: torch.Tensor | None, B: int, T: int,
             device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The prompt's key mask (B, T) (None without padding) and RoPE positions (B, T) from a left-padding mask."""
    position_ids = torch.arange(T, device=device).expand(B, T)
    if attention_mask is None:
        return None, position_ids
    if attention_mask.shape != (B, T):
        raise ValueError(f"attention_mask must have shape (batch, tokens) = {(B, T)}, got {tuple(attention_mask.shape)}")
    attention_mask = attention_mask.to(device=device, dtype=torch.bool)
    if not attention_mask[:, -1].all():
        raise ValueError("attention_mask has padding at the end of a row: generation needs left padding")
    if attention_mask.all():
        return None, position_ids
    return attention_mask, positions_from_mask(attention_mask)


def _eos_ids(model: Decoder, eos_token_id: object, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is _FROM_CONFIG:
        eos_token_id = model.config.eos_token_id
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None
