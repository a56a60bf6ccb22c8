"""The adaptation methods, one module each, chosen by `config.method`.

Every module has `build(config) -> base.Method`; the training program, checkpoints, evaluation
and the benchmark runner only use that interface (see `base`).
"""

from lsd_jax.methods import adaptsegnet, adversarial, advent, base, lsd, source_only
from lsd_jax.methods.base import Method, NetState, States, compile_method, run_iteration

BUILDERS = {"lsd": lsd.build, "source_only": source_only.build,
            "adaptsegnet": adaptsegnet.build, "advent": advent.build,
            "adversarial": adversarial.build}
METHODS = tuple(BUILDERS)


def build(config) -> Method:
    """The method `config.method` for this config; ValueError naming the field if a value is
    not one the method accepts."""
    base.check_choice("method", config.method, BUILDERS)
    return BUILDERS[config.method](config)


__all__ = ["METHODS", "Method", "NetState", "States", "base", "build", "compile_method",
           "run_iteration"]
