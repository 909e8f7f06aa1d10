"""One typed config for `opd distill`: every default documented inline.

YAML files and `--set a.b=c` overrides map onto these dataclasses; unknown keys and wrong types
are one-line errors naming the key. The resolved config is saved in every run directory.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from opd.errors import OpdError
from opd.methods.base import MethodOptions


@dataclass
class ModelConfig:
    model: str = ""  # hub name or local folder, loaded with AutoModelForCausalLM.from_pretrained
    revision: str | None = None  # hub revision (branch, tag or commit); None = default branch
    # auto (teacher): bfloat16 where this machine computes it natively (CUDA, AVX512-BF16/AMX CPUs) and
    # its log-probs on probe answers stay within 0.05 nats of float32 (measured at start, recorded in the
    # manifest), else float32. The student always trains in float32 (see train.precision).
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    # where the model runs: auto = the first CUDA GPU when there is one, else the CPU; or cuda:N / cpu. A
    # teacher may sit on another GPU than the student; batches move once, between student and teacher
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class LoraConfig:
    # LoRA adapters with peft: only the adapters train and are checkpointed; the run writes the adapter
    # (student-adapter/) and the merged model (student/). r = 0 trains every weight (full fine-tuning)
    r: int = 0  # adapter rank; 0 = no LoRA (full fine-tuning)
    alpha: float = 32.0  # scale of the adapter update is alpha / r
    dropout: float = 0.0  # dropout on the adapter's input (0 keeps sampling and training the same policy)
    target_modules: typing.Any = "all-linear"  # module names (list) or "all-linear" (every linear but the head)


@dataclass
class StudentConfig(ModelConfig):
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters instead of full fine-tuning


@dataclass
class TeacherConfig(ModelConfig):
    # a teacher is `model` (loaded here) or `url` (an `opd serve-teacher` or vLLM server), not both
    name: str | None = None  # how metrics and the store name it (default: teacher, or teacherN in a list)
    tasks: list = field(default_factory=lambda: ["*"])  # task tags it scores; "*" = every tag without its own
    prompt_schema: typing.Any = None  # its own prompt schema (None = task.teacher_prompt_schema, else the student's)
    url: str | None = None  # an `opd serve-teacher` or vLLM server instead of `model`
    api_key_env: str | None = None  # environment variable holding the server's bearer token
    # served: the server's tokenizer (hub name or local folder, loaded with AutoTokenizer), checked against the
    # hash the server reports. Another vocabulary than the student's = cross-tokenizer distillation
    # (docs/cross_tokenizer.md): opd sends the teacher's own token ids of its prompt and the completion's text
    tokenizer: str | None = None  # served: the teacher's tokenizer (None = the student's)
    # served: top-k log-probs requested per position; objective auto then uses the top-k reverse KL with a
    # tail bucket. A server that answers only the sampled tokens' log-probs (plain OpenAI) falls back to
    # the sampled-token estimator. 0 = ask for the sampled tokens only.
    top_k: int = 20  # served: top-k log-probs requested per position (0 = sampled tokens only)
    request_timeout: float = 120.0  # served: seconds one scoring request may take before it counts as failed
    # served: consecutive failed requests (unreachable, 5xx, timeout) before the run ends with one line;
    # the retries back off exponentially up to 30 s, so the default waits about 15 minutes for a restart
    max_failures: int = 30  # served: consecutive failed requests before the run ends
    # local: spread a teacher larger than one GPU over several (accelerate's device_map, e.g. "auto");
    # null = the whole teacher on `device`
    device_map: str | None = None  # null | auto | balanced | sequential

    def validate(self, where: str) -> None:
        if bool(self.model) == bool(self.url):
            raise OpdError(f"{where}: needs 'model' (a hub name or local folder) or 'url' (a server), not both")
        if self.tokenizer and not self.url:
            raise OpdError(f"{where}: 'tokenizer' names a served teacher's tokenizer; a local model brings its own")
        if self.top_k < 0 or self.request_timeout <= 0 or self.max_failures <= 0:
            raise OpdError(f"{where}: top_k must be >= 0, request_timeout and max_failures positive")


@dataclass
class TaskConfig:
    train: str | None = None  # JSONL of {"prompt", "answer"} rows that prompts are drawn from
    eval: str | None = None  # held-out JSONL, deployment-shaped prompts
    builtin: str | None = None  # a built-in task family instead of files (e.g. reverse_addition)
    params: dict = field(default_factory=dict)  # parameters of the built-in family (e.g. {digits: 3})
    n_train: int = 20000  # built-in only: training prompts generated
    n_eval: int = 500  # built-in only: held-out prompts generated (disjoint from training)
    verifier: str = "exact"  # exact | numeric | regex:<pattern> | python:module:function
    prompt_schema: typing.Any = "{prompt}"  # format string, "chat" (tokenizer's chat template) or a dict
    teacher_prompt_schema: typing.Any = None  # None = the teacher sees exactly the student's prompt
    # chat schemas: passed to apply_chat_template for student and teacher alike (recorded in the manifest),
    # e.g. {enable_thinking: false} so a Qwen3 model answers without a thinking block
    chat_template_kwargs: dict = field(default_factory=dict)  # extra apply_chat_template arguments
    allow_schema_mismatch: bool = False  # a teacher/student prompt difference is an error unless this is true
    seed: int = 1234  # seed of the built-in generator
    # multi-turn episodes (docs/multi_turn.md): "python:module:Class", built once as Class(**env_params);
    # reset(example) gives the opening messages, step(messages) the messages to append and whether it is over
    env: str | None = None  # None = single completions (a built-in family may bring its own, e.g. calculator)
    env_params: dict = field(default_factory=dict)  # keyword arguments of the environment class


@dataclass
class RolloutConfig:
    batch_size: int = 64  # prompts per training step
    samples_per_prompt: int = 1  # completions sampled per prompt
    max_new_tokens: int = 32  # completion budget; a completion without EOS is marked truncated (episodes: per turn)
    max_turns: int = 4  # episodes: assistant turns at most; an episode still running after them is truncated
    temperature: float = 1.0  # sampling temperature; sampling is over the full vocabulary (no top-k/top-p)
    # 0 = strictly on-policy. k > 0: rollouts for k+1 steps are sampled at once with the current weights
    # and used over the next k+1 steps (policy lag 0..k, logged); the loss then weights each token by the
    # truncated prefix importance ratio (docs/objectives.md). Checkpoints fall on multiples of k+1.
    max_staleness: int = 0  # max policy lag (steps) of a rollout; 0 = strictly on-policy
    # who samples the student's rollouts: hf (opd's KV-cache sampler, in this process), ray (scale.rollout_workers
    # Ray actors), vllm (GPU, `pip install 'opd[vllm]'`); auto = ray when scale.rollout_workers > 0, else hf
    backend: str = "auto"  # auto | hf | ray | vllm
    # rows decoded at once (rollouts and greedy evaluation) are bounded so their KV cache, prompt + new
    # tokens at the model's own dtype, stays under this budget; the rows' samples do not depend on it
    kv_cache_gib: float = 8.0  # KV-cache budget per decode batch, GiB


@dataclass
class ObjectiveConfig:
    # auto: exact full-vocabulary reverse KL when the teacher's logits are local (measured to close
    # 88-98% of the gap where the unclipped sampled form closed 6%); a served teacher's top-k reverse KL
    # (+ tail bucket) when it returns top-k; the clipped sampled-token form when it returns only log-probs.
    # topk_reverse_kl / topk_forward_kl: over the teacher's k likeliest tokens + one tail bucket (a served
    # teacher's top-k log-probs, `teacher.top_k`; or a local teacher's top `top_k`)
    name: str = "auto"  # auto | reverse_kl | sampled_reverse_kl | forward_kl | jsd | skew_kl | skew_reverse_kl | topk_*
    top_k: int = 20  # topk_* with a local teacher: tokens kept per position (a served teacher: teacher.top_k)
    beta: float = 0.5  # jsd: interpolation; 0 = forward KL, 1 = reverse KL (GKD/TRL convention)
    alpha: float = 0.1  # skew_kl / skew_reverse_kl: skew towards the target distribution
    clip: float | None = 5.0  # sampled_reverse_kl: per-token advantage clip (None = off)
    temperature: float = 1.0  # both models' logits are divided by this inside the loss (1 with a served teacher)


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps (one rollout batch each)
    lr: float = 1e-3  # AdamW learning rate; ~1e-3 for tiny from-scratch models, 1e-5..1e-4 for pretrained
    warmup_steps: int = 20  # linear warm-up, then constant
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    max_nonfinite: int = 3  # a non-finite loss/gradient skips the update; abort after this many in a row
    micro_batch_size: int = 0  # rows per forward/backward (gradient accumulation); 0 = whole batch
    # and at most this many tokens (rows x (prompt + completion)) per forward/backward, so activation memory
    # is bounded whatever the batch; a row longer than the budget is a micro-batch of its own. Neither
    # budget changes the loss or the gradient (every loss is normalised by the whole batch's token count)
    micro_batch_tokens: int = 16384  # tokens per micro-batch (0 = no token budget)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, ~30% slower)
    # with several torchrun ranks: shard parameters, gradients and optimizer state over them with FSDP2
    # (fully_shard per decoder layer + root) instead of a full replica per rank; checkpoints stay gathered
    fsdp: bool = False  # FSDP2 sharding of the student (docs/distributed.md); one rank: ignored
    # float32: weights, activations and optimizer in float32. bfloat16: autocast (float32 weights and
    # optimizer, bfloat16 matmuls). bfloat16_weights: bfloat16 weights and activations, with float32 master
    # weights and optimizer state (saved in checkpoints, so a resume is exact). auto = bfloat16_weights on a
    # GPU with native bfloat16, else float32 (bench/NOTES.md: on CPU bf16 made the demo no faster and worse)
    precision: str = "auto"  # auto | float32 | bfloat16 | bfloat16_weights
    # the loss walks completion tokens in chunks of at most this many logits (per model, float32), so
    # memory does not grow with batch x length x vocabulary; the default is one chunk at small vocabularies
    logits_chunk: int = 4_194_304  # logits per chunk (16 MiB float32)
    eval_every: int = 100  # evaluate every N steps (and always at the end)
    checkpoint_every: int = 100  # save a resumable checkpoint every N steps (0 = never)
    keep_checkpoints: int = 2  # keep the newest K checkpoints
    seed: int = 0  # seeds prompt order, sampling and dropout: each step's randomness is f(seed, step)
    # held-out accuracy below the start by more than its 95% interval at two evaluations in a row is
    # reported loudly in any case; true = also stop the run there (the last checkpoint is the student)
    stop_on_regression: bool = False  # stop when the regression warning fires (it is printed in any case)


@dataclass
class EvalConfig:
    limit: int = 500  # evaluate on at most this many held-out prompts (0 = all)
    batch_size: int = 256  # prompts per greedy decoding batch
    max_new_tokens: int = 0  # 0 = use rollout.max_new_tokens


@dataclass
class LoggingConfig:
    # metrics.jsonl / eval.jsonl stay the source of truth; these only mirror them
    tensorboard: bool = False  # also write RUN/tensorboard event files (needs `pip install tensorboard`)
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb`; project from $WANDB_PROJECT)
    report: bool = True  # write RUN/report.html (plots, samples, review checklist) at the end of the run


@dataclass
class AnchorsConfig:
    path: str | None = None  # JSONL of older or teacher traces (prompt/answer rows) kept as anchors
    fraction: float = 0.0  # share of each batch's rows drawn from the anchors (the rest is sampled)


@dataclass
class ScaleConfig:
    # local = a Ray started here; auto = the Ray cluster this machine belongs to; HOST:PORT = that cluster
    ray_address: str | None = None  # where rollouts and teacher passes run; null = in this process
    rollout_workers: int = 0  # Ray actors sampling the student's rollouts (each gets the new weights every step)
    teacher_workers: int = 0  # Ray actors running the local teachers' forward passes


@dataclass
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    # several teachers routed by task tag, each a `teacher` section: [{name, model | url, tasks: [tags]
    # ("*" = the rest), dtype, prompt_schema, ...}]; when set, the `teacher` section is not used
    teachers: list[TeacherConfig] | None = None
    # the training method and its own options, e.g. {name: mixed, lmbda: 0.5}; each method's options and
    # their rules are in opd/methods/<method>.py: opd (default), sft, mixed, kd, rl, opd+rl
    method: MethodOptions = field(default_factory=MethodOptions)
    anchors: AnchorsConfig = field(default_factory=AnchorsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # ordered filter rules, e.g. [{rule: min_tokens, n: 1}, {rule: regex, pattern: "^[0-9]+$", must_match: true}];
    # the first rule that rejects a rollout is stored as its reason (see opd/rollout/filters.py)
    filters: list | None = None
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    out: str = "runs/opd"  # run directory (config, manifest, metrics, eval, summary, student/)


POSITIVE = {"train.max_nonfinite", "rollout.batch_size", "rollout.samples_per_prompt", "rollout.max_new_tokens", "rollout.max_turns", "train.steps",
            "train.eval_every", "eval.batch_size", "task.n_train", "task.n_eval"}
NON_NEGATIVE = {"train.micro_batch_tokens", "rollout.max_staleness", "train.warmup_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.micro_batch_size", "train.logits_chunk", "objective.top_k", "scale.rollout_workers", "scale.teacher_workers", "eval.limit", "eval.max_new_tokens",
                "train.grad_clip", "train.weight_decay"}


def check_device(key: str, device: str) -> None:
    """auto | cpu | cuda | cuda:N (availability is checked when the model loads)."""
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise OpdError(f"{key} must be auto, cpu, cuda or cuda:N, got {device!r}")


def _check_type(key: str, value, annotation):
    """Coerce/validate one value against a field annotation; raise OpdError naming the key."""
    origin = typing.get_origin(annotation)
    if annotation is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except OpdError as exc:
                errors.append(str(exc))
        raise OpdError(errors[0] if errors else f"{key}: invalid value {value!r}")
    expected = origin or annotation
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise OpdError(f"{key}: expected float, got {value!r}") from None
    if expected is int and isinstance(value, bool):
        raise OpdError(f"{key}: expected int, got {value!r}")
    if not isinstance(value, expected):
        raise OpdError(f"{key}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build a dataclass from a (nested) dict; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise OpdError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            if issubclass(cls, MethodOptions):  # a method's own options: say which method has it
                from opd.methods import METHODS

                owners = [n for n, m in METHODS.items() if key in {f.name for f in dataclasses.fields(m.Options)}]
                raise OpdError(f"method {data.get('name', 'opd')} has no option '{key}' ({path}"
                               + (f" applies to method {' / '.join(owners)} only)" if owners else ")"))
            raise OpdError(f"unknown config key '{path}' (valid: {', '.join(sorted(names))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, str) and "name" in {f.name for f in dataclasses.fields(hint)}:
            value = {"name": value}  # shorthand, e.g. `method: rl`
        if hint is MethodOptions:  # the named method's own options dataclass
            from opd.methods import method_class

            value = value if value is not None else {}
            if not isinstance(value, dict):
                raise OpdError(f"{path}: expected a mapping, got {type(value).__name__}")
            hint = method_class(str(value.get("name", "opd"))).Options
        element = _list_of_dataclass(hint)
        if element is not None and value is not None:
            if not isinstance(value, list):
                raise OpdError(f"{path}: expected a list, got {type(value).__name__}")
            kwargs[key] = [from_dict(element, v, f"{path}[{i}].") for i, v in enumerate(value)]
        elif dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value if value is not None else {}, f"{path}.")
        else:
            kwargs[key] = _check_type(path, value, hint)
    return cls(**kwargs)


def _list_of_dataclass(hint):
    """The element dataclass of `list[X] | None` annotations (typed lists such as `teachers`), else None."""
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is list:
            (element,) = typing.get_args(arg) or (None,)
            return element if dataclasses.is_dataclass(element) else None
    return None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b=c` override to a nested dict; the value is parsed as YAML (1e-3, true, [1,2])."""
    if "=" not in assignment:
        raise OpdError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise OpdError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = value


def validate(cfg: DistillConfig) -> DistillConfig:
    flat = {f"{section}.{k}": v for section, sub in to_dict(cfg).items() if isinstance(sub, dict)
            for k, v in sub.items()}
    for key in POSITIVE:
        if flat[key] <= 0:
            raise OpdError(f"{key} must be positive, got {flat[key]}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise OpdError(f"{key} must be >= 0, got {flat[key]}")
    if flat["rollout.temperature"] <= 0:
        raise OpdError(f"rollout.temperature must be positive, got {flat['rollout.temperature']}")
    if cfg.rollout.backend not in ("auto", "hf", "ray", "vllm"):
        raise OpdError(f"rollout.backend must be auto, hf, ray or vllm, got {cfg.rollout.backend!r}")
    if cfg.rollout.backend == "ray" and not cfg.scale.rollout_workers:
        raise OpdError("rollout.backend ray needs scale.rollout_workers > 0 (and scale.ray_address)")
    from opd.rollout.filters import build_filters

    if cfg.objective.temperature <= 0:
        raise OpdError(f"objective.temperature must be positive, got {cfg.objective.temperature}")
    if cfg.objective.clip is not None and cfg.objective.clip <= 0:
        raise OpdError(f"objective.clip must be positive or null, got {cfg.objective.clip}")
    for key in ("beta", "alpha"):
        if not 0.0 <= getattr(cfg.objective, key) <= 1.0:
            raise OpdError(f"objective.{key} must be in [0, 1], got {getattr(cfg.objective, key)}")
    if cfg.train.precision not in ("auto", "float32", "bfloat16", "bfloat16_weights"):
        raise OpdError(f"train.precision must be auto, float32, bfloat16 or bfloat16_weights, got {cfg.train.precision!r}")
    if cfg.rollout.kv_cache_gib <= 0:
        raise OpdError(f"rollout.kv_cache_gib must be positive, got {cfg.rollout.kv_cache_gib}")
    for where, model in [("student", cfg.student), *((f"teachers[{i}]" if cfg.teachers else "teacher", t)
                                                      for i, t in enumerate(cfg.teachers or [cfg.teacher]))]:
        check_device(f"{where}.device", model.device)
    lora = cfg.student.lora
    if lora.r < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
        raise OpdError("student.lora: r must be >= 0, alpha positive and dropout in [0, 1)")
    if cfg.train.fsdp and (lora.r or cfg.rollout.backend not in ("auto", "hf")):
        raise OpdError("train.fsdp shards a fully trained student decoded by opd's own sampler: not with student.lora "
                       "(adapters are small: train them replicated, fsdp: false) nor rollout.backend "
                       f"{cfg.rollout.backend}")
    if lora.r and cfg.scale.rollout_workers:
        raise OpdError("student.lora with scale.rollout_workers is not supported yet: Ray workers take full "
                       "weights; sample in this process (scale.rollout_workers: 0)")
    if cfg.student.dtype not in ("auto", "float32"):
        raise OpdError("student.dtype: the student's precision is train.precision (float32, bfloat16 autocast "
                       "or bfloat16_weights); student.dtype stays auto")
    if cfg.anchors.fraction and round(cfg.anchors.fraction * cfg.rollout.batch_size) >= cfg.rollout.batch_size:
        raise OpdError(f"anchors.fraction {cfg.anchors.fraction} leaves no sampled rollouts in a batch of "
                       f"{cfg.rollout.batch_size}")

    if (cfg.scale.rollout_workers or cfg.scale.teacher_workers) and not cfg.scale.ray_address:
        raise OpdError("scale.rollout_workers / scale.teacher_workers need scale.ray_address (local, auto or HOST:PORT)")
    if cfg.scale.ray_address and not (cfg.scale.rollout_workers or cfg.scale.teacher_workers):
        raise OpdError("scale.ray_address is set but scale.rollout_workers and scale.teacher_workers are both 0")
    build_filters(cfg.filters)  # unknown rules and bad parameters are config errors, before any model loads
    teachers = cfg.teachers or [cfg.teacher]
    if not cfg.teachers and not cfg.teacher.model and not cfg.teacher.url:
        raise OpdError("teacher.model is required (a hub name or a local folder), or teacher.url, or a 'teachers' list")
    for i, t in enumerate(teachers):
        t.validate(f"teachers[{i}]" if cfg.teachers else "teacher")
    served = any(t.url for t in teachers)
    if served and cfg.objective.temperature != 1.0:  # its log-probs are at temperature 1: no common temperature
        raise OpdError("objective.temperature must be 1 with a served teacher (it returns log-probs at temperature 1)")
    if not 0.0 <= cfg.anchors.fraction < 1.0:
        raise OpdError(f"anchors.fraction must be in [0, 1), got {cfg.anchors.fraction}")
    if cfg.anchors.fraction > 0 and not cfg.anchors.path:
        raise OpdError("anchors.fraction > 0 needs anchors.path (a JSONL of traces)")
    sampled = cfg.objective.name == "sampled_reverse_kl" or (cfg.objective.name == "auto" and served and
                                                              any(t.url and not t.top_k for t in teachers))
    if cfg.anchors.fraction > 0 and sampled:
        raise OpdError("anchors have no sampling log-probs, so the sampled-token estimator cannot weight them; "
                       "use an exact objective (a local teacher, or teacher.top_k > 0) or drop the anchors")
    cfg.method.validate(cfg)  # the method's own rules (opd/methods/<method>.py)
    block = cfg.rollout.max_staleness + 1
    if cfg.train.checkpoint_every % block:
        raise OpdError(f"train.checkpoint_every ({cfg.train.checkpoint_every}) must be a multiple of "
                       f"rollout.max_staleness + 1 ({block}) so a resume starts a fresh rollout block")
    if not cfg.student.model:
        raise OpdError("student.model is required (a hub name or a local folder)")
    if not cfg.task.builtin and not (cfg.task.train and cfg.task.eval):
        raise OpdError("task needs either 'builtin: NAME' or both 'train' and 'eval' JSONL files")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> DistillConfig:
    """YAML file (optional) + `--set` overrides -> validated DistillConfig."""
    data: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise OpdError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise OpdError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise OpdError(f"{path}: the config must be a mapping of sections")
        data.update(loaded or {})
    for assignment in overrides:
        apply_override(data, assignment)
    return validate(from_dict(DistillConfig, data))


def save_config(cfg: DistillConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
