"""The source-only baseline (docs/methods.md, section 7): F+C trained on the source's labels
alone, as the method it is the baseline of trains them (`config.source_only.optimizer`): LSD's
Adam (`config.optim`) with LSD's segmentation loss (`config.loss.reduction`), or AdaptSegNet and
ADVENT's S training, their SGD and poly schedule (`config.adaptsegnet`'s rates) with their
cross-entropy averaged over pixels (their rates are for that loss: with a sum over a batch of
128x256 scenes the first steps overflow). The oracle is the same method trained on the target's
labels (the configs' `target_only` variant).

With `config.source_only.augment`, each source image is first given DACS's strong transform
(colour jitter and Gaussian blur with `config.dacs`'s values, its own draws from the step key):
an option of the benchmark's pre-training phase (configs/synthetic.py's `:pretrain`), not of
the source-only baseline of any paper."""

import jax
import optax

from lsd_jax import losses
from lsd_jax.methods import adaptsegnet, augmentation, base

# config.source_only.optimizer: whose optimiser S trains with.
OPTIMIZERS = ("lsd_adam", "output_space_sgd", "daformer_adamw")
_AUGMENT = 2  # the step key's stream of the source images' augmentation (0: F's dropout)


def optimizer_and_rates(config, field: str = "source_only"):
    """(optax transformation, step -> {"lr/...": rate}) for S's optimiser named by
    config.<field>.optimizer (the source-only baseline's, or another method's that trains S
    alone the same way), warmed up over config.<field>.warmup_steps (DAFormer's; 0: none)."""
    choice = config[field].optimizer
    base.check_choice(f"{field}.optimizer", choice, OPTIMIZERS)
    warmup = config[field].warmup_steps
    base.check_warmup_steps(field, warmup)
    if choice == "lsd_adam":
        tx, rates = base.f_optimizer(config.optim), base.f_learning_rates(config.optim)
    elif choice == "daformer_adamw":
        tx, rates = daformer_adamw(config.daformer_optim)
    else:
        block = config.adaptsegnet
        adaptsegnet.check_block(block, "adaptsegnet", ())
        backbone = adaptsegnet.poly_schedule(block.s_lr, block)
        classifier = adaptsegnet.poly_schedule(block.s_lr * block.classifier_lr_mult, block)
        tx, rates = adaptsegnet.s_optimizer(block), lambda step: {
            "lr/f": float(backbone(step)), "lr/f_classifier": float(classifier(step))}
    return base.with_warmup(tx, warmup), base.warmed_up_rates(rates, warmup)


def daformer_adamw(block):
    """DAFormer's AdamW for DeepLab-v2 (`config.daformer_optim`): decoupled weight decay on
    every parameter but BatchNorm's (mmseg's norm decay_mult 0), the classifiers ("head") at
    classifier_lr_mult x the rate, poly decay to 0 over poly_steps."""
    schedule = optax.polynomial_schedule(block.lr, 0.0, block.poly_power, block.poly_steps)
    head = optax.polynomial_schedule(block.lr * block.classifier_lr_mult, 0.0, block.poly_power,
                                     block.poly_steps)

    def decayed(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any("bn" in str(getattr(k, "key", "")) for k in path), params)

    def adamw(lr):
        return optax.adamw(lr, b1=block.b1, b2=block.b2, weight_decay=block.weight_decay,
                           mask=decayed)

    def label(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "classifier" if adaptsegnet.is_classifier(path) else "backbone",
            params)

    tx = optax.multi_transform({"backbone": adamw(schedule), "classifier": adamw(head)}, label)
    return tx, lambda step: {"lr/f": float(schedule(step)), "lr/f_classifier": float(head(step))}


def loss_reduction(config) -> str:
    """The segmentation loss's reduction: the references' mean with their SGD, else LSD's."""
    if config.source_only.optimizer in ("output_space_sgd", "daformer_adamw"):
        return "mean"
    return base.check_reduction(config)


def source_only_loss(f, reduction, variables, batch, key):
    outputs, statistics = base.f_outputs(f, variables, batch["source_image"], train=True,
                                         key=key, update_statistics=True)
    loss = losses.ce2d(outputs["score"], batch["source_label"], reduction)
    return loss, ({"loss": loss, "seg": loss}, statistics)


def augmented_source(batch, key, block):
    """The batch with its source images given DACS's strong transform (`block`: config.dacs)."""
    return {**batch, "source_image": augmentation.strongly_augmented(
        jax.random.fold_in(key, _AUGMENT), batch["source_image"], block)}


def f_update(f, tx, reduction, augment, f_state, batch, key):
    base.check_batch(batch, with_target=False, with_image01=False, one_size=False)
    if augment is not None:
        batch = augmented_source(batch, key, augment)
    key = base.f_dropout_key(key, "source")
    grads, (metrics, statistics) = jax.grad(
        lambda p: source_only_loss(f, reduction, f_state.variables(p), batch, key),
        has_aux=True)(f_state.params)
    new = base.apply_gradients(tx, f_state, grads).replace(batch_stats=statistics)
    return new, base.with_grad_norm(metrics, grads)


def build(config) -> base.Method:
    f = base.segmentation_network(config)
    tx, learning_rates = optimizer_and_rates(config)
    reduction = loss_reduction(config)
    augment = config.dacs if config.source_only.augment else None
    if augment is not None:
        augmentation.check_values(augment)

    return base.Method(
        name="source_only",
        networks={"f": f},
        updates={"f": lambda s, batch, key: f_update(f, tx, reduction, augment, s["f"],
                                                     batch, key)},
        mode="alternating",  # one update: the modes are the same
        init=lambda key: {"f": base.init_network(f, tx, base.init_keys(key)[0],
                                                base.example_image(), train=False)},
        predict=base.predict_scores(f),
        pictures=lambda states, batch: base.predictions(f, states, batch, ("source",)),
        learning_rates=learning_rates,
        output_shapes=lambda states, image: {"f": base.f_output_shapes(f, states, image)},
        reads_target=False,
        console_terms=("f/seg",),
    )
