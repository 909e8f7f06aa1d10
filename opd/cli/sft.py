"""`opd sft`: supervised fine-tuning on prompt -> answer rows or on whole chat transcripts (`messages`
rows, trained on the assistant turns only), with an optional held-out accuracy as it trains: single
completions, or greedy multi-turn episodes in an environment (`--env`, docs/multi_turn.md)."""

from __future__ import annotations

import json
from pathlib import Path

from opd.errors import OpdError


def add_env_args(p) -> None:
    """The `opd sft` / `opd eval`-style flags that evaluate in an environment."""
    p.add_argument("--env", default=None,
                   help="for --eval: evaluate greedy multi-turn episodes in this environment, python:module:Class "
                        "or a built-in task that has one (calculator); the verifier judges the final answer")
    p.add_argument("--env-param", action="append", metavar="KEY=VALUE",
                   help="for --env: constructor argument of the environment (value parsed as YAML; repeatable)")
    p.add_argument("--max-turns", type=int, default=4, help="for --env: assistant turns per episode at most")


def env_spec(name: str) -> str:
    """A built-in family's environment, or a python:module:Class spec as given."""
    from opd.tasks.builtin import BUILTIN_ENVS

    if name.startswith("python:"):
        return name
    if name not in BUILTIN_ENVS:
        raise OpdError(f"--env {name!r}: give python:module:Class or a built-in task with an environment "
                       f"({', '.join(sorted(BUILTIN_ENVS))})")
    return BUILTIN_ENVS[name]


def load_cli_env(args):
    """The environment --env names (None without --env), built with --env-param."""
    if not getattr(args, "env", None):
        if getattr(args, "env_param", None):
            raise OpdError("--env-param needs --env")
        return None
    import yaml

    from opd.rollout.episodes import load_env

    params = {}
    for item in args.env_param or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OpdError(f"--env-param expects KEY=VALUE, got {item!r}")
        params[key] = yaml.safe_load(value)
    if args.max_turns <= 0:
        raise OpdError("--max-turns must be positive")
    return load_env(env_spec(args.env), params)


def make_eval_fn(args, tokenizer, held_out, schema, verifier, env):
    """model -> held-out greedy accuracy: single completions, or episodes in `env`."""
    from opd.eval.evaluate import evaluate, evaluate_episodes
    from opd.rollout.sampler import generate

    if env is None:
        return lambda model: evaluate(model, tokenizer, held_out, schema, verifier, max_new_tokens=args.max_new_tokens,
                                      kv_cache_gib=args.kv_cache_gib).accuracy

    def episodes_accuracy(model):
        def decode(prompts, _uniforms):
            return generate(model, prompts, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                            max_new_tokens=args.max_new_tokens, greedy=True, vocab_size=len(tokenizer),
                            kv_cache_gib=args.kv_cache_gib)
        was_training = model.training
        model.eval()
        try:
            return evaluate_episodes(decode, env, held_out, tokenizer, verifier, max_turns=args.max_turns,
                                     chat_kwargs=schema.chat_template_kwargs).accuracy
        finally:
            model.train(was_training)
    return episodes_accuracy


def cmd_sft(args) -> None:
    from opd.backends.devices import resolve_device
    from opd.backends.hf import load_model
    from opd.cli.summary import print_sft_summary
    from opd.tasks.data import Transcript, load_jsonl, load_sft_rows
    from opd.tasks.schema import PromptSchema
    from opd.train.sft import run_sft

    if args.steps <= 0 or args.batch_size <= 0 or args.max_new_tokens <= 0:
        raise OpdError("--steps, --batch-size and --max-new-tokens must be positive")
    examples = load_sft_rows(args.data)
    schema = PromptSchema.from_spec(args.prompt_schema)
    env = load_cli_env(args)
    if env is not None and not args.eval:
        raise OpdError("--env needs --eval DATA.jsonl (the held-out rows its episodes start from)")
    if args.stop_at is not None and not args.eval:
        raise OpdError("--stop-at needs --eval DATA.jsonl")
    loaded = load_model(args.model, trainable=True, device=resolve_device(args.device))
    if any(isinstance(ex, Transcript) for ex in examples) and not getattr(loaded.tokenizer, "chat_template", None):
        raise OpdError(f"{args.data} has messages rows but the tokenizer of {args.model} has no chat template "
                       "(opd init-model writes one: opd/tasks/chat.py)")
    eval_fn, held_out = None, []
    if args.eval:
        from opd.tasks.verifiers import make_verifier

        held_out = load_jsonl(args.eval)
        eval_fn = make_eval_fn(args, loaded.tokenizer, held_out, schema, make_verifier(args.verifier), env)
    result = run_sft(loaded.model, loaded.tokenizer, examples, schema, steps=args.steps, batch_size=args.batch_size,
                     lr=args.lr, warmup_steps=args.warmup, seed=args.seed, progress=not args.no_progress,
                     logits_chunk=args.logits_chunk,
                     eval_fn=eval_fn, eval_every=args.eval_every if eval_fn else 0, stop_at=args.stop_at)
    loaded.model.save_pretrained(args.out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(args.out)
    # what made this model, next to it: a teacher trained here can be explained from its folder later
    record = {"args": {k: v for k, v in vars(args).items() if k not in ("func", "argv")}, "steps": result.steps,
              "final_loss": result.final_loss, "evals": [{"step": s, "accuracy": a} for s, a in result.evals],
              "eval_n": len(held_out)}
    (Path(args.out) / "sft_summary.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print_sft_summary(result, args.out, args.steps, eval_n=len(held_out))
