"""Test-wide setup: 8 simulated CPU devices, so that multi-device tests can build meshes.

Must run before jax initialises its backends, hence at conftest import time.
"""

import gc
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="module")
def release_compiled_programs(request):
    """After a module: its cached programs (functools caches at module level) and jax's
    executables freed, for the modules after it (the whole suite runs in one process)."""
    import jax  # here: jax must initialise after XLA_FLAGS above

    yield
    for value in vars(request.module).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()
    jax.clear_caches()
    gc.collect()
