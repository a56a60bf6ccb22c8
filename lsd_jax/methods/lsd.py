"""LSD (docs/methods.md, sections 2-4): F+C, the generator G and the discriminator D.

Each network has its own state (params + optax state). Each update is a pure function of its own
state, the other networks' parameters, a batch and a step key:

    d_update(d_state, f_variables, g_params, batch, key) -> (d_state, metrics)
    g_update(g_state, f_variables, d_params, batch, key) -> (g_state, metrics)
    f_update(f_state, g_params, d_params, batch, key)    -> (f_state, metrics)

`build` makes the method of a config: D, then G, then F in the configured update mode
(`config.update_mode`, see `base.run_iteration`), with the config's `loss` and `optim` blocks
(LSD's reference values are in configs/default.py).

Dropout keys are derived from the step key with a fixed id per forward pass (see `DropoutKeys`):
within an iteration every network draws one mask per input image, shared by all updates. This is
what lets "simultaneous" be one forward pass, and what lets XLA compute F's features once for the
D and G updates of an "alternating" iteration (F does not change there). The reference draws fresh
masks at each of its forward passes; which masks an iteration uses does not change the method.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from lsd_jax import losses
from lsd_jax.methods import base
from lsd_jax.methods.base import Metrics, States
from lsd_jax.models import Discriminator, FCN8s, Generator


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

def gd_optimizer(optim) -> optax.GradientTransformation:
    return optax.adam(optim.gd_lr, b1=optim.gd_b1, b2=optim.gd_b2)


def build_networks(config) -> Networks:
    """Modules, optimizers and loss weights from a config (see configs/default.py)."""
    base.check_choice("update_mode", config.update_mode, base.UPDATE_MODES)
    base.check_reduction(config)
    m = config.model
    if m.backbone != "fcn8s_vgg16":
        # G is built for FCN-8s's features; which DeepLab features it should take instead is
        # not defined by LSD-seg (docs/methods.md, section 6).
        raise ValueError(
            f"config.model.backbone={m.backbone!r}: LSD's G reconstructs images from FCN-8s's "
            "fc7, pool4 and pool3, which a DeepLab network does not have; use "
            "backbone='fcn8s_vgg16' with method 'lsd' (the DeepLab backbones serve the "
            "output-space methods and the source-only baseline)")
    dtype = base.model_dtype(config)
    plain = bool(m.plain_kernels)
    return Networks(
        f=base.segmentation_network(config),
        # Rematerialisation: trades activation memory for recomputation in the backward pass.
        g=Generator(m.width, m.dropout_rate, dtype, remat=bool(m.remat_g), plain_kernels=plain),
        d=Discriminator(config.num_classes, m.width, m.dropout_rate, dtype,
                        plain_kernels=plain),
        f_tx=base.warmed_up_f_optimizer(config.optim)[0],
        g_tx=gd_optimizer(config.optim),
        d_tx=gd_optimizer(config.optim),
        weights=LossWeights(**config.loss),
    )


def init_states(nets: Networks, key: jax.Array) -> States:
    """Fresh states of F, G and D."""
    k_f, k_g, k_d = base.init_keys(key)
    image = base.example_image()
    f = base.init_network(nets.f, nets.f_tx, k_f, image, train=False)
    features = jax.eval_shape(lambda v: nets.f.apply(v, image, train=False), f.variables())[1:]
    features = [jnp.zeros(s.shape, jnp.float32) for s in features]
    return {"f": f, "g": base.init_network(nets.g, nets.g_tx, k_g, *features, train=False),
            "d": base.init_network(nets.d, nets.d_tx, k_d, image, train=False)}


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


# ----------------------------------------------------------------------------- updates

def d_update(nets, d_state, f_variables, g_params, batch, key):
    base.check_batch(batch)
    keys = DropoutKeys.from_step_key(key)
    source, target = _fixed_features(nets, f_variables, batch, keys)
    generated = jax.lax.stop_gradient((_generate(nets, g_params, source, keys.g_source),
                                       _generate(nets, g_params, target, keys.g_target)))
    grads, metrics = jax.grad(lambda p: d_loss(nets, p, generated, batch, keys), has_aux=True)(
        d_state.params)
    return base.apply_gradients(nets.d_tx, d_state, grads), base.with_grad_norm(metrics, grads)


def g_update(nets, g_state, f_variables, d_params, batch, key):
    base.check_batch(batch)
    keys = DropoutKeys.from_step_key(key)
    features = _fixed_features(nets, f_variables, batch, keys)
    grads, metrics = jax.grad(
        lambda p: g_loss(nets, p, d_params, features, batch, keys), has_aux=True)(g_state.params)
    return base.apply_gradients(nets.g_tx, g_state, grads), base.with_grad_norm(metrics, grads)


def f_update(nets, f_state, g_params, d_params, batch, key):
    base.check_batch(batch)
    keys = DropoutKeys.from_step_key(key)
    grads, metrics = jax.grad(
        lambda p: f_loss(nets, p, f_state.frozen, g_params, d_params, batch, keys),
        has_aux=True)(f_state.params)
    return base.apply_gradients(nets.f_tx, f_state, grads), base.with_grad_norm(metrics, grads)


# ----------------------------------------------------------------------------- the method

def build(config, nets: Networks | None = None) -> base.Method:
    """LSD for a config; `nets` replaces the config's networks and optimizers (tests swap in an
    optimizer that records gradients)."""
    nets = build_networks(config) if nets is None else nets
    updates = {  # D, then G, then F; each reads what it needs from the states it sees
        "d": lambda s, batch, key: d_update(nets, s["d"], s["f"].variables(), s["g"].params,
                                            batch, key),
        "g": lambda s, batch, key: g_update(nets, s["g"], s["f"].variables(), s["d"].params,
                                            batch, key),
        "f": lambda s, batch, key: f_update(nets, s["f"], s["g"].params, s["d"].params, batch,
                                            key),
    }
    f_rates = base.warmed_up_f_optimizer(config.optim)[1]

    def pictures(states, batch):
        out = {}
        for domain in ("source", "target"):
            score, *features = nets.f.apply(states["f"].variables(), batch[f"{domain}_image"],
                                            train=False)
            out[f"{domain}_prediction"] = jnp.argmax(score, axis=-1)
            out[f"{domain}_reconstruction"] = nets.g.apply(
                {"params": states["g"].params}, *features, train=False)
        return out

    def output_shapes(states, image):
        f_out = base.f_output_shapes(nets.f, states, image)
        g_out = jax.eval_shape(lambda p, *fs: nets.g.apply({"params": p}, *fs, train=False),
                               states["g"].params, f_out["fc7"], f_out["pool4"], f_out["pool3"])
        d_out = jax.eval_shape(lambda p, x: nets.d.apply({"params": p}, x, train=False),
                               states["d"].params, image)
        return {"f": f_out,
                "g": {"image": g_out},  # from F's fc7, pool4 and pool3
                "d": dict(zip(("out_s", "out_c"), d_out))}

    return base.Method(
        name="lsd",
        networks={"f": nets.f, "g": nets.g, "d": nets.d},
        updates=updates,
        mode=config.update_mode,
        init=lambda key: init_states(nets, key),
        predict=base.predict_scores(nets.f),
        pictures=pictures,
        learning_rates=lambda step: {**f_rates(step), "lr/g_d": config.optim.gd_lr},
        output_shapes=output_shapes,
        reads_target=True,
        console_terms=("f/seg", "f/adv", "g/l1", "g/adv", "d/loss"),
    )
