"""Test-wide setup, before jax initialises its backends, hence at conftest import time:

- 8 simulated CPU devices, so that multi-device tests can build meshes;
- one persistent compilation cache for the whole run: the two xdist workers and every JAX
  subprocess a test starts share it, so a program compiled once (the same LSD step in another
  test, another module or another process) is loaded, not compiled again (docs/testing.md);
- XLA's CPU backend at a lower LLVM optimisation level (train_helpers.IN_PROCESS_COMPILE): the
  suite's programs are tiny, so compiling them is most of its time and running them little.
"""

import gc
import os
import shutil
import tempfile

import pytest

from train_helpers import IN_PROCESS_COMPILE, xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8, IN_PROCESS_COMPILE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Created by the first process that imports this file (pytest's main process, whose
# environment the xdist workers inherit); removed by it at the end of the run.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lsd_jax_test_cache_")
# Every program, however quick to compile: most of the suite's are.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the main process, not a worker
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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


_PROFILE_FOLDER = os.environ.get("LSD_TEST_PROFILE")
if _PROFILE_FOLDER:
    from time_profile import install as _install_profile, record as _record_profile
    _profile_out = _install_profile(_PROFILE_FOLDER)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_logreport(report):
        if getattr(report, "node", None) is None:  # not xdist's copy of a worker's report
            _record_profile(_profile_out, report.nodeid, report.when, report.duration)
        yield
