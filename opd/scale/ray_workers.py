"""Scale-out on Ray: rollout workers sample the student's batches, teacher workers run the teachers'
forward passes, and the trainer (this process) keeps everything else.

The trainer stays the single source of truth. Each step it draws the prompts and the uniforms (one
per row and position, see `sampler.choose_tokens`), pushes the student's weights with their policy
version to every rollout worker, gives each worker a contiguous block of rows, and concatenates the
answers in the original row order. A row's sample depends only on its prompt, its uniforms and the
weights, so the batch equals the single-process batch (up to float rounding) however it is split.
Teacher workers return final hidden states; the trainer applies the teacher's head in chunks, as
in the single-process path (opd/train/chunked.py).

`ray` is imported only here, and only when `scale.ray_address` is set.
"""

from __future__ import annotations

import os

import torch

from opd.errors import OpdError
from opd.batch import Batch, concat_batches
from opd.teachers.local import LocalTeacher


def row_blocks(n_rows: int, n_workers: int) -> list[slice]:
    """Contiguous, nearly equal blocks of rows, one per worker (empty blocks dropped)."""
    size, extra = divmod(n_rows, n_workers)
    blocks, lo = [], 0
    for w in range(n_workers):
        hi = lo + size + (w < extra)
        if hi > lo:
            blocks.append(slice(lo, hi))
        lo = hi
    return blocks


class RolloutWorker:
    """Holds a copy of the student; samples with the weights of the version it was last given."""

    def __init__(self, model_path: str, threads: int = 1):
        torch.set_num_threads(threads)
        from opd.backends.hf import load_model

        self.model = load_model(model_path).model.eval()
        self.version = None

    def load(self, state: dict, version: int) -> int:
        self.model.load_state_dict(state)
        self.version = version
        return version

    def generate(self, prompts: list[list[int]], uniforms: torch.Tensor, version: int, options: dict):
        from opd.rollout.sampler import generate

        if version != self.version:  # a stale worker must never pass its samples off as fresh
            raise RuntimeError(f"rollout worker holds policy version {self.version}, asked for {version}")
        return generate(self.model, prompts, uniforms=uniforms, **options), self.version


class TeacherWorker:
    """Holds a copy of one teacher (in the precision the trainer settled on) and runs its body."""

    def __init__(self, model_path: str, dtype: str, threads: int = 1):
        torch.set_num_threads(threads)
        from opd.backends.hf import load_model

        self.model = load_model(model_path).model.to(getattr(torch, dtype)).eval()

    def hidden(self, batch: Batch) -> torch.Tensor:
        from opd.teachers.local import teacher_hidden

        return teacher_hidden(self.model, batch).clone()  # a normal tensor, not an inference tensor


class RayWorkers:
    """The Ray actors of one run: `rollout_workers` students and `teacher_workers` per local teacher."""

    def __init__(self, scale, student_path: str, teachers: list, pad_id: int, eos_id: int):
        """teachers: the LocalTeachers whose forward passes run on `scale.teacher_workers` actors each."""
        try:
            import ray
        except ImportError:
            raise OpdError("scale.ray_address needs Ray: pip install 'opd[ray]'") from None
        self.ray, self.pad_id, self.eos_id, self.started = ray, pad_id, eos_id, False
        n_actors = scale.rollout_workers + scale.teacher_workers * len(teachers)
        if not ray.is_initialized():
            if scale.ray_address == "local":  # on a laptop, actors may outnumber cores: oversubscribe
                ray.init(num_cpus=max(os.cpu_count() or 1, n_actors), include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=scale.ray_address, log_to_driver=False, configure_logging=False)
            self.started = True
        rollout_actor = ray.remote(num_cpus=1)(RolloutWorker)
        teacher_actor = ray.remote(num_cpus=1)(TeacherWorker)
        self.rollout = [rollout_actor.remote(student_path) for _ in range(scale.rollout_workers)]
        self.teacher = {t.name: [teacher_actor.remote(t.loaded.name, t.precision["dtype"])
                                 for _ in range(scale.teacher_workers)] for t in teachers}
        self.version = None
        self.counts = {"weight_pushes": 0, "rollout_batches": 0, "teacher_passes": 0}  # -> summary.json

    def push_weights(self, state_dict, version: int) -> None:
        """Every rollout worker gets the trainer's current weights, tagged with their policy version."""
        if self.rollout and version != self.version:
            state = self.ray.put({k: v.detach().clone() for k, v in state_dict.items()})
            self.ray.get([w.load.remote(state, version) for w in self.rollout])
            self.version = version
            self.counts["weight_pushes"] += 1

    def generate(self, prompts: list[list[int]], uniforms: torch.Tensor, version: int, options: dict) -> Batch:
        blocks = row_blocks(len(prompts), len(self.rollout))
        futures = [w.generate.remote(prompts[b], uniforms[b], version, options) for w, b in zip(self.rollout, blocks)]
        parts = self.ray.get(futures)
        self.counts["rollout_batches"] += 1
        if any(v != version for _, v in parts):
            raise OpdError(f"rollout workers answered with policy versions {[v for _, v in parts]}, expected {version}")
        return concat_batches([p for p, _ in parts], self.pad_id)

    def has_teacher(self, name: str) -> bool:
        return bool(self.teacher.get(name))

    def teacher_hidden(self, name: str, batch: Batch) -> torch.Tensor:
        workers = self.teacher[name]
        blocks = row_blocks(batch.prompt_ids.shape[0], len(workers))
        self.counts["teacher_passes"] += 1
        return torch.cat(self.ray.get([w.hidden.remote(batch.rows(b)) for w, b in zip(workers, blocks)]))

    def close(self) -> None:
        for actor in self.rollout + [a for group in self.teacher.values() for a in group]:
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()

    def rollout_backend(self) -> "RayRolloutBackend":
        return RayRolloutBackend(self)

    def host(self, teacher: LocalTeacher) -> LocalTeacher:
        """The teacher, with its forward passes on this run's teacher actors (when it has any)."""
        return RayTeacher(teacher, self) if self.teacher.get(teacher.name) else teacher


class RayRolloutBackend:
    """RolloutBackend (opd/rollout/backend.py) on the rollout actors: rows in contiguous blocks."""

    def __init__(self, workers: RayWorkers):
        self.workers, self._version = workers, None

    @property
    def version(self) -> int:
        return self._version

    def load_weights(self, state_dict, version: int) -> None:
        self.workers.push_weights(state_dict, version)
        self._version = version

    def generate(self, prompts, *, max_new_tokens: int, temperature: float = 1.0, greedy: bool = False, seed: int = 0,
                 uniforms: torch.Tensor | None = None) -> Batch:
        if uniforms is None and not greedy:
            uniforms = torch.rand(len(prompts), max_new_tokens, generator=torch.Generator().manual_seed(seed),
                                  dtype=torch.float64)
        options = dict(eos_id=self.workers.eos_id, pad_id=self.workers.pad_id, greedy=greedy,
                       max_new_tokens=max_new_tokens, temperature=temperature)
        return self.workers.generate(prompts, uniforms, self._version, options)


class RayTeacher(LocalTeacher):
    """A local teacher whose body runs on Ray actors; the head and everything else stay here."""

    def __init__(self, local: LocalTeacher, workers: RayWorkers):
        self.__dict__.update(local.__dict__)  # the same teacher (model, schema, precision), hosted elsewhere
        self.workers = workers

    def hidden(self, batch: Batch) -> torch.Tensor:
        return self.workers.teacher_hidden(self.name, batch)
