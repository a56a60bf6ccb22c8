"""The adaptation methods, one module each, chosen by `config.method`.

Every module has `build(config) -> base.Method`; the training program, checkpoints, evaluation
and the benchmark runner only use that interface (see `base`).
"""

from lsd_jax.methods import (adaptsegnet, adversarial, advent, base, lsd, self_training,
                             source_only)
from lsd_jax.methods.base import Method, NetState, States, compile_method, run_iteration

BUILDERS = {"lsd": lsd.build, "source_only": source_only.build,
            "adaptsegnet": adaptsegnet.build, "advent": advent.build,
            "adversarial": adversarial.build, "dacs": self_training.build}
METHODS = tuple(BUILDERS)

# LSD's G concatenates its upsampled features with F's pool4 and pool3, and D compares both
# domains' reconstructions; DACS's ClassMix pastes source pixels onto target images: their
# training images share one size, a multiple of 32. The other methods pass each domain through
# S on its own, so each domain keeps its own size (the published AdaptSegNet / ADVENT settings:
# 1280x720 source, 1024x512 target).
ONE_SIZE_METHODS = ("lsd", "dacs")


def needs_one_size(config) -> bool:
    """Whether both domains' training images must have one size that is a multiple of 32."""
    return config.method in ONE_SIZE_METHODS


def build(config) -> Method:
    """The method `config.method` for this config; ValueError naming the field if a value is
    not one the method accepts."""
    base.check_choice("method", config.method, BUILDERS)
    return BUILDERS[config.method](config)


__all__ = ["METHODS", "ONE_SIZE_METHODS", "Method", "NetState", "States", "base", "build", "compile_method",
           "needs_one_size", "run_iteration"]
