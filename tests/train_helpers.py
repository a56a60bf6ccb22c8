"""A tiny training setup shared by the training, checkpoint and main tests, and the
environment of the tests' JAX subprocesses.

The compiled programs are built once per test process (`tiny_programs`), because XLA's compile
of the composed LSD step dominates these tests' time.
"""
import functools
import importlib.util
import os
import socket

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Synthetic scenes small enough to build in a second; 32x64 training crops (multiples of 32).
TINY_SCENES = {"height": 64, "width": 128, "num_train": 16, "num_validation": 6}


def load_config_file(name: str, argument: str = ""):
    path = os.path.join(REPO_ROOT, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"test_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()


def tiny_config(data_dir: str, variant: str = "lsd", backbone: str = "fcn8s_vgg16"):
    """configs/synthetic.py at 32x64 on 16 tiny scenes, a few steps, no periodic work (DeepLab
    ResNet with one block per stage)."""
    config = load_config_file("synthetic", variant)
    if backbone != config.model.backbone:  # the default's programs stay those of the file
        config.model.backbone = backbone
        config.model.resnet_blocks = (1, 1, 1, 1)
    data = config.data
    data.data_dir = data_dir
    for field in ("source", "target", "eval", "selection"):
        data[field].config_overrides = dict(TINY_SCENES)
    data.source.crop = data.target.crop = (32, 64)
    data.target.split = "train[:12]"
    data.selection.split = "train[12:]"
    data.eval.scale = data.selection.scale = (32, 64)
    data.eval.batch_size = data.selection.batch_size = 4
    data.shuffle_buffer = 16
    config.train.num_steps = 4
    config.train.log_every = 2
    config.train.image_every = 0
    config.train.eval_every = 0
    config.checkpoint.every = 2
    config.eval.num_images = 2
    return config


@functools.lru_cache(maxsize=None)
def tiny_programs(variant: str = "lsd", backbone: str = "fcn8s_vgg16"):
    """Compiled for a mesh of 2 of the tests' simulated CPU devices (conftest.py): the batch of
    2 is split over them, as data parallelism on a real machine."""
    from lsd_jax import parallel
    from lsd_jax.programs import build_programs
    return build_programs(tiny_config("unused", variant, backbone), parallel.make_mesh(2))


def subprocess_env(devices: int = 1, xla_flags: str = "") -> dict:
    """This environment for a JAX subprocess on `devices` simulated CPU devices, minus anything
    that could make JAX think it runs in a cluster (and without the suite's own XLA_FLAGS)."""
    cluster_prefixes = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "JAX_", "KUBERNETES_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(cluster_prefixes)}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {xla_flags}".strip())
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
