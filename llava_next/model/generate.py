"""Generation with the decoder's static KV cache: prefill, one-token decode, sampling, the loop.

    tokens = generate(decoder, input_ids=ids, max_new_tokens=64)                        # greedy
    tokens = generate(decoder, input_embeds=e, attention_mask=m, max_new_tokens=64,
                      temperature=0.7, top_p=0.9, seed=0, eos_token_id=[2])              # sampled, batch
    for step in stream(decoder, input_ids=ids, max_new_tokens=64): print(step)          # (B,) per step

Split as in gpt-fast so each piece can be timed (and compiled) on its own:
- ``prefill``: the whole prompt in one forward, filling the cache; logits of the last position only.
- ``decode_one_token``: one token per row against the cache.
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

from typing import Callable, Iterator, Protocol, Sequence

import torch

from . import compiled_step, cpu_decode
from .decoder import Decoder

_FROM_CONFIG = object()  # default for eos_token_id / pad_token_id: read decoder.config


class LayerRunner(Protocol):
    """Runs prefill and each decode step itself (e.g. ``llava_next.reduce.ReducedRunner``: it prunes tokens
    between layers, so layer ranges hold KV caches of different lengths). Same arguments as ``prefill``;
    ``decode`` gets the step index (0 = the first token after the prompt) and the (B, 1) RoPE positions.
    Optional ``setup_caches(model, batch, max_len, dtype, device)``: allocates the KV caches instead of
    ``model.setup_caches`` (a pruner gives the layers after it shorter caches)."""

    def prefill(self, model: Decoder, input_embeds: torch.Tensor, position_ids: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor: ...

    def decode(self, model: Decoder, token: torch.Tensor, step: int, position_ids: torch.Tensor) -> torch.Tensor: ...


@torch.no_grad()
def prefill(model: Decoder, input_embeds: torch.Tensor, position_ids: torch.Tensor,
            key_mask: torch.Tensor | None) -> torch.Tensor:
    """Run the (B, T, C) prompt through the decoder, writing cache slots 0..T-1. Returns (B, V) logits
    of the last position."""
    T = input_embeds.shape[1]
    input_pos = torch.arange(T, device=input_embeds.device)
    return model(input_embeds=input_embeds, input_pos=input_pos, position_ids=position_ids,
                 key_mask=key_mask, last_only=True)[:, -1]


@torch.no_grad()
def decode_one_token(model: Decoder, token: torch.Tensor, input_pos: torch.Tensor, position_ids: torch.Tensor,
                     key_mask: torch.Tensor | None) -> torch.Tensor:
    """token (B,) at cache slot input_pos (1,) and RoPE positions (B, 1) -> (B, V) next-token logits."""
    return model(token[:, None], input_pos=input_pos, position_ids=position_ids, key_mask=key_mask)[:, -1]


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
           runner: LayerRunner | None = None) -> Iterator[torch.Tensor]:
    """Yield the next (B,) tokens, one step at a time (see the module docstring for the arguments).
    ``compile_step``: decode with the whole-step compiled graph (compiled_step.py): None = when it pays
    for itself (``worth_compiling``), True / False = always / never. ``runner``: prefill and decode through a
    ``LayerRunner`` (token reduction, llava_next.reduce) instead of the whole decoder at once; the compiled
    step is then not used."""
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

    # padding: positions per row, and a key mask over every slot this run will fill
    key_mask = None
    position_ids = torch.arange(T, device=device).expand(B, T)
    if attention_mask is not None:
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask must have shape (batch, tokens) = {(B, T)}, got {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
        if not attention_mask[:, -1].all():
            raise ValueError("attention_mask has padding at the end of a row: generation needs left padding")
        if not attention_mask.all():
            key_mask = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)
            key_mask[:, :T] = attention_mask
            position_ids = positions_from_mask(attention_mask)

    use_step = runner is None and compiled_step.worth_compiling(model, max_new_tokens, device, compile_step)
    cache_len = compiled_step.cache_length(T, max_new_tokens) if use_step else T + max_new_tokens
    if runner is not None and hasattr(runner, "setup_caches"):  # e.g. a pruner sizes the caches after pruning
        runner.setup_caches(model, B, cache_len, embeds.dtype, device)
    else:
        model.setup_caches(B, cache_len, dtype=embeds.dtype, device=device)
    if use_step:  # the compiled step reads the whole static cache: a (B, S) mask of real (non-padding) slots
        static_mask = torch.ones(B, model.cache_shape[1], dtype=torch.bool, device=device)
        if key_mask is not None:
            static_mask[:, :T] = key_mask[:, :T]
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()  # nondeterministic
        else:
            generator.manual_seed(seed)

    if runner is None:
        logits = prefill(model, embeds, position_ids, None if key_mask is None else key_mask[:, :T])
    else:  # a token-reduction schedule (llava_next.reduce) runs the layers itself
        logits = runner.prefill(model, embeds, position_ids, None if key_mask is None else key_mask[:, :T])
    cfg = model.config  # the eager step's compiled attention (cpu_decode.py): only where it pays for itself
    kv_bytes = 2 * cfg.num_layers * B * cfg.num_kv_heads * (T + max_new_tokens / 2) * cfg.head_dim * embeds.element_size()
    attention_compile = cpu_decode.worth_compiling(kv_bytes, max_new_tokens)
    next_pos = position_ids[:, -1:] + 1  # (B, 1) RoPE position of the next token
    input_pos = torch.tensor([T], device=device)  # its cache slot
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = sample(logits, temperature, top_p, generator)  # (B,)
        if eos is None:
            yield token
        else:  # stopped rows show pad_token_id (which may be no valid id) but keep decoding their sample
            yield token.masked_fill(done, pad)
            done = done | torch.isin(token, eos)
        if step == max_new_tokens - 1 or (eos is not None and bool(done.all())):
            return
        kv_len = T + step + 1
        if runner is not None:
            with cpu_decode.for_request(attention_compile):
                logits = runner.decode(model, token, step, next_pos)
        else:
            logits = compiled_step.run_step(model, token, input_pos, next_pos, static_mask) if use_step else None
            if logits is not None:
                _call_forward_hooks(model, logits[:, None])  # what model(...) would have run (e.g. finiteness checks)
            else:
                with cpu_decode.for_request(attention_compile):
                    logits = decode_one_token(model, token, input_pos, next_pos,
                                              None if key_mask is None else key_mask[:, :kv_len])
        input_pos += 1
        next_pos += 1


def generate(model: Decoder, input_ids: torch.Tensor | None = None, *, input_embeds: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, eos_token_id: int | Sequence[int] | None | object = _FROM_CONFIG,
             pad_token_id: int | None | object = _FROM_CONFIG,
             on_token: Callable[[torch.Tensor], None] | None = None, compile_step: bool | None = None,
             runner: LayerRunner | None = None) -> torch.Tensor:
    """(B, n) new tokens, n <= max_new_tokens; ``on_token`` is called with each step's (B,) tokens."""
    steps = []
    for token in stream(model, input_ids, input_embeds=input_embeds, attention_mask=attention_mask,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id, compile_step=compile_step,
                        runner=runner):
        steps.append(token)
        if on_token is not None:
            on_token(token)
    return torch.stack(steps, dim=1)


def _call_forward_hooks(model: Decoder, output: torch.Tensor) -> None:
    """Run ``model``'s forward hooks on ``output`` (the compiled step bypasses ``model.__call__``)."""
    for hook in list(model._forward_hooks.values()):
        hook(model, (), output)


def _eos_ids(model: Decoder, eos_token_id: object, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is _FROM_CONFIG:
        eos_token_id = model.config.eos_token_id
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None
