import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.backends.hf import (build_char_tokenizer, check_same_vocab, init_model, load_model, local_model_path,
                             tokenizer_sha256, weights_sha256)
from opd.errors import OpdError


def test_char_tokenizer_covers_data_and_round_trips(tmp_path):
    tok = build_char_tokenizer(["12+34=", "ab c"])
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = loaded("12+ab c", add_special_tokens=False).input_ids
    assert len(ids) == 7  # one token per character
    assert loaded.decode(ids) == "12+ab c"
    assert loaded("1").input_ids[0] == loaded.bos_token_id
    specials = {loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id}
    assert len(specials) == 4  # PAD distinct from EOS
    assert loaded.unk_token_id in loaded("z", add_special_tokens=False).input_ids


@pytest.mark.parametrize("arch,cls", [("qwen3", "Qwen3ForCausalLM"), ("llama", "LlamaForCausalLM")])
def test_init_model_saves_a_hub_style_folder(tmp_path, arch, cls):
    out = init_model(arch, layers=1, hidden=16, heads=2, tokenizer_texts=["0123"], out=tmp_path / arch, seed=3)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == cls
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id


def test_init_model_is_deterministic_in_the_seed(tmp_path):
    a = init_model("qwen3", 1, 16, 2, ["01"], tmp_path / "a", seed=1)
    b = init_model("qwen3", 1, 16, 2, ["01"], tmp_path / "b", seed=1)
    c = init_model("qwen3", 1, 16, 2, ["01"], tmp_path / "c", seed=2)
    ha, hb, hc = (weights_sha256(load_model(str(p)).model) for p in (a, b, c))
    assert ha == hb != hc


def test_weights_hash_sees_any_change(tiny):
    before = weights_sha256(tiny.model)
    with torch.no_grad():
        next(tiny.model.parameters()).view(-1)[0] += 1e-3
    assert weights_sha256(tiny.model) != before


def test_load_model_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(OpdError, match="model not found: .*nope"):
        load_model(str(tmp_path / "nope"))


def test_local_or_hub_is_decided_without_the_network(tmp_path, monkeypatch):
    """org/name goes to the hub unless org/ is a local folder; anything else path-like must exist."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "m").mkdir(parents=True)
    assert local_model_path("Qwen/Qwen3-0.6B") is None and local_model_path("org-x/model.v2_1") is None
    assert local_model_path("runs/m") == Path("runs/m")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert local_model_path("~/runs/m") == tmp_path / "runs" / "m"
    for name in ("runs/nosuch", "./m", "a/b/c", "m", "org/na me", "org/a..b", "/abs/x"):
        with pytest.raises(OpdError, match=f"model not found: {re.escape(name)} \\(no such folder"):
            local_model_path(name)


def test_bad_shapes_are_errors(tmp_path):
    with pytest.raises(OpdError, match="not divisible"):
        init_model("qwen3", 1, 30, 4, ["01"], tmp_path / "x")
    with pytest.raises(OpdError, match="unknown --arch"):
        init_model("gpt9", 1, 16, 2, ["01"], tmp_path / "y")


def test_vocab_mismatch_is_an_error(tiny):
    other = build_char_tokenizer(["xyz"])
    with pytest.raises(OpdError, match="different vocabularies"):
        check_same_vocab(tiny.tokenizer, other)
    check_same_vocab(tiny.tokenizer, tiny.tokenizer)
    assert tokenizer_sha256(tiny.tokenizer) != tokenizer_sha256(other)


def test_loaded_model_is_frozen_unless_trainable(tiny_model_dir):
    frozen = load_model(str(tiny_model_dir))
    trainable = load_model(str(tiny_model_dir), trainable=True)
    assert not any(p.requires_grad for p in frozen.model.parameters())
    assert all(p.requires_grad for p in trainable.model.parameters())
