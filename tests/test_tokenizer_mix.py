import json

from sparsetrain.cli import main
from sparsetrain.data.prepare import load_tokenizer, prepare


def test_shared_tokenizer_from_two_sources(tmp_path, capsys):
    code, english = tmp_path / "code", tmp_path / "english"
    code.mkdir()
    english.mkdir()
    for i in range(20):
        (code / f"f{i}.c").write_text(f"int add_{i}(int a, int b) {{ return a + b * {i}; }}\n" * 5)
        (english / f"d{i}.txt").write_text(f"The scheduler wakes task number {i} when its timer expires.\n" * 5)
    tok = tmp_path / "tok" / "tokenizer.json"
    assert main(["data", "tokenizer", "--source", str(code), "--source", str(english), "--vocab-size", "400",
                 "--out", str(tok)]) == 0
    info = json.loads(capsys.readouterr().out.split(": ", 1)[1])
    assert info["sample_docs"] == 40  # documents from both sources
    vocab = load_tokenizer(tok).get_vocab()
    assert any("sched" in t for t in vocab) and any("return" in t for t in vocab)  # merges from each domain
    a = prepare(str(code), tmp_path / "dc", tokenizer=str(tok), progress=False)
    b = prepare(str(english), tmp_path / "de", tokenizer=str(tok), progress=False)
    assert a["vocab_size"] == b["vocab_size"]
    # Refuses to overwrite.
    assert main(["data", "tokenizer", "--source", str(code), "--out", str(tok)]) == 2
