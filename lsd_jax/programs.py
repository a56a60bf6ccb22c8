"""What a config compiles to (`Programs`), and the states a run starts from.

Step keys: the run has one base key (from `config.seed`, saved in every checkpoint); iteration
`step` uses `jax.random.fold_in(base_key, step)`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import jax
import jax.numpy as jnp

from lsd_jax import checkpoint, methods, parallel, preflight
from lsd_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Programs:
    """Everything compiled for a config: built once and reusable across runs of one process
    (tests resume a run in the same process without compiling again)."""

    config_fingerprint: str
    method: methods.Method
    compiled: methods.base.Compiled
    mesh: jax.sharding.Mesh
    init: Callable      # key -> fresh states (compiled once, not once per run)
    predict: Callable   # (F variables, images) -> class scores
    pictures: Callable  # (states, batch) -> predictions (and reconstructions) for summaries


# The config blocks that only the run uses; the compiled programs depend on every other field
# (the method, its networks, losses and optimisers, whichever block holds them).
RUN_ONLY_FIELDS = ("seed", "data", "train", "checkpoint", "eval", "init")


def _programs_fingerprint(config) -> str:
    """The fields the compiled programs depend on."""
    flat = checkpoint.flatten_config(config)
    used = {k: v for k, v in flat.items() if k.split(".")[0] not in RUN_ONLY_FIELDS}
    return repr(sorted(used.items()))


def build_programs(config, mesh: jax.sharding.Mesh | None = None) -> Programs:
    mesh = parallel.make_mesh() if mesh is None else mesh
    method = methods.build(config)
    return Programs(_programs_fingerprint(config), method,
                    methods.compile_method(method, donate=True, mesh=mesh), mesh,
                    jax.jit(method.init), jax.jit(method.predict), jax.jit(method.pictures))


def check_programs(programs: Programs, config) -> None:
    if programs.config_fingerprint != _programs_fingerprint(config):
        raise ValueError("the programs passed in were built for another config (model, loss, "
                         "optimiser or method differ); build them with build_programs(config)")


def base_key(config) -> jax.Array:
    return jax.random.key(config.seed)


def _say_f_starts_from_scratch(config) -> None:
    """One line at start-up: F from random initialisation. A warning where the source is a real
    dataset (every published result starts from ImageNet weights), a note on the embedded
    benchmark (configs/synthetic.py is made to train without them)."""
    field = next((name for name, backbones in preflight.KERAS_WEIGHTS_BACKBONES.items()
                  if config.model.backbone in backbones), "vgg16_weights")
    if config.data.source.name.startswith("synthetic_scenes"):
        logging.info("F starts from random initialisation (no config.init weights)")
    else:
        logging.warning("F starts from random initialisation, without ImageNet weights: the "
                        "published results need them (config.init.%s; README, 'Training on GTA5 "
                        "or SYNTHIA')", field)


def _import_weights(config, method: methods.Method,
                    states: methods.States) -> methods.States:
    """Pretrained weights named in config.init, into fresh states (optimizer states are zeros
    either way, so they stay valid)."""
    from lsd_jax import weights

    init = config.init
    backbone = config.model.backbone
    preflight.check_keras_weights_backbone(config)
    f = states["f"]
    f_vars = f.variables()
    if init.vgg16_weights and backbone == "fcn8s_vgg16":
        f_vars = weights.import_keras_vgg16(init.vgg16_weights, f_vars)
        logging.info("F's backbone: ImageNet VGG16 weights from %s", init.vgg16_weights)
    elif init.vgg16_weights:  # LargeFOV: the convolutions; its dilated fc6/fc7 fit no VGG16 top
        f_vars = weights.import_keras_vgg16(init.vgg16_weights, f_vars, fully_connected=False)
        logging.info("F's backbone: ImageNet VGG16 weights from %s for conv1_1-conv5_3; fc6 "
                     "and fc7 keep this run's initialisation", init.vgg16_weights)
    if init.resnet_weights:
        f_vars = weights.import_keras_resnet(init.resnet_weights, f_vars)
        logging.info("F's backbone: ImageNet ResNet weights from %s (conv1-layer4, BatchNorm "
                     "statistics included); the classifiers keep this run's initialisation",
                     init.resnet_weights)
    if init.torch_f and backbone == "fcn8s_vgg16":
        f_vars = weights.import_torch_fcn8s(init.torch_f, f_vars)
        logging.info("F: PyTorch LSD-seg weights from %s", init.torch_f)
    elif init.torch_f:
        f_vars, kept, unused = weights.import_torch_deeplab(init.torch_f, f_vars, backbone,
                                                            config.model.resnet_blocks)
        logging.info("F: PyTorch DeepLab-v2 weights from %s%s%s", init.torch_f,
                     f"; classifiers {kept} keep this run's initialisation" if kept else "",
                     f"; the file's {unused} are not used" if unused else "")
    if init.f_workdir:
        step, saved = checkpoint.read_network(init.f_workdir, "f", init.f_step)
        f_vars = _same_structure(saved, f_vars, f"F of step {step} in {init.f_workdir!r}")
        logging.info("F: from the checkpoint of step %d in %s", step, init.f_workdir)
    if init.f_file:
        f_vars = _same_structure(weights.read_network_file(init.f_file), f_vars,
                                 f"F in {init.f_file!r}")
        logging.info("F: from %s", init.f_file)
    if not any(init[name] for name in ("vgg16_weights", "resnet_weights",
                                       *methods.base.F_SOURCES)):
        _say_f_starts_from_scratch(config)
    f = f.replace(params=f_vars["params"], frozen=f_vars.get("frozen", {}),
                  batch_stats=f_vars.get("batch_stats", {}))
    states = {**states, "f": f}
    for name in method.copies_of_f:  # e.g. ADDA's fixed source network: the imported F
        states[name] = methods.base.fixed_copy(f)
    for name in method.averages_of_f:  # e.g. a mean teacher: it starts as the imported F
        states[name] = methods.base.average_copy(f)
    for name, path, importer in (("g", init.torch_g, weights.import_torch_generator),
                                 ("d", init.torch_d, weights.import_torch_discriminator)):
        if not path:
            continue
        if name not in states:
            raise ConfigError(f"config.init.torch_{name} is set but config.method="
                              f"{config.method!r} has no {name.upper()}")
        state = states[name]
        params = importer(path, {"params": state.params})["params"]
        states = {**states, name: state.replace(params=params)}
        logging.info("%s: PyTorch LSD-seg weights from %s", name.upper(), path)
    return states


# Heads that a method adds to F and a saved F may lack (e.g. a source-only pre-training run
# started from by a multi-level method): they keep their fresh initialisation.
OPTIONAL_F_HEADS = ("score_aux",)


def _same_structure(saved: dict, like: dict, source: str) -> dict:
    """`saved` as arrays shaped, typed and nested like `like`, or a ConfigError naming the
    first difference (another width, class count or network). Parameters of the heads in
    OPTIONAL_F_HEADS that only `like` has keep their values there."""
    keystr = jax.tree_util.keystr
    saved_leaves = dict(jax.tree_util.tree_leaves_with_path(saved))
    like_leaves = dict(jax.tree_util.tree_leaves_with_path(like))
    expected = "expected a run of the same network (model.width, num_classes)"
    optional = {path for path in set(like_leaves) - set(saved_leaves)
                if path[0].key == "params" and path[1].key in OPTIONAL_F_HEADS}
    if optional:
        logging.info("%s has no %s: this run's initialisation is kept for it", source,
                     ", ".join(sorted({keystr(path[:2]) for path in optional})))
        saved_leaves.update({path: like_leaves[path] for path in optional})
    unmatched = sorted(set(saved_leaves) ^ set(like_leaves), key=keystr)
    if unmatched:
        which = "only the saved F" if unmatched[0] in saved_leaves else "only this run's F"
        raise ConfigError(f"{source}: {keystr(unmatched[0])} is in {which}; {expected}")
    for path, leaf in like_leaves.items():
        if saved_leaves[path].shape != leaf.shape:
            raise ConfigError(f"{source}: {keystr(path)} has shape {saved_leaves[path].shape}, "
                              f"this run's F {leaf.shape}; {expected}")
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(saved_leaves[path], leaf.dtype), like)


def initial_states(config, programs: Programs) -> methods.States:
    """Fresh states (with config.init's weights), replicated over the mesh."""
    init_key = jax.random.fold_in(base_key(config), -1 % 2**31)  # apart from the step keys
    states = _import_weights(config, programs.method, programs.init(init_key))
    return parallel.replicate(states, programs.mesh)


def abstract_states(config, programs: Programs):
    """Shapes, dtypes and (replicated) shardings of the states, computing nothing."""
    shapes = jax.eval_shape(programs.init, jax.random.key(0))
    sharding = parallel.replicated(programs.mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        shapes)
