"""The unified adversarial framework (docs/methods.md, section 10; Tzeng et al., CVPR 2017):
ADDA, gradient reversal, domain confusion, FCNs in the Wild and FCAN's representation
adaptation as settings of one method, `config.adversarial`.

A discriminator D tells, at every location, whether a map comes from a source or a target
image; the map is S's last features before the classifier ("features": fc7, DeepLab ResNet's
layer4) or its class probabilities ("scores"). The choices that define a method:

  tied:          one encoder for both domains, trained on the source labels and against D;
                 or untied (ADDA): the target encoder M_t ("f") starts as a copy of the source
                 network ("f_source", a source-trained F from config.init, never trained), and
                 only M_t learns, against D, with the classifier C fixed. Prediction: C(M_t(x)).
  mapping_loss:  what the encoder minimises against D: "gan" (target maps called source, the
                 inverted label), "confusion" (both domains' maps called each domain with
                 probability 1/2), "minimax" (minus D's loss: a gradient reversal).
  discriminator: "pixel" (1x1 convolutions) or "aspp" (FCAN's dilated convolutions).

    f_update(states, batch, key) -> the encoder's new state   (D fixed)
    d_update(states, batch, key) -> D's new state             (the maps detached)

FCNs in the Wild adds a category-specific term on S's target predictions (`size_weight` > 0):
the constrained multiple-instance loss of `lsd_jax.size_constraints`, with the per-class size
statistics of the source labels (`size_statistics`, a file written once by
`python -m lsd_jax.size_constraints`), read when a run starts and kept in its state
("size_statistics", never trained) and so in every checkpoint.

Untied training can drift: the target encoder forgets what C reads. The two safeguards
implementations use, both off by default: `seg_weight` > 0 keeps a source cross-entropy through
M_t; `d_gate` > 0 applies the adversarial term only while D's accuracy on the iteration's maps
is above it (0.6 in implementations).
"""

import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lsd_jax import losses, output_space, size_constraints
from lsd_jax.methods import base
from lsd_jax.methods.base import Metrics, NetState
from lsd_jax.models.domain_discriminators import ASPPDiscriminator, PixelDiscriminator
from lsd_jax.models.layers import at_least_float32

D_INPUTS = ("features", "scores")
MAPPING_LOSSES = ("gan", "confusion", "minimax")
DISCRIMINATORS = ("pixel", "aspp")
SOURCE_NETWORK = "f_source"  # the fixed source network of untied training
SIZE_STATISTICS = "size_statistics"  # FCNs in the Wild's source statistics, in the state


@dataclasses.dataclass(frozen=True)
class Parts:
    """Everything static about one setting of the framework.

    size_statistics: FCNs in the Wild's per-class source statistics (the run's starting
        values; the update reads those in the state), or None without the size term.
    """

    s: nn.Module
    d: nn.Module
    s_tx: optax.GradientTransformation
    d_tx: optax.GradientTransformation
    d_input: str
    tied: bool
    mapping_loss: str
    seg_weight: float
    adv_weight: float
    d_gate: float
    size_statistics: size_constraints.SizeStatistics | None = None
    size_weight: float = 0.0
    size_slack_weight: float = 0.0
    size_iterations: int = 0


# ----------------------------------------------------------------------------- losses

def d_loss_terms(source_logits: jax.Array, target_logits: jax.Array) -> dict[str, jax.Array]:
    """D's two terms: -E_s[log D(source)] and -E_t[log(1 - D(target))], D(z) the probability
    of "source"; each a mean over D's map."""
    return {"source": output_space.gan_loss(source_logits, output_space.SOURCE),
            "target": output_space.gan_loss(target_logits, output_space.TARGET)}


def mapping_loss(kind: str, source_logits: jax.Array, target_logits: jax.Array) -> jax.Array:
    """The encoder's adversarial loss against D (docs/methods.md, section 10.1)."""
    if kind == "gan":
        return output_space.gan_loss(target_logits, output_space.SOURCE)
    if kind == "confusion":
        return sum(0.5 * (output_space.gan_loss(x, output_space.SOURCE)
                          + output_space.gan_loss(x, output_space.TARGET))
                   for x in (source_logits, target_logits))
    if kind == "minimax":
        return -sum(d_loss_terms(source_logits, target_logits).values())
    raise ValueError(f"mapping loss: expected one of {MAPPING_LOSSES}, got {kind!r}")


def d_accuracy(source_logits: jax.Array, target_logits: jax.Array) -> jax.Array:
    """The mean of D's accuracy on each domain's locations (logit > 0 means "target")."""
    return 0.5 * (jnp.mean(source_logits <= 0) + jnp.mean(target_logits > 0))


# ----------------------------------------------------------------------------- forward passes

def feature_output(s: nn.Module) -> str:
    """The name of S's last representation before its classifier (fc7, or layer4)."""
    return base.output_names(s)[1]


def encode(parts: Parts, variables, image, key, update_statistics: bool = False):
    """S's outputs by name in training mode, and BatchNorm's statistics after the pass."""
    return base.f_outputs(parts.s, variables, image, train=True, key=key,
                          update_statistics=update_statistics)


def d_view(parts: Parts, outputs: dict) -> jax.Array:
    """The map D sees: S's features, or its class probabilities (at the image size)."""
    if parts.d_input == "features":
        return outputs[feature_output(parts.s)]
    return jax.nn.softmax(at_least_float32(outputs["score"]), axis=-1)


def d_dropout_key(key: jax.Array, domain: str) -> jax.Array:
    """D's dropout key for one domain's maps: the same in the encoder's and D's updates, so in
    "simultaneous" mode both see the same D."""
    return jax.random.fold_in(key, {"source": 2, "target": 3}[domain])


def discriminate(parts: Parts, d_params, maps, key, domain: str) -> jax.Array:
    return parts.d.apply({"params": d_params}, maps, train=True,
                         rngs={"dropout": d_dropout_key(key, domain)})


def source_maps(parts: Parts, source_variables, batch, key) -> jax.Array:
    """Untied: the fixed source network's maps of the source images (no gradient reaches it;
    training mode, so that both encoders see their images alike)."""
    outputs, _ = encode(parts, source_variables, batch["source_image"],
                        base.f_dropout_key(key, "source"))
    return jax.lax.stop_gradient(d_view(parts, outputs))


def statistics_state(stats: size_constraints.SizeStatistics) -> NetState:
    """The size statistics as a state that is never trained (so that checkpoints keep them)."""
    arrays = {name: jnp.asarray(getattr(stats, name), jnp.float32)
              for name in ("alpha", "delta", "gamma", "count")}
    return NetState(arrays, optax.EmptyState())


def statistics_of(state: NetState) -> size_constraints.SizeStatistics:
    p = state.params
    return size_constraints.SizeStatistics(p["alpha"], p["delta"], p["gamma"], p["count"], 0)


def size_term(parts: Parts, logits: jax.Array, stats: size_constraints.SizeStatistics):
    return size_constraints.size_constraint_loss(
        logits, stats, slack_weight=parts.size_slack_weight, iterations=parts.size_iterations)


def s_loss(parts: Parts, s_variables, source_variables, d_params, batch, key,
           size_statistics: size_constraints.SizeStatistics | None = None
           ) -> tuple[jax.Array, tuple[Metrics, base.Params]]:
    """The encoder's loss: seg_weight x the source cross-entropy (through the trained network;
    skipped at weight 0) + adv_weight x the mapping loss (x 0 while D's accuracy is at or below
    d_gate) + size_weight x FCNs in the Wild's size term on the target (with
    `size_statistics`). Also returns BatchNorm's running statistics after the passes (source,
    then target)."""
    statistics = s_variables.get("batch_stats", {})
    terms: Metrics = {}
    loss = 0.0
    source_view = None
    if parts.tied or parts.seg_weight:
        source, statistics = encode(parts, s_variables, batch["source_image"],
                                    base.f_dropout_key(key, "source"), update_statistics=True)
        if statistics:
            s_variables = {**s_variables, "batch_stats": statistics}
        if parts.seg_weight:
            terms["seg"] = losses.ce2d(source["score"], batch["source_label"], "mean")
            loss = loss + parts.seg_weight * terms["seg"]
        source_view = d_view(parts, source) if parts.tied else None
    if source_view is None:
        source_view = source_maps(parts, source_variables, batch, key)
    target, statistics = encode(parts, s_variables, batch["target_image"],
                                base.f_dropout_key(key, "target"), update_statistics=True)
    out_s = discriminate(parts, d_params, source_view, key, "source")
    out_t = discriminate(parts, d_params, d_view(parts, target), key, "target")
    accuracy = jax.lax.stop_gradient(d_accuracy(out_s, out_t))
    gate_open = (accuracy > parts.d_gate).astype(jnp.float32)
    terms["adv"] = mapping_loss(parts.mapping_loss, out_s, out_t)
    loss = loss + parts.adv_weight * gate_open * terms["adv"]
    if parts.size_weight:
        terms["size"], size_metrics = size_term(parts, target["score"], size_statistics)
        terms.update({f"size_{k}": v for k, v in size_metrics.items()})
        loss = loss + parts.size_weight * terms["size"]
    return loss, ({"loss": loss, **terms, "d_accuracy": accuracy, "gate_open": gate_open},
                  statistics)


def d_loss(parts: Parts, d_params, source_view, target_view, key) -> tuple[jax.Array, Metrics]:
    out_s = discriminate(parts, d_params, source_view, key, "source")
    out_t = discriminate(parts, d_params, target_view, key, "target")
    terms = d_loss_terms(out_s, out_t)
    loss = terms["source"] + terms["target"]
    return loss, {"loss": loss, **terms, "acc_source": jnp.mean(out_s <= 0),
                  "acc_target": jnp.mean(out_t > 0)}


# ----------------------------------------------------------------------------- updates

def check_batch(batch) -> None:
    base.check_batch(batch, with_target=True, with_image01=False, one_size=False)


def f_update(parts: Parts, states, batch, key):
    check_batch(batch)
    s_state = states["f"]
    source_variables = None if parts.tied else states[SOURCE_NETWORK].variables()
    d_params = states["d"].params
    size_statistics = statistics_of(states[SIZE_STATISTICS]) if parts.size_weight else None
    grads, (metrics, statistics) = jax.grad(
        lambda p: s_loss(parts, s_state.variables(p), source_variables, d_params, batch, key,
                         size_statistics),
        has_aux=True)(s_state.params)
    new = base.apply_gradients(parts.s_tx, s_state, grads).replace(batch_stats=statistics)
    return new, base.with_grad_norm(metrics, grads)


def d_update(parts: Parts, states, batch, key):
    """D on this iteration's maps, detached (the same dropout masks as the encoder's update:
    in "simultaneous" mode the very maps it computed)."""
    check_batch(batch)
    target, _ = encode(parts, states["f"].variables(), batch["target_image"],
                       base.f_dropout_key(key, "target"))
    target_view = jax.lax.stop_gradient(d_view(parts, target))
    if parts.tied:
        source, _ = encode(parts, states["f"].variables(), batch["source_image"],
                           base.f_dropout_key(key, "source"))
        source_view = jax.lax.stop_gradient(d_view(parts, source))
    else:
        source_view = source_maps(parts, states[SOURCE_NETWORK].variables(), batch, key)
    d_state = states["d"]
    grads, metrics = jax.grad(
        lambda p: d_loss(parts, p, source_view, target_view, key), has_aux=True)(d_state.params)
    return base.apply_gradients(parts.d_tx, d_state, grads), base.with_grad_norm(metrics, grads)


# ----------------------------------------------------------------------------- construction

def is_classifier(path) -> bool:
    """C: FCN-8s's score layers, DeepLab's ASPP classifiers (and their auxiliary heads)."""
    return path[0].key.startswith(("score", "classifier"))


def s_optimizer(config, tied: bool) -> optax.GradientTransformation:
    """F's optimiser (`config.optim`, LSD's and the baselines', with its warmup); untied, C
    stays fixed."""
    tx = base.warmed_up_f_optimizer(config.optim)[0]
    if tied:
        return tx
    classifier = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: is_classifier(path), params)
    return optax.chain(tx, optax.masked(optax.set_to_zero(), classifier))


def d_optimizer(block) -> optax.GradientTransformation:
    """Adam with coupled weight decay (added to the gradient, as ADDA's L2 regulariser)."""
    return optax.chain(optax.add_decayed_weights(block.d_weight_decay),
                       optax.adam(block.d_lr, b1=block.d_b1, b2=block.d_b2))


def discriminator(config) -> nn.Module:
    block, dtype = config.adversarial, base.model_dtype(config)
    base.check_choice("adversarial.discriminator", block.discriminator, DISCRIMINATORS)
    if block.discriminator == "aspp":
        return ASPPDiscriminator(config.model.width, dtype)
    hidden = tuple(block.d_hidden)
    if not hidden or not all(isinstance(h, int) and h >= 1 for h in hidden):
        raise ValueError(f"config.adversarial.d_hidden={block.d_hidden!r}: expected one or more "
                         "channel counts >= 1, e.g. (1024, 512)")
    return PixelDiscriminator(hidden, config.model.width, block.d_dropout,
                              bool(block.d_channel_dropout), dtype)


def check_block(block) -> None:
    for name in ("seg_weight", "adv_weight", "d_weight_decay", "size_weight",
                 "size_slack_weight"):
        value = block[name]
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"config.adversarial.{name}={value!r}: expected a number >= 0")
    if not isinstance(block.d_lr, (int, float)) or block.d_lr <= 0:
        raise ValueError(f"config.adversarial.d_lr={block.d_lr!r}: expected a positive number")
    if not isinstance(block.size_iterations, int) or block.size_iterations < 1:
        raise ValueError(f"config.adversarial.size_iterations={block.size_iterations!r}: "
                         "expected a number of solver iterations >= 1")
    if not 0 <= block.d_gate < 1:
        raise ValueError(f"config.adversarial.d_gate={block.d_gate!r}: expected D's accuracy "
                         "threshold in [0, 1) (0 = no gate)")
    if not 0 <= block.d_dropout < 1:
        raise ValueError(f"config.adversarial.d_dropout={block.d_dropout!r}: expected a rate "
                         "in [0, 1)")
    if block.tied and not block.seg_weight:
        raise ValueError("config.adversarial.seg_weight=0 with tied=True: the one encoder would "
                         "never see a label; set seg_weight > 0 (untied training keeps C fixed "
                         "instead)")


def read_size_statistics(config) -> size_constraints.SizeStatistics | None:
    """FCNs in the Wild's statistics file, when its term is on (a clear error when the file is
    not named, missing, or of another class set)."""
    block = config.adversarial
    if not block.size_weight:
        return None
    if not block.size_statistics:
        raise ValueError(
            f"config.adversarial.size_weight={block.size_weight} needs the source's class size "
            "statistics: set config.adversarial.size_statistics to the file written by "
            "`python -m lsd_jax.size_constraints --config <this config> --output <file>`")
    return size_constraints.load_statistics(block.size_statistics, config.num_classes,
                                            config.data.class_set)


def build_parts(config) -> Parts:
    block = config.adversarial
    base.check_choice("adversarial.d_input", block.d_input, D_INPUTS)
    base.check_choice("adversarial.mapping_loss", block.mapping_loss, MAPPING_LOSSES)
    check_block(block)
    tied = bool(block.tied)
    return Parts(s=base.segmentation_network(config), d=discriminator(config),
                 s_tx=s_optimizer(config, tied), d_tx=d_optimizer(block),
                 d_input=block.d_input, tied=tied, mapping_loss=block.mapping_loss,
                 seg_weight=float(block.seg_weight), adv_weight=float(block.adv_weight),
                 d_gate=float(block.d_gate), size_statistics=read_size_statistics(config),
                 size_weight=float(block.size_weight),
                 size_slack_weight=float(block.size_slack_weight),
                 size_iterations=int(block.size_iterations))


def method_from_parts(name: str, config, parts: Parts) -> base.Method:
    """The Method: the encoder's update, then D's; untied, also the fixed source network."""
    base.check_choice("update_mode", config.update_mode, base.UPDATE_MODES)
    num_classes = config.num_classes
    d_rate = float(config.adversarial.d_lr)
    f_rates = base.warmed_up_f_optimizer(config.optim)[1]

    def view_shape(states, image):
        if parts.d_input == "scores":
            return jax.ShapeDtypeStruct((*image.shape[:3], num_classes), jnp.float32)
        return base.f_output_shapes(parts.s, states, image)[feature_output(parts.s)]

    def init(key):
        keys = base.init_keys(key)
        f = base.init_network(parts.s, parts.s_tx, keys[0], base.example_image(), train=False)
        example = jnp.zeros(view_shape({"f": f}, base.example_image()).shape, jnp.float32)
        states = {"f": f, "d": base.init_network(parts.d, parts.d_tx, keys[1], example)}
        if not parts.tied:
            states[SOURCE_NETWORK] = base.fixed_copy(f)
        if parts.size_weight:
            states[SIZE_STATISTICS] = statistics_state(parts.size_statistics)
        return states

    def output_shapes(states, image):
        shapes = {"f": base.f_output_shapes(parts.s, states, image)}
        shapes["d"] = {"domain": jax.eval_shape(
            lambda p, x: parts.d.apply({"params": p}, x), states["d"].params,
            view_shape(states, image))}
        if not parts.tied:
            shapes[SOURCE_NETWORK] = shapes["f"]
        return shapes

    return base.Method(
        name=name,
        networks={"f": parts.s, "d": parts.d,
                  **({} if parts.tied else {SOURCE_NETWORK: parts.s})},
        updates={"f": lambda s, batch, key: f_update(parts, s, batch, key),
                 "d": lambda s, batch, key: d_update(parts, s, batch, key)},
        mode=config.update_mode,
        init=init,
        predict=base.predict_scores(parts.s),
        pictures=lambda states, batch: base.predictions(parts.s, states, batch,
                                                        ("source", "target")),
        learning_rates=lambda step: {**f_rates(step), "lr/d": d_rate},
        output_shapes=output_shapes,
        reads_target=True,
        console_terms=(*(("f/seg",) if parts.seg_weight else ()), "f/adv",
                       *(("f/size",) if parts.size_weight else ()), "d/loss"),
        copies_of_f=() if parts.tied else (SOURCE_NETWORK,),
    )


def build(config) -> base.Method:
    parts = build_parts(config)
    if not parts.tied and not any(config.init[name] for name in base.F_SOURCES):
        logging.warning("config.adversarial.tied=False (ADDA) starts its target encoder and "
                        "keeps its classifier from a source-trained F, but config.init names "
                        "none (set init.f_workdir to a source-only run)")
    return method_from_parts("adversarial", config, parts)
