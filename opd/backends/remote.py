"""A teacher behind HTTP: `opd serve-teacher` or vLLM's OpenAI-compatible server.

Serve a teacher with opd:   opd serve-teacher --model DIR_OR_NAME --port 8000 [--token SECRET]
or with vLLM:               vllm serve MODEL --port 8000 --max-logprobs 20
(vLLM answers `prompt_logprobs` only up to `--max-logprobs`, so it must be >= top_k.)

opd sends token ids, never text (`prompt: [[ids], ...]`, `echo: true`, `max_tokens: 0`), so the
teacher scores exactly the tokens it is sent: the student's, and then both tokenizers must match
(`check_tokenizer` compares the hash opd's server reports), or with `teacher.tokenizer` the teacher's
own ids of the same text (opd/teachers/cross.py, docs/cross_tokenizer.md). vLLM's per-token `prompt_logprobs` are
used when the server returns them, else the OpenAI `logprobs.token_logprobs`. vLLM refuses
`max_tokens: 0`; the client then asks for one generated token and ignores it. `generate_greedy`
asks for `temperature: 0` completions with `return_token_ids` (vLLM's name for the generated ids,
>= 0.10.2), so a served teacher can be evaluated.

Failures: a request that takes longer than `request_timeout`, a connection error or a 5xx is
retried with exponential backoff (capped at 30 s), so a run waits for a restarted server; after
`max_failures` failed attempts in a row the run ends with one line that says whether the teacher
was slow (it answered nothing within the timeout: raise it) or unreachable. The defaults (120 s,
30 attempts: about 12 minutes of backoff) wait through a restart. A 400/401 ends the run at once.
"""

from __future__ import annotations

import logging
import time

from opd.errors import OpdError

log = logging.getLogger("opd.remote")
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
CONNECT_TIMEOUT = 10.0  # a live server accepts a connection within milliseconds, even while busy


class RemoteTeacher:
    """Scores token sequences on a remote teacher; returns completion log-probs (and top-k)."""

    def __init__(self, url: str, api_key: str | None = None, top_k: int = 0, request_timeout: float = 120.0,
                 max_failures: int = 30, backoff: tuple[float, float] = (0.5, 30.0), model: str | None = None,
                 *, timeout: float | None = None, max_retries: int | None = None):
        """`request_timeout`: seconds one request may take. `max_failures`: failed attempts in a row
        before the run ends (0 = retry forever). `timeout` and `max_retries` (N retries = N + 1
        attempts) are the older names of the two and still accepted."""
        import httpx

        if timeout is not None:
            request_timeout = timeout
        if max_retries is not None:
            max_failures = max_retries + 1
        self.url = url.rstrip("/").removesuffix("/v1")
        self.top_k, self.backoff, self.model = top_k, backoff, model
        self.request_timeout, self.max_failures = float(request_timeout), int(max_failures)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(
            self.request_timeout, connect=min(CONNECT_TIMEOUT, self.request_timeout)))
        self.max_tokens = 0  # becomes 1 for servers that refuse 0 (vLLM)

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One call, retried with backoff on timeouts, connection errors and 5xx until `max_failures`
        attempts in a row have failed (each call starts a fresh count: a success ends a streak)."""
        import httpx

        failures, all_slow, started = 0, True, time.monotonic()
        while True:
            slow = False
            try:
                resp = self.client.request(method, self.url + path, json=body)
                if resp.status_code not in RETRY_STATUS:
                    return self._check(resp)
                reason = f"HTTP {resp.status_code}"
            except (httpx.ReadTimeout, httpx.WriteTimeout):  # connected, but no answer in time: live and slow
                reason, slow = "timeout", True
            except httpx.TransportError as exc:  # refused, reset, DNS, connect timeout: nobody answering
                reason = type(exc).__name__
            failures += 1
            all_slow = all_slow and slow
            if self.max_failures and failures >= self.max_failures:
                raise OpdError(self._gave_up(reason, failures, all_slow, time.monotonic() - started))
            delay = min(self.backoff[1], self.backoff[0] * 2 ** (failures - 1))
            what = f"did not answer within {self.request_timeout:g} s" if slow else "unreachable"
            log.warning("teacher at %s %s, retrying in %.1fs (%s, attempt %d%s)", self.url, what, delay, reason,
                        failures, f" of {self.max_failures}" if self.max_failures else "")
            time.sleep(delay)

    def _gave_up(self, reason: str, failures: int, all_slow: bool, seconds: float) -> str:
        """The one line that ends the run: a slow teacher and a dead one need different fixes."""
        if all_slow:
            return (f"teacher at {self.url} did not answer within {self.request_timeout:g} s, {failures} times in "
                    f"a row (it is reachable but slow: raise teacher.request_timeout)")
        span = f"{failures} attempts over " + (f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s")
        if reason.startswith("HTTP"):
            return f"teacher at {self.url} answered {reason} for {span}: see the server's log"
        return f"teacher at {self.url} unreachable ({reason}) for {span}: is the server running?"

    def _check(self, resp) -> dict:
        """Errors that retrying cannot fix end the run with one line."""
        if resp.status_code == 401:
            raise OpdError(f"teacher at {self.url} refused the API key (401): check the token")
        if resp.status_code >= 400:
            try:
                msg = resp.json().get("error", {}).get("message") or resp.text
            except ValueError:
                msg = resp.text
            raise OpdError(f"teacher at {self.url} rejected the request ({resp.status_code}): {str(msg)[:300]}")
        return resp.json()

    def health(self) -> dict:
        """The server's /health answer (opd: status, model, tokenizer_sha256, vocab_size; vLLM: empty)."""
        import httpx

        try:
            resp = self.client.get(self.url + "/health")
        except httpx.TransportError as exc:
            raise OpdError(f"teacher at {self.url} unreachable ({type(exc).__name__})") from None
        out = self._check(resp) if resp.content else {}
        return out if isinstance(out, dict) else {}

    def info(self) -> dict:
        """What the server serves: {"model", "tokenizer_sha256", "vocab_size"}, None where it does not say
        (vLLM's /health is empty)."""
        served = self.health()
        return {"model": served.get("model", self.model), "tokenizer_sha256": served.get("tokenizer_sha256"),
                "vocab_size": served.get("vocab_size")}

    def check_tokenizer(self, tokenizer, vocab_size: int | None = None) -> None:
        """Refuse a teacher whose token ids mean other text than the student's (or, given the student's
        `vocab_size`, whose logits have another width); a server that does not say passes."""
        from opd.backends.hf import tokenizer_sha256

        served = self.info()
        if served["tokenizer_sha256"] is not None and served["tokenizer_sha256"] != tokenizer_sha256(tokenizer):
            raise OpdError(f"teacher at {self.url} uses another tokenizer than the student (sha256 "
                           f"{served['tokenizer_sha256'][:12]}... vs {tokenizer_sha256(tokenizer)[:12]}...): "
                           f"opd needs a shared tokenizer")
        if vocab_size is not None and served["vocab_size"] not in (None, vocab_size):
            raise OpdError(f"teacher at {self.url} has a vocabulary of {served['vocab_size']} tokens, the student "
                           f"{vocab_size}: opd needs a shared vocabulary")

    def _complete(self, sequences: list[list[int]]) -> dict:
        body = {"prompt": sequences, "echo": True, "max_tokens": self.max_tokens, "temperature": 0.0,
                "logprobs": self.top_k, "prompt_logprobs": self.top_k}
        if self.model:
            body["model"] = self.model
        try:
            return self._request("POST", "/v1/completions", body)
        except OpdError as exc:
            if self.max_tokens == 0 and "max_tokens" in str(exc) and "(400)" in str(exc):
                self.max_tokens = 1  # vLLM: "max_tokens must be at least 1"
                return self._complete(sequences)
            raise

    def _choices(self, answer: dict, n: int) -> list[dict]:
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        if len(choices) != n:
            raise OpdError(f"teacher at {self.url} answered {len(choices)} choices for {n} prompts")
        return choices

    def generate_greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """The teacher's greedy completion of each token-id prompt, as token ids (ending with the EOS
        when it stopped there; at most `max_new_tokens`)."""
        if max_new_tokens < 1:
            raise OpdError("generate_greedy: max_new_tokens must be at least 1")
        if not prompts:
            return []
        body = {"prompt": prompts, "max_tokens": max_new_tokens, "temperature": 0.0, "return_token_ids": True}
        if self.model:
            body["model"] = self.model
        choices = self._choices(self._request("POST", "/v1/completions", body), len(prompts))
        if any(c.get("token_ids") is None for c in choices):
            raise OpdError(f"teacher at {self.url} returned no token ids for its completions "
                           f"(opd serve-teacher and vLLM >= 0.10.2 do)")
        return [list(c["token_ids"]) for c in choices]

    def score_tokens(self, sequences: list[list[int]], completion_starts: list[int]):
        """Log-probs of tokens completion_starts[i]: of each sequence, and the top-k per position.

        Returns (logprobs, topk): logprobs[i][j] = log p(seq[s + j] | seq[:s + j]) with s the start;
        topk[i][j] = {token_id: logprob} of the k likeliest tokens there (None when top_k is 0).
        """
        if len(sequences) != len(completion_starts):
            raise OpdError("score_tokens: one completion start per sequence")
        if any(not 1 <= s <= len(seq) for seq, s in zip(sequences, completion_starts)):
            raise OpdError("score_tokens: a completion must start after the first token")
        choices = self._choices(self._complete(sequences), len(sequences))
        results = [self._parse(c, seq, s) for c, seq, s in zip(choices, sequences, completion_starts)]
        topk = [r[1] for r in results] if self.top_k else None
        return [r[0] for r in results], topk

    def _parse(self, choice: dict, seq: list[int], start: int):
        """Per-position log-probs from vLLM's prompt_logprobs, else the OpenAI token_logprobs."""
        n = len(seq)
        if choice.get("prompt_logprobs"):
            entries = choice["prompt_logprobs"][start:n]
            lps = [e[str(t)]["logprob"] for e, t in zip(entries, seq[start:n])]
            top = [{int(t): v["logprob"] for t, v in e.items() if v.get("rank", 0) <= self.top_k} for e in entries]
            return lps, top
        if self.top_k:
            raise OpdError(f"teacher at {self.url} returned no prompt_logprobs; top-k needs opd or vLLM")
        lps = choice["logprobs"]["token_logprobs"][start:n]
        if len(lps) != n - start or any(v is None for v in lps):
            raise OpdError(f"teacher at {self.url} returned {len(lps)} log-probs for {n - start} tokens")
        return lps, None
