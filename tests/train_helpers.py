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


# XLA's CPU backend optimises the machine code less (docs/testing.md): the tests' programs are
# tiny, so compiling them is most of the suite's time. XLA's HLO passes, and with them what is
# fused and recomputed, are the same; the rounding of a few operations is not (float64 results
# moved by up to 5e-9 at level 0). The test processes use level 1: it compiles the LSD step 12%
# faster and runs it as fast as the default, where level 0 (22% faster to compile) runs float64
# code 16 times slower. The JAX subprocesses, which train in float32 for a few steps, use 0.
IN_PROCESS_COMPILE = "--xla_backend_optimization_level=1"
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The suite's persistent compilation cache (conftest.py), passed on to every JAX subprocess.
CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def xla_flags(devices: int, compile_flags: str = FAST_COMPILE) -> str:
    """XLA_FLAGS for `devices` simulated CPU devices (a subprocess's, unless told)."""
    return f"--xla_force_host_platform_device_count={devices} {compile_flags}"


def subprocess_env(devices: int = 1) -> dict:
    """This environment for a JAX subprocess on `devices` simulated CPU devices, minus anything
    that could make JAX think it runs in a cluster, with the suite's compilation cache."""
    cluster_prefixes = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "JAX_", "KUBERNETES_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(cluster_prefixes)}
    env.update({k: os.environ[k] for k in CACHE_VARIABLES if k in os.environ})
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT, XLA_FLAGS=xla_flags(devices))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
