"""Sampling text from a model: top-k / temperature sampling without a KV cache (the model recomputes the window), for
any model (dense, upcycled, or a dense model run as an MoE)."""
from __future__ import annotations

from collections.abc import Collection

import torch

from sparsetrain.errors import UserError
from sparsetrain.nn.model import Transformer


@torch.no_grad()
def generate(model: Transformer, tokenizer, prompt: str, max_new_tokens: int = 100, top_k_sampling: int = 50,
             temperature: float = 0.8, seed: int = 0, stop_id: int | Collection[int] | None = None) -> str:
    """Sample a continuation of `prompt` (dense or MoE mode alike; no KV cache: the model recomputes the window).
    temperature 0 = greedy; top_k_sampling 0 = the whole vocabulary; `stop_id`: the id, or ids (a model may have
    several eos tokens), that end it. Returns the continuation's text."""
    if max_new_tokens < 0 or temperature < 0 or top_k_sampling < 0:
        raise UserError("max_new_tokens, temperature and top-k must be >= 0")
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise UserError("the prompt is empty after tokenization; pass some text with --prompt")
    stops = {stop_id} if isinstance(stop_id, int) else set(stop_id or ())
    was_training = model.training
    model.eval()
    device = model.wte.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], device=device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.args.max_seq_len:])[0, -1].float()
        if temperature == 0:
            nxt = logits.argmax().view(1)
        else:
            logits = logits / temperature
            if top_k_sampling:
                kth = logits.topk(min(top_k_sampling, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=gen)
        idx = torch.cat([idx, nxt.view(1, 1)], dim=1)
        if stops and nxt.item() in stops:
            break
    model.train(was_training)
    return tokenizer.decode(idx[0, len(ids):].tolist())
