"""Multi-turn episodes (opd/rollout/episodes.py) on tiny models from a config, with user environments
from tests/rollout/toy_envs.py loaded as `python:module:Class`."""

import pytest
import torch

from opd.backends.hf import init_model, load_model
from opd.batch import make_sft_batch, position_ids
from opd.errors import OpdError
from opd.rollout.backend import HFBackend
from opd.rollout.episodes import episode_stats, load_env, render, run_episodes
from opd.tasks.data import Example
from opd.teachers.local import score
from opd.train.chunked import completion_hidden

# one marker character per role; an assistant turn ends with EOS, as opd requires
TEMPLATE = ("{% for m in messages %}{{ '[' + m['role'][0] + ']' + m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}[a]{% endif %}")
TOY = "python:tests.rollout.toy_envs:"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("episodes")
    texts = ["abc?ok[]uatsmore 0123456789"]
    out = {}
    for name, hidden, seed in (("student", 32, 0), ("teacher", 48, 1)):
        path = init_model("qwen3", 2, hidden, 4, texts, root / name, seed=seed)
        loaded = load_model(str(path), trainable=True)
        loaded.tokenizer.chat_template = TEMPLATE
        out[name] = loaded
    return out


def examples(n=6):
    return [Example(prompt=f"a{i % 10}", answer=str(i % 10), extra={"hint": i}) for i in range(n)]


def student_decode(student, max_new_tokens=6):
    tok = student.tokenizer
    backend = HFBackend(student.model, tok.eos_token_id, tok.pad_token_id, vocab_size=len(tok))
    return lambda prompts, u: backend.generate(prompts, max_new_tokens=max_new_tokens, uniforms=u,
                                               greedy=u is None)


def episodes(models, env, n=6, max_turns=3, seed=0):
    tok = models["student"].tokenizer
    uniforms = torch.rand(n, max_turns, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return run_episodes(student_decode(models["student"]), env, examples(n), tok, max_turns=max_turns,
                        uniforms=uniforms)


def scripted(tokenizer, replies):
    """A fake model: the k-th assistant turn of the episode whose user message is `prompt` is
    replies(prompt)[k] (the last one repeats), ended by EOS unless it ends with '~' (runs out of tokens)."""
    def decode(prompts, _uniforms):
        rows, ended = [], []
        for ids in prompts:
            text = tokenizer.decode(ids, skip_special_tokens=False)
            prompt, turn = text.split("]", 1)[1].split("[", 1)[0], text.count("[a]") - 1
            plan = replies(prompt)
            reply = plan[min(turn, len(plan) - 1)]
            out = tokenizer(reply.rstrip("~"), add_special_tokens=False).input_ids
            ended.append(not reply.endswith("~"))
            rows.append(out + [tokenizer.eos_token_id] * ended[-1])
        batch = make_sft_batch(prompts, rows, tokenizer.pad_token_id)
        batch.sample_logprobs = torch.full(batch.completion_ids.shape, -1.0) * batch.completion_mask
        batch.truncated = ~torch.tensor(ended)
        return batch
    return decode


def scripted_episodes(models, env, replies, n=6, max_turns=3):
    tok = models["student"].tokenizer
    return run_episodes(scripted(tok, replies), env, examples(n), tok, max_turns=max_turns)


def test_an_episode_is_its_rendered_transcript_and_masks_split_model_from_environment(models):
    env = load_env(TOY + "LookupEnv", {"reply": "ok"})
    tok = models["student"].tokenizer
    batch, transcripts, turn_tokens = episodes(models, env, n=8, seed=3)
    seen = batch.attention_mask.bool()
    for row, messages in enumerate(transcripts):
        ids = batch.input_ids[row][seen[row]].tolist()
        text = tok.decode(ids, skip_special_tokens=False)
        if not batch.truncated[row]:  # what both models read is exactly the template's rendering
            assert text == render(tok, messages, False)
        # the model's tokens: completion_mask; the environment's: context_mask; never both
        model_ids = batch.completion_ids[row][batch.completion_mask[row].bool()].tolist()
        assert len(model_ids) == sum(turn_tokens[row])
        assert not (batch.completion_mask[row].bool() & batch.context_mask[row].bool()).any()
        assistant = [m["content"] for m in messages if m["role"] == "assistant"]
        assert len(assistant) == len(turn_tokens[row])
    # some episodes called the tool and went on (the sampled student is random)
    assert any(episode_stats(m)["tool_calls"] for m in transcripts) or batch.context_mask.sum() == 0


def test_the_teacher_scores_exactly_the_students_ids_environment_included(models):
    env = load_env(TOY + "LookupEnv", {})
    batch, _, _ = scripted_episodes(models, env, lambda p: ["?", "?", p[-1]])
    assert batch.context_mask.sum() > 0
    teacher = models["teacher"].model
    got = score(teacher, batch).logprobs
    with torch.no_grad():  # the teacher's own forward over the whole episode, by hand
        mask = batch.attention_mask
        logits = teacher(input_ids=batch.input_ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        start = batch.prompt_ids.shape[1] - 1
        logp = torch.log_softmax(logits[:, start:start + batch.completion_ids.shape[1]].float(), -1)
        want = logp.gather(-1, batch.completion_ids[..., None])[..., 0] * batch.completion_mask
    assert torch.allclose(got, want, atol=1e-5)
    assert (got[batch.context_mask.bool()] == 0).all()  # environment tokens carry no score


def test_environment_tokens_get_zero_gradient(models):
    from opd.config import TrainConfig
    from opd.methods import make_method
    from opd.methods.base import MethodOptions
    from opd.objectives.select import make_objective
    from opd.config import ObjectiveConfig
    from opd.train.optim import make_optimizer
    from opd.train.step import update

    env = load_env(TOY + "LookupEnv", {})
    batch, _, _ = scripted_episodes(models, env, lambda p: ["?", "3"])  # a call, the tool's answer, the reply
    assert batch.context_mask.sum() > 0
    student = models["student"].model
    scores = score(models["teacher"].model, batch)
    captured = {}

    def keep(_module, _inputs, output):  # the body's final hidden states [B, L, H] (not the no-grad probe's)
        if output.requires_grad:
            output.retain_grad()
            captured["hidden"] = output

    handle = student.model.norm.register_forward_hook(keep)
    optimizer, scheduler = make_optimizer(student, lr=0.0)
    try:
        update(student, optimizer, scheduler, make_method(MethodOptions()), make_objective(ObjectiveConfig(),
               teacher_has_logits=True), batch, TrainConfig(precision="float32"), scores=scores,
               vocab_size=len(models["student"].tokenizer))
    finally:
        handle.remove()
    grad = captured["hidden"].grad.abs().sum(-1)  # [B, L]
    start = batch.prompt_ids.shape[1] - 1  # position p predicts completion token p - start
    predicts = grad[:, start:start + batch.completion_ids.shape[1]]
    assert (predicts[batch.context_mask.bool()] == 0).all()  # a position that predicts an environment token
    assert (predicts[batch.completion_mask.bool()] > 0).all()


def test_max_turns_truncates_an_episode_that_never_ends(models):
    env = load_env(TOY + "EndlessEnv", {})
    batch, transcripts, turn_tokens = scripted_episodes(models, env, lambda p: ["1", "2", "3"], n=4, max_turns=2)
    assert batch.truncated.all()
    assert all(len(k) == 2 for k in turn_tokens)
    assert all([m["content"] for m in t if m["role"] == "assistant"] == ["1", "2"] for t in transcripts)
    # a turn that runs out of tokens ends its episode, truncated, without asking the environment
    env = load_env(TOY + "LookupEnv", {})
    batch, transcripts, _ = scripted_episodes(models, env, lambda p: ["?~"], n=2)
    assert batch.truncated.all() and not env.seen and all(len(t) == 2 for t in transcripts)


def test_episodes_of_different_lengths_batch_together(models):
    env = load_env(TOY + "LookupEnv", {})
    plan = {"a0": ["5"], "a1": ["?", "1"], "a2": ["?", "?", "2"]}
    batch, transcripts, turn_tokens = scripted_episodes(models, env, lambda p: plan[p], n=3, max_turns=4)
    assert [episode_stats(t) for t in transcripts] == [
        {"turns": 1, "tool_calls": 0, "redundant_calls": 0, "malformed_calls": 0},
        {"turns": 2, "tool_calls": 1, "redundant_calls": 0, "malformed_calls": 0},
        {"turns": 3, "tool_calls": 2, "redundant_calls": 1, "malformed_calls": 0}]
    assert not batch.truncated.any() and turn_tokens == [[2], [2, 2], [2, 2, 2]]
    assert batch.context_mask[0].sum() == 0 and batch.context_mask[2].sum() > batch.context_mask[1].sum()


def test_an_environment_that_raises_is_one_line_naming_the_row(models):
    env = load_env(TOY + "BrokenEnv", {})
    with pytest.raises(OpdError) as info:
        scripted_episodes(models, env, lambda p: ["?"], n=3)
    message = str(info.value)
    assert "\n" not in message and "step() failed on the episode of row 'a" in message
    assert "ValueError: tool server down" in message


def test_a_malformed_assistant_message_reaches_step_unchanged(models):
    env = load_env(TOY + "LookupEnv", {})
    scripted_episodes(models, env, lambda p: ["?c [u]", " ? "], n=1)
    assert env.seen[0][1:] == [{"role": "assistant", "content": "?c [u]"}]  # the environment decides
    assert env.seen[1][-1] == {"role": "assistant", "content": " ? "}
    assert env.seen[1][2]["error"] == "bad call"  # its own verdict, kept in the transcript
    # and a sampled student's raw text, special tokens and all, is what step() receives
    tok = models["student"].tokenizer
    env = load_env(TOY + "LookupEnv", {})
    batch, transcripts, turn_tokens = episodes(models, env, n=8, seed=11)
    for row, messages in enumerate(transcripts):
        first = batch.completion_ids[row][:turn_tokens[row][0]].tolist()
        text = tok.decode(first[:-1] if first and first[-1] == tok.eos_token_id else first, skip_special_tokens=False)
        assert messages[1] == {"role": "assistant", "content": text}


def test_load_env_errors_are_one_line():
    with pytest.raises(OpdError, match="must be 'python:module:Class'"):
        load_env("tests.rollout.toy_envs.LookupEnv")
    with pytest.raises(OpdError, match="cannot load it"):
        load_env(TOY + "Nope")
    with pytest.raises(OpdError, match=r"LookupEnv\(\*\*task.env_params\) failed: TypeError"):
        load_env(TOY + "LookupEnv", {"colour": "red"})


def test_episode_stats_count_calls_redundancy_and_errors():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "?"},
                {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "?"},
                {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "?x"},
                {"role": "tool", "content": "ok", "error": "bad call"}, {"role": "assistant", "content": "5"}]
    assert episode_stats(messages) == {"turns": 4, "tool_calls": 3, "redundant_calls": 1, "malformed_calls": 1}
