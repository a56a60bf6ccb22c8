"""TensorFlow's start-up notices stay off the console; everything else written meanwhile stays."""
import subprocess
import sys

import pytest

from lsd_jax import tf_quiet
from train_helpers import subprocess_env

NOTICES = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796397763.934389    1509 port.cc:153] oneDNN custom operations are on. You may \
see slightly different numerical results due to floating-point round-off errors from different \
computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1796397763.972237    1509 cpu_feature_guard.cc:227] This TensorFlow binary is \
optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild \
TensorFlow with the appropriate compiler flags.
"""


def test_only_the_startup_notices_are_dropped():
    other = ("W0000 00:00:1.0 1 some_op.cc:1] a real warning\n"
             "To enable the feature, set the flag.\nTraceback (most recent call last):\n")
    assert tf_quiet.drop_startup_notices(NOTICES + other + NOTICES) == other
    assert tf_quiet.drop_startup_notices("no newline at the end") == "no newline at the end"


@pytest.mark.slow  # a subprocess
def test_importing_through_it_prints_nothing_and_keeps_the_rest():
    code = ("import sys; from lsd_jax.tf_quiet import import_tensorflow_datasets as i; "
            "tfds = i(); import tensorflow as tf; assert i() is tfds; "
            "print(tf.reduce_sum(tf.ones(3)).numpy(), file=sys.stderr)")
    env = {k: v for k, v in subprocess_env().items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300, check=True)
    assert result.stderr == "3.0\n"
