"""Every rollout and eval answer of a run, as Parquet tables that DuckDB can query.

    RUN/samples/rollouts/part-0000050-0.parquet     rows buffered since the previous flush
    RUN/samples/evals/part-0000050-0.parquet

Rows are buffered in memory and written by `flush(step)` as one new part per table, atomically
(temp file + fsync + rename), so a crash leaves whole parts only. The loop flushes just before
each checkpoint (and at the end); on resume `truncate_after(ckpt_step)` deletes later parts, so
every row of a resumed run exists exactly once. pyarrow and duckdb are imported lazily: the
training path never loads duckdb.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from opd.errors import OpdError

TABLES = ("rollouts", "evals")
_PART = re.compile(r"part-(\d+)-(\d+)\.parquet")


def schema(table: str):
    """The fixed Arrow schema of a table, so empty lists and None never change column types."""
    import pyarrow as pa

    if table == "rollouts":
        return pa.schema([
            pa.field("step", pa.int64(), nullable=False),
            pa.field("policy_version", pa.int64(), nullable=False),
            pa.field("task_tag", pa.string()),
            pa.field("prompt", pa.string(), nullable=False),
            pa.field("completion", pa.string(), nullable=False),
            pa.field("completion_ids", pa.list_(pa.int64())),
            pa.field("student_logprobs", pa.list_(pa.float32())),
            pa.field("teacher_logprobs", pa.list_(pa.float32())),
            pa.field("kept", pa.bool_(), nullable=False),
            pa.field("reject_rule", pa.string()),
            pa.field("correct", pa.bool_()),
            pa.field("teacher", pa.string()),
            pa.field("truncated", pa.bool_()),
            pa.field("source", pa.string()),  # student | teacher | anchor: who wrote the completion
            # episodes: the messages as JSON, and the model's tokens per assistant turn (completion_ids and
            # the log-probs are those tokens, every turn's in order); null / empty for single completions
            pa.field("transcript", pa.string()),
            pa.field("turn_tokens", pa.list_(pa.int64())),
        ])
    if table == "evals":
        return pa.schema([
            pa.field("step", pa.int64(), nullable=False),
            pa.field("prompt", pa.string(), nullable=False),
            pa.field("completion", pa.string(), nullable=False),
            pa.field("expected", pa.string()),
            pa.field("correct", pa.bool_(), nullable=False),
            pa.field("well_formed", pa.bool_()),
            pa.field("task_tag", pa.string()),
            pa.field("transcript", pa.string()),  # episodes: the messages as JSON
        ])
    raise OpdError(f"unknown sample table {table!r} (valid: {', '.join(TABLES)})")


def eval_rows(step: int, records: list[dict]) -> list[dict]:
    """Rows for `evals` from `evaluate(...).records` (which name the task tag `tag`)."""
    return [{"step": step, "prompt": r["prompt"], "completion": r["completion"], "expected": r.get("expected"),
             "correct": r["correct"], "well_formed": r.get("well_formed"), "task_tag": r.get("tag"),
             "transcript": r.get("transcript")}
            for r in records]


def _to_table(table: str, rows: list[dict]):
    """Rows as an Arrow table of the fixed schema; a missing required value is an OpdError."""
    import pyarrow as pa

    sch = schema(table)
    try:
        data = pa.Table.from_pylist(rows, schema=sch)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
        raise OpdError(f"bad {table} sample row: {' '.join(str(exc).split())}") from exc
    for f in sch:
        if not f.nullable and data.column(f.name).null_count:
            raise OpdError(f"bad {table} sample row: '{f.name}' is missing or None")
    return data


def _part_step(path: Path) -> int | None:
    m = _PART.fullmatch(path.name)
    return int(m.group(1)) if m else None


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class SampleStore:
    """Buffered, append-only Parquet tables `rollouts` and `evals` under ROOT/samples/."""

    def __init__(self, root: str | Path, writes: bool = True):
        """`writes`: False on every rank but 0 of a distributed job (rank 0 stores the gathered rows)."""
        self.root = Path(root) / "samples"
        self.writes = writes
        self._buffers: dict[str, list[dict]] = {t: [] for t in TABLES}

    def add_rollouts(self, rows: list[dict]) -> None:
        if self.writes:
            self._buffers["rollouts"].extend(rows)

    def add_evals(self, rows: list[dict]) -> None:
        if self.writes:
            self._buffers["evals"].extend(rows)

    def drop_pending_after(self, step: int) -> None:
        """Forget buffered rows of steps after `step` (a step interrupted half-way is redone on resume)."""
        for rows in self._buffers.values():
            rows[:] = [r for r in rows if r["step"] <= step]

    def parts(self, table: str) -> list[Path]:
        folder = self.root / table
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if _part_step(p) is not None)

    def flush(self, step: int) -> None:
        """Write each table's buffered rows as one new part file, atomically; empty buffers write nothing."""
        for table, rows in self._buffers.items():
            if not rows:
                continue
            data = _to_table(table, rows)
            folder = self.root / table
            folder.mkdir(parents=True, exist_ok=True)
            k = sum(1 for p in self.parts(table) if _part_step(p) == step)
            self._write_atomic(data, folder / f"part-{step:07d}-{k}.parquet")
            rows.clear()

    @staticmethod
    def _write_atomic(data, path: Path) -> None:
        import pyarrow.parquet as pq

        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            pq.write_table(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    def truncate_after(self, step: int) -> None:
        """Delete parts written after the checkpoint at `step` (and leftover temp files); drop the buffers."""
        if not self.writes:
            return
        for table in TABLES:
            for path in self.parts(table):
                if _part_step(path) > step:
                    path.unlink()
            folder = self.root / table
            for tmp in folder.glob("*.tmp") if folder.is_dir() else []:
                tmp.unlink()
            self._buffers[table].clear()

    def connect(self):
        """A DuckDB connection with views `rollouts` and `evals` over the part files (empty if none)."""
        import duckdb

        con = duckdb.connect()
        for table in TABLES:
            parts = self.parts(table)
            if parts:  # an explicit file list: no glob surprises from the path, temp files never read
                files = ", ".join(_sql_string(str(p)) for p in parts)
                con.execute(f"create view {table} as select * from read_parquet([{files}])")
            else:
                con.register(table, schema(table).empty_table())
        return con

    def query(self, sql: str, params: list | None = None):
        """Run SQL over `rollouts` and `evals`; returns a pyarrow.Table. A bad query is an OpdError."""
        import duckdb
        import pyarrow as pa

        con = self.connect()
        try:
            result = con.sql(sql, params=params)
            return result.to_arrow_table() if result is not None else pa.table({})
        except duckdb.Error as exc:
            raise OpdError(f"query failed: {' '.join(str(exc).split())}") from exc
        finally:
            con.close()

    def rows(self, sql: str, params: list | None = None) -> list[dict]:
        return self.query(sql, params).to_pylist()
