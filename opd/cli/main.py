"""`opd` command line: init-model, data, sft, distill, preflight, eval, compare, inspect, report, diff,
serve-teacher, demo.

Errors in the user's input, and running out of GPU memory, end in one line on stderr and exit code 2
(a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from pathlib import Path

from opd.errors import OpdError


def _quiet_libraries() -> None:
    """Keep transformers' own progress bars and advice out of opd's output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def tokenizer_texts(path: str) -> list[str]:
    """Characters for a char tokenizer: every string field of a JSONL file, or a plain text file."""
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
                     max_positions=args.max_positions, tokenizer=args.tokenizer, vocab_size=args.vocab_size)
    loaded = load_model(str(out))
    print(f"wrote {args.arch} model to {out}: {loaded.num_params:,} parameters, vocabulary {len(loaded.tokenizer)}")


def cmd_sft(args) -> None:
    from opd.cli.sft import cmd_sft as run  # prompt/answer or messages rows, --env episodes (opd/cli/sft.py)

    run(args)


def cmd_data(args) -> None:
    import yaml

    from opd.tasks.builtin import builtin_split, save_builtin_transcripts
    from opd.tasks.data import save_jsonl

    params = {}
    for item in args.param or []:
        key, _, value = item.partition("=")
        params[key] = yaml.safe_load(value)
    train, held_out = builtin_split(args.builtin, args.n_train, args.n_eval, args.seed, **params)
    out = Path(args.out)
    save_jsonl(out / "train.jsonl", train)
    save_jsonl(out / "eval.jsonl", held_out)
    extra = save_builtin_transcripts(args.builtin, train, out)  # a tool task's teacher episodes (multi-turn)
    print(f"wrote {len(train)} training and {len(held_out)} held-out rows of {args.builtin} to {out}"
          + (f" (and {', '.join(extra)})" if extra else ""))


def cmd_eval(args) -> None:
    from opd.backends.devices import resolve_device
    from opd.backends.hf import load_model
    from opd.eval.evaluate import evaluate
    from opd.tasks.data import load_jsonl
    from opd.tasks.schema import PromptSchema
    from opd.tasks.verifiers import make_verifier

    if args.batch_size <= 0 or args.max_new_tokens <= 0:
        raise OpdError("--batch-size and --max-new-tokens must be positive")
    examples = load_jsonl(args.data)[: args.limit or None]
    verifier = make_verifier(args.verifier)
    loaded = load_model(args.model, dtype=args.dtype, device=resolve_device(args.device))
    result = evaluate(loaded.model, loaded.tokenizer, examples, PromptSchema.from_spec(args.prompt_schema), verifier,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=not args.json,
                      kv_cache_gib=args.kv_cache_gib)
    if args.json:
        print(json.dumps({"accuracy": result.accuracy, "n": result.n, "ci95": list(result.interval95()),
                          "model": args.model}))
    else:
        from opd.cli.summary import print_eval_summary

        print_eval_summary(result, args.model)


def cmd_distill(args) -> None:
    from opd.config import load_config
    from opd.loop import distill

    from opd.cli.summary import print_distill_summary

    cfg = load_config(args.config, args.set or [])
    if args.nproc > 1:  # the same job on N local ranks, through torchrun (opd/cli/launch.py)
        from opd.cli.launch import launch, without_nproc
        from opd.run import check_split

        check_split(cfg, args.nproc)  # before any rank starts or any model loads
        launch(without_nproc(args.argv), args.nproc)
    else:
        skip = {"preflight": False} if args.no_preflight else {}  # distill runs the preflight by default
        summary = distill(cfg, resume=args.resume, progress=not args.no_progress, argv=sys.argv, **skip)
        if os.environ.get("RANK", "0") != "0":  # rank 0 of a torchrun job reports for all
            return
    print_distill_summary(cfg.out)
    if args.json:  # summary.json as written (with the checklist), for scripts
        path = Path(cfg.out) / "summary.json"
        print(json.dumps(json.loads(path.read_text()) if path.exists() else {}, default=str))


def cmd_preflight(args) -> None:
    """The checks `opd distill` runs before step 1, on a run built in a temporary directory (so a later
    `opd distill` of the same config starts fresh); the report on stdout, or on stderr with --json."""
    import tempfile

    from opd.config import load_config
    from opd.preflight import preflight
    from opd.run import build_run

    if args.prompts <= 0:
        raise OpdError("--prompts must be positive")
    cfg = load_config(args.config, args.set or [])
    cfg.logging.tensorboard = cfg.logging.wandb = False  # a check, not a run: nothing to mirror
    with tempfile.TemporaryDirectory(prefix="opd-preflight-") as tmp:
        cfg.out = tmp
        run, _ = build_run(cfg, resume=False)
        try:
            found = preflight(run, self_test=args.self_test, n=args.prompts,
                              out=sys.stderr if args.json else sys.stdout)
        finally:
            if run.workers is not None:
                run.workers.close()
    if args.json:
        print(json.dumps(found, default=str))


def cmd_config(args) -> None:
    from opd.cli.config_doc import print_config

    print_config(args.config, args.set or [])


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
                     rl_budget=args.rl_budget, method_overrides=overrides, evals_per_run=args.evals_per_run,
                     progress=not args.no_progress)
    print_table(report)
    print(f"wrote {args.out}/compare.json and {args.out}/compare.png")


def cmd_demo(args) -> None:
    from opd.cli.demo import run_demo

    run_demo(out=args.out, cache_dir=args.cache, progress=not args.no_progress)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with "(required)" or its default; a flag (takes no value) shows neither."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.nargs == 0 or "%(default)" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if action.default is None or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: {'none' if action.default == '' else '%(default)s'})"


CONFIG_HELP = """\
config keys: `opd config` prints every key with its default and what it means
(`opd config CONFIG.yaml --set ...`: the resolved values). They are defined,
with comments, in opd/config.py; the README's "Configuration" has an overview."""


def _builtin_tasks_help() -> str:
    from opd.tasks.builtin import BUILTIN_TASKS

    width = max(map(len, BUILTIN_TASKS))
    lines = [f"  {name:<{width}}  {f.description} ({', '.join(f'{k}={v}' for k, v in f.defaults.items())})"
             for name, f in BUILTIN_TASKS.items()]
    return "built-in tasks: prompt -> answer (--param defaults):\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation of language models.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    no_progress = {"action": "store_true", "help": "no progress bars (for logs and scripts)"}

    p = sub.add_parser("init-model", help="build a randomly initialised model + char or BPE tokenizer")
    p.add_argument("--arch", choices=["qwen3", "llama"], default="qwen3", help="model architecture")
    p.add_argument("--layers", type=int, required=True, help="transformer layers")
    p.add_argument("--hidden", type=int, required=True, help="hidden size (a multiple of --heads)")
    p.add_argument("--heads", type=int, required=True, help="attention heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 4 x hidden)")
    p.add_argument("--max-positions", type=int, default=512, help="longest prompt + completion, in tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument("--tokenizer-data", required=True,
                   help="JSONL (prompt/answer rows) or text whose characters the tokenizer covers")
    p.add_argument("--extra-chars", default="", help="characters to add (e.g. those of a prompt format string)")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="char",
                   help="char: one token per character; bpe: byte-level BPE trained on --tokenizer-data "
                        "(a teacher and a student with different tokenizers: docs/cross_tokenizer.md)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="bpe: largest vocabulary, at least 260 (256 bytes + 4 special tokens; default 320)")
    p.add_argument("--out", required=True, help="folder to write (loadable with from_pretrained)")
    p.set_defaults(func=cmd_init_model)

    p = sub.add_parser("sft", help="supervised fine-tuning on prompt -> answer (loss on answer + EOS)")
    p.add_argument("--model", required=True, help="model folder or hub name to start from")
    p.add_argument("--data", required=True,
                   help="training JSONL of {prompt, answer} rows, or {messages} transcripts (loss on assistant turns)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (one random batch each)")
    p.add_argument("--out", required=True, help="folder the trained model and tokenizer are saved to")
    p.add_argument("--batch-size", type=int, default=64, help="rows per step")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="AdamW learning rate; ~1e-3 for tiny from-scratch models, 1e-5..1e-4 for pretrained ones")
    p.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--seed", type=int, default=0, help="seed of batch order and dropout")
    p.add_argument("--prompt-schema", default="{prompt}", help="format string with {prompt}, or 'chat'")
    p.add_argument("--eval", default=None, help="held-out JSONL: greedy accuracy every --eval-every steps and at the end")
    p.add_argument("--verifier", default="exact", help="for --eval: exact | numeric | regex:PATTERN | python:module:function")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations (with --eval)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="for --eval: greedy answer budget in tokens")
    p.add_argument("--stop-at", type=float, default=None, help="stop once eval accuracy reaches this (needs --eval)")
    from opd.cli.sft import add_env_args

    add_env_args(p)  # --env, --env-param, --max-turns: --eval in multi-turn episodes
    p.add_argument("--device", default="auto", help="auto (the first CUDA GPU, else the CPU) | cpu | cuda | cuda:N")
    p.add_argument("--logits-chunk", type=int, default=0,
                   help="logits per chunk of the loss (memory does not grow with batch x length x vocabulary); "
                        "0 = the default, 4,194,304")
    p.add_argument("--kv-cache-gib", type=float, default=8.0, help="for --eval: KV-cache budget per decoding batch")
    p.add_argument("--no-progress", **no_progress)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("data", help="write a built-in task as train.jsonl + eval.jsonl", epilog=_builtin_tasks_help())
    p.add_argument("--builtin", required=True, metavar="NAME", help="a built-in task (listed below)")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="task parameter, e.g. length=10 (repeatable)")
    p.add_argument("--n-train", type=int, default=20000, help="training rows")
    p.add_argument("--n-eval", type=int, default=500, help="held-out rows (prompts disjoint from training)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the generator")
    p.add_argument("--out", required=True, help="folder for train.jsonl and eval.jsonl")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("distill", help="run on-policy distillation from a YAML config", epilog=CONFIG_HELP)
    p.add_argument("config", help="YAML config (see below for its keys)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. train.lr=3e-4 (value parsed as YAML; repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in 'out'")
    p.add_argument("--json", action="store_true", help="also print summary.json as one JSON line at the end")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip the checks before step 1 (prompts, special tokens, teacher log-probs; opd preflight)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel over N local ranks: the same as torchrun --standalone --nproc_per_node N -m "
                        "opd distill ... (docs/distributed.md)")
    p.add_argument("--no-progress", **no_progress)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("preflight", help="check a config before distilling: prompts, special tokens, teacher "
                                         "log-probs (docs/preflight.md)", epilog=CONFIG_HELP)
    p.add_argument("config", help="YAML config, as for opd distill")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--self-test", action="store_true",
                   help="also distil the student into a frozen copy of itself for a few steps: the KL must stay ~0")
    p.add_argument("--prompts", type=int, default=3, help="training prompts checked per teacher")
    p.add_argument("--json", action="store_true", help="print the findings as one JSON line (report on stderr)")
    p.set_defaults(func=cmd_preflight)

    p = sub.add_parser("config", help="print the fully resolved config as YAML, each key with its comment",
                       epilog=CONFIG_HELP)
    p.add_argument("config", nargs="?", default=None, help="YAML config to resolve (default: print the defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("compare", help="run methods (opd, sft, rl, mixed, opd+rl) at equal compute over seeds",
                       epilog=CONFIG_HELP)
    p.add_argument("config", help="YAML config every method starts from")
    p.add_argument("--methods", default="opd,sft,rl", help="comma-separated methods to run")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method")
    p.add_argument("--out", required=True, help="folder for the runs, compare.json and compare.png")
    p.add_argument("--rl-budget", type=float, default=10.0, help="RL FLOPs budget as a multiple of OPD's FLOPs to target")
    p.add_argument("--evals-per-run", type=int, default=20,
                   help="FLOP grid: evaluations over an OPD run's FLOPs (every method is evaluated on it)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value for every method")
    p.add_argument("--method-set", action="append", metavar="METHOD:KEY=VALUE",
                   help="override for one method only, e.g. rl:train.lr=1e-4")
    p.add_argument("--no-progress", **no_progress)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("eval", help="greedy accuracy of a model on a JSONL task")
    p.add_argument("--model", required=True, help="model folder or hub name")
    p.add_argument("--data", required=True, help="JSONL of {prompt, answer} rows")
    p.add_argument("--verifier", default="exact", help="exact | numeric | regex:PATTERN | python:module:function")
    p.add_argument("--prompt-schema", default="{prompt}", help="format string with {prompt}, or 'chat'")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer budget in tokens")
    p.add_argument("--batch-size", type=int, default=256, help="prompts per decoding batch")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N rows only (0 = all)")
    p.add_argument("--device", default="auto", help="auto (the first CUDA GPU, else the CPU) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 when stored in 16 bits and native on the device, else float32) | float32 | "
                        "bfloat16 | float16")
    p.add_argument("--kv-cache-gib", type=float, default=8.0,
                   help="KV-cache budget per decoding batch (rows are decoded in groups that fit)")
    p.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="embedded end-to-end demo: tiny teacher -> tiny student, no downloads")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's data, student and run")
    p.add_argument("--cache", default=None, help="where the trained demo teacher is cached (default: ~/.cache/opd)")
    p.add_argument("--no-progress", **no_progress)
    p.set_defaults(func=cmd_demo)

    from opd.backends.server import add_parser as add_serve_parser
    from opd.cli.inspect import add_parser as add_inspect_parser
    from opd.report.html import add_parsers as add_report_parsers

    add_inspect_parser(sub)
    add_report_parsers(sub)
    add_serve_parser(sub)
    # every subcommand's --help: its one-line summary on top, defaults shown
    summaries = {a.dest: a.help for a in sub._choices_actions}
    for name, command in sub.choices.items():
        command.formatter_class = HelpFormatter
        command.description = command.description or summaries.get(name)
    return parser


# -- out of GPU memory ------------------------------------------------------------------------------
# What to set when a phase runs out of memory, first the phase's own setting. Innermost opd frame wins:
# a decode inside a training step is the decode's.
OOM_ADVICE = {
    "train": "lower train.micro_batch_tokens (training forward/backward)",
    "decode": "lower rollout.kv_cache_gib (sampling and evaluation decode)",
    "checkpointing": "set train.gradient_checkpointing: true",
    "lora": "set student.lora.r, e.g. 16 (LoRA: fewer trainable parameters)",
    "teacher": "put the teacher on another GPU (teacher.device / teacher.device_map)",
}
OOM_PHASES = {"update": "train", "sft_backward": "train", "optimizer_step": "train",
              "generate": "decode", "_generate": "decode", "evaluate": "decode",
              "score": "teacher", "hidden": "teacher", "teacher_hidden": "teacher", "auto_precision": "teacher"}
OOM_WHERE = {"train": " in the training update", "decode": " while decoding", "teacher": " in teacher scoring"}
# commands configured by flags, not a config file: their own settings
OOM_FLAGS = {"sft": ["lower --batch-size (rows per step)"], "eval": ["lower --batch-size (prompts per decoding batch)"],
             "serve-teacher": ["lower --logits-chunk (scoring memory)", "serve with --dtype bfloat16"]}
OPD_PACKAGE = Path(__file__).resolve().parents[1]


def is_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")  # not imported: nothing ran on a GPU
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def oom_phase(exc: BaseException) -> str | None:
    """train, decode or teacher: the innermost opd function on the traceback that names a phase."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.name in OOM_PHASES and Path(frame.filename).resolve().is_relative_to(OPD_PACKAGE):
            return OOM_PHASES[frame.name]
    return None


def oom_message(exc: BaseException, command: str = "distill") -> str:
    """One line: where memory ran out, how much was asked for, and the settings that lower it."""
    phase = oom_phase(exc)
    order = sorted(OOM_ADVICE, key=lambda k: k != phase)  # the phase's own setting first (a stable sort)
    advice = OOM_FLAGS.get(command) or [OOM_ADVICE[k] for k in order]
    size = re.search(r"Tried to allocate ([\d.]+ \w+)", str(exc))
    asked = f" (tried to allocate {size.group(1)})" if size else ""
    return f"CUDA out of memory{OOM_WHERE.get(phase, '')}{asked}: {advice[0]}" + \
        (f"; or {', '.join(advice[1:])}" if advice[1:] else "")


def execute(args) -> int:
    """Run the parsed command; an OpdError or running out of GPU memory is one line on stderr, exit 2."""
    from opd.cli.launch import rank_prefix, record_failure

    try:
        args.func(args)
    except OpdError as exc:
        if args.debug:
            raise
        if not record_failure(str(exc)):  # a rank of `--nproc`: the launcher prints it, naming the rank
            print(f"opd: {rank_prefix()}error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if args.debug or not is_oom(exc):
            record_failure(f"{type(exc).__name__}: {exc}")
            raise
        if not record_failure(oom_message(exc, args.command)):
            print(f"opd: {rank_prefix()}error: {oom_message(exc, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("opd: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: `--nproc` relaunches it per rank
    _quiet_libraries()
    return execute(args)


if __name__ == "__main__":
    sys.exit(main())
