"""`opd distill CONFIG --nproc N`: the same job as `torchrun --standalone --nproc_per_node N -m opd distill
CONFIG`, launched through torchrun's own entry point, with a failure reported as one line naming the
rank that died and why (torchrun's agent stops the other ranks)."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from pathlib import Path

from opd.errors import OpdError


def without_nproc(argv: list[str]) -> list[str]:
    """The command line minus `--nproc N` / `--nproc=N`: what every rank runs."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(distill_argv: list[str], nproc: int) -> None:
    """Run `opd distill` on `nproc` local ranks (gloo on CPU, NCCL on GPUs); an OpdError names the
    first rank that failed and its cause."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if os.environ.get("WORLD_SIZE"):
        raise OpdError("--nproc inside a torchrun job: launch either with torchrun or with --nproc, not both")
    # each rank gets its share of the cores (torchrun alone would give every rank 1 thread)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # opd says what failed
    with tempfile.TemporaryDirectory(prefix="opd-ranks-") as errors:
        os.environ["OPD_ERROR_DIR"] = errors
        args = torchrun.get_args_parser().parse_args(
            ["--standalone", f"--nproc_per_node={nproc}", "--max-restarts=0", "-m", "opd", *distill_argv])
        try:
            torchrun.run(args)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            raise OpdError(f"rank {rank} of {nproc} failed: {cause(failure.exitcode, Path(errors) / f'rank-{rank}')}; "
                           "the other ranks were stopped") from None
        finally:
            os.environ.pop("OPD_ERROR_DIR", None)


def cause(exitcode: int, error_file: Path) -> str:
    """What the rank left in its error file, else how it ended (a signal: killed, e.g. out of memory)."""
    if error_file.exists() and error_file.read_text().strip():
        return error_file.read_text().strip()
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (out of host memory, or killed from outside)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit code {exitcode} (see its output above)"


def record_failure(message: str) -> bool:
    """In a rank started by `--nproc`: leave the one-line cause for the launcher (True), else False."""
    from opd.world import error_file

    path = error_file()
    if path is None:
        return False
    Path(path).write_text(message.strip().splitlines()[-1] if message.strip() else message)
    return True


def rank_prefix() -> str:
    """`rank N: ` inside a multi-rank job, so a rank's own error line says which rank it is."""
    return f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""

