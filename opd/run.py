"""Building a run: everything `distill` needs, loaded and checked before step 1.

The loop (opd/loop.py) then only steps, evaluates and checkpoints; this module owns the setup:
run directory, task, student, teachers (local, served, Ray-hosted), method, objective, filters, the
rollout backend and producer, the optimizer, and the start or resume of the run's state.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from opd.backends.devices import resolve_device
from opd.backends.hf import load_model
from opd.config import DistillConfig, to_dict
from opd.errors import OpdError
from opd.eval.evaluate import EvalResult, evaluate, evaluate_episodes
from opd.flops import ModelShape
from opd.methods import make_method
from opd.objectives.select import make_objective
from opd.rollout.backend import HFBackend, RolloutBackend
from opd.rollout.filters import build_filters
from opd.rollout.producer import RolloutProducer
from opd.rollout.prompts import check_turn_end, encode_answers, encode_prompts
from opd.rollout.sampler import generate
from opd.sharded import gathered
from opd.store.rundir import RunDir
from opd.store.samples import SampleStore
from opd.store.tracking import Tracker
from opd.tasks.data import load_jsonl
from opd.tasks.loader import load_task
from opd.teachers import LocalTeacher, TeacherPool, load_teachers
from opd.train.optim import make_optimizer
from opd.train.step import student_precision
from opd.world import World

SAMPLED_LR = 1e-4  # docs/objectives.md: the sampled-token estimator made students worse at 1e-3, better at 1e-4


@dataclass
class State:
    """What changes as the run goes: restored exactly from a checkpoint."""

    step: int = 0  # the last finished step
    flops: float = 0.0
    teacher_accuracy: float | None = None
    student_before: float = 0.0
    eval_n: int = 0
    below_start: int = 0  # consecutive evaluations below the start by more than the interval
    regressed_at: list = field(default_factory=list)  # steps where the regression warning fired
    nonfinite_streak: int = 0
    last_checkpoint: int = 0


@dataclass
class Run:
    cfg: DistillConfig
    dir: RunDir
    tracker: Tracker
    task: object
    student: object  # LoadedModel
    teachers: TeacherPool
    method: object
    objective: object
    filters: object
    samples: SampleStore
    producer: RolloutProducer
    backend: object
    optimizer: object
    scheduler: object
    shapes: dict
    eval_set: list
    schema_check: dict
    workers: object = None  # RayWorkers, when scale: is set
    world: World = field(default_factory=World)  # the ranks of a torchrun job (one process: World())

    @property
    def tokenizer(self):
        return self.student.tokenizer

    def evaluate_student(self, desc: str, progress: bool):
        """Greedy held-out accuracy: each rank answers its share of the eval set, the records gathered."""
        mine = self.eval_set[self.world.share(len(self.eval_set))]
        model = self.student.model
        was_training = model.training
        model.eval()
        try:
            with gathered(model):  # FSDP2: whole weights for decoding (opd/sharded.py)
                result = self._evaluate(mine, desc, progress, model=model)
        finally:
            model.train(was_training)
        return self._gathered(result)

    def evaluate_teachers(self, progress: bool) -> float | None:
        """Each held-out prompt answered greedily by the teacher of its task tag; None if one cannot decode."""
        correct = 0
        tokens = self.cfg.eval.max_new_tokens or self.cfg.rollout.max_new_tokens
        for t, rows in self.teachers.split(self.eval_set):
            def decode(prompts, examples, t=t):
                return t.generate(prompts, examples, max_new_tokens=tokens, greedy=True)
            mine = [self.eval_set[i] for i in rows][self.world.share(len(rows))]
            try:
                result = self._evaluate(mine, f"eval {t.name}", progress, decode=decode)
            except OpdError as exc:  # e.g. a served teacher without a generation endpoint
                print(f"opd: teacher {t.name} not evaluated: {exc}", file=sys.stderr)
                return None  # the same on every rank: a teacher that cannot decode fails on all
            correct += self._gathered(result).accuracy * len(rows)
        return correct / len(self.eval_set)

    def _evaluate(self, examples, desc: str, progress: bool, model=None, decode=None) -> EvalResult:
        """Single completions, or greedy episodes when the task has an environment. decode(prompts,
        examples) -> Batch replaces `model` (a teacher)."""
        cfg, tok = self.cfg, self.tokenizer
        tokens = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
        if self.task.env is None:
            return evaluate(model, tok, examples, self.task.schema, self.task.verifier, max_new_tokens=tokens,
                            batch_size=cfg.eval.batch_size, progress=progress, desc=desc, decode=decode)
        if decode is None:
            def decode(prompts, _examples):
                return generate(model, prompts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                                max_new_tokens=tokens, greedy=True, vocab_size=len(tok))
        return evaluate_episodes(lambda prompts, _u: decode(prompts, [None] * len(prompts)), self.task.env, examples,
                                 tok, self.task.verifier, max_turns=cfg.rollout.max_turns,
                                 batch_size=cfg.eval.batch_size, chat_kwargs=cfg.task.chat_template_kwargs,
                                 progress=progress, desc=desc)

    def _gathered(self, result: EvalResult) -> EvalResult:
        records = self.world.gather(result.records)
        return EvalResult(sum(r["correct"] for r in records) / max(len(records), 1), len(records), records)


def build_run(cfg: DistillConfig, resume: bool, world: World | None = None) -> tuple[Run, tuple | None]:
    """Load and check everything; returns the run and the checkpoint to resume from (step, path) or None.
    `world`: the ranks of a distributed job; rank 0 writes the run directory, every rank reads it."""
    world = world or World()
    check_split(cfg, world.size)
    run_dir = RunDir(cfg.out, writes=world.main)
    if resume and not run_dir.root.exists():
        raise OpdError(f"--resume: no run at {run_dir.root} (nothing to resume; drop --resume to start it)")
    world.on_main(lambda: run_dir.create(resume))
    ckpt = run_dir.latest_checkpoint() if resume else None
    task = load_task(cfg.task)
    fsdp = cfg.train.fsdp and world.size > 1
    if cfg.train.fsdp and not fsdp and world.main:
        print("opd: train.fsdp with one rank: the student trains unsharded", file=sys.stderr)
    student = load_student(cfg, ckpt[1] if ckpt else None, sharded=fsdp)
    tok = student.tokenizer
    check_turn_end(task.schema, tok)  # a chat turn must end in EOS, or rollouts run past every answer
    if task.env is not None:
        check_episodes(cfg, tok)
    teachers = TeacherPool(load_teachers(cfg, tok, task.schema), task.schema, tok)
    schema_check = teachers.check_schemas(task.train, cfg.task.allow_schema_mismatch)
    teachers.prepare(task.train)  # dtype auto: bf16 where native and accurate; served: tokenizer, top-k
    method = make_method(cfg.method)
    objective = make_objective(cfg.objective, teacher_has_logits=teachers.has_logits, teacher_top_k=teachers.top_k)
    _check_learning_rate(cfg, objective)
    workers = None
    if cfg.scale.ray_address:  # rollouts and teacher passes on Ray actors; the same results as in-process
        from opd.scale.ray_workers import RayWorkers

        local = [t for t in teachers.teachers if isinstance(t, LocalTeacher)]
        workers = RayWorkers(cfg.scale, student.name, local, tok.pad_token_id, tok.eos_token_id)
        teachers = TeacherPool([workers.host(t) if isinstance(t, LocalTeacher) else t for t in teachers.teachers],
                               task.schema, tok)
    backend = make_backend(cfg, student, workers)
    traces = load_jsonl(method.options.traces) if getattr(method.options, "traces", None) else None
    pool = traces or task.train
    anchors = load_jsonl(cfg.anchors.path) if cfg.anchors.fraction > 0 else None
    producer = RolloutProducer(
        cfg, method, backend, teachers, tok, pool, encode_prompts(pool, task.schema, tok),
        answers=encode_answers(traces, tok) if traces else None, anchors=anchors,
        anchor_ids=(encode_prompts(anchors, task.schema, tok), encode_answers(anchors, tok)) if anchors else None,
        world=world, env=task.env)
    bf16_weights = student_precision(cfg.train.precision, student.device) == "bfloat16_weights"
    optimizer, scheduler = make_optimizer(student.model, cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_steps,
                                          master_weights=bf16_weights and not fsdp)  # FSDP2: float32 shards
    shapes = {"student": ModelShape.of(student.model),
              **{t.name: ModelShape.of(t.model) for t in teachers.teachers if isinstance(t, LocalTeacher)}}
    tracker = Tracker(run_dir.root, tensorboard=cfg.logging.tensorboard and world.main,
                      wandb=cfg.logging.wandb and world.main, config=to_dict(cfg))
    run = Run(cfg, run_dir, tracker, task, student, teachers, method, objective, build_filters(cfg.filters),
              SampleStore(run_dir.root, writes=world.main), producer, backend, optimizer, scheduler, shapes,
              task.eval[:cfg.eval.limit] if cfg.eval.limit else task.eval, schema_check, workers, world)
    return run, ckpt


def check_episodes(cfg: DistillConfig, tokenizer) -> None:
    """Episodes need a chat template whose assistant turns end in EOS, and a teacher that reads exactly
    the student's tokens (it scores the whole episode, environment turns included, in one pass)."""
    from opd.tasks.schema import PromptSchema

    if not getattr(tokenizer, "chat_template", None):
        raise OpdError("task.env: the student's tokenizer has no chat template (episodes are chat messages); "
                       "opd init-model writes one, hub chat models have their own")
    check_turn_end(PromptSchema.from_spec("chat", cfg.task.chat_template_kwargs), tokenizer)
    teachers = cfg.teachers or [cfg.teacher]
    if cfg.task.teacher_prompt_schema or any(t.prompt_schema for t in teachers):
        raise OpdError("task.env: a teacher prompt schema is not supported: teacher and student read the same episode")
    if any(t.url for t in teachers):
        raise OpdError("task.env with a served teacher (teacher.url) is not supported yet: the server scores "
                       "completions, not whole episodes; use a local teacher")
    if cfg.anchors.fraction > 0:
        raise OpdError("task.env with anchors: anchor traces are single completions; set anchors.fraction: 0")


def check_split(cfg: DistillConfig, ranks: int) -> None:
    """Refuse, before any model loads, a step whose rows do not split into equal shares of whole prompt
    groups (samples_per_prompt rows share a reward baseline) over `ranks` ranks."""
    if ranks <= 1:
        return
    if cfg.scale.ray_address:
        raise OpdError("scale: (Ray rollout/teacher workers) with several torchrun ranks is not supported: use one "
                       "or the other (a served teacher works with both; docs/distributed.md)")
    r = cfg.rollout
    n_anchor = round(cfg.anchors.fraction * r.batch_size) if cfg.anchors.fraction > 0 else 0
    rows = (r.batch_size - n_anchor) * r.samples_per_prompt + n_anchor
    what = f"rollout.batch_size {r.batch_size}" + (f" x samples_per_prompt {r.samples_per_prompt}"
                                                   if r.samples_per_prompt > 1 else "")
    if rows < ranks:
        raise OpdError(f"{what} gives {rows} rows per step: too few for {ranks} ranks (at least one row each)")
    if rows % ranks or (rows // ranks) % r.samples_per_prompt:
        unit = ranks * r.samples_per_prompt
        raise OpdError(f"{what} gives {rows} rows per step, which do not split into equal shares of whole prompt "
                       f"groups over {ranks} ranks: make the rows per step a multiple of {unit}")


def load_student(cfg: DistillConfig, checkpoint=None, sharded: bool = False):
    """The student on its device, in the dtype train.precision asks for, with LoRA adapters when
    student.lora.r > 0. From a checkpoint: its weights (full fine-tuning), or the base model plus the
    checkpoint's adapter (LoRA: checkpoints hold only the adapter). `sharded`: FSDP2 over the ranks
    (opd/sharded.py), float32 shards with bfloat16 compute where train.precision says bfloat16_weights."""
    device = resolve_device(cfg.student.device)
    bf16_weights = student_precision(cfg.train.precision, device) == "bfloat16_weights"
    dtype = "bfloat16" if bf16_weights and not sharded else "float32"
    lora = cfg.student.lora.r > 0
    if checkpoint is not None and RunDir.is_adapter_checkpoint(checkpoint) != lora:
        raise OpdError(f"--resume: {checkpoint} holds {'a LoRA adapter' if not lora else 'full weights'} but "
                       f"student.lora.r is {cfg.student.lora.r}; resume with the run's own config")
    source = str(checkpoint) if checkpoint is not None and not lora else cfg.student.model
    student = load_model(source, dtype=dtype, revision=cfg.student.revision if source == cfg.student.model else None,
                         trainable=True, device=device)
    if lora:
        from opd.backends.lora import apply_lora, load_adapter

        student.model = load_adapter(student.model, checkpoint) if checkpoint is not None \
            else apply_lora(student.model, cfg.student.lora, seed=cfg.train.seed)
    if cfg.train.gradient_checkpointing:  # recompute each layer's activations in the backward pass
        from opd.backends.lora import unwrap

        unwrap(student.model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if sharded:
        import torch

        from opd.sharded import shard

        shard(student.model, param_dtype=torch.bfloat16 if bf16_weights else None)
    return student


def make_backend(cfg, student, scale_workers=None) -> RolloutBackend:
    """The backend `rollout.backend` names; an unavailable one is a one-line error."""
    name = cfg.rollout.backend
    if name == "auto":
        name = "ray" if cfg.scale.rollout_workers else "hf"
    tok = student.tokenizer
    if name == "hf":
        return HFBackend(student.model, tok.eos_token_id, tok.pad_token_id, vocab_size=len(tok),
                         kv_cache_gib=cfg.rollout.kv_cache_gib)
    if name == "ray":
        if scale_workers is None:
            raise OpdError("rollout.backend ray needs scale.ray_address and scale.rollout_workers > 0")
        return scale_workers.rollout_backend()
    try:
        from opd.backends.vllm import VLLMBackend
    except ImportError as exc:
        raise OpdError(f"rollout.backend vllm is unavailable ({exc}): pip install 'opd[vllm]' on a GPU machine") from None
    return VLLMBackend(student.name, tok.eos_token_id, tok.pad_token_id)


def _check_learning_rate(cfg, objective) -> None:
    """The sampled-token estimator needs a smaller step than the exact divergences (measured): `auto` with
    the default lr takes SAMPLED_LR (the resolved config shows it); an explicit larger lr is warned about."""
    from opd.config import TrainConfig

    if objective.is_sampled and cfg.objective.name == "auto" and cfg.train.lr == TrainConfig.lr:
        cfg.train.lr = SAMPLED_LR
        print(f"opd: the teacher returns only sampled-token log-probs: objective {objective.name} (clip "
              f"{objective.params['clip']:g}) at train.lr {SAMPLED_LR:g} (docs/objectives.md)", file=sys.stderr)
    elif objective.is_sampled and cfg.train.lr > SAMPLED_LR:
        print(f"opd: warning: objective {objective.name} with train.lr {cfg.train.lr:g}: this estimator made "
              f"students worse at lr 1e-3 and better at {SAMPLED_LR:g} (docs/objectives.md); set "
              f"train.lr={SAMPLED_LR:g}, or use a teacher that returns top-k log-probs (teacher.top_k)",
              file=sys.stderr)
