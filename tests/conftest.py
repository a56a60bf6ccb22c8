"""Test-wide setup: 8 simulated CPU devices, so that multi-device tests can build meshes.

Must run before jax initialises its backends, hence at conftest import time.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
