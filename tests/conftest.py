"""Shared fixtures: tiny real-architecture models built from a config (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

CHARS = "0123456789+=abc"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised 2-layer Qwen3 with a char tokenizer, saved like a hub model."""
    from opd.backends.hf import init_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    init_model("qwen3", layers=2, hidden=32, heads=2, tokenizer_texts=[CHARS], out=out, seed=0)
    return out


@pytest.fixture()
def tiny(tiny_model_dir):
    from opd.backends.hf import load_model

    return load_model(str(tiny_model_dir))
