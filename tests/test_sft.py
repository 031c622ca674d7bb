"""SFT data: loss only on response tokens, chat format, packing, line-numbered errors, loader resume."""
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sparsetrain.config import ModelConfig
from sparsetrain.data.sft import IGNORE_INDEX, SFTLoader, prepare_sft
from sparsetrain.errors import UserError
from sparsetrain.nn.model import build

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["what is two plus two", "four", "<|user|>\n<|assistant|>\n", "say hi", "hello there"],
                            trainer)
    folder = tmp_path_factory.mktemp("tok")
    tok.save(str(folder / "tokenizer.json"))
    return folder


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def decode_loss_spans(tokenizer, tokens, mask):
    """The text of each maximal run of loss tokens in one row."""
    spans, current = [], []
    for t, m in zip(tokens.tolist(), mask.tolist()):
        if m:
            current.append(t)
        elif current:
            spans.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
    if current:
        spans.append(tokenizer.decode(current, skip_special_tokens=False))
    return spans


def test_loss_only_on_response_tokens_and_chat_assistant_turns(tmp_path, tokenizer_dir):
    rows = [
        {"prompt": "what is two plus two", "response": "four"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say hi"},
                      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
                      {"role": "assistant", "content": "hello there"}]},
    ]
    meta = prepare_sft(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer_dir, tmp_path / "out", seq_len=64,
                       val_fraction=0.0)
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    data = np.load(tmp_path / "out" / "sft_train.npz")
    tokens, mask = data["tokens"], data["mask"]
    assert tokens.shape == (1, 65) and meta["train"]["sequences"] == 1  # both examples packed in one row
    assert decode_loss_spans(tokenizer, tokens[0], mask[0]) == ["four" + EOS, "hello" + EOS, "hello there" + EOS]
    text = tokenizer.decode(tokens[0].tolist(), skip_special_tokens=False)
    assert text.startswith("<|user|>\nwhat is two plus two" + EOS + "<|assistant|>\nfour" + EOS + "<|system|>\nbe")
    # Padding carries no loss, and the loader turns the mask into -100 targets.
    assert not mask[0, -1] and tokens[0, -1] == meta["eos_id"]
    loader = SFTLoader(tmp_path / "out", "train", batch_size=1)
    x, y = loader.next_batch()
    assert torch.equal(x[0], torch.from_numpy(tokens[0, :-1].astype(np.int64)))
    keep = torch.from_numpy(mask[0, 1:])
    assert torch.equal(y[0][keep], torch.from_numpy(tokens[0, 1:].astype(np.int64))[keep])
    assert (y[0][~keep] == IGNORE_INDEX).all()
    # The model's loss ignores -100 targets: it equals the mean over the response tokens alone.
    model = build(ModelConfig(preset="tiny", vocab_size=meta["vocab_size"]))
    logits = model(x)
    expected = torch.nn.functional.cross_entropy(logits[0][keep], y[0][keep])
    torch.testing.assert_close(model(x, y), expected)


def test_packing_starts_a_new_row_truncates_and_drops(tmp_path, tokenizer_dir):
    long_prompt = "what is two plus two " * 20
    rows = [{"prompt": "say hi", "response": "hello"}] * 3 + [
        {"prompt": "say hi", "response": "hello there " * 20},  # cut to the row, keeps loss tokens
        {"prompt": long_prompt, "response": "four"},  # its response is cut off entirely: dropped
    ]
    meta = prepare_sft(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer_dir, tmp_path / "out", seq_len=15,
                       val_fraction=0.0)
    data = np.load(tmp_path / "out" / "sft_train.npz")
    tokens, mask = data["tokens"], data["mask"]
    assert tokens.shape[1] == 16
    assert meta["train"]["truncated"] == 2 and meta["train"]["dropped"] == 1 and meta["train"]["examples"] == 4
    assert meta["train"]["loss_tokens"] == int(mask[:, 1:].sum())
    assert mask[:, 1:].any(axis=1).all()  # every row has something to learn
    # An example is never split across rows: every row starts with a user header.
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    for row in tokens:
        assert tokenizer.decode(row.tolist(), skip_special_tokens=False).startswith("<|user|>\n")


def test_validation_split_is_whole_examples(tmp_path, tokenizer_dir):
    rows = [{"prompt": f"say hi {i}", "response": "hello"} for i in range(20)]
    meta = prepare_sft(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer_dir, tmp_path / "out", seq_len=32,
                       val_fraction=0.25)
    assert meta["val"]["examples"] == 5 and meta["train"]["examples"] == 15
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert SFTLoader(tmp_path / "out", "val", batch_size=2).next_batch()[0].shape == (2, 32)


@pytest.mark.parametrize("line, message", [
    ({"prompt": "say hi"}, "d.jsonl:2: missing field 'response'"),
    ({"question": "a", "response": "b"}, "d.jsonl:2: missing field 'prompt'"),
    ('{"prompt": "a", ', "d.jsonl:2: not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "d.jsonl:2: the chat has no assistant turn"),
    ({"messages": [{"role": "user"}]}, "d.jsonl:2: 'messages' must be a list"),
    ({"prompt": "a", "response": 3}, "d.jsonl:2: field 'response' must be a string"),
])
def test_bad_line_names_its_number_and_writes_nothing(tmp_path, tokenizer_dir, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "say hi", "response": "hello"}, line])
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        prepare_sft(path, tokenizer_dir, out, seq_len=32)
    assert not out.exists()


def test_custom_fields_and_tokenizer_file(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "say hi", "a": "hello"}])
    meta = prepare_sft(path, tokenizer_dir / "tokenizer.json", tmp_path / "out", prompt_field="q",
                       response_field="a", seq_len=32, val_fraction=0.0)
    assert meta["train"]["examples"] == 1
    with pytest.raises(UserError, match="no tokenizer.json at"):
        prepare_sft(path, tmp_path / "missing", tmp_path / "out2", seq_len=32)
    with pytest.raises(UserError, match="seq_len=32, not 64"):
        SFTLoader(tmp_path / "out", "train", batch_size=1, seq_len=64)


def test_loader_is_reproducible_and_resumes_exactly(tmp_path, tokenizer_dir):
    rows = [{"prompt": f"say hi {i}", "response": "hello " * (i % 3 + 1)} for i in range(30)]
    prepare_sft(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer_dir, tmp_path / "out", seq_len=16,
                val_fraction=0.0)
    n_rows = len(np.load(tmp_path / "out" / "sft_train.npz")["tokens"])
    a = SFTLoader(tmp_path / "out", batch_size=3, seed=7)
    first = [a.next_batch() for _ in range(n_rows)]  # several epochs, batches crossing epoch ends
    b = SFTLoader(tmp_path / "out", batch_size=3, seed=7)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(first, (b.next_batch()
                                                                                          for _ in range(n_rows))))
    # Every row once per epoch.
    one = SFTLoader(tmp_path / "out", batch_size=1, seed=7)
    epoch = sorted(tuple(one.next_batch()[0][0].tolist()) for _ in range(n_rows))
    assert epoch == sorted(tuple(r.tolist()) for r in one.x) and one.epoch == 1
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(5)]
    c = SFTLoader(tmp_path / "out", batch_size=3, seed=7)
    c.load_state_dict(state)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(expected, (c.next_batch()
                                                                                             for _ in range(5))))
    with pytest.raises(UserError, match="used seed 7, this run uses 8"):
        SFTLoader(tmp_path / "out", batch_size=3, seed=8).load_state_dict(state)
    # Evaluation batches: the same rows every call, at most max_tokens inputs.
    batches = list(a.eval_batches(batch_size=4, max_tokens=16 * 6))
    assert [x.shape[0] for x, _ in batches] == [4, 2]
    assert all(torch.equal(p[0], q[0]) for p, q in zip(batches, a.eval_batches(batch_size=4, max_tokens=16 * 6)))


KERNEL_C = """\
#include <linux/kernel.h>

/**
 * foo_add() - add two numbers
 * @a: the first
 * @b: the second
 *
 * Return: their sum
 */
static int foo_add(int a,
		   int b)
{
	return a + b;
}

/**
 * struct foo - not a function
 * @x: a member
 */
struct foo {
	int x;
};

/**
 * foo_decl - a prototype, no body here
 */
int foo_decl(void);

/**
 * foo_long - too long for the limit below
 */
void foo_long(void)
{
	LONG_BODY
}

/* not kernel-doc */
int plain(void)
{
	return 0;
}
"""


def test_kernel_doc_pairs_take_documented_function_definitions_only():
    from sparsetrain.data.sft import KERNEL_DOC_PROMPT, kernel_doc_pairs

    text = KERNEL_C.replace("LONG_BODY", "x();\n" * 200)
    pairs = kernel_doc_pairs(text, max_response_chars=500)
    assert len(pairs) == 1
    prompt, response = pairs[0]
    doc = "foo_add() - add two numbers\n@a: the first\n@b: the second\n\nReturn: their sum"
    assert prompt == KERNEL_DOC_PROMPT + doc
    assert response == "static int foo_add(int a,\n\t\t   int b)\n{\n\treturn a + b;\n}"
    assert [r.split("(")[0] for _, r in kernel_doc_pairs(text, max_response_chars=5000)] == ["static int foo_add",
                                                                                          "void foo_long"]


def test_cli_kernel_doc_writes_pairs_that_data_sft_packs(tmp_path, tokenizer_dir):
    from sparsetrain.cli import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.c").write_text(KERNEL_C.replace("LONG_BODY", "x();"))
    out = tmp_path / "pairs.jsonl"
    assert main(["data", "kernel-doc", "--source", str(src), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["response"].splitlines()[0] for r in rows] == ["static int foo_add(int a,", "void foo_long(void)"]
    assert main(["data", "sft", "--source", str(out), "--tokenizer", str(tokenizer_dir), "--out",
                 str(tmp_path / "sft"), "--seq-len", "256", "--val-fraction", "0"]) == 0
    assert main(["data", "kernel-doc", "--source", str(src), "--out", str(out)]) == 2  # exists: refused
    (tmp_path / "py").mkdir()
    (tmp_path / "py" / "b.py").write_text("def f():\n    return 1\n")
    assert main(["data", "kernel-doc", "--source", str(tmp_path / "py"), "--out", str(tmp_path / "none.jsonl")]) == 2
    assert not (tmp_path / "none.jsonl").exists() and not (tmp_path / "none.jsonl.tmp").exists()
