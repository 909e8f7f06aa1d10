"""`opd init-model --tokenizer bpe`: a byte-level BPE trained on the task's text (opd/backends/hf.py)."""

from __future__ import annotations

import pytest

from opd.backends.hf import build_bpe_tokenizer, build_char_tokenizer, build_tokenizer, init_model, load_model
from opd.errors import OpdError

TEXTS = ["123+456=975", "12+34=64", "999+1=0001"] * 20


def test_bpe_writes_any_text_back_and_merges_frequent_characters():
    tok = build_bpe_tokenizer(TEXTS, vocab_size=280)
    assert 260 < len(tok) <= 280  # at most: the data may offer fewer merges
    for text in ("123+456=975", "héllo — wörld 😀", " leading and  double spaces\n"):  # unseen characters too
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text and tok.unk_token_id not in ids
    tokens = tok.convert_ids_to_tokens(tok("123+456=975", add_special_tokens=False).input_ids)
    assert any(len(t) > 1 for t in tokens)  # merges: fewer tokens than characters
    # the same special tokens, ids and BOS template as the char tokenizer
    char = build_char_tokenizer(TEXTS)
    for kind in ("pad", "bos", "eos", "unk"):
        assert getattr(tok, f"{kind}_token_id") == getattr(char, f"{kind}_token_id")
    assert tok("12").input_ids[0] == tok.bos_token_id


def test_vocabulary_size_is_checked():
    with pytest.raises(OpdError, match="below the 260 tokens"):
        build_bpe_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(OpdError, match="--vocab-size applies to --tokenizer bpe only"):
        build_tokenizer("char", TEXTS, vocab_size=300)
    with pytest.raises(OpdError, match="unknown --tokenizer"):
        build_tokenizer("wordpiece", TEXTS)


def test_init_model_with_bpe_loads_back_the_ordinary_way(tmp_path):
    out = init_model("qwen3", 1, 16, 2, TEXTS, tmp_path / "m", tokenizer="bpe", vocab_size=270)
    loaded = load_model(str(out))
    assert len(loaded.tokenizer) == 270 == loaded.model.config.vocab_size
    assert loaded.model.config.eos_token_id == loaded.tokenizer.eos_token_id


def test_cli_init_model_tokenizer_bpe(tmp_path, capsys):
    from opd.cli.main import main

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "12+34=", "answer": "64"}\n{"prompt": "5+5=", "answer": "01"}\n')
    assert main(["init-model", "--layers", "1", "--hidden", "16", "--heads", "2", "--tokenizer", "bpe",
                 "--vocab-size", "265", "--tokenizer-data", str(data), "--out", str(tmp_path / "m")]) in (0, None)
    out = capsys.readouterr().out
    assert "vocabulary 26" in out and int(out.split("vocabulary ")[1]) <= 265
