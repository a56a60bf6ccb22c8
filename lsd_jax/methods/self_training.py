"""Self-training with a mean teacher: DACS, and DACS with MIC's masked image consistency
(docs/methods.md, section 12; shared facts: the official codes vikolss/DACS, lhoyer/MIC).

Two networks: the student "f" (F+C, trained) and the "teacher", an exponential moving average
of the student that no gradient ever reaches. An iteration runs, in this order ("alternating":
the teacher follows the student's new parameters, DACS's order):

    f:       pseudo-labels = the teacher's argmax on the target images (no augmentation, no
             dropout); per image, ClassMix pastes the pixels of ceil(n/2) of the n label values
             present in the source label (the ignore label counts, as in the official code) onto
             the target image; colour jitter and Gaussian blur on the mixed images; the loss is
                 CE(source) + mean over all pixels of (w x CE(mixed)),
             w = 1 on source pixels, and on pseudo-labelled ones the fraction of the batch's
             target pixels whose teacher confidence is >= the threshold (one scalar per batch),
             0 in the rows of `pseudo_label_crop` (DAFormer's; off by default). With
             `pseudo_weight="pixel"` (not DACS's; FixMatch's mask): 1 on the pseudo-labelled
             pixels whose confidence is >= the threshold, 0 on the others.
             With MIC (`mic_weight` > 0): plus mic_weight x the same weighted CE of the student's
             prediction on the target image, freshly jittered and blurred, with b x b blocks
             masked (each with probability `mic_mask_ratio`; masked pixels 0 in F's input, the
             mean colour), against the same pseudo-labels and weight.
             With `augment_source` (not DACS's; off by default): CE(source) on the source
             images jittered and blurred the same way, each with its own draws.
    teacher: params <- a params + (1 - a) student params, a = min(1 - 1/(t + 1), ema_alpha),
             t the number of EMA updates before this one (its state's count: the training step,
             checkpointed with it, so a resumed run is the uninterrupted one bit for bit).

The student is what is evaluated and exported. All randomness (ClassMix's classes, jitter, blur,
MIC's masks) comes from the step's key. `config.dacs` holds the values.
"""

import functools

import jax
import jax.numpy as jnp

from lsd_jax import losses
from lsd_jax.losses import IGNORE_LABEL
from lsd_jax.methods import augmentation, base, source_only
from lsd_jax.models.layers import at_least_float32

TEACHER = "teacher"
IMAGENET = "imagenet"  # the frozen copy of F as its ImageNet weights made it (feature distance)
FEATURE_LABEL_MIN_RATIO = 0.75  # DAFormer's: a feature cell's label covers 3/4 of its patch
DEEPLAB_OUTPUT_STRIDE = 8
# Streams of the step key; 0 and 1 are F's dropout on the source and target images, as in
# every method (base.f_dropout_key).
(_MIXED_DROPOUT, _MASKED_DROPOUT, _CLASSMIX, _MIXED_AUGMENT, _MASKED_AUGMENT, _MIC_MASK,
 _SOURCE_AUGMENT) = (2, 3, 4, 5, 6, 7, 8)


def ema_rate(count: jax.Array, alpha: float) -> jax.Array:
    """min(1 - 1/(t + 1), alpha): 0 at t = 0 (the teacher becomes the student), then rising
    to alpha (the references' warm-up of the average)."""
    t = count.astype(jnp.float32)
    return jnp.minimum(1.0 - 1.0 / (t + 1.0), alpha)


def ema_update(alpha: float, teacher: base.NetState, student: base.NetState
               ) -> tuple[base.NetState, dict]:
    """The teacher after one EMA step towards the student's parameters. Only parameters are
    averaged, as in the references (BatchNorm statistics and frozen variables stay the
    teacher's own)."""
    rate = ema_rate(teacher.opt_state.count, alpha)
    params = jax.tree.map(lambda t, s: rate * t + (1.0 - rate) * s, teacher.params,
                          student.params)
    count = base.AverageCount(teacher.opt_state.count + 1)
    return teacher.replace(params=params, opt_state=count), {"alpha": rate}


# ----------------------------------------------------------------------------- pseudo-labels

def pseudo_labels(f, teacher: base.NetState, image: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """(class ids, confidence = the largest softmax probability) of the teacher's prediction
    in evaluation mode (no dropout), without gradient."""
    scores = base.predict_scores(f)(teacher.variables(), image)
    probabilities = jax.nn.softmax(at_least_float32(scores), axis=-1)
    return jax.lax.stop_gradient((jnp.argmax(probabilities, axis=-1).astype(jnp.int32),
                                  jnp.max(probabilities, axis=-1)))


def confident_fraction(confidence: jax.Array, threshold: float) -> jax.Array:
    """DACS's weight of the pseudo-labelled pixels: the fraction of the batch's target pixels
    whose confidence reaches the threshold (one scalar)."""
    return jnp.mean((confidence >= threshold).astype(jnp.float32))


PSEUDO_WEIGHTS = ("fraction", "pixel")


def confidence_weight(confidence: jax.Array, threshold: float, kind: str) -> jax.Array:
    """The weight of the pseudo-labelled pixels: DACS's confident fraction, one scalar
    ("fraction"), or (n, h, w) of 1 where the confidence reaches the threshold and 0 elsewhere
    ("pixel")."""
    if kind == "pixel":
        return (confidence >= threshold).astype(jnp.float32)
    return confident_fraction(confidence, threshold)


def pseudo_label_weights(weight: jax.Array, shape: tuple[int, int, int],
                         crop: tuple[int, int]) -> jax.Array:
    """(n, h, w) weights of pseudo-labelled pixels: the confidence weight (a scalar, or one per
    pixel), 0 on the top crop[0] and bottom crop[1] rows (DAFormer's pseudo-label crop)."""
    top, bottom = crop
    rows = jnp.arange(shape[1])
    kept = (rows >= top) & (rows < shape[1] - bottom)
    return jnp.broadcast_to(jnp.where(kept[None, :, None], weight, 0.0), shape)


def weighted_ce(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean over all pixels (ignored ones count, with loss 0) of weight x cross-entropy, as
    the references' CrossEntropyLoss2dPixelWiseWeighted."""
    log_probs = jax.nn.log_softmax(at_least_float32(logits), axis=-1)
    valid = labels != IGNORE_LABEL
    safe = jnp.where(valid, labels, 0)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return jnp.mean(jnp.where(valid, nll, 0.0) * weights)


# ----------------------------------------------------------------------------- ClassMix

def classmix_mask(key: jax.Array, label: jax.Array, num_classes: int) -> jax.Array:
    """One image's ClassMix mask (True: take the source pixel): the pixels of ceil(n/2) of the
    n label values present in `label` (H, W), the ignore label being one of them, drawn
    uniformly without replacement."""
    slots = jnp.where(label == IGNORE_LABEL, num_classes, label)  # 255 -> slot num_classes
    present = jnp.zeros(num_classes + 1, bool).at[slots.ravel()].set(True)
    chosen_count = (jnp.sum(present) + 1) // 2
    # A random order of the present values (absent ones last); the first ceil(n/2) are chosen.
    scores = jnp.where(present, jax.random.uniform(key, present.shape), 2.0)
    rank = jnp.argsort(jnp.argsort(scores))
    chosen = present & (rank < chosen_count)
    return chosen[slots]


def classmix(key: jax.Array, source01, target01, source_label, pseudo_label, num_classes: int):
    """(mixed images in [0, 1], mixed labels, mask) of a batch: image i is target image i with
    the pixels of ClassMix's classes of source image i pasted in, with their labels."""
    keys = jax.random.split(key, source_label.shape[0])
    mask = jax.vmap(classmix_mask, in_axes=(0, 0, None))(keys, source_label, num_classes)
    images = jnp.where(mask[..., None], source01, target01)
    labels = jnp.where(mask, source_label, pseudo_label)
    return images, labels, mask


# ----------------------------------------------------------------------------- MIC

def mic_mask(key: jax.Array, shape: tuple[int, int, int], block_size: int, ratio: float
             ) -> jax.Array:
    """MIC's masks for a batch (N, H, W): a grid of block_size x block_size blocks, each kept
    (True) with probability 1 - ratio, cut to the image at its bottom and right."""
    n, h, w = shape
    grid = jax.random.uniform(key, (n, -(-h // block_size), -(-w // block_size))) > ratio
    return jnp.repeat(jnp.repeat(grid, block_size, axis=1), block_size, axis=2)[:, :h, :w]


# ----------------------------------------------------------------------------- the student

def downscale_labels(labels: jax.Array, factor: int, num_classes: int,
                     min_ratio: float = FEATURE_LABEL_MIN_RATIO) -> jax.Array:
    """(n, H/factor, W/factor) labels: each cell takes the class covering at least `min_ratio`
    of its factor x factor patch of the (n, H, W) label map, else the ignore label (DAFormer's
    downscale_label_ratio)."""
    n, height, width = labels.shape
    if height % factor or width % factor:
        raise ValueError(f"labels of {height}x{width} do not split into {factor}x{factor} "
                         "patches")
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # ignore: all zero
    patches = one_hot.reshape(n, height // factor, factor, width // factor, factor,
                              num_classes)
    fraction = patches.mean(axis=(2, 4))
    best = jnp.argmax(fraction, axis=-1)
    return jnp.where(jnp.max(fraction, axis=-1) >= min_ratio, best, IGNORE_LABEL)


def labels_of_features(labels: jax.Array, size: tuple[int, int], num_classes: int
                       ) -> jax.Array:
    """The labels of a DeepLab feature map of `size` (output stride 8): downscaled 8x; the
    extra last row and column of a ceil-mode map (H/8 + 1, the references' DeepLab) cover
    partial windows at the border and are ignored."""
    small = downscale_labels(labels, DEEPLAB_OUTPUT_STRIDE, num_classes)
    extra = (size[0] - small.shape[1], size[1] - small.shape[2])
    if min(extra) < 0 or max(extra) > 1:
        raise ValueError(f"features of {size} do not match labels of {labels.shape[1:]} at "
                         f"stride {DEEPLAB_OUTPUT_STRIDE}")
    return jnp.pad(small, ((0, 0), (0, extra[0]), (0, extra[1])), constant_values=IGNORE_LABEL)


def feature_distance(student: jax.Array, imagenet: jax.Array, labels: jax.Array,
                     classes: jax.Array) -> jax.Array:
    """DAFormer's ImageNet feature distance: the mean over the feature cells whose
    (downscaled) label is one of `classes` of the L2 distance between the two feature vectors;
    0 where no cell is (DAFormer's mean over none would be NaN)."""
    distance = jnp.sqrt(jnp.sum(jnp.square(at_least_float32(student)
                                           - at_least_float32(imagenet)), axis=-1) + 1e-16)
    mask = jnp.isin(labels, classes)
    count = jnp.sum(mask)
    return jnp.where(count > 0, jnp.sum(jnp.where(mask, distance, 0.0)) / jnp.maximum(count, 1),
                     0.0)


def thing_class_indices(config) -> tuple[int, ...]:
    """The indices, in the config's class set, of `dacs.feature_distance_classes` (Cityscapes
    class names; those the class set lacks, e.g. truck and train in SYNTHIA's 16, have no
    pixels to measure and are left out, as in DAFormer's SYNTHIA runs)."""
    from lsd_jax.data import classes

    wanted = tuple(config.dacs.feature_distance_classes)
    unknown = [name for name in wanted if name not in classes.CITYSCAPES_CLASSES]
    if unknown:
        raise ValueError(f"config.dacs.feature_distance_classes: {unknown} are not class names "
                         f"(expected some of {classes.CITYSCAPES_CLASSES})")
    names = classes.class_names(config.data.class_set)
    return tuple(names.index(name) for name in wanted if name in names)


def has_imagenet_weights(init) -> bool:
    """Whether config.init names weights F starts from (the feature distance's reference)."""
    return bool(init.resnet_weights or init.vgg16_weights or init.torch_f)


def check_feature_distance(config) -> None:
    """The feature distance compares F with F as ImageNet made it: refused, in one line,
    without ImageNet weights for F's backbone, when F starts from another run instead, or on
    FCN-8s, whose fc7 grid is not a downscaling of the image (DAFormer uses the backbone's
    last stage: DeepLab's layer4, LargeFOV's fc7, both at 1/8)."""
    init = config.init
    if config.model.backbone == "fcn8s_vgg16":
        raise ValueError("config.dacs.feature_distance_weight > 0 needs a DeepLab-v2 backbone "
                         "(config.model.backbone=deeplabv2_resnet101 or deeplabv2_vgg16): "
                         "FCN-8s's fc7 is not aligned with the labels")
    if not has_imagenet_weights(init):
        raise ValueError("config.dacs.feature_distance_weight > 0 compares F with its ImageNet "
                         "weights, and none are given: set config.init.resnet_weights (or "
                         "vgg16_weights, or torch_f to an ImageNet-trained DeepLab file)")
    for field in ("f_workdir", "f_file"):
        if init[field]:
            raise ValueError("config.dacs.feature_distance_weight > 0 compares F with its "
                             f"ImageNet weights, but config.init.{field} starts F from another "
                             "run: the frozen copy would be that run's F, not ImageNet's")


def check_block(block) -> None:
    """`config.dacs`'s values, or an error naming the field."""
    number = functools.partial(augmentation.check_number, block)
    augmentation.check_values(block)
    number("ema_alpha", 0.0, 1.0, closed_high=False)
    number("confidence_threshold", 0.0, 1.0)
    number("mic_mask_ratio", 0.0, 1.0, closed_high=False)
    number("mic_weight", 0.0, float("inf"), closed_high=False)
    number("feature_distance_weight", 0.0, float("inf"), closed_high=False)
    if block.pseudo_weight not in PSEUDO_WEIGHTS:
        raise ValueError(f"config.dacs.pseudo_weight={block.pseudo_weight!r}: expected one of "
                         f"{PSEUDO_WEIGHTS}")
    if not isinstance(block.augment_source, bool):
        raise ValueError(f"config.dacs.augment_source={block.augment_source!r}: expected True "
                         "or False")
    crop = tuple(block.pseudo_label_crop)
    if len(crop) != 2 or not all(isinstance(r, int) and r >= 0 for r in crop):
        raise ValueError(f"config.dacs.pseudo_label_crop={block.pseudo_label_crop!r}: expected "
                         "(top rows, bottom rows), each 0 or more")
    if not isinstance(block.mic_block_size, int) or block.mic_block_size < 1:
        raise ValueError(f"config.dacs.mic_block_size={block.mic_block_size!r}: expected a "
                         "positive number of pixels")


def check_batch(batch) -> None:
    base.check_batch(batch, with_target=True, with_image01=False, one_size=True)
    if batch["source_image"].shape != batch["target_image"].shape:
        raise ValueError(f"training batch: ClassMix pastes source pixels onto target images, "
                         f"so both need one shape; got source {batch['source_image'].shape} "
                         f"and target {batch['target_image'].shape}")


def student_loss(f, block, num_classes: int, variables: dict, teacher: base.NetState, batch,
                 key, imagenet: base.NetState | None = None, thing_classes: tuple[int, ...] = ()
                 ) -> tuple[jax.Array, tuple[dict, base.Params]]:
    """The student's loss (see the module docstring), its terms, and BatchNorm's running
    statistics after its passes (source, mixed, masked, each starting from the last's). With
    `feature_distance_weight` > 0, `imagenet` is the frozen ImageNet copy of F and
    `thing_classes` the label indices the distance is taken on."""
    def student(variables, image, dropout_key):
        """The student's outputs in training mode; the variables for its next pass (BatchNorm's
        running statistics as this pass left them)."""
        outputs, statistics = base.f_outputs(f, variables, image, train=True, key=dropout_key,
                                             update_statistics=True)
        return outputs, ({**variables, "batch_stats": statistics} if statistics
                         else variables)

    source_image = batch["source_image"]
    if block.augment_source:  # not DACS's: its source term sees the images as they are
        source_image = augmentation.strongly_augmented(
            jax.random.fold_in(key, _SOURCE_AUGMENT), source_image, block)
    source_outputs, variables = student(variables, source_image,
                                        base.f_dropout_key(key, "source"))
    terms = {"seg": losses.ce2d(source_outputs["score"], batch["source_label"], "mean")}
    extra = 0.0
    if block.feature_distance_weight > 0:
        features = base.output_names(f)[1]  # the backbone's last stage (layer4 / fc7)
        imagenet_outputs, _ = base.f_outputs(f, imagenet.variables(), source_image,
                                             train=False)
        student_features = source_outputs[features]
        labels = labels_of_features(batch["source_label"], student_features.shape[1:3],
                                    num_classes)
        terms["fd"] = feature_distance(student_features,
                                       jax.lax.stop_gradient(imagenet_outputs[features]),
                                       labels, jnp.asarray(thing_classes))
        extra = block.feature_distance_weight * terms["fd"]

    pseudo, confidence = pseudo_labels(f, teacher, batch["target_image"])
    fraction = confident_fraction(confidence, block.confidence_threshold)
    weight = confidence_weight(confidence, block.confidence_threshold, block.pseudo_weight)
    source01 = augmentation.image01(batch["source_image"])
    target01 = augmentation.image01(batch["target_image"])
    mixed01, mixed_labels, mask = classmix(jax.random.fold_in(key, _CLASSMIX), source01,
                                           target01, batch["source_label"], pseudo, num_classes)
    mixed01 = augmentation.strong_augment(jax.random.fold_in(key, _MIXED_AUGMENT), mixed01,
                                          block)
    mixed_outputs, variables = student(variables, augmentation.f_view(mixed01),
                                       jax.random.fold_in(key, _MIXED_DROPOUT))
    mixed_scores = mixed_outputs["score"]
    pseudo_weights = pseudo_label_weights(weight, pseudo.shape, tuple(block.pseudo_label_crop))
    terms["mix"] = weighted_ce(mixed_scores, mixed_labels, jnp.where(mask, 1.0, pseudo_weights))
    loss = terms["seg"] + terms["mix"] + extra
    if block.mic_weight > 0:
        masked01 = augmentation.strong_augment(jax.random.fold_in(key, _MASKED_AUGMENT),
                                               target01, block)
        keep = mic_mask(jax.random.fold_in(key, _MIC_MASK), pseudo.shape, block.mic_block_size,
                        block.mic_mask_ratio)
        masked = jnp.where(keep[..., None], augmentation.f_view(masked01), 0.0)
        masked_outputs, variables = student(variables, masked,
                                            jax.random.fold_in(key, _MASKED_DROPOUT))
        masked_scores = masked_outputs["score"]
        terms["mic"] = weighted_ce(masked_scores, pseudo, pseudo_weights)
        loss = loss + block.mic_weight * terms["mic"]
    statistics = variables.get("batch_stats", {})
    return loss, ({"loss": loss, **terms, "confident": fraction,
                   "mixed_source_fraction": jnp.mean(mask.astype(jnp.float32))}, statistics)


def student_update(f, tx, block, num_classes: int, states, batch, key,
                   thing_classes: tuple[int, ...] = ()):
    check_batch(batch)
    student, teacher = states["f"], states[TEACHER]
    grads, (metrics, statistics) = jax.grad(
        lambda p: student_loss(f, block, num_classes, student.variables(p), teacher, batch,
                               key, states.get(IMAGENET), thing_classes),
        has_aux=True)(student.params)
    new = base.apply_gradients(tx, student, grads).replace(batch_stats=statistics)
    return new, base.with_grad_norm(metrics, grads)


# ----------------------------------------------------------------------------- the method

def build(config) -> base.Method:
    block = config.dacs
    check_block(block)
    if config.update_mode != "alternating":
        raise ValueError(f"config.update_mode={config.update_mode!r}: dacs updates its teacher "
                         "from the student's new parameters after the student's step (DACS's "
                         "order); expected 'alternating'")
    f = base.segmentation_network(config)
    tx, learning_rates = source_only.optimizer_and_rates(config, "dacs")
    num_classes = config.num_classes
    with_fd = block.feature_distance_weight > 0
    if with_fd:
        check_feature_distance(config)
    thing_classes = thing_class_indices(config) if with_fd else ()
    copies = (IMAGENET,) if with_fd else ()

    def init(key):
        student = base.init_network(f, tx, base.init_keys(key)[0], base.example_image(),
                                    train=False)
        # The ImageNet copy is made again once config.init's weights are in F (copies_of_f).
        return {"f": student, TEACHER: base.average_copy(student),
                **{name: base.fixed_copy(student) for name in copies}}

    def output_shapes(states, image):
        shapes = base.f_output_shapes(f, states, image)
        return {"f": shapes, TEACHER: shapes, **{name: shapes for name in copies}}

    return base.Method(
        name="dacs_mic" if block.mic_weight > 0 else "dacs",
        networks={"f": f, TEACHER: f, **{name: f for name in copies}},
        updates={
            "f": lambda s, batch, key: student_update(f, tx, block, num_classes, s, batch, key,
                                                      thing_classes),
            TEACHER: lambda s, batch, key: ema_update(block.ema_alpha, s[TEACHER], s["f"]),
        },
        mode="alternating",
        init=init,
        predict=base.predict_scores(f),
        pictures=lambda states, batch: base.predictions(f, states, batch, ("source", "target")),
        learning_rates=learning_rates,
        output_shapes=output_shapes,
        reads_target=True,
        console_terms=("f/seg", "f/mix", *(("f/mic",) if block.mic_weight > 0 else ()),
                       *(("f/fd",) if with_fd else ()), "f/confident"),
        averages_of_f=(TEACHER,),
        copies_of_f=copies,
    )

