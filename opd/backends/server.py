"""`opd serve-teacher`: a teacher model behind an OpenAI-compatible endpoint, for scoring and greedy eval.

`POST /v1/completions` answers two kinds of request, so `opd.backends.remote.RemoteTeacher` talks
to this server and to `vllm serve` alike:
- scoring, `max_tokens: 0` and `echo: true`: the log-prob of every prompt token given the tokens
  before it (one forward pass), in the OpenAI legacy `logprobs` shape and, when `prompt_logprobs`
  is asked for, in vLLM's shape with the top-k alternatives per position;
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


def forward_logprobs(model, seqs: list[list[int]], pad_id: int):
    """Log-softmax over the vocabulary for each row, left-padded like the sampler (same positions)."""
    import torch

    from opd.rollout.sampler import left_pad, position_ids

    ids, mask = left_pad(seqs, pad_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
        return torch.log_softmax(logits.float(), dim=-1).cpu()


def score_row(logp, seq: list[int], k: int, tokenizer) -> dict:
    """One choice: log p(token_j | tokens_<j) for j >= 1, the k best alternatives and the token's rank."""
    import torch

    width = logp.shape[0]
    rows = logp[width - len(seq): width - 1]  # row j-1 predicts token j
    target = torch.tensor(seq[1:], dtype=torch.long)
    lps = rows.gather(1, target[:, None]).squeeze(1) if len(seq) > 1 else torch.zeros(0)
    ranks = (rows > lps[:, None]).sum(dim=1) + 1
    k = min(k, rows.shape[1])  # a vocabulary smaller than k: every token is an alternative
    top_lp, top_id = rows.topk(k, dim=1) if k else (torch.zeros(len(seq) - 1, 0), torch.zeros(len(seq) - 1, 0))
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

    if next(model.parameters()).device.type != "cpu":  # the sampler builds its token tensors on the CPU
        raise ApiError(501, "greedy generation is served only for a teacher on the CPU")
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


def complete(loaded, body: dict, lock: threading.Lock, max_logprobs: int) -> dict:
    """Answer one /v1/completions request: scoring or greedy generation."""
    kind, n = check_request(body, max_logprobs)
    tok = loaded.tokenizer
    seqs = parse_prompts(body.get("prompt"), tok, loaded.model.get_input_embeddings().num_embeddings)
    if kind == "generate":
        with lock:  # one pass at a time: the model is shared by the worker threads
            choices = greedy_choices(loaded.model, tok, seqs, n)
        generated = sum(len(c["token_ids"]) for c in choices)
    else:
        with lock:
            logp = forward_logprobs(loaded.model, seqs, tok.pad_token_id)
        choices, generated = [], 0
        for i, seq in enumerate(seqs):
            choice = {"index": i, **score_row(logp[i], seq, n, tok), "finish_reason": "length"}
            if body.get("prompt_logprobs") is None:
                del choice["prompt_logprobs"]
            choices.append(choice)
    prompt = sum(len(s) for s in seqs)
    return {"object": "text_completion", "model": loaded.name, "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}}


def make_app(loaded, token: str | None, max_logprobs: int = 20):
    """The FastAPI app: /health and /v1/completions (scoring, greedy generation), optionally behind a token."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    from opd.backends.hf import tokenizer_sha256

    app = FastAPI(title="opd teacher", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()
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
            return await run_in_threadpool(complete, loaded, body, lock, max_logprobs)
        except ApiError as exc:
            return error(exc.status, exc.message)

    return app


def check_bind(host: str, token: str | None) -> None:
    """A server reachable from other machines must ask for a token."""
    if host not in LOOPBACK and not token:
        raise OpdError(f"refusing to serve on {host} without --token: anyone who can reach it could use the "
                       f"teacher; pass --token SECRET or bind 127.0.0.1")


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          dtype: str = "float32") -> None:
    """Load the teacher (on GPU when there is one) and serve it until interrupted."""
    check_bind(host, token)
    import torch
    import uvicorn

    from opd.backends.hf import load_model

    loaded = load_model(model, dtype=dtype)
    if torch.cuda.is_available():
        loaded.model.to("cuda")
    print(f"serving teacher {loaded.name} on http://{host}:{port}/v1 "
          f"({'token required' if token else 'no token'})", flush=True)
    uvicorn.run(make_app(loaded, token), host=host, port=port, log_level="warning")


def run_serve(args) -> None:
    serve(args.model, host=args.host, port=args.port, token=args.token, dtype=args.dtype)


def add_parser(subparsers) -> None:
    """Register `opd serve-teacher`."""
    p = subparsers.add_parser("serve-teacher",
                              help="serve a teacher model over HTTP for scoring and greedy eval (OpenAI-compatible)")
    p.add_argument("--model", required=True, help="model folder or hub name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; other than loopback needs --token")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' on every request")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="precision the teacher scores in")
    p.set_defaults(func=run_serve)
