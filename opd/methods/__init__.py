"""Training methods: one file each; METHODS maps a config name to its class.

Adding a method = adding a file with a Method subclass (and its Options) and naming it here.
"""

from __future__ import annotations

from opd.errors import OpdError
from opd.methods.base import Chunk, Method, MethodOptions
from opd.methods.kd import SupervisedDistillation
from opd.methods.mixed import Mixed
from opd.methods.opd import OnPolicyDistillation
from opd.methods.opd_rl import OpdPlusRl
from opd.methods.rl import Reinforce
from opd.methods.sft import SupervisedFineTuning

METHODS: dict[str, type[Method]] = {m.name: m for m in (OnPolicyDistillation, SupervisedFineTuning, Mixed,
                                                         SupervisedDistillation, Reinforce, OpdPlusRl)}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise OpdError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def make_method(options: MethodOptions) -> Method:
    return method_class(options.name)(options)


__all__ = ["METHODS", "Chunk", "Method", "MethodOptions", "make_method", "method_class"]
