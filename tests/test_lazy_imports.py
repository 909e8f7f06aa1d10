"""The training path stays lean: a whole distill run never imports ray, duckdb or matplotlib."""

import json
import subprocess
import sys

SCRIPT = """
import json, sys
from opd.config import load_config
from opd.loop import distill
model, root = sys.argv[1], sys.argv[2]
with open(root + "/train.jsonl", "w") as f:
    for i in range(40):
        f.write(json.dumps({"prompt": f"{i % 9}+{i % 7}=", "answer": str(i % 9 + i % 7)}) + "\\n")
cfg = load_config(None, [f"teacher.model={model}", f"student.model={model}", f"task.train={root}/train.jsonl",
                         f"task.eval={root}/train.jsonl", "rollout.batch_size=4", "rollout.max_new_tokens=4",
                         "train.steps=2", "train.eval_every=2", "eval.limit=4", "logging.report=false",
                         "train.checkpoint_every=1", f"out={root}/run"])
distill(cfg, progress=False)
print(json.dumps(sorted(m for m in ("ray", "duckdb", "matplotlib", "trl", "fastapi") if m in sys.modules)))
"""


def test_a_distill_run_does_not_import_ray_duckdb_or_matplotlib(tiny_model_dir, tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
