"""Where a tokenizer is, and what travels with it.

A tokenizer is a Hugging Face `tokenizers` file (tokenizer.json) and its settings beside it (TOKENIZER_FILES:
tokenizer_config.json with the special tokens and chat template, ...). A prepared data folder holds the one its
tokens were made with; a model folder made by `convert hf-import` holds the Hugging Face model's own, with the
special-token ids of its config.json in `special_tokens.json`; a run or a checkpoint holds none, and uses its
data folder's (`data.dir`). `tokenizer_file` finds it from any of these folders, and never elsewhere.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer

from sparsetrain import config
from sparsetrain.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
SPECIAL_IDS_FILE = "special_tokens.json"  # bos/eos/pad token ids, as the Hugging Face config.json gave them


def model_tokenizer(path: str | Path) -> Path | None:
    """tokenizer.json of a model, run or checkpoint folder: the folder's own (an imported model), else its data
    folder's (data.dir of its config.toml: a run trained by the toolkit); None when it has neither."""
    p = Path(path).expanduser()
    if (p / "tokenizer.json").is_file():
        return p / "tokenizer.json"
    # a checkpoint's config.toml is its run's, two levels up
    for run_config in (p / "config.toml", p.parent.parent / "config.toml"):
        if run_config.is_file() and (run_config.parent == p or (p / "model.safetensors").is_file()):
            data_dir = config.load(run_config).data.dir
            if data_dir and (Path(data_dir) / "tokenizer.json").is_file():
                return Path(data_dir) / "tokenizer.json"
            return None
    return None


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.json of `path`: the file itself, a folder holding it (data, tokenizer or imported model
    folder), or a model, run or checkpoint folder's own (`model_tokenizer`); never another."""
    p = Path(path).expanduser()
    f = p if p.is_file() else p / "tokenizer.json"
    if f.is_file():
        return f
    if (p / "config.toml").is_file() or (p / "model.safetensors").is_file():  # a model, run or checkpoint
        found = model_tokenizer(p)
        if found is None:
            raise UserError(f"{p} holds a model without a tokenizer (none of its own, none in its data.dir); pass "
                            "--tokenizer DIR with the one it was trained with (a folder holding tokenizer.json)")
        return found
    raise UserError(f"no tokenizer.json at {p}; pass a folder holding tokenizer.json (a Hugging Face model "
                    "folder, a model folder or a prepared data dir) or the tokenizer.json file itself")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A Hugging Face `tokenizers.Tokenizer` from any path `tokenizer_file` accepts."""
    f = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # the Rust side raises a plain Exception on bad JSON / unknown components
        raise UserError(f"{f} is not a Hugging Face tokenizers file ({e}); pass a tokenizer.json saved by "
                        "`tokenizers`/`transformers`") from None


def vocab_entries(tok: Tokenizer) -> int:
    """Embedding rows the tokenizer needs: max id + 1 (ids of loaded tokenizers need not be dense)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def special_ids(folder: Path) -> dict:
    """The special-token ids a model folder carries (`special_tokens.json`), {} when it has none."""
    return _json(Path(folder) / SPECIAL_IDS_FILE)


def eos_token(folder: Path, tok: Tokenizer) -> str | None:
    """The end-of-sequence token named by the tokenizer's settings: tokenizer_config.json, else the eos id of
    special_tokens.json."""
    eos = _json(Path(folder) / "tokenizer_config.json").get("eos_token")
    if isinstance(eos, dict):  # {"content": "</s>", "special": true, ...} in older configs
        eos = eos.get("content")
    if isinstance(eos, str):
        return eos
    ids = special_ids(folder).get("eos_token_id")
    first = ids[0] if isinstance(ids, list) and ids else ids
    return tok.id_to_token(first) if isinstance(first, int) else None


def stop_ids(tokenizer_json: Path, tok: Tokenizer) -> list[int]:
    """Ids that end a generation: the model's eos ids (special_tokens.json), else the end-of-text id the data was
    prepared with (meta.json), else the eos token of the tokenizer's settings."""
    folder = Path(tokenizer_json).parent
    ids = special_ids(folder).get("eos_token_id")
    if ids is None:
        ids = _json(folder / "meta.json").get("eot_id")
    if ids is None:
        token = eos_token(folder, tok)
        ids = tok.token_to_id(token) if token is not None else None
    ids = ids if isinstance(ids, list) else [] if ids is None else [ids]
    return [i for i in ids if isinstance(i, int)]


def same_vocabulary(model_tok: Tokenizer, data_tok: Tokenizer) -> bool:
    """Whether data made with `data_tok` speaks `model_tok`'s ids: every token of the model's tokenizer has the
    same id in the data's (which may have gained an end-of-text token in `data prepare`)."""
    return model_tok.get_vocab(with_added_tokens=True).items() <= data_tok.get_vocab(with_added_tokens=True).items()


def copy_tokenizer_files(src: Path, dst: Path, names: tuple[str, ...] = TOKENIZER_FILES) -> list[str]:
    """Copy those of `names` that `src` holds into `dst`; the names copied."""
    copied = [n for n in names if (Path(src) / n).is_file()]
    for name in copied:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return copied
