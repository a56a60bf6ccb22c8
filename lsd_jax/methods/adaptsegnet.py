"""AdaptSegNet (docs/methods.md, section 8.2): adversarial learning in the output space.

A fully convolutional discriminator D tells the softmax maps of source and target images apart;
the segmentation network S (`config.model.backbone`: lsd_jax's FCN-8s by default, or DeepLab-v2)
learns from the source labels and from making its target maps look like source maps to D.
Multi-level: an auxiliary classifier (on FCN-8s on pool4, see `FCN8s.aux_classifier`; on
DeepLab-v2 ResNet-101 on layer3) with a discriminator of its own, "d_aux".

    s_update(states, batch, key) -> S's new state    (D fixed: no gradient reaches D)
    d_update(states, batch, key) -> D's new state    (S's maps detached: none reaches S)

In the default "simultaneous" mode both see the states at the start of the iteration, as the
reference codes do (one forward pass, the pre-step D). ADVENT (`advent.py`) is the same machine
with another map fed to D, or no D at all.

The config block `config.adaptsegnet` holds the reference's values (configs/default.py); "the
classifiers" that learn at 10x the lr are FCN-8s's score layers (score_fr, score_pool4,
score_pool3, score_aux), or DeepLab's ASPP classifiers.
"""

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lsd_jax import losses, output_space
from lsd_jax.methods import base
from lsd_jax.methods.base import Metrics, NetState
from lsd_jax.models.fc_discriminator import FCDiscriminator
from lsd_jax.models.layers import at_least_float32

# S's output levels, named by the network that discriminates each.
MAIN, AUX = "d", "d_aux"


@dataclasses.dataclass(frozen=True)
class Weights:
    """The loss weights: seg_aux on the auxiliary source cross-entropy, adv / adv_aux on S's
    target terms (adversarial, or ADVENT's direct entropy) of the main / auxiliary output."""

    seg_aux: float
    adv: float
    adv_aux: float


@dataclasses.dataclass(frozen=True)
class Parts:
    """What an output-space method is made of, everything static.

    d_input: S's logits -> the map D sees (softmax for AdaptSegNet, self-information for
        ADVENT); None for a method without D, whose target term is `direct_term` instead.
    """

    s: nn.Module
    d: FCDiscriminator | None
    s_tx: optax.GradientTransformation
    d_tx: optax.GradientTransformation | None
    gan: str
    weights: Weights
    multi_level: bool
    d_input: Callable[[jax.Array], jax.Array] | None
    direct_term: Callable[[jax.Array], jax.Array] | None = None

    @property
    def levels(self) -> tuple[str, ...]:
        return (MAIN, AUX) if self.multi_level else (MAIN,)

    @property
    def target_term(self) -> str:
        """The name of S's target term in the metrics."""
        return "adv" if self.direct_term is None else "ent"


# ----------------------------------------------------------------------------- construction

def poly_schedule(base_lr: float, block) -> optax.Schedule:
    """lr = base * (1 - step / poly_steps) ** poly_power, updated every step (the reference's
    poly schedule; training usually stops before poly_steps)."""
    return optax.polynomial_schedule(base_lr, 0.0, block.poly_power, block.poly_steps)


def is_classifier(path) -> bool:
    """FCN-8s's score layers, DeepLab's ASPP classifiers."""
    return path[0].key.startswith(("score", "classifier"))


def s_optimizer(block) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay (added to the gradient, as PyTorch's SGD
    does); the classifiers at classifier_lr_mult x the backbone's lr."""
    def sgd(lr):
        return optax.chain(optax.add_decayed_weights(block.weight_decay),
                           optax.sgd(poly_schedule(lr, block), momentum=block.momentum))

    def label(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "classifier" if is_classifier(path) else "backbone", params)

    return optax.multi_transform({"backbone": sgd(block.s_lr),
                                  "classifier": sgd(block.s_lr * block.classifier_lr_mult)},
                                 label)


def warmed_up_s_optimizer(block) -> optax.GradientTransformation:
    """S's SGD warmed up over block.warmup_steps (DAFormer's strategy, 0 by default: the
    references have none). D keeps its own schedule: DAFormer, which has no D, warms up the
    network it trains, and a D that barely moves would only delay the adversarial signal."""
    return base.with_warmup(s_optimizer(block), block.warmup_steps)


def d_optimizer(block) -> optax.GradientTransformation:
    return optax.adam(poly_schedule(block.d_lr, block), b1=block.d_b1, b2=block.d_b2)


def check_block(block, field: str, weight_fields: tuple[str, ...]) -> None:
    """Weights and rates of a method's config block: numbers, weights >= 0, rates > 0."""
    for name in weight_fields:
        value = block[name]
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"config.{field}.{name}={value!r}: expected a weight >= 0 (S "
                             "minimises every term; a negative weight would maximise it)")
    for name in ("s_lr", "d_lr", "classifier_lr_mult", "poly_steps", "poly_power"):
        value = block[name]
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"config.{field}.{name}={value!r}: expected a positive number")
    base.check_warmup_steps(field, block.warmup_steps)


def discriminator(config) -> FCDiscriminator:
    return FCDiscriminator(config.model.width, base.model_dtype(config))


def build_parts(config) -> Parts:
    block = config.adaptsegnet
    check_block(block, "adaptsegnet", ("seg_aux_weight", "adv_weight", "adv_aux_weight"))
    base.check_choice("adaptsegnet.gan", block.gan, output_space.GAN_LOSSES)
    return Parts(
        s=base.segmentation_network(config, block.multi_level), d=discriminator(config),
        s_tx=warmed_up_s_optimizer(block), d_tx=d_optimizer(block), gan=block.gan,
        weights=Weights(block.seg_aux_weight, block.adv_weight, block.adv_aux_weight),
        multi_level=bool(block.multi_level),
        d_input=lambda logits: jax.nn.softmax(at_least_float32(logits), axis=-1))


# ----------------------------------------------------------------------------- forward passes

def level_outputs(parts: Parts, s_variables, image, key, update_statistics: bool = False
                  ) -> tuple[dict[str, jax.Array], base.Params]:
    """S's logits at the input size in training mode, by level ({"d": main, "d_aux": aux}),
    and BatchNorm's running statistics after the pass (see `base.f_outputs`)."""
    outputs, statistics = base.f_outputs(parts.s, s_variables, image, train=True, key=key,
                                         update_statistics=update_statistics)
    levels = {MAIN: outputs["score"],
              **({AUX: outputs["score_aux"]} if parts.multi_level else {})}
    return levels, statistics


def _discriminate(parts: Parts, d_params, logits) -> jax.Array:
    return parts.d.apply({"params": d_params}, parts.d_input(logits))


def domain_accuracy(d_out: jax.Array, domain: int, gan: str) -> jax.Array:
    """Fraction of D's cells on the right side of the middle between the two domains (logit 0
    for BCE, 0.5 for LS-GAN's raw output): how often D is right."""
    middle = 0.5 if gan == "ls" else 0.0
    return jnp.mean((d_out > middle) == bool(domain))


# ----------------------------------------------------------------------------- losses

def s_loss(parts: Parts, s_variables, d_params: dict, batch, key
           ) -> tuple[jax.Array, tuple[Metrics, base.Params]]:
    """Cross-entropy on the source labels (averaged over valid pixels) at every level, plus
    S's target term at every level: D called the target maps source ("inverted label"), or the
    direct term (ADVENT's entropy). Also returns BatchNorm's running statistics after the
    source pass and then the target pass, as the references' forward passes leave them."""
    w = parts.weights
    source, statistics = level_outputs(parts, s_variables, batch["source_image"],
                                       base.f_dropout_key(key, "source"), update_statistics=True)
    if statistics:  # the target pass starts from the statistics the source pass left
        s_variables = {**s_variables, "batch_stats": statistics}
    target, statistics = level_outputs(parts, s_variables, batch["target_image"],
                                       base.f_dropout_key(key, "target"), update_statistics=True)
    labels = batch["source_label"]
    terms = {"seg": losses.ce2d(source[MAIN], labels, "mean")}
    loss = terms["seg"]
    if parts.multi_level:
        terms["seg_aux"] = losses.ce2d(source[AUX], labels, "mean")
        loss = loss + w.seg_aux * terms["seg_aux"]
    for level, weight in ((MAIN, w.adv), (AUX, w.adv_aux)):
        if level not in target:
            continue
        name = parts.target_term + level[1:]  # e.g. "adv" or "adv_aux"
        if parts.direct_term is not None:
            terms[name] = parts.direct_term(target[level])
        else:
            d_out = _discriminate(parts, d_params[level], target[level])
            terms[name] = output_space.gan_loss(d_out, output_space.SOURCE, parts.gan)
        loss = loss + weight * terms[name]
    return loss, ({"loss": loss, **terms}, statistics)


def d_loss(parts: Parts, d_params, source_logits, target_logits) -> tuple[jax.Array, Metrics]:
    """0.5 x (source maps called source) + 0.5 x (target maps called target)."""
    out_s = _discriminate(parts, d_params, source_logits)
    out_t = _discriminate(parts, d_params, target_logits)
    terms = {"source": output_space.gan_loss(out_s, output_space.SOURCE, parts.gan),
             "target": output_space.gan_loss(out_t, output_space.TARGET, parts.gan)}
    loss = 0.5 * (terms["source"] + terms["target"])
    return loss, {"loss": loss, **terms,
                  "acc_source": domain_accuracy(out_s, output_space.SOURCE, parts.gan),
                  "acc_target": domain_accuracy(out_t, output_space.TARGET, parts.gan)}


# ----------------------------------------------------------------------------- updates

def check_batch(batch) -> None:
    base.check_batch(batch, with_target=True, with_image01=False, one_size=False)


def s_update(parts: Parts, s_state: NetState, d_params: dict, batch, key):
    check_batch(batch)
    grads, (metrics, statistics) = jax.grad(
        lambda p: s_loss(parts, s_state.variables(p), d_params, batch, key), has_aux=True)(
        s_state.params)
    new = base.apply_gradients(parts.s_tx, s_state, grads).replace(batch_stats=statistics)
    return new, base.with_grad_norm(metrics, grads)


def d_update(parts: Parts, level: str, d_state: NetState, s_variables, batch, key):
    """One level's D on S's maps of this iteration, detached (the same dropout masks as S's
    update, so in "simultaneous" mode the very maps S's update computed; BatchNorm normalises
    with each batch's own statistics in training, and this pass leaves the running ones to
    S's update)."""
    check_batch(batch)
    source, target = jax.lax.stop_gradient(tuple(
        level_outputs(parts, s_variables, batch[f"{domain}_image"],
                      base.f_dropout_key(key, domain))[0][level]
        for domain in ("source", "target")))
    grads, metrics = jax.grad(
        lambda p: d_loss(parts, p, source, target), has_aux=True)(d_state.params)
    return base.apply_gradients(parts.d_tx, d_state, grads), base.with_grad_norm(metrics, grads)


# ----------------------------------------------------------------------------- the method

def method_from_parts(name: str, config, parts: Parts, block) -> base.Method:
    """The Method of an output-space method: S first, then each level's D (when it has D)."""
    base.check_choice("update_mode", config.update_mode, base.UPDATE_MODES)
    levels = parts.levels if parts.d is not None else ()
    updates = {"f": lambda s, batch, key: s_update(
        parts, s["f"], {level: s[level].params for level in levels}, batch, key)}
    for level in levels:
        updates[level] = (lambda s, batch, key, level=level: d_update(
            parts, level, s[level], s["f"].variables(), batch, key))
    s_rates = (poly_schedule(block.s_lr, block),
               poly_schedule(block.s_lr * block.classifier_lr_mult, block))
    d_rate = poly_schedule(block.d_lr, block)
    num_classes = config.num_classes

    def init(key):
        keys = base.init_keys(key)
        states = {"f": base.init_network(parts.s, parts.s_tx, keys[0], base.example_image(),
                                         train=False)}
        maps = jnp.zeros((1, 32, 32, num_classes), jnp.float32)
        for level, k in zip(levels, keys[1:]):
            states[level] = base.init_network(parts.d, parts.d_tx, k, maps)
        return states

    def output_shapes(states, image):
        shapes = {"f": base.f_output_shapes(parts.s, states, image)}
        maps = jax.ShapeDtypeStruct((*image.shape[:3], num_classes), jnp.float32)  # upsampled
        for level in levels:
            shapes[level] = {"domain": jax.eval_shape(
                lambda p, x: parts.d.apply({"params": p}, x), states[level].params, maps)}
        return shapes

    s_learning_rates = base.warmed_up_rates(lambda step: {
        "lr/f": float(s_rates[0](step)), "lr/f_classifier": float(s_rates[1](step))},
        block.warmup_steps)

    def learning_rates(step):
        return {**s_learning_rates(step), **({"lr/d": float(d_rate(step))} if levels else {})}

    return base.Method(
        name=name,
        networks={"f": parts.s, **{level: parts.d for level in levels}},
        updates=updates,
        mode=config.update_mode,
        init=init,
        predict=base.predict_scores(parts.s),
        pictures=lambda states, batch: base.predictions(parts.s, states, batch,
                                                        ("source", "target")),
        learning_rates=learning_rates,
        output_shapes=output_shapes,
        reads_target=True,
        console_terms=("f/seg", f"f/{parts.target_term}", *(f"{level}/loss" for level in levels)),
    )


def build(config) -> base.Method:
    return method_from_parts("adaptsegnet", config, build_parts(config), config.adaptsegnet)
