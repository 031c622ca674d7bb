"""`sparsetrain generate`: a trained model's continuation of a prompt, dense and (with --moe K) run as an MoE."""
from __future__ import annotations

from pathlib import Path

from sparsetrain.data.tokenizer_files import load_tokenizer, stop_ids, tokenizer_file, vocab_entries
from sparsetrain.errors import UserError
from sparsetrain.methods.ssd.moefy import prepare_moe
from sparsetrain.nn.generate import generate
from sparsetrain.training.build import load_model


def model_tokenizer_for(path: str | Path, vocab_size: int, tokenizer: str | None = None, data: str | None = None):
    """(tokenizer, its tokenizer.json) for the model at `path`: `tokenizer` (--tokenizer), else the `data` folder's
    (--data), else the model's own (an imported model's, or its run's data folder's); a one-line error when there
    is none, or when it has more ids than the model has embeddings (someone else's tokenizer)."""
    tok_json = tokenizer_file(tokenizer or data or path)
    tok = load_tokenizer(tok_json)
    if vocab_entries(tok) > vocab_size:
        raise UserError(f"the tokenizer {tok_json} has {vocab_entries(tok):,} ids, the model at {path} only "
                        f"{vocab_size:,} embeddings: it is not this model's tokenizer; pass the one it was trained "
                        "with (--tokenizer DIR)")
    return tok, tok_json


def generate_both(path: str | Path, prompt: str, moe: int | None = None, experts: int | None = None,
                  device: str = "cpu", tokenizer: str | None = None, data: str | None = None,
                  **sampling) -> dict[str, str]:
    """`sparsetrain generate`: the dense model's continuation, and with `moe` = K the same model's as an MoE with
    top-K experts (same seed), for comparison."""
    model, _, _ = load_model(path, device)
    tok, tok_json = model_tokenizer_for(path, model.args.vocab_size, tokenizer, data)
    stop = stop_ids(tok_json, tok)
    out = {"dense": generate(model, tok, prompt, stop_id=stop, **sampling)}
    if moe:
        prepare_moe(model, path, moe, experts)
        out[f"moe_top{moe}"] = generate(model, tok, prompt, stop_id=stop, **sampling)
    return out
