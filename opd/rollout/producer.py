"""Each step's rollouts: prompt choice, who samples (student, or teacher for sft/mixed), anchor
traces mixed in, and production ahead of time when a policy lag is allowed.

Every step's randomness is drawn from (seed, step) alone, so what a step trains on does not depend
on when it was produced; with `rollout.max_staleness = k` the batches of steps s..s+k are sampled
together at step s with the weights of version s−1 (lag 0..k).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from opd.rollout.prompts import encode_prompts
from opd.rollout.sampler import Batch, concat_batches, generate, left_pad
from opd.train.sft import make_sft_batch


def step_rng(seed: int, step: int) -> tuple[random.Random, torch.Generator]:
    """Independent, reproducible randomness for one step (prompt choice, token sampling)."""
    return random.Random(f"opd:{seed}:{step}"), torch.Generator().manual_seed(seed * 1_000_003 + step)


@dataclass
class Rollouts:
    batch: Batch
    examples: list  # the Example of each row
    sources: list[str]  # student | teacher | anchor, per row
    policy_version: int  # training step of the weights that sampled the batch (step − 1 when fresh)
    teacher_sampled: bool


class RolloutProducer:
    def __init__(self, cfg, pool, prompts, answers, anchors, anchor_answers, student, teachers, tokenizer):
        self.cfg, self.pool, self.prompts, self.answers = cfg, pool, prompts, answers
        self.anchors, self.anchor_answers = anchors, anchor_answers
        self.student, self.teachers, self.tok = student, teachers, tokenizer
        self.ahead: dict[int, Rollouts] = {}
        self.workers = None  # RayWorkers when scale.rollout_workers sample the student's rollouts

    def get(self, step: int) -> Rollouts:
        block = self.cfg.rollout.max_staleness + 1
        if step not in self.ahead:  # start of a block (or of a resumed run): sample the block now
            if self.workers is not None:
                self.workers.push_weights(self.student.model, version=step - 1)
            for t in range(step, step + block):
                self.ahead[t] = self._produce(t, policy_version=step - 1)
        return self.ahead.pop(step)

    def _produce(self, step: int, policy_version: int) -> Rollouts:
        cfg, tok = self.cfg, self.tok
        rng, gen = step_rng(cfg.train.seed, step)
        n_anchor = round(cfg.anchors.fraction * cfg.rollout.batch_size) if self.anchors else 0
        picks = [rng.randrange(len(self.prompts)) for _ in range(cfg.rollout.batch_size - n_anchor)]
        picks = [i for i in picks for _ in range(cfg.rollout.samples_per_prompt)]
        method = cfg.method.name
        teacher_sampled = method == "sft" or (method == "mixed" and rng.random() >= cfg.method.lmbda)
        examples = [self.pool[i] for i in picks]
        if self.answers is not None:  # sft from a traces file: the traces are the completions
            batch = make_sft_batch([self.prompts[i] for i in picks], [self.answers[i] for i in picks], tok.pad_token_id)
            sources = ["teacher"] * len(picks)
        elif teacher_sampled:
            batch = self._teacher_samples(picks, examples, gen)
            sources = ["teacher"] * len(picks)
        else:
            prompts = [self.prompts[i] for i in picks]
            uniforms = torch.rand(len(prompts), cfg.rollout.max_new_tokens, generator=gen)  # per row: splittable
            if self.workers is not None and self.workers.rollout:
                batch = self.workers.generate(prompts, uniforms, policy_version, self._options(greedy=False))
            else:
                batch = self._sample(self.student.model, prompts, gen, greedy=False, uniforms=uniforms)
            sources = ["student"] * len(picks)
        if n_anchor:
            rows = [rng.randrange(len(self.anchors)) for _ in range(n_anchor)]
            anchor_batch = make_sft_batch([self.anchor_answers[0][i] for i in rows],
                                          [self.anchor_answers[1][i] for i in rows], tok.pad_token_id)
            batch = concat_batches([batch, anchor_batch], tok.pad_token_id)
            examples += [self.anchors[i] for i in rows]
            sources += ["anchor"] * n_anchor
        return Rollouts(batch, examples, sources, policy_version, teacher_sampled)

    def _options(self, greedy: bool) -> dict:
        return dict(eos_id=self.tok.eos_token_id, pad_id=self.tok.pad_token_id, greedy=greedy,
                    max_new_tokens=self.cfg.rollout.max_new_tokens, temperature=self.cfg.rollout.temperature)

    def _sample(self, model, prompts, gen, greedy, uniforms=None):
        was_training = model.training
        model.eval()  # sample from the deployed policy (no dropout)
        try:
            return generate(model, prompts, generator=gen, uniforms=uniforms, **self._options(greedy))
        finally:
            model.train(was_training)

    def _teacher_samples(self, picks, examples, gen) -> Batch:
        """Each row sampled by the teacher of its task tag (rows regrouped in the original order)."""
        names = [self.teachers.route(ex.tag).name for ex in examples]
        parts, order = [], []
        for t in self.teachers.teachers:
            rows = [i for i, n in enumerate(names) if n == t.name]
            if rows:
                prompts = [self.prompts[picks[i]] for i in rows]
                if t.schema is not None:  # the teacher writes its trace reading its own prompt
                    prompts = encode_prompts([examples[i] for i in rows], t.schema, t.loaded.tokenizer)
                part = self._sample(t.loaded.model, prompts, gen, greedy=self.cfg.method.teacher_greedy)
                if t.schema is not None:  # ... and the student trains on it under the shared prompt
                    part.prompt_ids, part.prompt_mask = left_pad([self.prompts[picks[i]] for i in rows],
                                                                 self.tok.pad_token_id)
                parts.append(part)
                order += rows
        batch = concat_batches(parts, self.tok.pad_token_id)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return batch.rows(inverse)
