"""The sample store: Parquet parts written atomically, truncated on resume, queried with SQL."""

import pyarrow as pa
import pytest

from opd.errors import OpdError
from opd.store.samples import SampleStore, eval_rows


def rollout(step, completion="12", kept=True, rule=None, correct=None, **kw):
    row = {"step": step, "policy_version": step - 1, "task_tag": "add", "prompt": "1+1=", "completion": completion,
           "completion_ids": [5, 6, 2], "student_logprobs": [-0.5, -1.0, -0.1],
           "teacher_logprobs": [-0.25, -3.0, -0.2], "kept": kept, "reject_rule": rule, "correct": correct,
           "teacher": "runs/teacher", "truncated": False, "source": "student", "transcript": None,
           "turn_tokens": []}
    return {**row, **kw}


def evaluation(step, correct, completion="2"):
    return {"step": step, "prompt": "1+1=", "completion": completion, "expected": "2", "correct": correct,
            "well_formed": True, "task_tag": "add", "transcript": None}


def test_round_trip_of_both_tables(tmp_path):
    store = SampleStore(tmp_path)
    store.add_rollouts([rollout(1), rollout(1, "x", kept=False, rule="regex", correct=False)])
    store.add_evals([evaluation(1, True), evaluation(1, False, "3")])
    store.flush(1)
    rows = SampleStore(tmp_path).rows("select * from rollouts order by completion")
    floats = ("student_logprobs", "teacher_logprobs")  # stored as float32
    assert {k: v for k, v in rows[0].items() if k not in floats} == \
        {k: v for k, v in rollout(1).items() if k not in floats}
    assert rows[0]["student_logprobs"] == pytest.approx([-0.5, -1.0, -0.1])
    assert {k: rows[1][k] for k in ("completion", "kept", "reject_rule", "correct")} == \
        {"completion": "x", "kept": False, "reject_rule": "regex", "correct": False}
    assert SampleStore(tmp_path).rows("select completion, correct from evals order by 1") == \
        [{"completion": "2", "correct": True}, {"completion": "3", "correct": False}]
    assert [p.name for p in store.parts("rollouts")] == ["part-0000001-0.parquet"]


def test_none_and_empty_values_keep_column_types(tmp_path):
    store = SampleStore(tmp_path)
    store.add_rollouts([rollout(1, completion_ids=[], student_logprobs=[], teacher_logprobs=None, task_tag=None)])
    store.flush(1)
    table = store.query("select * from rollouts")
    assert table.schema.field("completion_ids").type == pa.list_(pa.int64())
    assert table.schema.field("reject_rule").type == pa.string()
    assert table.to_pylist()[0]["completion_ids"] == []


def test_flushes_append_parts_and_empty_buffers_write_nothing(tmp_path):
    store = SampleStore(tmp_path)
    store.add_rollouts([rollout(1), rollout(2)])
    store.flush(2)
    store.add_rollouts([rollout(3)])
    store.flush(4)
    store.add_rollouts([rollout(4)])
    store.flush(4)  # a second flush at one step gets its own part
    store.flush(5)
    assert [p.name for p in store.parts("rollouts")] == \
        ["part-0000002-0.parquet", "part-0000004-0.parquet", "part-0000004-1.parquet"]
    assert store.parts("evals") == []
    assert [r["step"] for r in store.rows("select step from rollouts order by step")] == [1, 2, 3, 4]


def test_truncate_after_removes_later_parts(tmp_path):
    store = SampleStore(tmp_path)
    for step in (2, 4, 6):
        store.add_rollouts([rollout(step - 1), rollout(step)])
        store.add_evals([evaluation(step, True)])
        store.flush(step)
    store.add_rollouts([rollout(7)])
    resumed = SampleStore(tmp_path)
    resumed.truncate_after(4)
    assert [r["step"] for r in resumed.rows("select step from rollouts order by 1")] == [1, 2, 3, 4]
    assert [r["step"] for r in resumed.rows("select step from evals order by 1")] == [2, 4]


def test_sql_group_by_reject_rule(tmp_path):
    store = SampleStore(tmp_path)
    store.add_rollouts([rollout(1), rollout(1, kept=False, rule="regex"), rollout(2, kept=False, rule="regex"),
                        rollout(2, kept=False, rule="max_tokens")])
    store.flush(2)
    got = store.rows("select reject_rule, count(*) as n from rollouts where not kept group by 1 order by 2 desc")
    assert got == [{"reject_rule": "regex", "n": 2}, {"reject_rule": "max_tokens", "n": 1}]
    assert store.rows("select count(*) as n from rollouts where step = ?", [2]) == [{"n": 2}]


def test_queries_work_before_anything_is_written(tmp_path):
    store = SampleStore(tmp_path)
    assert store.rows("select count(*) as n from rollouts") == [{"n": 0}]
    assert store.query("select * from evals").column_names == \
        ["step", "prompt", "completion", "expected", "correct", "well_formed", "task_tag", "transcript"]


def test_crash_loses_only_unflushed_rows_and_ignores_temp_files(tmp_path):
    store = SampleStore(tmp_path)
    store.add_rollouts([rollout(1)])
    store.flush(1)
    store.add_rollouts([rollout(2)])  # buffered, then the process dies
    tmp = tmp_path / "samples" / "rollouts" / "part-0000002-0.parquet.tmp"
    tmp.write_bytes(b"PAR1 half a file")
    reopened = SampleStore(tmp_path)
    assert [r["step"] for r in reopened.rows("select step from rollouts")] == [1]
    reopened.truncate_after(1)
    assert not tmp.exists()


def test_bad_rows_and_bad_sql_are_opd_errors(tmp_path):
    store = SampleStore(tmp_path)
    store.add_rollouts([{"step": 1, "prompt": "p"}])  # no completion / kept / policy_version
    with pytest.raises(OpdError, match="bad rollouts sample row"):
        store.flush(1)
    with pytest.raises(OpdError, match="query failed"):
        store.query("select nope from rollouts")


def test_eval_rows_from_evaluate_records():
    records = [{"prompt": "1+1=", "completion": "2", "expected": "2", "correct": True, "well_formed": True,
                "tag": "add"}]
    assert eval_rows(3, records) == [evaluation(3, True)]
