"""`opd` command line: init-model, data, sft, distill, eval, compare, inspect, report, diff, serve-teacher, demo.

Errors in the user's input end in one line on stderr and exit code 2 (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from opd.errors import OpdError


def _quiet_libraries() -> None:
    """Keep transformers' own progress bars and advice out of opd's output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def tokenizer_texts(path: str) -> list[str]:
    """Characters for a char tokenizer: every string field of a JSONL file, or a plain text file."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise OpdError(f"tokenizer data not found: {path}")
    if p.suffix != ".jsonl":
        return [p.read_text()]
    from opd.tasks.data import load_jsonl

    return [s for ex in load_jsonl(p) for s in (ex.prompt, ex.answer, *map(str, ex.extra.values()))]


def cmd_init_model(args) -> None:
    from opd.backends.hf import init_model, load_model

    out = init_model(args.arch, args.layers, args.hidden, args.heads, tokenizer_texts(args.tokenizer_data) + [args.extra_chars],
                     args.out, seed=args.seed, kv_heads=args.kv_heads, intermediate=args.intermediate,
                     max_positions=args.max_positions)
    loaded = load_model(str(out))
    print(f"wrote {args.arch} model to {out}: {loaded.num_params:,} parameters, vocabulary {len(loaded.tokenizer)}")


def cmd_sft(args) -> None:
    from opd.backends.hf import load_model
    from opd.tasks.data import load_jsonl
    from opd.tasks.schema import PromptSchema
    from opd.train.sft import run_sft

    if args.steps <= 0 or args.batch_size <= 0 or args.max_new_tokens <= 0:
        raise OpdError("--steps, --batch-size and --max-new-tokens must be positive")
    examples = load_jsonl(args.data)
    schema = PromptSchema.from_spec(args.prompt_schema)
    eval_fn = None
    if args.eval:
        from opd.eval.evaluate import evaluate
        from opd.tasks.verifiers import make_verifier

        held_out, verifier = load_jsonl(args.eval), make_verifier(args.verifier)
        eval_fn = lambda model: evaluate(model, loaded.tokenizer, held_out, schema, verifier,  # noqa: E731
                                         max_new_tokens=args.max_new_tokens).accuracy
    elif args.stop_at is not None:
        raise OpdError("--stop-at needs --eval DATA.jsonl")
    loaded = load_model(args.model, trainable=True)
    result = run_sft(loaded.model, loaded.tokenizer, examples, schema, steps=args.steps, batch_size=args.batch_size,
                     lr=args.lr, warmup_steps=args.warmup, seed=args.seed, progress=not args.no_progress,
                     eval_fn=eval_fn, eval_every=args.eval_every if eval_fn else 0, stop_at=args.stop_at)
    loaded.model.save_pretrained(args.out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(args.out)
    acc = f", eval accuracy {result.evals[-1][1]:.3f}" if result.evals else ""
    print(f"sft: {result.steps} steps, final loss {result.final_loss:.4f}{acc}; saved to {args.out}")


def cmd_data(args) -> None:
    from pathlib import Path

    import yaml

    from opd.tasks.builtin import builtin_split
    from opd.tasks.data import save_jsonl

    params = {}
    for item in args.param or []:
        key, _, value = item.partition("=")
        params[key] = yaml.safe_load(value)
    train, held_out = builtin_split(args.builtin, args.n_train, args.n_eval, args.seed, **params)
    out = Path(args.out)
    save_jsonl(out / "train.jsonl", train)
    save_jsonl(out / "eval.jsonl", held_out)
    print(f"wrote {len(train)} training and {len(held_out)} held-out rows of {args.builtin} to {out}")


def cmd_eval(args) -> None:
    from opd.backends.hf import load_model
    from opd.eval.evaluate import evaluate
    from opd.tasks.data import load_jsonl
    from opd.tasks.schema import PromptSchema
    from opd.tasks.verifiers import make_verifier

    if args.batch_size <= 0 or args.max_new_tokens <= 0:
        raise OpdError("--batch-size and --max-new-tokens must be positive")
    examples = load_jsonl(args.data)[: args.limit or None]
    verifier = make_verifier(args.verifier)
    loaded = load_model(args.model)
    result = evaluate(loaded.model, loaded.tokenizer, examples, PromptSchema.from_spec(args.prompt_schema), verifier,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=not args.json)
    lo, hi = result.interval95()
    if args.json:
        print(json.dumps({"accuracy": result.accuracy, "n": result.n, "ci95": [lo, hi], "model": args.model}))
    else:
        print(f"accuracy {result.accuracy:.4f} on {result.n} prompts (95% interval {lo:.3f}-{hi:.3f})")


def cmd_distill(args) -> None:
    from opd.config import load_config
    from opd.loop import distill

    cfg = load_config(args.config, args.set or [])
    summary = distill(cfg, resume=args.resume, progress=not args.no_progress, argv=sys.argv)
    print(json.dumps(summary, indent=2))


def cmd_compare(args) -> None:
    from opd.compare import compare, print_table
    from opd.config import load_config

    base = load_config(args.config, args.set or [])
    overrides: dict[str, list[str]] = {}
    for item in args.method_set or []:
        method, sep, assignment = item.partition(":")
        if not sep:
            raise OpdError(f"--method-set expects METHOD:key=value, got {item!r}")
        overrides.setdefault(method, []).append(assignment)
    report = compare(base, [m.strip() for m in args.methods.split(",") if m.strip()], args.seeds, args.out,
                     rl_budget=args.rl_budget, method_overrides=overrides, progress=not args.no_progress)
    print_table(report)
    print(f"wrote {args.out}/compare.json and {args.out}/compare.png")


def cmd_demo(args) -> None:
    from opd.cli.demo import run_demo

    run_demo(out=args.out, cache_dir=args.cache, progress=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation of language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-model", help="build a randomly initialised model + char tokenizer")
    p.add_argument("--arch", choices=["qwen3", "llama"], default="qwen3")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--heads", type=int, required=True)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 4 x hidden)")
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-data", required=True, help="JSONL (prompt/answer rows) or text whose characters the tokenizer covers")
    p.add_argument("--extra-chars", default="", help="characters to add (e.g. those of a prompt format string)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_init_model)

    p = sub.add_parser("sft", help="supervised fine-tuning on prompt -> answer (loss on answer + EOS)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-schema", default="{prompt}", help="format string with {prompt}, or 'chat'")
    p.add_argument("--eval", default=None, help="held-out JSONL to evaluate on every --eval-every steps")
    p.add_argument("--verifier", default="exact")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--stop-at", type=float, default=None, help="stop once eval accuracy reaches this")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("data", help="write a built-in task as train.jsonl + eval.jsonl")
    p.add_argument("--builtin", required=True, help="addition | reverse_addition | running_sum | scratchpad_addition")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="task parameter, e.g. length=10")
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("distill", help="run on-policy distillation from a YAML config")
    p.add_argument("config")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.lr=3e-4")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in 'out'")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("compare", help="run methods (opd, sft, rl, mixed, opd+rl) at equal compute over seeds")
    p.add_argument("config")
    p.add_argument("--methods", default="opd,sft,rl")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--rl-budget", type=float, default=10.0, help="RL FLOPs budget as a multiple of OPD's FLOPs to target")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--method-set", action="append", metavar="METHOD:KEY=VALUE",
                   help="override for one method only, e.g. rl:train.lr=1e-4")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("eval", help="greedy accuracy of a model on a JSONL task")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--verifier", default="exact")
    p.add_argument("--prompt-schema", default="{prompt}")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N rows only (0 = all)")
    p.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="embedded end-to-end demo: tiny teacher -> tiny student, no downloads")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--cache", default=None, help="where the trained demo teacher is cached (default ~/.cache/opd)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    from opd.cli.inspect import add_parser as add_inspect_parser

    add_inspect_parser(sub)
    from opd.report.html import add_parsers as add_report_parsers

    add_report_parsers(sub)
    from opd.backends.server import add_parser as add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        args.func(args)
    except OpdError as exc:
        if args.debug:
            raise
        print(f"opd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("opd: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
