"""User-written environments for the episode tests, loaded as `python:tests.rollout.toy_envs:Class`."""


class LookupEnv:
    """The model may ask for the answer with a call ("?"), gets it as a tool message, then answers."""

    def __init__(self, reply: str = "ok", max_calls: int = 3):
        self.reply, self.max_calls = reply, max_calls
        self.seen: list[list[dict]] = []  # every transcript step() received, as received

    def reset(self, example):
        return [{"role": "user", "content": example["prompt"]}]

    def step(self, messages):
        self.seen.append(messages)
        last = messages[-1]["content"]
        calls = sum(m["role"] == "tool" for m in messages)
        if last.startswith("?") and calls < self.max_calls:
            error = {"error": "bad call"} if last != "?" else {}
            return [{"role": "tool", "content": self.reply, **error}], False
        return [], True


class EndlessEnv(LookupEnv):
    """Never over: every episode runs into rollout.max_turns."""

    def step(self, messages):
        self.seen.append(messages)
        return [{"role": "user", "content": "more"}], False


class BrokenEnv(LookupEnv):
    def step(self, messages):
        raise ValueError("tool server down")
