"""`opd serve-teacher`: a teacher model behind an OpenAI-compatible endpoint, for scoring and greedy eval.

`POST /v1/completions` answers two kinds of request, so `opd.backends.remote.RemoteTeacher` talks
to this server and to `vllm serve` alike:
- scoring, `max_tokens: 0` and `echo: true`: the log-prob of every prompt token given the tokens
  before it (one pass of the body, then the head in chunks of positions: never [B, L, V] logits),
  in the OpenAI legacy `logprobs` shape and, when `prompt_logprobs` is asked for, in vLLM's shape
  with the top-k alternatives per position;
- greedy generation, `max_tokens > 0` and `temperature: 0`: each prompt's greedy continuation by
  opd's own sampler (the one evaluation uses), stopping at EOS; `choices[i].token_ids` holds the
  generated ids (the EOS included when it stopped there) and `prompt_token_ids` the prompt, as
  vLLM's `return_token_ids` names them, so a served teacher can be evaluated. Sampling at a
  temperature is not served: nothing in opd needs a teacher's samples over HTTP.
`/health` reports the model name, its tokenizer's sha256 and its vocabulary size (the rows of its
input embedding), so a client can refuse a teacher whose token ids mean something else.

With `--token`, every request, `/health` included, needs `Authorization: Bearer <token>`: the
model name is not advertised to strangers, and a client's `health()` also checks its key. Binding
anything but loopback without a token is refused: the server would score for anyone.
"""

# no `from __future__ import annotations`: FastAPI must resolve the `Request` annotations at runtime
import hmac
import threading

from opd.errors import OpdError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOGITS_CHUNK = 1 << 22  # logits per scoring chunk (16 MiB of float32), as train.logits_chunk


class ApiError(Exception):
    """An HTTP error answered in OpenAI's `{"error": {...}}` shape."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def parse_prompts(prompt, tokenizer, vocab_size: int) -> list[list[int]]:
    """Token-id lists from any OpenAI prompt form: a string, strings, token ids, lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "'prompt' must be a string, a list of strings or a list of token-id lists")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    seqs = []
    for p in prompt:
        if isinstance(p, str):
            p = tokenizer(p)["input_ids"]
        if not isinstance(p, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise ApiError(400, "'prompt' must be a string, a list of strings or a list of token-id lists")
        if not p:
            raise ApiError(400, "empty prompt: send at least one token")
        if any(t < 0 or t >= vocab_size for t in p):
            raise ApiError(400, f"token id out of range: the vocabulary has {vocab_size} tokens")
        seqs.append(p)
    return seqs


def check_request(body: dict, max_logprobs: int) -> tuple[str, int]:
    """("score", k alternatives per position) or ("generate", max_tokens); anything else is refused."""
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    max_tokens = body.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise ApiError(400, "max_tokens must be a non-negative integer")
    ks = [body.get("logprobs") or 0, body.get("prompt_logprobs") or 0]
    if max_tokens == 0 and body.get("echo") is True:
        if not all(isinstance(k, int) and 0 <= k <= max_logprobs for k in ks):
            raise ApiError(400, f"logprobs and prompt_logprobs must be integers from 0 to {max_logprobs}")
        return "score", max(ks)
    if max_tokens > 0 and body.get("temperature") == 0 and not body.get("echo"):
        if any(ks):
            raise ApiError(400, "log-probs of generated tokens are not served: score the completion "
                                "with max_tokens=0 and echo=true")
        return "generate", max_tokens
    raise ApiError(400, "this server only scores prompts (max_tokens=0, echo=true) and decodes greedily "
                        "(max_tokens>0, temperature=0, no echo)")


def lm_split(model):
    """(body, head) of a causal LM whose head(body(x)) reproduces model(x).logits on a probe, else
    (None, identity): the "hidden states" are then the full logits (correct, not memory-bounded).

    The check opd/train/chunked.py's `split_lm` makes (an architecture with e.g. logit soft-capping
    fails it); repeated here because backends may not import train (tests/test_architecture.py)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "model", None)
    if head is None or body is None:
        return None, _identity
    device = next(model.parameters()).device
    probe = torch.arange(4, device=device).remainder(model.get_input_embeddings().num_embeddings)[None]
    with torch.inference_mode():
        full = model(input_ids=probe, use_cache=False).logits.float()
        mine = head(body(input_ids=probe, use_cache=False).last_hidden_state).float()
    same = torch.allclose(full, mine, rtol=1e-4, atol=1e-4 * float(full.abs().max()) + 1e-6)
    return (body, head) if same else (None, _identity)


def _identity(hidden):
    return hidden


def score_tokens(model, split, seqs: list[list[int]], pad_id: int, k: int,
                 chunk_elements: int = LOGITS_CHUNK) -> list[tuple]:
    """Per row, CPU tensors: log p(token_j | tokens_<j) for j >= 1 [n], each token's rank [n], and the
    k best alternatives' log-probs and ids [n, k].

    The rows are left-padded like the sampler's (same positions). The body runs once over the batch;
    the head, log-softmax and top-k then run per chunk of at most `chunk_elements` logits, so the peak
    holds one chunk's logits, never [B, L, V]. Everything is computed on the model's device."""
    import torch

    from opd.batch import left_pad, position_ids

    body, head = split
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in left_pad(seqs, pad_id))
    vocab = model.get_input_embeddings().num_embeddings
    k = min(k, vocab)  # a vocabulary smaller than k: every token is an alternative
    real = mask.bool()
    predicts = real[:, :-1] & real[:, 1:]  # position p predicts token p + 1: both real
    targets = ids[:, 1:][predicts]
    n = targets.shape[0]
    lps, ranks = torch.empty(n, device=device), torch.empty(n, dtype=torch.long, device=device)
    top_lp, top_id = torch.empty(n, k, device=device), torch.empty(n, k, dtype=torch.long, device=device)
    with torch.inference_mode():
        kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
        hidden = (body(**kwargs).last_hidden_state if body is not None else model(**kwargs).logits)[:, :-1][predicts]
        for lo, hi in chunk_ranges(n, vocab, chunk_elements):
            logp = torch.log_softmax(head(hidden[lo:hi]).float(), dim=-1)
            lp = logp.gather(1, targets[lo:hi, None])
            lps[lo:hi], ranks[lo:hi] = lp[:, 0], (logp > lp).sum(dim=1) + 1
            top_lp[lo:hi], top_id[lo:hi] = logp.topk(k, dim=1)
    counts = [len(s) - 1 for s in seqs]
    return list(zip(*(t.cpu().split(counts) for t in (lps, ranks, top_lp, top_id))))


def chunk_ranges(n_tokens: int, vocab: int, chunk_elements: int):
    """[(lo, hi)] covering n_tokens, each with at most chunk_elements logits (at least one token)."""
    step = max(1, chunk_elements // max(vocab, 1))
    return [(lo, min(lo + step, n_tokens)) for lo in range(0, n_tokens, step)]


def score_row(scores: tuple, seq: list[int], tokenizer) -> dict:
    """One choice from `score_tokens`' row: OpenAI's legacy `logprobs` and vLLM's `prompt_logprobs`."""
    lps, ranks, top_lp, top_id = scores
    texts = [tokenizer.decode([t]) for t in seq]
    strs = tokenizer.convert_ids_to_tokens(seq)
    offsets, pos = [], 0
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    top_openai, top_vllm = [None], [None]
    for j in range(len(seq) - 1):
        alts = list(zip(top_id[j].tolist(), top_lp[j].tolist()))
        top_openai.append({tokenizer.convert_ids_to_tokens(int(t)): lp for t, lp in alts})
        entry = {str(int(t)): {"logprob": lp, "rank": r + 1, "decoded_token": tokenizer.decode([int(t)])}
                 for r, (t, lp) in enumerate(alts)}
        entry.setdefault(str(seq[j + 1]), {"logprob": lps[j].item(), "rank": int(ranks[j]),
                                           "decoded_token": texts[j + 1]})
        top_vllm.append(entry)
    return {"text": "".join(texts), "token_ids": list(seq),
            "logprobs": {"tokens": strs, "token_logprobs": [None] + lps.tolist(),
                         "top_logprobs": top_openai, "text_offset": offsets},
            "prompt_logprobs": top_vllm}


def greedy_choices(model, tokenizer, seqs: list[list[int]], max_tokens: int) -> list[dict]:
    """Each prompt's greedy continuation, decoded by the sampler evaluation uses (same ids as a local eval)."""
    from opd.rollout.sampler import decode_completions, generate

    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max(len(s) for s in seqs) + max_tokens > limit:
        raise ApiError(400, f"prompt + max_tokens exceeds the model's {limit} positions")
    batch = generate(model, seqs, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                     max_new_tokens=max_tokens, greedy=True)
    texts = decode_completions(tokenizer, batch)  # without the final EOS, like `text` from vLLM
    choices = []
    for i, (ids, mask, truncated) in enumerate(zip(batch.completion_ids.tolist(), batch.completion_mask.tolist(),
                                                    batch.truncated.tolist())):
        choices.append({"index": i, "text": texts[i][0], "token_ids": [t for t, m in zip(ids, mask) if m],
                        "prompt_token_ids": seqs[i], "logprobs": None,
                        "finish_reason": "length" if truncated else "stop"})
    return choices


def complete(loaded, body: dict, lock: threading.Lock, max_logprobs: int, split,
             logits_chunk: int = LOGITS_CHUNK) -> dict:
    """Answer one /v1/completions request: scoring (with `split` = lm_split(model)) or greedy generation."""
    kind, n = check_request(body, max_logprobs)
    tok = loaded.tokenizer
    seqs = parse_prompts(body.get("prompt"), tok, loaded.model.get_input_embeddings().num_embeddings)
    if kind == "generate":
        with lock:  # one pass at a time: the model is shared by the worker threads
            choices = greedy_choices(loaded.model, tok, seqs, n)
        generated = sum(len(c["token_ids"]) for c in choices)
    else:
        with lock:
            scores = score_tokens(loaded.model, split, seqs, tok.pad_token_id, n, logits_chunk)
        choices, generated = [], 0
        for i, seq in enumerate(seqs):
            choice = {"index": i, **score_row(scores[i], seq, tok), "finish_reason": "length"}
            if body.get("prompt_logprobs") is None:
                del choice["prompt_logprobs"]
            choices.append(choice)
    prompt = sum(len(s) for s in seqs)
    return {"object": "text_completion", "model": loaded.name, "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}}


def make_app(loaded, token: str | None, max_logprobs: int = 20, logits_chunk: int = LOGITS_CHUNK):
    """The FastAPI app: /health and /v1/completions (scoring, greedy generation), optionally behind a token."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    from opd.backends.hf import tokenizer_sha256

    app = FastAPI(title="opd teacher", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()
    split = lm_split(loaded.model)  # checked once, before the first request
    about = {"status": "ok", "model": loaded.name, "tokenizer_sha256": tokenizer_sha256(loaded.tokenizer),
             "vocab_size": loaded.model.get_input_embeddings().num_embeddings}

    def error(status: int, message: str) -> JSONResponse:
        kind = "authentication_error" if status == 401 else "invalid_request_error"
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.middleware("http")
    async def check_token(request: Request, call_next):
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error(401, "missing or wrong API key: send 'Authorization: Bearer <token>'")
        return await call_next(request)

    @app.get("/health")
    def health():
        return about

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "request body is not valid JSON")
        try:
            return await run_in_threadpool(complete, loaded, body, lock, max_logprobs, split, logits_chunk)
        except ApiError as exc:
            return error(exc.status, exc.message)

    return app


def check_bind(host: str, token: str | None) -> None:
    """A server reachable from other machines must ask for a token."""
    if host not in LOOPBACK and not token:
        raise OpdError(f"refusing to serve on {host} without --token: anyone who can reach it could use the "
                       f"teacher; pass --token SECRET or bind 127.0.0.1")


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          dtype: str = "float32", logits_chunk: int = LOGITS_CHUNK, device: str = "auto",
          max_logprobs: int = 20) -> None:
    """Load the teacher directly onto its device (auto: the first GPU when there is one) and serve it
    until interrupted."""
    check_bind(host, token)
    import uvicorn

    from opd.backends.devices import resolve_device
    from opd.backends.hf import load_model

    loaded = load_model(model, dtype=dtype, device=resolve_device(device))
    print(f"serving teacher {loaded.name} on http://{host}:{port}/v1 "
          f"({'token required' if token else 'no token'})", flush=True)
    uvicorn.run(make_app(loaded, token, max_logprobs, logits_chunk), host=host, port=port, log_level="warning")


def run_serve(args) -> None:
    serve(args.model, host=args.host, port=args.port, token=args.token, dtype=args.dtype,
          logits_chunk=args.logits_chunk or LOGITS_CHUNK, device=args.device, max_logprobs=args.max_logprobs)


def add_parser(subparsers) -> None:
    """Register `opd serve-teacher`."""
    p = subparsers.add_parser("serve-teacher",
                              help="serve a teacher model over HTTP for scoring and greedy eval (OpenAI-compatible)")
    p.add_argument("--model", required=True, help="model folder or hub name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; other than loopback needs --token")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' on every request")
    p.add_argument("--device", default="auto", help="auto (the first CUDA GPU, else the CPU) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="precision the teacher scores in")
    p.add_argument("--logits-chunk", type=int, default=LOGITS_CHUNK,
                   help="logits per scoring chunk (bounds scoring memory; 0 = default)")
    # a cross-tokenizer client sums the probabilities of a token's extensions from the top-k it is sent, so a
    # larger k makes its span scores exact for more tokens (docs/cross_tokenizer.md); vLLM's flag has this name
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="largest top-k a client may ask for per position (default 20)")
    p.set_defaults(func=run_serve)
