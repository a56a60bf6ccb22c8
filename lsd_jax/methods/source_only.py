"""The source-only baseline (docs/methods.md, section 7): F+C trained on the source's labels
alone, with LSD's optimiser for F (`config.optim`) and its segmentation loss
(`config.loss.reduction`). The oracle is the same method trained on the target's labels (the
configs' `target_only` variant)."""

import jax

from lsd_jax import losses
from lsd_jax.methods import base


def source_only_loss(f, reduction, params, frozen, batch, key):
    score, *_ = f.apply({"params": params, "frozen": frozen}, batch["source_image"], train=True,
                        rngs={"dropout": key})
    loss = losses.ce2d(score, batch["source_label"], reduction)
    return loss, {"loss": loss, "seg": loss}


def f_update(f, tx, reduction, f_state, batch, key):
    base.check_batch(batch, with_target=False, with_image01=False)
    key = base.f_dropout_key(key, "source")
    grads, metrics = jax.grad(
        lambda p: source_only_loss(f, reduction, p, f_state.frozen, batch, key),
        has_aux=True)(f_state.params)
    return base.apply_gradients(tx, f_state, grads), base.with_grad_norm(metrics, grads)


def build(config) -> base.Method:
    f = base.segmentation_network(config)
    tx = base.f_optimizer(config.optim)
    reduction = base.check_reduction(config)

    return base.Method(
        name="source_only",
        networks={"f": f},
        updates={"f": lambda s, batch, key: f_update(f, tx, reduction, s["f"], batch, key)},
        mode="alternating",  # one update: the modes are the same
        init=lambda key: {"f": base.init_network(f, tx, base.init_keys(key)[0],
                                                base.example_image(), train=False)},
        predict=base.predict_first_output(f),
        pictures=lambda states, batch: base.predictions(f, states, batch, ("source",)),
        learning_rates=base.f_learning_rates(config.optim),
        output_shapes=lambda states, image: {"f": base.f_output_shapes(f, states, image)},
        reads_target=False,
        console_terms=("f/seg",),
    )
