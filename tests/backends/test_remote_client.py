"""RemoteTeacher's failure handling against real HTTP on 127.0.0.1: a slow teacher, a dead one, a failing
one, and a streak broken by a success. Tiny timeouts and backoff keep each test to a second or two."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from opd.backends.remote import RemoteTeacher
from opd.errors import OpdError

FAST = {"request_timeout": 0.2, "max_failures": 3, "backoff": (0.01, 0.02)}


class Scripted(ThreadingHTTPServer):
    """Answers each POST by the next entry of `script`: "ok" (completion [5, 2] for every prompt), "short"
    (one choice only), "slow" (ok, after five times the client's timeout) or an HTTP status; the last
    entry repeats. Records the request bodies."""

    daemon_threads, block_on_close = True, False

    def __init__(self, script: list):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script, self.bodies, self.lock = list(script), [], threading.Lock()

    def next_action(self):
        with self.lock:
            return self.script.pop(0) if len(self.script) > 1 else self.script[0]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):  # /health like vLLM's: 200 with an empty body
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        action = self.server.next_action()
        if action == "slow":
            time.sleep(1.0)
        n = 1 if action == "short" else len(body["prompt"])
        answer = {"choices": [{"index": i, "text": "x", "token_ids": [5, 2], "finish_reason": "stop"}
                              for i in range(n)]}
        status, payload = (action, b"{}") if isinstance(action, int) else (200, json.dumps(answer).encode())
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow answer
            pass


@pytest.fixture()
def serve():
    servers = []

    def start(*script) -> str:
        server = Scripted(list(script))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket is closed


def test_a_slow_teacher_ends_the_run_saying_it_is_slow(serve):
    url, server = serve("slow")
    started = time.monotonic()
    with pytest.raises(OpdError) as err:
        RemoteTeacher(url, **FAST).generate_greedy([[1, 4]], 4)
    assert str(err.value) == (f"teacher at {url} did not answer within 0.2 s, 3 times in a row "
                              f"(it is reachable but slow: raise teacher.request_timeout)")
    assert len(server.bodies) == 3 and time.monotonic() - started < 3


def test_a_dead_teacher_ends_the_run_saying_it_is_unreachable():
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(OpdError) as err:
        RemoteTeacher(url, **FAST).score_tokens([[1, 4, 5]], [1])
    assert str(err.value).startswith(f"teacher at {url} unreachable (ConnectError) for 3 attempts over ")
    assert str(err.value).endswith(": is the server running?") and "\n" not in str(err.value)


def test_a_failing_teacher_names_the_status(serve):
    url, server = serve(503)
    with pytest.raises(OpdError, match=r"answered HTTP 503 for 3 attempts over \d+ s: see the server's log"):
        RemoteTeacher(url, **FAST).generate_greedy([[1, 4]], 4)
    assert len(server.bodies) == 3


def test_a_success_resets_the_count_of_failures(serve):
    # two failures before each success: 4 failures over two calls, never 3 in a row
    url, server = serve("slow", 503, "ok", 503, "slow", "ok", "slow", "slow", "slow")
    teacher = RemoteTeacher(url, **FAST)
    assert teacher.generate_greedy([[1, 4]], 4) == [[5, 2]]
    assert teacher.generate_greedy([[1, 4]], 4) == [[5, 2]]
    with pytest.raises(OpdError, match="3 times in a row"):
        teacher.generate_greedy([[1, 4]], 4)
    assert len(server.bodies) == 9


def test_a_mixed_streak_is_not_called_slow(serve):
    url, _ = serve("slow", 503)
    with pytest.raises(OpdError, match="answered HTTP 503 for 3 attempts"):
        RemoteTeacher(url, **FAST).generate_greedy([[1, 4]], 4)


def test_greedy_request_and_older_keyword_names(serve):
    url, server = serve("ok")
    assert RemoteTeacher(url + "/v1", model="t").generate_greedy([[1, 4], [1]], 3) == [[5, 2], [5, 2]]
    body = server.bodies[-1]
    assert body == {"prompt": [[1, 4], [1]], "max_tokens": 3, "temperature": 0.0, "return_token_ids": True,
                    "model": "t"}
    # `timeout` / `max_retries` (N retries = N + 1 attempts) still work
    dead = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(OpdError, match="for 2 attempts"):
        RemoteTeacher(dead, timeout=0.2, max_retries=1, backoff=(0.01, 0.02)).score_tokens([[1, 4]], [1])


def test_wrong_number_of_choices_and_a_server_that_does_not_describe_itself(serve):
    url, _ = serve("short")
    teacher = RemoteTeacher(url, **FAST)
    with pytest.raises(OpdError, match="answered 1 choices for 2 prompts"):
        teacher.generate_greedy([[1, 4], [1]], 3)
    assert teacher.info() == {"model": None, "tokenizer_sha256": None, "vocab_size": None}
    teacher.check_tokenizer(object(), vocab_size=99)  # vLLM's empty /health: nothing to compare, passes
