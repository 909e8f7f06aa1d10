"""Hugging Face causal LMs: build tiny real-architecture models, load any model the ordinary way.

Everything downstream treats a folder written by `init_model` exactly like a hub model:
`AutoModelForCausalLM.from_pretrained(path)` + `AutoTokenizer.from_pretrained(path)`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from opd.backends.devices import model_device, native_bf16  # noqa: F401  (re-exported)
from opd.errors import OpdError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
ARCHS = ("qwen3", "llama")


def build_char_tokenizer(texts, extra_chars: str = ""):
    """A character-level fast tokenizer (bos/eos/pad/unk) covering every character in `texts`.

    Built with `tokenizers` and wrapped as a `PreTrainedTokenizerFast`, so `save_pretrained`
    writes a normal tokenizer.json that `AutoTokenizer` loads back.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(texts)) | set(extra_chars))
    if not chars:
        raise OpdError("tokenizer data has no characters")
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join back without spaces
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


TOKENIZERS = ("char", "bpe")
DEFAULT_BPE_VOCAB = 320  # the 256 bytes + 4 specials + ~60 merges: multi-character tokens on small tasks


def build_bpe_tokenizer(texts, vocab_size: int = DEFAULT_BPE_VOCAB):
    """A byte-level BPE fast tokenizer trained on `texts` (bos/eos/pad/unk first, as in the char one).

    Every byte is in the vocabulary, so any text can be written; merges make tokens of several
    characters, so a BPE model and a char model of one task have different tokenizers (opd's
    cross-tokenizer distillation, docs/cross_tokenizer.md)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise OpdError(f"--vocab-size {vocab_size} is below the {len(alphabet) + len(SPECIAL_TOKENS)} tokens every "
                       f"byte-level BPE holds (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    texts = [t for t in texts if t]
    if not texts:
        raise OpdError("tokenizer data has no text")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_tokenizer(kind: str, texts, vocab_size: int | None = None):
    """`opd init-model --tokenizer`: char (one token per character) or bpe (byte-level BPE)."""
    if kind == "char":
        if vocab_size is not None:
            raise OpdError("--vocab-size applies to --tokenizer bpe only (a char tokenizer has one token per character)")
        return build_char_tokenizer(texts)
    if kind == "bpe":
        return build_bpe_tokenizer(texts, vocab_size or DEFAULT_BPE_VOCAB)
    raise OpdError(f"unknown --tokenizer {kind!r}; choose one of {', '.join(TOKENIZERS)}")


def build_config(arch: str, vocab_size: int, layers: int, hidden: int, heads: int,
                 kv_heads: int | None = None, intermediate: int | None = None,
                 max_positions: int = 512, tokenizer=None):
    """A transformers config for a small model of a real architecture (Qwen3 or Llama)."""
    from transformers import LlamaConfig, Qwen3Config

    if arch not in ARCHS:
        raise OpdError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if hidden % heads:
        raise OpdError(f"--hidden {hidden} is not divisible by --heads {heads}")
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise OpdError(f"--heads {heads} is not divisible by --kv-heads {kv_heads}")
    cls = Qwen3Config if arch == "qwen3" else LlamaConfig
    special = {}
    if tokenizer is not None:
        special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return cls(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, max_position_embeddings=max_positions,
        tie_word_embeddings=True, **special,
    )


def init_model(arch: str, layers: int, hidden: int, heads: int, tokenizer_texts, out: str | Path,
               seed: int = 0, kv_heads: int | None = None, intermediate: int | None = None,
               max_positions: int = 512, tokenizer: str = "char", vocab_size: int | None = None) -> Path:
    """Randomly initialise a real architecture + a char or byte-level BPE tokenizer (`tokenizer`,
    `vocab_size` for bpe) and save both (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    from opd.tasks.chat import CHAT_CHARS, add_chat_template

    texts = list(tokenizer_texts) + [CHAT_CHARS] * (tokenizer == "char")  # the chat template's role markers
    tokenizer = build_tokenizer(tokenizer, texts, vocab_size)
    add_chat_template(tokenizer)  # opd/tasks/chat.py: one marker per role, assistant turns end with EOS
    config = build_config(arch, len(tokenizer), layers, hidden, heads, kv_heads, intermediate,
                          max_positions, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# a hub repository id: optional "org/" then a name, of letters, digits, "-", "_", "." (huggingface_hub's rule)
HUB_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]+$")


def local_model_path(name: str) -> Path | None:
    """The local folder `name` refers to, or None when it is a hub name (org/name).

    Decided without any network access, so a mistyped folder fails at once instead of spending a minute
    in hub retries: a name is local when it exists, starts with . / ~, has more than one "/" or no "/"
    at all, is not a valid hub id, or its first component is an existing folder (`runs/nosuch` where
    runs/ exists). A local name that does not exist is an OpdError.
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    first = name.split("/", 1)[0]
    local = (name.startswith((".", "/", "~")) or name.count("/") != 1 or not HUB_ID.match(name)
             or ".." in name or "--" in name or Path(first).expanduser().is_dir())
    if local:
        raise OpdError(f"model not found: {name} (no such folder; a hub name looks like org/name)")
    return None


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from (for the manifest)."""

    model: object
    tokenizer: object
    name: str
    files: list = field(default_factory=list)  # the safetensors files it was loaded from
    stored_dtype: str | None = None  # the dtype of the weights as stored
    commit: str | None = None  # a hub model's commit hash

    @functools.cached_property
    def weights_hash(self) -> str | None:
        """sha256 of the safetensors files (streamed), None for an in-memory model. Computed when the
        manifest asks, not at every load: reading an 8B teacher's 16 GB takes a while."""
        from opd.backends.weights import files_sha256

        return files_sha256(self.files)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def device(self):
        return model_device(self.model)


def load_model(name_or_path: str, dtype: str = "float32", revision: str | None = None,
               trainable: bool = False, device="cpu", device_map: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer the ordinary way (a hub name or a local folder), directly in
    `dtype` and onto `device` (or spread by accelerate's `device_map`): no float32 copy on the host.

    dtype auto: bfloat16 when the weights are stored in 16 bits and the device computes bf16 natively
    (casting up would add nothing), else float32 (a float32 teacher may still be cast after a probe:
    opd/teachers/local.py)."""
    path = local_model_path(name_or_path)  # before any import or network access: a typo fails at once
    source = name_or_path if path is None else str(path)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.backends.weights import model_folder, safetensors_files, stored_dtype

    device = torch.device(device)
    files = safetensors_files(model_folder(source, revision))
    stored = stored_dtype(files)
    if dtype == "auto":
        dtype = "bfloat16" if stored in ("bfloat16", "float16") and native_bf16(device) else "float32"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise OpdError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    placement = device_map or (str(device) if device.type != "cpu" else None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=torch_dtype,
                                                     use_safetensors=True,  # never unpickle weights
                                                     low_cpu_mem_usage=True, device_map=placement)
    except OSError as exc:  # missing files, no network for a hub name, ...
        raise OpdError(f"cannot load model {name_or_path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise OpdError(f"tokenizer of {name_or_path} has no eos token")
    if tokenizer.pad_token_id is None:  # many hub tokenizers; keep PAD distinct from EOS if we can
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    model.train(trainable)
    model.requires_grad_(trainable)
    files = files or safetensors_files(model_folder(source, revision))  # a hub model is cached only now
    return LoadedModel(model=model, tokenizer=tokenizer, name=name_or_path, files=files,
                       stored_dtype=stored or stored_dtype(files),
                       commit=None if path is not None else getattr(model.config, "_commit_hash", None))


def weights_sha256(model) -> str:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes, bytes), in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of the vocabulary and special tokens (what decides token ids)."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items()),
               "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def check_same_vocab(teacher_tok, student_tok) -> None:
    """Teacher and student must share token ids: the loss compares distributions position by position."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise OpdError("teacher and student tokenizers have different vocabularies; "
                       "opd needs a shared tokenizer (cross-tokenizer distillation is not supported)")
