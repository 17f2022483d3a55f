"""Generate text from a trained run: temperature, top-k, top-p, a KV cache, streamed output."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from tinylm.data.tokenizer import Tokenizer
from tinylm.errors import UserError
from tinylm.model import GPT
from tinylm.rundir import LoadedRun, load_run

__all__ = ["LoadedRun", "SamplingOptions", "generate", "load_run", "pick_next", "sample_text"]  # load_run: old path


@dataclass
class SamplingOptions:
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    stop_at_eot: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # nan passes a plain < 0 test
            raise UserError(f"--temperature must be a finite number, at least 0 (0 is greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError("--top-p must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise UserError("--top-k must be at least 1")


def pick_next(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) next tokens."""
    if opts.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / opts.temperature
    if opts.top_k is not None and opts.top_k < logits.shape[-1]:
        kth = torch.topk(logits, opts.top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p is not None and opts.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > opts.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


@torch.no_grad()
def generate(
    model: GPT,
    prompt: list[int],
    opts: SamplingOptions,
    tokenizer: Tokenizer,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one at a time (stopping at <|endoftext|> if asked).

    Only ids the tokenizer can decode are drawn: output rows beyond its vocabulary (a
    vocabulary padded to a multiple of 64, as the quality preset's) are left out.
    """
    block = model.config.block_size
    device = model.lm_head.weight.device
    context = list(prompt[-block:])
    cache = None
    pending = torch.tensor([context], device=device)
    for _ in range(opts.max_new_tokens):
        if use_cache:
            if cache is not None and cache[0][0].shape[2] >= block:
                # the window is full: rebuild the cache over the most recent tokens
                context = context[-(block // 2) :]
                cache, pending = None, torch.tensor([context], device=device)
            logits, cache = model.forward_cached(pending, cache)
        else:
            logits = model(torch.tensor([context[-block:]], device=device))[0][:, -1]
        token = pick_next(logits[:, : tokenizer.vocab_size].float(), opts, generator)
        next_id = int(token.item())
        if opts.stop_at_eot and next_id == tokenizer.eot_id:
            return
        yield next_id
        context.append(next_id)
        pending = token.view(1, 1)


def sample_text(
    run: LoadedRun,
    prompt: str,
    opts: SamplingOptions,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """Generate a continuation of prompt; on_text receives each new piece as it is decoded."""
    tok = run.tokenizer
    ids = tok.encode_batch([prompt])[0] if prompt else [tok.eot_id]
    block = run.cfg.model.block_size
    if len(ids) > block:
        raise UserError(f"the prompt is {len(ids)} tokens, longer than the block size ({block})")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=run.model.lm_head.weight.device).manual_seed(seed)
    new: list[int] = []
    shown = ""
    for token in generate(run.model, ids, opts, tok, generator):
        new.append(token)
        text = tok.decode(new)
        if on_text is not None and not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
            on_text(text[len(shown) :])
            shown = text
    text = tok.decode(new)
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown) :])
    return text
