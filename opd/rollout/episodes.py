"""Multi-turn episodes: the model writes each assistant turn, an environment answers (tool results,
follow-ups), until the environment says the episode is over or `rollout.max_turns` turns were written.

    env = Class(**task.env_params)                  # task.env: "python:module:Class", built once
    messages = env.reset(example)                   # the opening chat messages
    messages += env.step(messages) -> (new, done)   # after every assistant turn

One episode is one row of a Batch: the prompt is the rendering of the opening messages; the
completion holds every later token in order. The model's own tokens have completion_mask 1 (the
loss trains on them); the environment's messages, rendered by the chat template, have context_mask 1
(both models attend to them, no loss touches them). Teacher and student therefore read the same ids,
and the teacher scores the whole episode in one pass. A turn's sampling uses its own uniforms
(row, turn, position), so an episode does not depend on the other rows of its batch.
"""

from __future__ import annotations

import importlib
import json

import torch

from opd.batch import Batch, left_pad
from opd.errors import OpdError


def load_env(spec: str, params: dict | None = None):
    """The environment instance `spec` ("python:module:Class") names, built as Class(**params)."""
    if not isinstance(spec, str) or not spec.startswith("python:") or spec.count(":") != 2:
        raise OpdError(f"task.env must be 'python:module:Class', got {spec!r}")
    _, module, name = spec.split(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise OpdError(f"task.env {spec}: cannot load it ({type(exc).__name__}: {exc})") from None
    try:
        env = cls(**(params or {}))
    except Exception as exc:  # noqa: BLE001 - a user's constructor: say which, in one line
        raise OpdError(f"task.env {spec}: {name}(**task.env_params) failed: {type(exc).__name__}: {exc}") from None
    for method in ("reset", "step"):
        if not callable(getattr(env, method, None)):
            raise OpdError(f"task.env {spec}: {name} has no {method}() method (see docs/multi_turn.md)")
    env.spec = getattr(env, "spec", spec)
    return env


def example_dict(example) -> dict:
    """What the environment receives: the row's fields (prompt, answer, tag and every extra field)."""
    return {**example.extra, "prompt": example.prompt, "answer": example.answer, "tag": example.tag}


def render(tokenizer, messages: list[dict], generation: bool, chat_kwargs: dict | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                             **(chat_kwargs or {}))
    except Exception as exc:  # noqa: BLE001 - jinja errors, a template without a role
        raise OpdError(f"the tokenizer's chat template cannot render the episode ({type(exc).__name__}: {exc})") \
            from None


def run_episodes(decode, env, examples, tokenizer, *, max_turns: int, uniforms: torch.Tensor | None = None,
                 chat_kwargs: dict | None = None) -> tuple[Batch, list[list[dict]], list[list[int]]]:
    """Episodes for `examples`, batched across rows with different numbers of turns.

    decode(prompts: list[list[int]], uniforms [n, T] | None) -> Batch: one assistant turn per prompt (the
    student's sampler, or a teacher's). uniforms [B, max_turns, T]: per row, turn and position (None:
    greedy). Returns the batch, each episode's messages and each episode's tokens per assistant turn.
    """
    eos = tokenizer.eos_token_id
    eos_text = tokenizer.decode([eos], skip_special_tokens=False)
    messages = [_reset(env, ex) for ex in examples]
    prompts = [_encode(tokenizer, render(tokenizer, m, True, chat_kwargs)) for m in messages]
    n = len(examples)
    ids, trained, context, logprobs = ([[] for _ in range(n)] for _ in range(4))
    turn_tokens = [[] for _ in range(n)]
    truncated = [False] * n
    active = list(range(n))
    for turn in range(max_turns):
        if not active:
            break
        batch = decode([prompts[i] + ids[i] for i in active], uniforms[active, turn] if uniforms is not None else None)
        still = []
        for j, i in enumerate(active):
            mask = batch.completion_mask[j].bool()
            new_ids = batch.completion_ids[j][mask].tolist()
            _append(i, new_ids, batch.sample_logprobs[j][mask].tolist(), True, ids, trained, context, logprobs)
            turn_tokens[i].append(len(new_ids))
            ended = bool(new_ids) and new_ids[-1] == eos and not bool(batch.truncated[j])
            text = tokenizer.decode(new_ids[:-1] if ended else new_ids, skip_special_tokens=False)
            messages[i].append({"role": "assistant", "content": text})  # unchanged: the environment judges it
            if not ended:  # the turn ran out of tokens: the episode ends here, truncated
                truncated[i] = True
                continue
            before = render(tokenizer, messages[i], False, chat_kwargs)
            appended, done = _step(env, messages[i], examples[i])
            messages[i] += appended
            if done:
                continue
            if turn == max_turns - 1:
                truncated[i] = True
                continue
            after = render(tokenizer, messages[i], True, chat_kwargs)
            env_ids = _encode(tokenizer, template_delta(before, after, eos_text))
            _append(i, env_ids, [0.0] * len(env_ids), False, ids, trained, context, logprobs)
            still.append(i)
        active = still
    return _batch(prompts, ids, trained, context, logprobs, truncated, tokenizer.pad_token_id), messages, turn_tokens


def template_delta(before: str, after: str, eos_text: str) -> str:
    """The text the template adds after the last assistant turn's EOS: the environment's messages and
    the next assistant header. `before` renders the episode up to that turn, `after` with the new messages."""
    cut = before.rfind(eos_text)
    if cut < 0 or not after.startswith(before[:cut + len(eos_text)]):
        raise OpdError("the chat template renders an episode differently once messages are added (its text up to "
                       "the last assistant turn changed): opd needs a template whose rendering only grows")
    return after[cut + len(eos_text):]


def episode_stats(messages: list[dict]) -> dict:
    """Turns, tool calls (assistant turns answered by a tool message), redundant calls (the same call
    again in the episode) and malformed calls (tool answers carrying an "error")."""
    turns = calls = redundant = malformed = 0
    seen = set()
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        turns += 1
        follow = messages[k + 1] if k + 1 < len(messages) else None
        if follow is not None and follow.get("role") == "tool":
            calls += 1
            redundant += m["content"] in seen
            seen.add(m["content"])
            malformed += bool(follow.get("error"))
    return {"turns": turns, "tool_calls": calls, "redundant_calls": redundant, "malformed_calls": malformed}


def final_answer(messages: list[dict]) -> str:
    """The last assistant message: what the verifier judges."""
    return next((m["content"] for m in reversed(messages) if m.get("role") == "assistant"), "")


def transcript_json(messages: list[dict]) -> str:
    return json.dumps(messages, ensure_ascii=False, default=str)


def _reset(env, example) -> list[dict]:
    try:
        messages = env.reset(example_dict(example))
    except Exception as exc:  # noqa: BLE001 - the user's environment: one line naming the row
        raise OpdError(f"environment {env.spec}: reset() failed on the episode of row {example.prompt!r}: "
                       f"{type(exc).__name__}: {exc}") from None
    return _checked(env, messages, example, "reset()")


def _step(env, messages, example) -> tuple[list[dict], bool]:
    try:
        out = env.step([dict(m) for m in messages])  # a copy: the environment cannot rewrite the transcript
    except Exception as exc:  # noqa: BLE001
        raise OpdError(f"environment {env.spec}: step() failed on the episode of row {example.prompt!r}: "
                       f"{type(exc).__name__}: {exc}") from None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise OpdError(f"environment {env.spec}: step() must return (messages, done), got {type(out).__name__} "
                       f"on the episode of row {example.prompt!r}")
    return _checked(env, out[0], example, "step()"), bool(out[1])


def _checked(env, messages, example, where: str) -> list[dict]:
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise OpdError(f"environment {env.spec}: {where} must return a list of {{'role': str, 'content': str}} "
                       f"messages, got {messages!r:.120} on the episode of row {example.prompt!r}")
    return [dict(m) for m in messages]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _append(i, new_ids, new_lps, model_wrote: bool, ids, trained, context, logprobs) -> None:
    ids[i] += new_ids
    trained[i] += [int(model_wrote)] * len(new_ids)
    context[i] += [int(not model_wrote)] * len(new_ids)
    logprobs[i] += new_lps


def _batch(prompts, ids, trained, context, logprobs, truncated, pad_id) -> Batch:
    p_ids, p_mask = left_pad(prompts, pad_id)
    width = max(1, max(map(len, ids)))

    def right(rows, value, dtype):
        out = torch.full((len(rows), width), value, dtype=dtype)
        for r, row in enumerate(rows):
            out[r, :len(row)] = torch.tensor(row, dtype=dtype)
        return out

    return Batch(p_ids, p_mask, right(ids, pad_id, torch.long), right(trained, 0, torch.long),
                 right(logprobs, 0.0, torch.float32), torch.tensor(truncated, dtype=torch.bool),
                 context_mask=right(context, 0, torch.long))
