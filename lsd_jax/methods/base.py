"""What every method is made of, and the pieces the methods share.

A method (`Method`) is static: its networks, one pure update function per trained network (in
iteration order), how an iteration strings them together (`mode`), how it starts, predicts and
pictures. The training program only ever sees this interface; the states it carries are a dict
of named network states (`States`), which is also what a checkpoint holds.

An update reads the states of the iteration it sees and returns its own network's new state:

    update(states, batch, key) -> (new state of its network, metrics)

so an update cannot change another network, by construction. `run_iteration` calls them in
order: in "alternating" mode each sees the networks the earlier ones have just updated, in
"simultaneous" mode all see the states at the start of the iteration. `compile_method` jits every
update on its own (each with its own optax state, data-parallel over a mesh) and the whole
iteration as one program; both give the same result.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lsd_jax import losses, parallel
from lsd_jax.models import FCN8s, check_training_size
from lsd_jax.models import deeplab
from lsd_jax.models.layers import upsample_bilinear_align_corners
from lsd_jax.models.vgg_fcn import check_image

UPDATE_MODES = ("alternating", "simultaneous")
# float64 is for reference evaluations in tests and checks (it needs jax_enable_x64).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
# config.model.backbone: F+C of a method (docs/methods.md, sections 2 and 6).
BACKBONES = ("fcn8s_vgg16", "deeplabv2_resnet101", "deeplabv2_vgg16")

Params = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class NetState:
    """One network's trainable state. `frozen` holds variables that are never trained,
    `batch_stats` BatchNorm's running statistics (DeepLab's), which forward passes update."""

    params: Params
    opt_state: optax.OptState
    frozen: Params = flax.struct.field(default_factory=dict)
    batch_stats: Params = flax.struct.field(default_factory=dict)

    def variables(self, params: Params | None = None) -> dict:
        """The variables for `apply`, with `params` in place of the state's when given (the
        parameters being differentiated)."""
        return {"params": self.params if params is None else params,
                **({"frozen": self.frozen} if self.frozen else {}),
                **({"batch_stats": self.batch_stats} if self.batch_stats else {})}


States = dict[str, NetState]  # network name -> state; "f" is the segmentation network
Update = Callable[[States, Batch, jax.Array], tuple[NetState, Metrics]]


@dataclasses.dataclass(frozen=True)
class Method:
    """Everything static about one method for one config.

    networks: the modules by name, "f" (the segmentation network every method has) first.
    updates: network name -> its pure update, in the order an iteration runs them.
    mode: "alternating" or "simultaneous" (see `run_iteration`).
    init: key -> fresh states (only shapes matter to the caller: it is jitted).
    predict: (F's variables, images) -> class scores at the images' size.
    pictures: (states, batch) -> {"<domain>_prediction": ids, "<domain>_reconstruction": images}
        for the domains in the batch (reconstructions only for methods that make images).
    learning_rates: step -> {"lr/<name>": rate} for the summaries.
    output_shapes: (states, images) -> {network: {output name: shape}} for `--mode summary`.
    reads_target: whether the training batches need target images.
    console_terms: the metrics shown on the console line.
    copies_of_f: networks that start as copies of F once config.init's weights are in it, and
        are never trained (untied adversarial training's fixed source network).
    averages_of_f: networks that start as copies of F once config.init's weights are in it
        (`average_copy`) and then follow an exponential moving average of F's parameters, with
        no gradient (self-training's mean teacher); evaluated beside F during training.
    """

    name: str
    networks: Mapping[str, nn.Module]
    updates: Mapping[str, Update]
    mode: str
    init: Callable[[jax.Array], States]
    predict: Callable[[dict, jax.Array], jax.Array]
    pictures: Callable[[States, Batch], dict]
    learning_rates: Callable[[int], dict[str, float]]
    output_shapes: Callable[[States, Any], dict]
    reads_target: bool
    console_terms: tuple[str, ...]
    copies_of_f: tuple[str, ...] = ()
    averages_of_f: tuple[str, ...] = ()


def run_iteration(updates: Mapping[str, Update], mode: str, states: States, batch: Batch,
                  key: jax.Array) -> tuple[States, Metrics]:
    """One iteration from a method's updates (compiled separately or not).

    alternating: each update sees the networks the updates before it have just changed.
    simultaneous: every update sees the states at the start of the iteration.
    Metrics come back as "<network>/<term>".
    """
    if mode not in UPDATE_MODES:
        raise ValueError(f"update mode: expected one of {UPDATE_MODES}, got {mode!r}")
    current, metrics = dict(states), {}
    for name, update in updates.items():
        current[name], own = update(current if mode == "alternating" else states, batch, key)
        metrics.update({f"{name}/{term}": value for term, value in own.items()})
    return current, metrics


# The fields of config.init that give F's weights whole, from another run or file (set one
# at most: preflight.check_config).
F_SOURCES = ("torch_f", "f_workdir", "f_file")


class Compiled(NamedTuple):
    """A method's compiled programs. `step` is one whole iteration (states donated when asked);
    `separate_step` the same iteration as one compiled call per update."""

    updates: dict[str, Callable]
    step: Callable
    separate_step: Callable


def compile_method(method: Method, donate: bool = True, mesh=None) -> Compiled:
    """jit-compiles every update and the whole iteration.

    With a mesh, every program is data-parallel: batches are split over the mesh's data axis
    and states replicated (gradients are all-reduced by XLA). The separate updates never
    donate: in "simultaneous" mode each needs the others' old states after they have changed.
    """
    def compile_(fn, donate_states):
        donated = (0,) if donate_states else ()
        if mesh is None:
            return jax.jit(fn, donate_argnums=donated)
        rep, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
        jitted = jax.jit(fn, in_shardings=(rep, data, rep), out_shardings=(rep, rep),
                         donate_argnums=donated)
        return parallel.BatchChecked(jitted, 1, mesh)

    updates = {name: compile_(fn, False) for name, fn in method.updates.items()}
    return Compiled(
        updates=updates,
        step=compile_(functools.partial(run_iteration, method.updates, method.mode), donate),
        separate_step=functools.partial(run_iteration, updates, method.mode),
    )


# ----------------------------------------------------------------------------- shared pieces

def check_choice(field: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"config.{field}: expected one of {tuple(choices)}, got {value!r}")


def model_dtype(config):
    check_choice("model.dtype", config.model.dtype, DTYPES)
    return DTYPES[config.model.dtype]


def apply_gradients(tx: optax.GradientTransformation, state: NetState, grads) -> NetState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def with_grad_norm(metrics: Metrics, grads) -> Metrics:
    return {**metrics, "grad_norm": optax.tree.norm(grads)}


def f_learning_rate_schedule(optim) -> optax.Schedule:
    """F's lr: x lr_decay_factor every lr_decay_steps (constant when lr_decay_steps is 0)."""
    if not optim.lr_decay_steps:
        return optax.constant_schedule(optim.f_lr)
    return optax.exponential_decay(optim.f_lr, transition_steps=optim.lr_decay_steps,
                                   decay_rate=optim.lr_decay_factor, staircase=True)


def f_optimizer(optim) -> optax.GradientTransformation:
    """Adam for F+C with the biases at f_bias_lr_mult x the weights' lr, as LSD's reference does
    (`config.optim`, shared by LSD and the baselines)."""
    schedule = f_learning_rate_schedule(optim)
    bias_schedule = lambda step: optim.f_bias_lr_mult * schedule(step)  # noqa: E731

    def label(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "bias" if path[-1].key == "bias" else "weight", params)

    adam = lambda lr: optax.adam(lr, b1=optim.f_b1, b2=optim.f_b2)  # noqa: E731
    return optax.multi_transform({"weight": adam(schedule), "bias": adam(bias_schedule)}, label)


def f_learning_rates(optim) -> Callable[[int], dict[str, float]]:
    schedule = f_learning_rate_schedule(optim)

    def rates(step):
        f_lr = float(schedule(step))
        return {"lr/f": f_lr, "lr/f_bias": f_lr * optim.f_bias_lr_mult}
    return rates


# DAFormer's warmup (mmcv's "linear"): the schedule's rate times a factor rising linearly from
# WARMUP_RATIO at step 0 to 1 at `steps`, then the schedule alone.
WARMUP_RATIO = 1e-6


def warmup_factor(step, steps: int):
    """1 - (1 - step / steps) (1 - WARMUP_RATIO) for step < steps, else 1 (written as
    ratio + (1 - ratio) progress, exact at step 0 in float32)."""
    if steps <= 0:
        return jnp.ones_like(jnp.asarray(step, jnp.float32))
    progress = jnp.minimum(jnp.asarray(step, jnp.float32) / steps, 1.0)
    return WARMUP_RATIO + (1.0 - WARMUP_RATIO) * progress


def check_warmup_steps(field: str, steps) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"config.{field}.warmup_steps={steps!r}: expected a number of steps "
                         "(0: no warmup)")


def with_warmup(tx: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """`tx` with its updates scaled by warmup_factor(step): for SGD (momentum included: the
    rate multiplies the momentum buffer), Adam and AdamW alike the same as scaling the learning
    rate. No warmup (the same transformation) for steps <= 0."""
    if steps <= 0:
        return tx
    return optax.chain(tx, optax.scale_by_schedule(lambda step: warmup_factor(step, steps)))


def warmed_up_rates(rates: Callable[[int], dict[str, float]], steps: int
                    ) -> Callable[[int], dict[str, float]]:
    """The logged learning rates of a `with_warmup` transformation."""
    if steps <= 0:
        return rates
    return lambda step: {name: rate * float(warmup_factor(step, steps))
                         for name, rate in rates(step).items()}


def warmed_up_f_optimizer(optim) -> tuple[optax.GradientTransformation,
                                           Callable[[int], dict[str, float]]]:
    """F's Adam (`f_optimizer`) and its logged rates, warmed up over optim.warmup_steps:
    LSD's F and the adversarial family's S (0: none, as in their references)."""
    check_warmup_steps("optim", optim.warmup_steps)
    return (with_warmup(f_optimizer(optim), optim.warmup_steps),
            warmed_up_rates(f_learning_rates(optim), optim.warmup_steps))


def init_network(module: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                 *inputs, **kwargs) -> NetState:
    """A network's fresh state from example inputs (parameter shapes never depend on the image
    size, so tiny ones do). Compiled: eager initialisers round differently in the last bit."""
    variables = jax.jit(lambda k: module.init(k, *inputs, **kwargs))(key)
    params = variables["params"]
    return NetState(params, tx.init(params), variables.get("frozen", {}),
                    variables.get("batch_stats", {}))


def fixed_copy(f: NetState) -> NetState:
    """A network that is never trained: a copy of F's variables (its own buffers: a compiled
    step donates every state's arrays), no optimizer state."""
    params, frozen, statistics = jax.tree.map(jnp.copy, (f.params, f.frozen, f.batch_stats))
    return NetState(params, optax.EmptyState(), frozen, statistics)


class AverageCount(NamedTuple):
    """The "optimizer state" of a moving average of F: how many updates it has had (int32),
    which is the training step."""
    count: jax.Array


def average_copy(f: NetState) -> NetState:
    """A moving average of F that starts as a copy of F (its own buffers), before any update."""
    params, frozen, statistics = jax.tree.map(jnp.copy, (f.params, f.frozen, f.batch_stats))
    return NetState(params, AverageCount(jnp.zeros((), jnp.int32)), frozen, statistics)


def init_keys(key: jax.Array) -> jax.Array:
    """Three keys to initialise a method's networks from, F's first: F's is the same for every
    method, so that every method's run of one seed starts from the same F."""
    return jax.random.split(key, 3)


def example_image() -> jax.Array:
    return jnp.zeros((1, 32, 32, 3), jnp.float32)


def segmentation_network(config, aux_classifier: bool = False) -> nn.Module:
    """F+C (S) of every method, from `config.model` (its `backbone`)."""
    m = config.model
    check_choice("model.backbone", m.backbone, BACKBONES)
    dtype = model_dtype(config)
    if m.backbone == "fcn8s_vgg16":
        return FCN8s(config.num_classes, m.width, m.dropout_rate, dtype, remat=bool(m.remat_f),
                     plain_kernels=bool(m.plain_kernels), aux_classifier=aux_classifier)
    check_choice("model.aspp_branches", m.aspp_branches, deeplab.ASPP_BRANCHES)
    if m.backbone == "deeplabv2_resnet101":
        check_choice("model.bn_statistics", m.bn_statistics, deeplab.BN_STATISTICS)
        blocks = tuple(m.resnet_blocks)
        if len(blocks) != 4 or not all(isinstance(b, int) and b >= 1 for b in blocks):
            raise ValueError(f"config.model.resnet_blocks={m.resnet_blocks!r}: expected four "
                             "block counts >= 1, e.g. (3, 4, 23, 3) for ResNet-101")
        return deeplab.DeepLabV2ResNet(config.num_classes, m.width, blocks,
                                       aux_classifier=aux_classifier,
                                       aspp_branches=m.aspp_branches,
                                       bn_statistics=m.bn_statistics, dtype=dtype)
    if aux_classifier:
        raise ValueError("config.model.backbone='deeplabv2_vgg16' has no auxiliary level (the "
                         "published VGG16 results are single-level): set the method's "
                         "multi_level=False, or use 'deeplabv2_resnet101' or 'fcn8s_vgg16'")
    return deeplab.DeepLabV2VGG16(config.num_classes, m.width, m.aspp_branches, dtype)


def output_names(f: nn.Module) -> tuple[str, ...]:
    """The names of F's outputs, in order; "score" (and "score_aux") are the class scores."""
    if isinstance(f, FCN8s):
        return ("score", "fc7", "pool4", "pool3", "score_aux")
    if isinstance(f, deeplab.DeepLabV2ResNet):
        return ("score", "layer4", "layer3", "score_aux")
    return ("score", "fc7")


SCORES = ("score", "score_aux")


def f_outputs(f: nn.Module, variables: dict, image: jax.Array, train: bool,
              key: jax.Array | None = None, update_statistics: bool = False
              ) -> tuple[dict[str, jax.Array], Params]:
    """F's outputs by name, the class scores at the image's size, and BatchNorm's running
    statistics after the pass: updated when `update_statistics` (in training, for a network
    that has them), else as they were.

    DeepLab predicts at 1/8 size; its scores are upsampled bilinearly with aligned corners,
    as the AdaptSegNet and ADVENT codes do before their losses and discriminators."""
    rngs = {} if key is None else {"dropout": key}
    statistics = variables.get("batch_stats", {})
    if update_statistics and train and statistics:
        outputs, mutated = f.apply(variables, image, train=True, rngs=rngs,
                                   mutable=["batch_stats"])
        statistics = mutated["batch_stats"]
    else:
        outputs = f.apply(variables, image, train=train, rngs=rngs)
    named = dict(zip(output_names(f), outputs))
    for name in SCORES:
        if name in named and named[name].shape[1:3] != image.shape[1:3]:
            named[name] = upsample_bilinear_align_corners(named[name], image.shape[1:3])
    return named, statistics


def f_dropout_key(key: jax.Array, domain: str) -> jax.Array:
    """F's dropout key for one domain's images in an iteration: the ids LSD's DropoutKeys give
    F's two passes, so that every method draws the same masks from one step key."""
    return jax.random.fold_in(key, {"source": 0, "target": 1}[domain])


def predict_scores(f: nn.Module):
    """`Method.predict`: F's class scores at the images' size, in evaluation mode."""
    return lambda variables, image: f_outputs(f, variables, image, train=False)[0]["score"]


def f_output_shapes(f: nn.Module, states: States, image) -> dict:
    """{output name: shape} of F's own outputs for `images` (`Method.output_shapes`' entry for
    "f"; DeepLab's scores at 1/8 size, before the methods upsample them)."""
    outputs = jax.eval_shape(lambda v, x: f.apply(v, x, train=False), states["f"].variables(),
                             image)
    return dict(zip(output_names(f), outputs))


def predictions(f: nn.Module, states: States, batch: Batch, domains: tuple[str, ...]) -> dict:
    """{"<domain>_prediction": class ids} of F for the batch's images (`Method.pictures`)."""
    predict = predict_scores(f)
    return {f"{domain}_prediction": jnp.argmax(
        predict(states["f"].variables(), batch[f"{domain}_image"]), axis=-1)
        for domain in domains}


def check_batch(batch: Batch, with_target: bool = True, with_image01: bool = True,
                one_size: bool = True) -> None:
    """Shapes and dtypes of a training batch, or an error that says what was expected.
    image01 (the images in [0, 1]) is what G reconstructs and D sees in LSD; one_size: the
    images are multiples of 32 (LSD, see `lsd_jax.methods.needs_one_size`)."""
    domains = ("source", "target") if with_target else ("source",)
    keys = [f"{d}_image" for d in domains] + ["source_label"]
    keys += [f"{d}_image01" for d in domains] if with_image01 else []
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"training batch: missing {missing}; expected keys {keys}")
    for d in domains:
        image = batch[f"{d}_image"]
        check_image(image, f"batch['{d}_image']")
        if one_size:
            check_training_size(*image.shape[1:3])
        if with_image01 and batch[f"{d}_image01"].shape != image.shape:
            raise ValueError(f"batch['{d}_image01']: expected shape {tuple(image.shape)} like "
                             f"batch['{d}_image'], got {tuple(batch[f'{d}_image01'].shape)}")
    label, image = batch["source_label"], batch["source_image"]
    if label.shape != image.shape[:3]:
        raise ValueError(f"batch['source_label']: expected shape {tuple(image.shape[:3])} (N, H, W) "
                         f"to match batch['source_image'], got {tuple(label.shape)}")
    if not jnp.issubdtype(label.dtype, jnp.integer):
        raise ValueError(f"batch['source_label']: expected integer class ids, got {label.dtype}")


def check_reduction(config) -> str:
    check_choice("loss.reduction", config.loss.reduction, losses.REDUCTIONS)
    return config.loss.reduction
