"""A teacher behind HTTP: `opd serve-teacher` or vLLM's OpenAI-compatible server.

Serve a teacher with opd:   opd serve-teacher --model DIR_OR_NAME --port 8000 [--token SECRET]
or with vLLM:               vllm serve MODEL --port 8000 --max-logprobs 20
(vLLM answers `prompt_logprobs` only up to `--max-logprobs`, so it must be >= top_k.)

opd sends token ids, never text (`prompt: [[ids], ...]`, `echo: true`, `max_tokens: 0`), so the
teacher scores exactly the student's tokens: teacher and student tokenizers must match. vLLM's
per-token `prompt_logprobs` are used when the server returns them, else the OpenAI
`logprobs.token_logprobs`. vLLM refuses `max_tokens: 0`; the client then asks for one generated
token and ignores it. An unreachable or failing (5xx) teacher is retried with exponential backoff,
forever by default, so a run waits for a restarted server; a 400/401 stops the run at once.
"""

from __future__ import annotations

import logging
import time

from opd.errors import OpdError

log = logging.getLogger("opd.remote")
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class RemoteTeacher:
    """Scores token sequences on a remote teacher; returns completion log-probs (and top-k)."""

    def __init__(self, url: str, api_key: str | None = None, top_k: int = 0, timeout: float = 60,
                 max_retries: int | None = None, backoff: tuple[float, float] = (0.5, 30.0),
                 model: str | None = None):
        import httpx

        self.url = url.rstrip("/").removesuffix("/v1")
        self.top_k, self.max_retries, self.backoff, self.model = top_k, max_retries, backoff, model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout)
        self.max_tokens = 0  # becomes 1 for servers that refuse 0 (vLLM)

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One call, retried with backoff on connection errors, timeouts and 5xx."""
        import httpx

        attempt = 0
        while True:
            try:
                resp = self.client.request(method, self.url + path, json=body)
                if resp.status_code not in RETRY_STATUS:
                    return self._check(resp)
                reason = f"HTTP {resp.status_code}"
            except httpx.TransportError as exc:  # connect/read errors and timeouts
                reason = type(exc).__name__
            if self.max_retries is not None and attempt >= self.max_retries:
                raise OpdError(f"teacher at {self.url} unreachable ({reason}) after {attempt + 1} attempts")
            delay = min(self.backoff[1], self.backoff[0] * 2 ** attempt)
            log.warning("teacher at %s unreachable, retrying in %.1fs (%s)", self.url, delay, reason)
            time.sleep(delay)
            attempt += 1

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
        """The server's /health answer (opd: {"status": "ok", "model": ...}; vLLM: empty)."""
        import httpx

        try:
            resp = self.client.get(self.url + "/health")
        except httpx.TransportError as exc:
            raise OpdError(f"teacher at {self.url} unreachable ({type(exc).__name__})") from None
        out = self._check(resp) if resp.content else {}
        return out if isinstance(out, dict) else {}

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

    def score_tokens(self, sequences: list[list[int]], completion_starts: list[int]):
        """Log-probs of tokens completion_starts[i]: of each sequence, and the top-k per position.

        Returns (logprobs, topk): logprobs[i][j] = log p(seq[s + j] | seq[:s + j]) with s the start;
        topk[i][j] = {token_id: logprob} of the k likeliest tokens there (None when top_k is 0).
        """
        if len(sequences) != len(completion_starts):
            raise OpdError("score_tokens: one completion start per sequence")
        if any(not 1 <= s <= len(seq) for seq, s in zip(sequences, completion_starts)):
            raise OpdError("score_tokens: a completion must start after the first token")
        choices = sorted(self._complete(sequences)["choices"], key=lambda c: c["index"])
        if len(choices) != len(sequences):
            raise OpdError(f"teacher at {self.url} answered {len(choices)} choices for {len(sequences)} prompts")
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
