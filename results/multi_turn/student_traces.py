"""The weak student's SFT data for results/multi_turn/run.sh: the calculator task's episodes, with
habits the teacher does not have, by the question's form (so a greedy student keeps them):
    a*b      clean      CALL expr -> result -> answer                      (the teacher's episode)
    a*b+c    redundant  CALL expr -> result -> CALL expr -> result -> answer   (the same call twice)
    a*b-c    guess      answers at once, in its head: the last two digits at random (wrong unless lucky)

    python results/multi_turn/student_traces.py DATA_DIR
writes DATA_DIR/student_messages.jsonl from DATA_DIR/train.jsonl.
"""

import argparse
import json
import random
from pathlib import Path

from opd.tasks.calculator import transcript


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    data = Path(args.data)
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    with open(data / "student_messages.jsonl", "w") as f:
        for row in rows:
            episode = transcript(row["prompt"], row["answer"])
            if "+" in row["prompt"]:
                episode = episode[:3] + episode[1:3] + episode[3:]
            elif "-" in row["prompt"]:
                guess = row["answer"][:-2] + f"{rng.randrange(100):02d}" if len(row["answer"]) > 2 else \
                    str(rng.randrange(100))
                episode = [episode[0], {"role": "assistant", "content": guess}]
            f.write(json.dumps({"messages": episode}) + "\n")


if __name__ == "__main__":
    main()
