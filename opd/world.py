"""The ranks of one training job: torch.distributed when launched by torchrun, one process otherwise.

Every part asks the World the same few questions: which rows are mine (`share`), what is the sum
over ranks (`sum`), what did every rank produce (`gather`), and the one gradient synchronisation of
a step (`sync_grads`). With one process each answer is the local value, so the loop reads the same
on a laptop and on 64 GPUs. This is the ground floor: it imports nothing from opd but errors.

Sampling is a pure function of (seed, step, row), so rank r's contiguous share of a step's rows is
exactly those rows of the single-process batch; losses are divided by the global token count and
gradients are summed, so the update does not depend on the number of ranks (docs/distributed.md).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from opd.errors import OpdError

BUCKET_ELEMENTS = 1 << 24  # gradients are all-reduced in flat buckets of at most 16M elements (64 MiB fp32)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # gloo | nccl; None with one process

    @classmethod
    def from_env(cls) -> "World":
        """The job torchrun started (WORLD_SIZE, RANK, LOCAL_RANK), its process group initialised: NCCL
        when this machine has CUDA GPUs (each rank on cuda:LOCAL_RANK), else gloo. One process: no group."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend)
        return cls(rank=rank, size=size, local_rank=local, backend=backend)

    @property
    def main(self) -> bool:
        """Rank 0 owns the run directory: config, manifest, logs, store, checkpoints, the final student."""
        return self.rank == 0

    def share(self, n: int, rank: int | None = None) -> slice:
        """This rank's contiguous share of n rows (the first n % size ranks take one more)."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(n, self.size)
        lo = rank * base + min(rank, extra)
        return slice(lo, lo + base + (rank < extra))

    def sum(self, *values: float) -> list[float]:
        """The sums over ranks of a few numbers (one all-reduce, in float64)."""
        if self.size == 1:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return t.tolist()

    def max(self, value: float) -> float:
        """The largest value over ranks."""
        if self.size == 1:
            return float(value)
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order (so rows come back in single-process order)."""
        if self.size == 1:
            return list(items)
        import torch.distributed as dist

        parts = [None] * self.size
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def on_main(self, fn):
        """fn() on rank 0, its result (or its OpdError, raised on every rank) broadcast to all ranks."""
        if self.size == 1:
            return fn()
        import torch.distributed as dist

        box = [None]
        if self.main:
            try:
                box = [("ok", fn())]
            except OpdError as exc:
                box = [("error", str(exc))]
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise OpdError(value)
        return value

    def sync_grads(self, params) -> None:
        """Sum every trainable parameter's gradient over the ranks, once per step, in flat buckets (what
        DDP's reducer does, run explicitly after opd's two-stage chunked backward: DDP's forward hooks
        cannot follow a body and head run as separate autograd passes). A rank whose rows trained no
        parameter contributes zeros."""
        if self.size == 1:
            return
        import torch
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        params = [p for p in params if p.requires_grad]
        touched = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self._device())
        dist.all_reduce(touched)  # a parameter no rank's loss reached keeps grad None, as with one process
        params = [p for p, t in zip(params, touched.tolist()) if t > 0]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        buckets: list[list] = []
        for p in params:  # consecutive gradients of one dtype, up to BUCKET_ELEMENTS each
            last = buckets[-1] if buckets else None
            if last and last[0].dtype == p.grad.dtype and sum(g.numel() for g in last) + p.numel() <= BUCKET_ELEMENTS:
                last.append(p.grad)
            else:
                buckets.append([p.grad])
        for grads in buckets:
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(synced)

    def hosts(self) -> list[str]:
        """Each rank's host name, in rank order (the manifest's record of where the job ran)."""
        return self.gather([socket.gethostname()])

    def describe(self) -> dict:
        return {"world_size": self.size, "backend": self.backend, "hosts": self.hosts()}

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def _device(self):
        import torch

        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def error_file() -> str | None:
    """Where `opd distill --nproc` asked this rank to leave its one-line error (None under plain torchrun)."""
    folder = os.environ.get("OPD_ERROR_DIR")
    return os.path.join(folder, f"rank-{os.environ.get('RANK', '0')}") if folder else None

