"""Each step's rollouts: prompt choice, who samples (the method says: student, teacher or a traces
file), anchor traces mixed in, and production ahead of time when a policy lag is allowed.

Every step's randomness is drawn from (seed, step) alone, so what a step trains on does not depend
on when it was produced; with `rollout.max_staleness = k` the batches of steps s..s+k are sampled
together at step s with the weights of version s−1 (lag 0..k). The student's rollouts go through a
RolloutBackend (opd/rollout/backend.py): opd's sampler here, Ray workers, or vLLM.
"""

from __future__ import annotations

import random

import torch

from opd.batch import Rollouts, concat_batches, make_sft_batch
from opd.errors import OpdError
from opd.rollout.episodes import run_episodes
from opd.sharded import gathered
from opd.world import World


def step_rng(seed: int, step: int) -> tuple[random.Random, torch.Generator]:
    """Independent, reproducible randomness for one step (prompt choice, token sampling)."""
    return random.Random(f"opd:{seed}:{step}"), torch.Generator().manual_seed(seed * 1_000_003 + step)


class RolloutProducer:
    def __init__(self, cfg, method, backend, teachers, tokenizer, pool, prompts, *, answers=None, anchors=None,
                 anchor_ids=None, world=None, env=None):
        """pool/prompts: the examples prompts are drawn from and their token ids; answers: the traces'
        token ids (method sft from a file); anchors/anchor_ids: anchor examples and (prompt, answer) ids;
        world: this rank samples its share of each step's rows (opd/world.py); env: the task's environment
        (multi-turn episodes, opd/rollout/episodes.py), or None for single completions."""
        self.cfg, self.method, self.backend, self.teachers, self.tok = cfg, method, backend, teachers, tokenizer
        self.pool, self.prompts, self.answers = pool, prompts, answers
        self.anchors, self.anchor_ids = anchors, anchor_ids
        self.world = world or World()
        self.env = env
        self.ahead: dict[int, Rollouts] = {}

    def get(self, step: int, model) -> Rollouts:
        """Step `step`'s rollouts; at the start of a block, the backend takes `model`'s weights first."""
        block = self.cfg.rollout.max_staleness + 1
        if step not in self.ahead:  # start of a block (or of a resumed run): sample the block now
            self.backend.load_weights(model.state_dict(), version=step - 1)
            with gathered(model):  # FSDP2: one gather for the block, whatever each rank's episodes decode
                for t in range(step, step + block):
                    self.ahead[t] = self._produce(t)
        return self.ahead.pop(step)

    def _produce(self, step: int) -> Rollouts:
        """The step's rows are drawn in full (every rank draws the same), then this rank's share is sampled."""
        cfg, tok = self.cfg, self.tok
        rng, gen = step_rng(cfg.train.seed, step)
        n_anchor = round(cfg.anchors.fraction * cfg.rollout.batch_size) if self.anchors else 0
        picks = [rng.randrange(len(self.prompts)) for _ in range(cfg.rollout.batch_size - n_anchor)]
        picks = [i for i in picks for _ in range(cfg.rollout.samples_per_prompt)]
        sampled_by = self.method.sampler(rng)
        anchor_rows = [rng.randrange(len(self.anchors)) for _ in range(n_anchor)]
        # one uniform per row (and turn, for episodes) and position: a row's sample does not depend on the others
        turns = (cfg.rollout.max_turns,) if self.env is not None else ()
        uniforms = torch.rand(len(picks), *turns, cfg.rollout.max_new_tokens, generator=gen, dtype=torch.float64)
        mine = self.world.share(len(picks) + n_anchor)  # rows: the sampled ones, then the anchors
        lo, hi = mine.start, mine.stop
        uniforms = uniforms[lo:min(hi, len(picks))]
        picks, anchor_rows = picks[lo:hi], anchor_rows[max(lo - len(picks), 0):max(hi - len(picks), 0)]
        examples = [self.pool[i] for i in picks]
        prompts = [self.prompts[i] for i in picks]
        parts, episodes = [], None
        if not picks:
            pass  # this rank's share is anchors only
        elif self.env is not None:
            batch, *episodes = self._episodes(prompts, examples, uniforms, sampled_by, step)
            parts.append(batch)
        elif sampled_by == "traces":  # sft from a traces file: the traces are the completions
            parts.append(make_sft_batch(prompts, [self.answers[i] for i in picks], tok.pad_token_id))
        elif sampled_by == "teacher":
            parts.append(self._teacher_samples(prompts, examples, uniforms))
        else:
            parts.append(self.backend.generate(prompts, max_new_tokens=cfg.rollout.max_new_tokens,
                                               temperature=cfg.rollout.temperature, uniforms=uniforms,
                                               seed=cfg.train.seed * 1_000_003 + step))
        sources = ["student" if sampled_by == "student" else "teacher"] * len(picks)
        if anchor_rows:
            parts.append(make_sft_batch([self.anchor_ids[0][i] for i in anchor_rows],
                                        [self.anchor_ids[1][i] for i in anchor_rows], tok.pad_token_id))
            examples += [self.anchors[i] for i in anchor_rows]
            sources += ["anchor"] * len(anchor_rows)
        return Rollouts(concat_batches(parts, tok.pad_token_id), examples, sources,
                        self.backend.version if sampled_by == "student" else step - 1, sampled_by,
                        *(episodes or ()))

    def _episodes(self, prompts, examples, uniforms, sampled_by, step):
        """Multi-turn episodes written by the student (or by each row's teacher: rows back in order)."""
        cfg = self.cfg.rollout
        options = dict(max_turns=cfg.max_turns, chat_kwargs=self.cfg.task.chat_template_kwargs)
        if sampled_by == "student":
            def decode(p, u):
                return self.backend.generate(p, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                             uniforms=u, seed=self.cfg.train.seed * 1_000_003 + step)
            return run_episodes(decode, self.env, examples, self.tok, uniforms=uniforms, **options)
        if sampled_by == "traces":
            raise OpdError("method sft from a traces file with task.env: make the traces by running the teacher "
                           "(method sft without traces samples episodes from it)")
        greedy = bool(getattr(self.method.options, "teacher_greedy", False))
        batches, messages, turn_tokens, order = [], [], [], []
        for t, rows in self.teachers.split(examples):
            def decode(p, u, t=t):  # an episode's teacher reads the student's transcript: no own schema
                return t.generate(p, [None] * len(p), max_new_tokens=cfg.max_new_tokens, greedy=greedy,
                                  temperature=cfg.temperature, uniforms=None if greedy else u)
            b, m, k = run_episodes(decode, self.env, [examples[i] for i in rows], self.tok,
                                   uniforms=uniforms[rows], **options)
            batches.append(b)
            messages += m
            turn_tokens += k
            order += rows
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        back = inverse.tolist()
        return (concat_batches(batches, self.tok.pad_token_id).rows(inverse), [messages[i] for i in back],
                [turn_tokens[i] for i in back])

    def _teacher_samples(self, prompts, examples, uniforms):
        """Each row sampled by the teacher of its task tag, with its own uniforms (rows back in order)."""
        parts, order = [], []
        greedy = bool(getattr(self.method.options, "teacher_greedy", False))
        for t, rows in self.teachers.split(examples):
            parts.append(t.generate([prompts[i] for i in rows], [examples[i] for i in rows], greedy=greedy,
                                    max_new_tokens=self.cfg.rollout.max_new_tokens,
                                    temperature=self.cfg.rollout.temperature, uniforms=uniforms[rows]))
            order += rows
        batch = concat_batches(parts, self.tok.pad_token_id)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return batch.rows(inverse)
