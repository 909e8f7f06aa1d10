"""Greedy evaluation on held-out, deployment-shaped prompts."""

from __future__ import annotations

from dataclasses import dataclass, field

from opd.stats import wilson
from opd.rollout.prompts import encode_prompts
from opd.rollout.sampler import decode_completions, generate


@dataclass
class EvalResult:
    accuracy: float
    n: int
    records: list[dict] = field(default_factory=list)  # prompt, completion, expected, correct, well_formed

    def interval95(self) -> tuple[float, float]:
        """95% Wilson interval (the one the report and compare use)."""
        return wilson(self.accuracy, self.n)


def evaluate(model, tokenizer, examples, schema, verifier, *, max_new_tokens: int,
             batch_size: int = 256, progress: bool = False, desc: str = "eval", decode=None,
             kv_cache_gib: float | None = None) -> EvalResult:
    """Greedy-decode every example and verify it; a truncated or special-token answer is wrong.

    `decode(prompt_ids, examples) -> Batch` replaces the local model (e.g. a teacher that renders its
    own prompt, or a served one); `model` may then be None. The local model decodes on its own device,
    each batch in row groups whose KV cache fits `kv_cache_gib` (None: no bound)."""
    from tqdm.auto import tqdm

    if decode is None:
        def decode(prompts, _examples):
            return generate(model, prompts, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                            max_new_tokens=max_new_tokens, greedy=True, kv_cache_gib=kv_cache_gib)
    was_training = model is not None and model.training
    if model is not None:
        model.eval()
    records = []
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        chunk = examples[start:start + batch_size]
        batch = decode(encode_prompts(chunk, schema, tokenizer), chunk)
        for ex, (text, well_formed) in zip(chunk, decode_completions(tokenizer, batch)):
            correct = bool(well_formed and verifier(text, ex.answer))
            records.append({"prompt": ex.prompt, "completion": text, "expected": ex.answer,
                            "correct": correct, "well_formed": well_formed, "tag": ex.tag})
    if model is not None:
        model.train(was_training)
    n = len(records)
    return EvalResult(accuracy=sum(r["correct"] for r in records) / max(n, 1), n=n, records=records)


def evaluate_episodes(decode, env, examples, tokenizer, verifier, *, max_turns: int, batch_size: int = 256,
                      chat_kwargs: dict | None = None, progress: bool = False, desc: str = "eval") -> EvalResult:
    """Greedy multi-turn episodes (opd/rollout/episodes.py); the verifier judges the final assistant
    message, a truncated episode is wrong. decode(prompts, None) -> Batch: one greedy assistant turn."""
    from tqdm.auto import tqdm

    from opd.rollout.episodes import episode_stats, final_answer, run_episodes, transcript_json

    records = []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = examples[start:start + batch_size]
        batch, transcripts, _ = run_episodes(decode, env, chunk, tokenizer, max_turns=max_turns,
                                             chat_kwargs=chat_kwargs)
        for ex, messages, truncated in zip(chunk, transcripts, batch.truncated.tolist()):
            text = final_answer(messages)
            records.append({"prompt": ex.prompt, "completion": text, "expected": ex.answer,
                            "correct": bool(not truncated and verifier(text, ex.answer)), "well_formed": not truncated,
                            "tag": ex.tag, "transcript": transcript_json(messages), "stats": episode_stats(messages)})
    n = len(records)
    return EvalResult(accuracy=sum(r["correct"] for r in records) / max(n, 1), n=n, records=records)
