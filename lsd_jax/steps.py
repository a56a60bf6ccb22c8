"""The LSD updates (docs/methods.md, sections 3-4) as pure functions, and their composition.

Each network has its own state (params + optax state). Each update is a pure function of its own
state, the other networks' parameters, a batch and a step key:

    d_update(d_state, f_variables, g_params, batch, key) -> (d_state, metrics)
    g_update(g_state, f_variables, d_params, batch, key) -> (g_state, metrics)
    f_update(f_state, g_params, d_params, batch, key)    -> (f_state, metrics)
    source_only_update(f_state, batch, key)              -> (f_state, metrics)

`lsd_iteration` strings them together in the configured update mode; `make_updates` compiles
the three separately and the whole iteration as one program (`step`), which give the same result.

Dropout keys are derived from the step key with a fixed id per forward pass (see `DropoutKeys`):
within an iteration every network draws one mask per input image, shared by all updates. This is
what lets "simultaneous" be one forward pass, and what lets XLA compute F's features once for the
D and G updates of an "alternating" iteration (F does not change there). The reference draws fresh
masks at each of its forward passes; which masks an iteration uses does not change the method.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from lsd_jax import losses, parallel
from lsd_jax.models import Discriminator, FCN8s, Generator, check_training_size
from lsd_jax.models.vgg_fcn import check_image

UPDATE_MODES = ("alternating", "simultaneous")
METHODS = ("lsd", "source_only")
# float64 is for reference evaluations in tests and checks (it needs jax_enable_x64).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}

Params = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class NetState:
    """One network's trainable state. `frozen` holds variables that are never trained."""

    params: Params
    opt_state: optax.OptState
    frozen: Params = flax.struct.field(default_factory=dict)

    def variables(self) -> dict:
        return {"params": self.params, **({"frozen": self.frozen} if self.frozen else {})}


@flax.struct.dataclass
class TrainStates:
    """F's, G's and D's states; g and d are None for the source-only baseline."""

    f: NetState
    g: NetState | None = None
    d: NetState | None = None


@dataclasses.dataclass(frozen=True)
class LossWeights:
    reduction: str = "sum"
    adv_weight: float = 0.1
    c_weight: float = 0.1
    g_adv_weight: float = 0.1
    l1_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Networks:
    """The three modules, their optimizers and the loss weights: everything static."""

    f: FCN8s
    g: Generator
    d: Discriminator
    f_tx: optax.GradientTransformation
    g_tx: optax.GradientTransformation
    d_tx: optax.GradientTransformation
    weights: LossWeights
    f_learning_rate: Callable[[jax.Array], jax.Array]


class DropoutKeys(NamedTuple):
    """One dropout key per forward pass of an iteration, derived from the step key."""

    f_source: jax.Array
    f_target: jax.Array
    g_source: jax.Array
    g_target: jax.Array
    d_real_source: jax.Array
    d_real_target: jax.Array
    d_fake_source: jax.Array
    d_fake_target: jax.Array

    @classmethod
    def from_step_key(cls, key: jax.Array) -> "DropoutKeys":
        return cls(*(jax.random.fold_in(key, i) for i in range(len(cls._fields))))


# ----------------------------------------------------------------------------- construction

def f_learning_rate_schedule(optim) -> optax.Schedule:
    """F's lr: x lr_decay_factor every lr_decay_steps (constant when lr_decay_steps is 0)."""
    if not optim.lr_decay_steps:
        return optax.constant_schedule(optim.f_lr)
    return optax.exponential_decay(optim.f_lr, transition_steps=optim.lr_decay_steps,
                                   decay_rate=optim.lr_decay_factor, staircase=True)


def f_optimizer(optim) -> optax.GradientTransformation:
    """Adam for F+C with the biases at f_bias_lr_mult x the weights' lr, as the reference does."""
    schedule = f_learning_rate_schedule(optim)
    bias_schedule = lambda step: optim.f_bias_lr_mult * schedule(step)  # noqa: E731

    def label(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "bias" if path[-1].key == "bias" else "weight", params)

    adam = lambda lr: optax.adam(lr, b1=optim.f_b1, b2=optim.f_b2)  # noqa: E731
    return optax.multi_transform({"weight": adam(schedule), "bias": adam(bias_schedule)}, label)


def gd_optimizer(optim) -> optax.GradientTransformation:
    return optax.adam(optim.gd_lr, b1=optim.gd_b1, b2=optim.gd_b2)


def build_networks(config) -> Networks:
    """Modules, optimizers and loss weights from a config (see configs/default.py)."""
    if config.update_mode not in UPDATE_MODES:
        raise ValueError(f"config.update_mode: expected one of {UPDATE_MODES}, got "
                         f"{config.update_mode!r}")
    if config.method not in METHODS:
        raise ValueError(f"config.method: expected one of {METHODS}, got {config.method!r}")
    if config.model.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype: expected one of {tuple(DTYPES)}, got "
                         f"{config.model.dtype!r}")
    if config.loss.reduction not in losses.REDUCTIONS:
        raise ValueError(f"config.loss.reduction: expected one of {losses.REDUCTIONS}, got "
                         f"{config.loss.reduction!r}")
    m = config.model
    dtype = DTYPES[m.dtype]
    # Rematerialisation: trades activation memory for recomputation in the backward pass.
    remat_f, remat_g = bool(m.remat_f), bool(m.remat_g)
    plain = bool(m.plain_kernels)
    return Networks(
        f=FCN8s(config.num_classes, m.width, m.dropout_rate, dtype, remat=remat_f,
                plain_kernels=plain),
        g=Generator(m.width, m.dropout_rate, dtype, remat=remat_g, plain_kernels=plain),
        d=Discriminator(config.num_classes, m.width, m.dropout_rate, dtype,
                        plain_kernels=plain),
        f_tx=f_optimizer(config.optim),
        g_tx=gd_optimizer(config.optim),
        d_tx=gd_optimizer(config.optim),
        weights=LossWeights(**config.loss),
        f_learning_rate=f_learning_rate_schedule(config.optim),
    )


def init_states(nets: Networks, key: jax.Array, with_gd: bool = True) -> TrainStates:
    """Fresh states. Parameter shapes do not depend on the image size, so a tiny one is used."""
    k_f, k_g, k_d = jax.random.split(key, 3)
    image = jnp.zeros((1, 32, 32, 3), jnp.float32)
    f_vars = jax.jit(lambda k: nets.f.init(k, image, train=False))(k_f)
    f_params, frozen = f_vars["params"], f_vars["frozen"]
    f = NetState(f_params, nets.f_tx.init(f_params), frozen)
    if not with_gd:
        return TrainStates(f)
    features = jax.eval_shape(lambda v: nets.f.apply(v, image, train=False), f_vars)[1:]
    features = [jnp.zeros(s.shape, jnp.float32) for s in features]
    g_params = jax.jit(lambda k: nets.g.init(k, *features, train=False))(k_g)["params"]
    d_params = jax.jit(lambda k: nets.d.init(k, image, train=False))(k_d)["params"]
    return TrainStates(f, NetState(g_params, nets.g_tx.init(g_params)),
                       NetState(d_params, nets.d_tx.init(d_params)))


# ----------------------------------------------------------------------------- checks

def check_batch(batch: Batch, with_target: bool = True) -> None:
    """Shapes and dtypes of a training batch, or an error that says what was expected."""
    domains = ("source", "target") if with_target else ("source",)
    keys = [f"{d}_image" for d in domains] + ["source_label"]
    keys += [f"{d}_image01" for d in domains] if with_target else []
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"training batch: missing {missing}; expected keys {keys}")
    for d in domains:
        image = batch[f"{d}_image"]
        check_image(image, f"batch['{d}_image']")
        check_training_size(*image.shape[1:3])
        if with_target and batch[f"{d}_image01"].shape != image.shape:
            raise ValueError(f"batch['{d}_image01']: expected shape {tuple(image.shape)} like "
                             f"batch['{d}_image'], got {tuple(batch[f'{d}_image01'].shape)}")
    label, image = batch["source_label"], batch["source_image"]
    if label.shape != image.shape[:3]:
        raise ValueError(f"batch['source_label']: expected shape {tuple(image.shape[:3])} (N, H, W) "
                         f"to match batch['source_image'], got {tuple(label.shape)}")
    if not jnp.issubdtype(label.dtype, jnp.integer):
        raise ValueError(f"batch['source_label']: expected integer class ids, got {label.dtype}")


# ----------------------------------------------------------------------------- forward passes

def _features(nets, f_variables, image, key):
    """F's (score, fc7, pool4, pool3) in training mode (dropout on)."""
    return nets.f.apply(f_variables, image, train=True, rngs={"dropout": key})


def _generate(nets, g_params, features, key):
    return nets.g.apply({"params": g_params}, *features, train=True, rngs={"dropout": key})


def _discriminate(nets, d_params, image, key):
    return nets.d.apply({"params": d_params}, image, train=True, rngs={"dropout": key})


def _fixed_features(nets, f_variables, batch, keys):
    """F's features of both domains for the D and G updates, which do not train F."""
    _, *source = _features(nets, f_variables, batch["source_image"], keys.f_source)
    _, *target = _features(nets, f_variables, batch["target_image"], keys.f_target)
    return jax.lax.stop_gradient((source, target))


def _apply_gradients(tx, state: NetState, grads) -> NetState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)


# ----------------------------------------------------------------------------- losses

def d_loss(nets, d_params, generated, batch, keys) -> tuple[jax.Array, Metrics]:
    """D tells source/target real/fake apart and classifies real source patches."""
    red = nets.weights.reduction
    gen_source, gen_target = generated
    real_s, real_c = _discriminate(nets, d_params, batch["source_image01"], keys.d_real_source)
    fake_s, _ = _discriminate(nets, d_params, gen_source, keys.d_fake_source)
    real_t, _ = _discriminate(nets, d_params, batch["target_image01"], keys.d_real_target)
    fake_t, _ = _discriminate(nets, d_params, gen_target, keys.d_fake_target)
    aux = losses.aux_labels(batch["source_label"], real_c.shape[1:3])
    terms = {
        "source_real": losses.domain_ce(real_s, losses.SOURCE_REAL, red),
        "source_fake": losses.domain_ce(fake_s, losses.SOURCE_FAKE, red),
        "aux": losses.ce2d(real_c, aux, red),
        "target_real": losses.domain_ce(real_t, losses.TARGET_REAL, red),
        "target_fake": losses.domain_ce(fake_t, losses.TARGET_FAKE, red),
    }
    loss = sum(terms.values())
    accuracy = {f"acc_{name}": losses.domain_accuracy(logits, label) for name, logits, label in (
        ("source_real", real_s, losses.SOURCE_REAL), ("source_fake", fake_s, losses.SOURCE_FAKE),
        ("target_real", real_t, losses.TARGET_REAL), ("target_fake", fake_t, losses.TARGET_FAKE))}
    return loss, {"loss": loss, **terms, **accuracy}


def g_loss(nets, g_params, d_params, features, batch, keys) -> tuple[jax.Array, Metrics]:
    """G makes D call its images real and of the right classes, and reconstructs the input."""
    w = nets.weights
    gen_source = _generate(nets, g_params, features[0], keys.g_source)
    gen_target = _generate(nets, g_params, features[1], keys.g_target)
    fake_s, fake_c = _discriminate(nets, d_params, gen_source, keys.d_fake_source)
    fake_t, _ = _discriminate(nets, d_params, gen_target, keys.d_fake_target)
    aux = losses.aux_labels(batch["source_label"], fake_c.shape[1:3])
    terms = {
        "aux": losses.ce2d(fake_c, aux, w.reduction),
        "adv": (losses.domain_ce(fake_s, losses.SOURCE_REAL, w.reduction)
                + losses.domain_ce(fake_t, losses.TARGET_REAL, w.reduction)),
        "l1": (losses.l1(gen_source, batch["source_image01"])
               + losses.l1(gen_target, batch["target_image01"])),
    }
    loss = terms["aux"] + w.g_adv_weight * terms["adv"] + w.l1_weight * terms["l1"]
    return loss, {"loss": loss, **terms}


def f_loss(nets, f_params, frozen, g_params, d_params, batch, keys) -> tuple[jax.Array, Metrics]:
    """F+C segments the source and makes G's images of each domain look like the other's.

    The adversarial and class terms reach F only through G (F's features -> G -> D).
    """
    w = nets.weights
    f_variables = {"params": f_params, "frozen": frozen}
    score, *source = _features(nets, f_variables, batch["source_image"], keys.f_source)
    _, *target = _features(nets, f_variables, batch["target_image"], keys.f_target)
    fake_s, fake_c = _discriminate(nets, d_params, _generate(nets, g_params, source, keys.g_source),
                                   keys.d_fake_source)
    fake_t, _ = _discriminate(nets, d_params, _generate(nets, g_params, target, keys.g_target),
                              keys.d_fake_target)
    aux = losses.aux_labels(batch["source_label"], fake_c.shape[1:3])
    terms = {
        "seg": losses.ce2d(score, batch["source_label"], w.reduction),
        # Source pushed towards "target real", target towards "source real".
        "adv": (losses.domain_ce(fake_s, losses.TARGET_REAL, w.reduction)
                + losses.domain_ce(fake_t, losses.SOURCE_REAL, w.reduction)),
        "aux": losses.ce2d(fake_c, aux, w.reduction),
    }
    loss = terms["seg"] + w.adv_weight * terms["adv"] + w.c_weight * terms["aux"]
    return loss, {"loss": loss, **terms}


def source_only_loss(nets, f_params, frozen, batch, keys) -> tuple[jax.Array, Metrics]:
    score, *_ = _features(nets, {"params": f_params, "frozen": frozen}, batch["source_image"],
                          keys.f_source)
    loss = losses.ce2d(score, batch["source_label"], nets.weights.reduction)
    return loss, {"loss": loss, "seg": loss}


# ----------------------------------------------------------------------------- updates

def _with_grad_norm(metrics, grads):
    return {**metrics, "grad_norm": optax.tree.norm(grads)}


def d_update(nets, d_state, f_variables, g_params, batch, key):
    check_batch(batch)
    keys = DropoutKeys.from_step_key(key)
    source, target = _fixed_features(nets, f_variables, batch, keys)
    generated = jax.lax.stop_gradient((_generate(nets, g_params, source, keys.g_source),
                                       _generate(nets, g_params, target, keys.g_target)))
    grads, metrics = jax.grad(lambda p: d_loss(nets, p, generated, batch, keys), has_aux=True)(
        d_state.params)
    return _apply_gradients(nets.d_tx, d_state, grads), _with_grad_norm(metrics, grads)


def g_update(nets, g_state, f_variables, d_params, batch, key):
    check_batch(batch)
    keys = DropoutKeys.from_step_key(key)
    features = _fixed_features(nets, f_variables, batch, keys)
    grads, metrics = jax.grad(
        lambda p: g_loss(nets, p, d_params, features, batch, keys), has_aux=True)(g_state.params)
    return _apply_gradients(nets.g_tx, g_state, grads), _with_grad_norm(metrics, grads)


def f_update(nets, f_state, g_params, d_params, batch, key):
    check_batch(batch)
    keys = DropoutKeys.from_step_key(key)
    grads, metrics = jax.grad(
        lambda p: f_loss(nets, p, f_state.frozen, g_params, d_params, batch, keys),
        has_aux=True)(f_state.params)
    return _apply_gradients(nets.f_tx, f_state, grads), _with_grad_norm(metrics, grads)


def source_only_update(nets, f_state, batch, key):
    check_batch(batch, with_target=False)
    keys = DropoutKeys.from_step_key(key)
    grads, metrics = jax.grad(
        lambda p: source_only_loss(nets, p, f_state.frozen, batch, keys), has_aux=True)(
        f_state.params)
    return _apply_gradients(nets.f_tx, f_state, grads), _with_grad_norm(metrics, grads)


def _prefixed(prefix, metrics):
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


def lsd_iteration(d_upd, g_upd, f_upd, mode: str, states: TrainStates, batch, key):
    """One LSD iteration from three update functions (compiled separately or not).

    alternating: D steps; G's loss uses the new D; F's the new D and G.
    simultaneous: all three gradients at the start-of-iteration parameters.
    """
    if mode not in UPDATE_MODES:
        raise ValueError(f"update mode: expected one of {UPDATE_MODES}, got {mode!r}")
    f_vars = states.f.variables()
    d_state, d_metrics = d_upd(states.d, f_vars, states.g.params, batch, key)
    d_params = d_state.params if mode == "alternating" else states.d.params
    g_state, g_metrics = g_upd(states.g, f_vars, d_params, batch, key)
    g_params = g_state.params if mode == "alternating" else states.g.params
    f_state, f_metrics = f_upd(states.f, g_params, d_params, batch, key)
    metrics = {**_prefixed("d", d_metrics), **_prefixed("g", g_metrics),
               **_prefixed("f", f_metrics)}
    return TrainStates(f_state, g_state, d_state), metrics


class Updates(NamedTuple):
    """Compiled updates. `step` is one whole iteration in one program (states donated)."""

    d_update: Callable
    g_update: Callable
    f_update: Callable
    source_only_update: Callable
    step: Callable
    separate_step: Callable  # the same iteration as three compiled calls


def make_updates(nets: Networks, mode: str, donate: bool = True, mesh=None) -> Updates:
    """jit-compiles every update; `step` donates its input states' buffers when `donate`.

    With a mesh, every update is data-parallel: batches are split over the mesh's data axis and
    states replicated (gradients are all-reduced by XLA). The separate updates never donate: in
    "simultaneous" mode each needs the others' old parameters after they have been updated.
    """
    if mode not in UPDATE_MODES:
        raise ValueError(f"update mode: expected one of {UPDATE_MODES}, got {mode!r}")
    bind = lambda fn: lambda *args: fn(nets, *args)  # noqa: E731

    def compile_(fn, num_state_args, donate_state=False):
        if mesh is None:
            return jax.jit(fn, donate_argnums=(0,) if donate_state else ())
        rep, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)

        jitted = jax.jit(fn, in_shardings=(rep,) * num_state_args + (data, rep),
                         out_shardings=(rep, rep), donate_argnums=(0,) if donate_state else ())
        return parallel.BatchChecked(jitted, num_state_args, mesh)

    d_upd, g_upd, f_upd = (compile_(bind(fn), 3) for fn in (d_update, g_update, f_update))

    def iteration(d, g, f):
        return lambda states, batch, key: lsd_iteration(d, g, f, mode, states, batch, key)

    return Updates(
        d_update=d_upd, g_update=g_upd, f_update=f_upd,
        source_only_update=compile_(bind(source_only_update), 1, donate),
        step=compile_(iteration(bind(d_update), bind(g_update), bind(f_update)), 1, donate),
        separate_step=iteration(d_upd, g_upd, f_upd),
    )
