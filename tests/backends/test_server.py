"""The teacher server and its client over real HTTP on 127.0.0.1 (server in a subprocess)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import httpx  # noqa: E402  (the dev extra installs fastapi, uvicorn and httpx)

from opd.backends.remote import RemoteTeacher  # noqa: E402
from opd.backends.server import serve  # noqa: E402
from opd.errors import OpdError  # noqa: E402

TOKEN = "s3cret"
START = ("import sys; from opd.backends.server import serve; "
         "serve(sys.argv[1], port=int(sys.argv[2]), token=sys.argv[3] or None)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, port: int, token: str | None) -> subprocess.Popen:
    """Start `serve` in a subprocess and wait until /health answers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-c", START, str(model_dir), str(port), token or ""], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", headers=headers, timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start within 120 s")


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    proc.stderr.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random model that greedily repeats a prompt's last token, except that after '2' (id 7) it ends:
    EOS's (tied) embedding is 1.5x that of '2', so greedy generation both stops at EOS and runs out."""
    from opd.backends.hf import init_model, load_model

    out = init_model("qwen3", 1, 32, 2, ["abc=0123456789+"], tmp_path_factory.mktemp("srv") / "m", seed=0)
    loaded = load_model(str(out))
    with torch.no_grad():
        emb = loaded.model.get_input_embeddings().weight
        emb[loaded.tokenizer.eos_token_id] = 1.5 * emb[7]
    loaded.model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(model_dir):
    port = free_port()
    proc = start_server(model_dir, port, TOKEN)
    yield f"http://127.0.0.1:{port}"
    stop(proc)


@pytest.fixture(scope="module")
def direct(model_dir):
    """log_softmax of an unpadded forward pass, row j predicting token j + 1."""
    from opd.backends.hf import load_model

    model = load_model(str(model_dir)).model

    def logprobs(seq):
        with torch.inference_mode():
            return torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].float(), dim=-1)
    return logprobs


SEQS = [[1, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 6, 5, 4]]  # different lengths: the short one is padded


def post(url, body, token=TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=30)


def test_logprobs_match_direct_pass(server, direct):
    k = 3
    resp = post(server, {"prompt": SEQS, "max_tokens": 0, "echo": True, "logprobs": k, "prompt_logprobs": k})
    assert resp.status_code == 200, resp.text
    choices = resp.json()["choices"]
    for seq, choice in zip(SEQS, choices):
        ref = direct(seq)
        assert choice["token_ids"] == seq
        lps = choice["logprobs"]["token_logprobs"]
        assert lps[0] is None and len(lps) == len(seq)
        expected = [ref[j - 1, seq[j]].item() for j in range(1, len(seq))]
        assert lps[1:] == pytest.approx(expected, abs=1e-5)
        for j in range(1, len(seq)):
            best_lp, best_id = ref[j - 1].topk(k)
            top = choice["logprobs"]["top_logprobs"][j]
            assert len(top) == k and sorted(top.values()) == pytest.approx(sorted(best_lp.tolist()), abs=1e-5)
            vllm = choice["prompt_logprobs"][j]
            assert {int(t) for t, v in vllm.items() if v["rank"] <= k} == set(best_id.tolist())
            assert vllm[str(seq[j])]["logprob"] == pytest.approx(expected[j - 1], abs=1e-5)


def test_string_prompt_and_generation_refused(server):
    resp = post(server, {"prompt": "abc", "max_tokens": 0, "echo": True, "logprobs": 1})
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"].endswith("abc")
    resp = post(server, {"prompt": "abc", "max_tokens": 5, "echo": True})
    assert resp.status_code == 400 and "only scores" in resp.json()["error"]["message"]


def test_token_required(server):
    body = {"prompt": SEQS, "max_tokens": 0, "echo": True}
    assert post(server, body, token=None).status_code == 401
    assert post(server, body, token="wrong").status_code == 401
    assert httpx.get(server + "/health").status_code == 401
    assert post(server, body).status_code == 200


def test_refuses_public_bind_without_token(model_dir):
    with pytest.raises(OpdError, match="0.0.0.0"):
        serve(str(model_dir), host="0.0.0.0", port=free_port())


def test_remote_teacher_scores_completions(server, direct):
    teacher = RemoteTeacher(server, api_key=TOKEN, top_k=2)
    assert teacher.health()["status"] == "ok"
    starts = [6, 2]
    lps, topk = teacher.score_tokens(SEQS, starts)
    for seq, s, got, top in zip(SEQS, starts, lps, topk):
        ref = direct(seq)
        assert got == pytest.approx([ref[j - 1, seq[j]].item() for j in range(s, len(seq))], abs=1e-5)
        assert [set(d) for d in top] == [set(ref[j - 1].topk(2).indices.tolist()) for j in range(s, len(seq))]
    with pytest.raises(OpdError, match="401"):
        RemoteTeacher(server, api_key="wrong").score_tokens(SEQS, starts)


def test_client_waits_for_restarted_server(model_dir, direct, caplog):
    port = free_port()
    proc = start_server(model_dir, port, None)
    teacher = RemoteTeacher(f"http://127.0.0.1:{port}/v1", backoff=(0.1, 0.5))
    teacher.score_tokens(SEQS, [1, 1])
    stop(proc)  # SIGKILL
    result = {}
    call = threading.Thread(target=lambda: result.update(out=teacher.score_tokens(SEQS, [1, 1])))
    with caplog.at_level(logging.WARNING, logger="opd.remote"):
        call.start()
        deadline = time.monotonic() + 30
        while "unreachable, retrying in" not in caplog.text:
            assert time.monotonic() < deadline, "client never reported the unreachable teacher"
            time.sleep(0.1)
        assert call.is_alive()
        proc = start_server(model_dir, port, None)
        call.join(timeout=60)
    stop(proc)
    assert not call.is_alive()
    lps, topk = result["out"]
    assert topk is None
    for seq, got in zip(SEQS, lps):
        ref = direct(seq)
        assert got == pytest.approx([ref[j - 1, seq[j]].item() for j in range(1, len(seq))], abs=1e-5)


def test_served_top_k_feeds_the_topk_objectives(server, model_dir):
    """A served teacher's top-k log-probs give the bucketed top-k KL (loss and top-k ids) that the
    same teacher computes locally from its logits."""
    from types import SimpleNamespace

    from opd.backends.hf import load_model
    from opd.config import ObjectiveConfig, TrainConfig
    from opd.objectives.select import make_objective
    from opd.batch import make_sft_batch
    from opd.methods import make_method
    from opd.methods.base import MethodOptions
    from opd.tasks.schema import PromptSchema
    from opd.teachers import LocalTeacher, ServedTeacher, TeacherPool
    from opd.train.optim import make_optimizer
    from opd.train.step import update

    k = 5
    student = load_model(str(model_dir), trainable=True)
    with torch.no_grad():
        for p in student.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tok, schema = student.tokenizer, PromptSchema.from_spec("{prompt}")
    batch = make_sft_batch([[1, 4, 5], [1, 6]], [[6, 7, 8, 2], [5, 2]], tok.pad_token_id)
    examples = [SimpleNamespace(tag="default")] * 2
    served = TeacherPool([ServedTeacher("t", RemoteTeacher(server, api_key=TOKEN, top_k=k), pad_id=tok.pad_token_id,
                                        eos_id=tok.eos_token_id)], schema, tok)
    local = TeacherPool([LocalTeacher("t", str(model_dir), dtype="float32", student_schema=schema)], schema, tok)
    assert served.top_k == k and not served.has_logits
    losses = []
    for pool, objective in ((served, make_objective(ObjectiveConfig(name="topk_reverse_kl"), False, served.top_k)),
                            (local, make_objective(ObjectiveConfig(name="topk_reverse_kl", top_k=k)))):
        scores, _ = pool.score(batch, examples)
        optimizer, scheduler = make_optimizer(student.model, lr=0.0)
        losses.append(update(student.model, optimizer, scheduler, make_method(MethodOptions()), objective, batch,
                             TrainConfig(), scores=scores)["loss"])
        if pool is served:
            served_ids = scores.topk_ids
        else:
            from opd.objectives.divergences import teacher_topk

            local_ids = teacher_topk(scores.logits(), k)[1]
    mask = batch.completion_mask.bool()
    assert torch.equal(served_ids[mask], local_ids[mask])
    assert losses[0] > 0 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    with pytest.raises(OpdError, match="needs the teacher's top-k"):
        make_objective(ObjectiveConfig(name="topk_reverse_kl"), teacher_has_logits=False, teacher_top_k=0)


GEN = [[1, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 7], [1, 6, 5, 4], [1, 9, 9, 9, 3]]


def test_greedy_generation_matches_the_local_sampler(server, model_dir):
    """The served teacher's greedy completions are the token ids a local greedy eval of it produces."""
    from opd.backends.hf import load_model
    from opd.rollout.sampler import generate

    local = load_model(str(model_dir))
    tok = local.tokenizer
    batch = generate(local.model, GEN, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=6,
                     greedy=True)
    expected = [[t for t, m in zip(ids, mask) if m]
                for ids, mask in zip(batch.completion_ids.tolist(), batch.completion_mask.tolist())]
    got = RemoteTeacher(server, api_key=TOKEN).generate_greedy(GEN, max_new_tokens=6)
    assert got == expected
    assert got[1] == [tok.eos_token_id] and len(got[0]) == 6 and tok.eos_token_id not in got[0]  # both endings

    resp = post(server, {"prompt": GEN[:2], "max_tokens": 6, "temperature": 0, "return_token_ids": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    assert [c["prompt_token_ids"] for c in body["choices"]] == GEN[:2]
    assert body["choices"][1]["text"] == "" and body["choices"][0]["text"] == tok.decode(got[0])
    assert body["usage"]["completion_tokens"] == 7


def test_only_greedy_generation_is_served(server):
    sampled = post(server, {"prompt": GEN, "max_tokens": 4})  # OpenAI's default temperature is 1
    assert sampled.status_code == 400 and "decodes greedily" in sampled.json()["error"]["message"]
    with_lps = post(server, {"prompt": GEN, "max_tokens": 4, "temperature": 0, "logprobs": 2})
    assert with_lps.status_code == 400 and "not served" in with_lps.json()["error"]["message"]
    too_long = post(server, {"prompt": GEN, "max_tokens": 10_000, "temperature": 0})
    assert too_long.status_code == 400 and "positions" in too_long.json()["error"]["message"]


def test_health_reports_tokenizer_and_vocabulary(server, model_dir, tmp_path):
    """A client can refuse a teacher whose token ids mean other text than the student's."""
    from opd.backends.hf import init_model, load_model, tokenizer_sha256

    tok = load_model(str(model_dir)).tokenizer
    teacher = RemoteTeacher(server, api_key=TOKEN)
    assert len(tok) == 23  # 4 special tokens, 15 characters, 4 chat-template role markers (opd/tasks/chat.py)
    assert teacher.info() == {"model": str(model_dir), "tokenizer_sha256": tokenizer_sha256(tok), "vocab_size": 23}
    teacher.check_tokenizer(tok, vocab_size=23)
    other = load_model(str(init_model("qwen3", 1, 32, 2, ["xyz="], tmp_path / "other", seed=0))).tokenizer
    with pytest.raises(OpdError, match="another tokenizer than the student"):
        teacher.check_tokenizer(other)
    with pytest.raises(OpdError, match="vocabulary of 23 tokens, the student 32"):
        teacher.check_tokenizer(tok, vocab_size=32)
