"""lsd_jax: LSD-seg adversarial domain adaptation for semantic segmentation, in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="lsd_jax",
    version="0.1.0",
    description=(
        "JAX/Flax reimplementation of 'Learning from Synthetic Data: Addressing Domain Shift "
        "for Semantic Segmentation' (LSD-seg, CVPR 2018) for GPUs and TPUs."
    ),
    packages=find_packages(include=["lsd_jax", "lsd_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9.7",
        "ml-collections>=0.1.1",
        "clu>=0.0.12",
        "tensorboard>=2.16",
        "absl-py>=2.0",
        "numpy>=1.26",
        "pillow>=10.0",
        "h5py>=3.10",
        "matplotlib>=3.5",  # the benchmark runner's charts and picture grids
        "importlib_resources>=6.0",  # tensorflow-datasets needs it with recent etils
    ],
    extras_require={
        # torch is only used by tests that cross-check against a PyTorch transcription, and by
        # users who import PyTorch LSD-seg checkpoints; install a CPU build first (see README).
        "test": ["pytest>=8.0", "pytest-xdist>=3.0", "torch>=2.0", "cityscapesscripts>=2.2"],
        "torch": ["torch>=2.0"],
        # benchmarks/adda_digits.py: scikit-learn's bundled 8x8 digits
        "digits": ["scikit-learn>=1.3"],
    },
)
