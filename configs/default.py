"""The reference hyperparameters (docs/methods.md, sections 2-4), shared by every other config.

Not meant to be run by itself: the experiment configs (gta.py, synthia.py, synthetic.py) start
from this one and set the data and the sizes. (It does run: on the embedded benchmark at full
width, which is slow on a CPU.)

The returned config is locked: setting a field that does not exist, in a config file or on the
command line (`--config.optim.f_llr=...`), is an error that names the closest existing field.
Imports neither TensorFlow nor JAX, so that benchmarks can load configs on any machine.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from lsd_jax.data.config import default_data_config


# What an experiment config's argument selects (`--config configs/gta.py:source_only`).
VARIANTS = ("lsd", "source_only", "target_only", "adaptsegnet", "adaptsegnet_multi",
            "adaptsegnet_ls", "advent", "minent", "adda", "grl", "confusion", "fcn_wild",
            "fcan_ran", "fcan", "dacs", "dacs_mic")

# The output-space variants: (method, that method's config fields set by the variant).
OUTPUT_SPACE_VARIANTS = {
    "adaptsegnet": ("adaptsegnet", {}),
    "adaptsegnet_multi": ("adaptsegnet", {"multi_level": True, "seg_aux_weight": 0.1,
                                          "adv_aux_weight": 0.0002}),
    "adaptsegnet_ls": ("adaptsegnet", {"gan": "ls", "adv_weight": 0.01}),
    "advent": ("advent", {"kind": "advent"}),
    "minent": ("advent", {"kind": "minent"}),
}

# The unified adversarial framework's variants (docs/methods.md, section 10): the fields of
# config.adversarial each sets, and the update mode.
ADVERSARIAL_VARIANTS = {
    # ADDA: untied, GAN loss on fc7, the target encoder from a source-trained F (init.f_workdir)
    # with C fixed; D 1024-512-2 with channel dropout, Adam 2e-4 (beta1 0.5), L2 2.5e-5.
    "adda": ({"tied": False, "mapping_loss": "gan", "seg_weight": 0.0, "adv_weight": 1.0},
             "simultaneous"),
    # One encoder trained on the source labels and against D: gradient reversal, or confusion.
    "grl": ({"tied": True, "mapping_loss": "minimax"}, "simultaneous"),
    "confusion": ({"tied": True, "mapping_loss": "confusion"}, "simultaneous"),
    # FCNs in the Wild: global alignment (confusion, 0.5 (L_D + L_Dinv), D 1024-1024-2 with
    # dropout) plus the size constraints (needs config.adversarial.size_statistics).
    "fcn_wild": ({"tied": True, "mapping_loss": "confusion", "d_hidden": (1024, 1024),
                  "d_channel_dropout": False, "size_weight": 1.0}, "alternating"),
    # FCAN's representation adaptation (RAN) alone: the ASPP discriminator on S's features,
    # max_S min_D (L_adv - 5 L_seg), alternating; fcan: the same on the AAN-adapted source.
    "fcan_ran": ({"tied": True, "mapping_loss": "minimax", "discriminator": "aspp",
                  "seg_weight": 5.0, "adv_weight": 1.0}, "alternating"),
}
ADVERSARIAL_VARIANTS["fcan"] = ADVERSARIAL_VARIANTS["fcan_ran"]


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """lsd: the method; source_only: the baseline (F+C on the source's labels alone);
    target_only: the oracle, F+C trained the same way on the target's own labels (an upper
    bound no adaptation method can use); adaptsegnet (single-level, BCE), adaptsegnet_multi,
    adaptsegnet_ls (LS-GAN), advent (AdvEnt), minent (MinEnt): the output-space methods with
    their reference weights, in their reference's simultaneous mode (docs/methods.md,
    section 8); adda, grl, confusion, fcn_wild, fcan_ran: settings of the unified adversarial
    framework (section 10); fcan: fcan_ran on the AAN-adapted source (section 11). Empty
    means lsd."""
    variant = variant or "lsd"
    if variant not in VARIANTS:
        raise ValueError(f"config argument {variant!r}: expected one of {VARIANTS} (as in "
                         "--config configs/gta.py:source_only)")
    if variant in OUTPUT_SPACE_VARIANTS:
        method, fields = OUTPUT_SPACE_VARIANTS[variant]
        config.method = method
        config.update_mode = "simultaneous"
        config[method].update(fields)
        config.data.source.flip = False  # their references do not flip
    if variant in ADVERSARIAL_VARIANTS:
        fields, mode = ADVERSARIAL_VARIANTS[variant]
        config.method = "adversarial"
        config.update_mode = mode
        config.adversarial.update(fields)
    if variant == "fcan":
        use_adapted_source(config)
    if variant in ("dacs", "dacs_mic"):
        config.method = "dacs"
        config.update_mode = "alternating"  # the teacher follows the student's new parameters
        config.data.source.flip = False     # DACS flips nothing
        if variant == "dacs_mic":
            config.dacs.mic_weight = 1.0
    if variant in ("source_only", "target_only"):
        config.method = "source_only"
    if variant == "target_only":
        # References, not copies: a later override of data.target (a config file's own
        # settings after this call, or --config.data.target.split=... on the command line)
        # reaches the oracle's training set too. The source's flip setting stays, and the
        # builder overrides are a copy (a reference to a dict field cannot be set to a dict).
        source, target = config.data.source, config.data.target
        for field in target.keys():
            if field == "config_overrides":
                source[field] = target[field].copy_and_resolve_references()
            elif field != "flip":
                source[field] = target.get_ref(field)
    return config


def use_adapted_source(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Train on the AAN-adapted copy of the source (FCAN): the copy's directory is given as
    --config.data.source.manual_dir (written by python -m lsd_jax.appearance_transfer with a
    variant of the same config that keeps the original source and :fcan's target, e.g.
    configs/synthetic.py:fcan_ran; not the file's default variant where it sets another target,
    as configs/synthetic.py's :demo does). Sizes, crops and flips stay the source's."""
    source = config.data.source
    source.name = f"appearance_adapted/{config.data.class_set}"
    source.split = "train"
    source.config_overrides = ml_collections.ConfigDict({"copy": ""})
    return config


# The variants the published DeepLab-v2 settings (configs/gta_deeplab.py, synthia_deeplab.py)
# offer. LSD's G needs FCN-8s's features.
DEEPLAB_VARIANTS = ("adaptsegnet_multi", "adaptsegnet", "adaptsegnet_ls", "advent", "minent",
                    "source_only", "target_only", "dacs", "daformer", "mic")


def use_published_deeplab_setting(config: ml_collections.ConfigDict, variant: str,
                                  source_size: tuple[int, int],
                                  advent_steps: int) -> ml_collections.ConfigDict:
    """AdaptSegNet's and ADVENT's published setting (docs/methods.md sections 8-9): DeepLab-v2
    ResNet-101 (four-branch ASPP, BatchNorm statistics of both domains in train mode), whole
    source images at `source_size` (H, W) without flips, whole 1024x512 Cityscapes targets,
    batch 1 + 1, the method's SGD / Adam and poly schedule, its reference iteration count."""
    if variant not in DEEPLAB_VARIANTS:
        raise ValueError(f"config argument {variant!r}: expected one of {DEEPLAB_VARIANTS} "
                         "(LSD's G needs the FCN-8s backbone: configs/gta.py, synthia.py)")
    config.model.backbone = "deeplabv2_resnet101"
    data = config.data
    data.batch_size = 1
    data.source.resize = tuple(source_size)
    data.source.crop = None
    use_cityscapes_target(config)
    config.train.eval_every = 5000
    # DAFormer's recipes are DACS's method with its strategies (MIC's: and masking).
    config = apply_variant(config, {"daformer": "dacs", "mic": "dacs_mic"}.get(variant, variant))
    if variant in ("source_only", "target_only"):
        # The references' baseline: S alone with their SGD and poly schedule, and as many
        # iterations as AdaptSegNet (unverified: neither paper gives its baseline's count).
        config.source_only.optimizer = "output_space_sgd"
        config.data.source.flip = False
        config.train.num_steps = 150_000
    if variant in ("dacs", "daformer", "mic"):
        use_published_dacs(config)
    if variant in ("daformer", "mic"):
        use_published_daformer(config)
    return use_reference_iterations(config, advent_steps)


def use_published_daformer(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """DAFormer's DeepLab-v2 recipe on top of DACS's setting (lhoyer/DAFormer; docs/methods.md
    section 12): AdamW 6e-5 (classifiers x10, weight decay 0.01), warmup over 1,500
    iterations, linear decay, 40k iterations; rare-class sampling (T 0.01; its statistics file
    is the run's to give: config.data.rcs.statistics); ImageNet feature distance 0.005 (needs
    ImageNet weights in config.init); teacher 0.999; colour jitter 0.2 with probability 0.2;
    pseudo-label crop of 15 and 120 rows; the ASPP's four branches (its DeepLab-v2 head).
    MIC (the :mic variant) adds masked image consistency, 32x32 blocks, ratio 0.7, weight 1."""
    config.model.aspp_branches = 4
    config.dacs.optimizer = "daformer_adamw"
    config.daformer_optim.poly_steps = 40_000
    config.train.num_steps = 40_000
    config.data.rcs.enabled = True
    config.data.rcs.temperature = 0.01
    block = config.dacs
    block.warmup_steps = 1500
    block.feature_distance_weight = 0.005
    block.ema_alpha = 0.999
    block.jitter_strength, block.jitter_probability = 0.2, 0.2
    block.pseudo_label_crop = (15, 120)
    block.mic_block_size, block.mic_mask_ratio = 32, 0.7
    return config


def use_published_dacs(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """DACS's published setting (vikolss/DACS, configs/configUDA.json; docs/methods.md section
    12): DeepLab-v2 ResNet-101 with the two ASPP branches its code sums (dilations 6 and 12),
    512x512 random crops of the 1280x720 source and of the 1024x512 target, no flips, batch
    2 + 2; S with the references' SGD (2.5e-4, classifiers at 10x, momentum 0.9, weight decay
    5e-4, poly 0.9 over 250k iterations), 250k iterations; teacher 0.99, threshold 0.968."""
    config.model.aspp_branches = 2
    data = config.data
    data.batch_size = 2
    data.source.crop = data.target.crop = (512, 512)
    data.source.flip = data.target.flip = False
    config.dacs.optimizer = "output_space_sgd"
    config.adaptsegnet.poly_steps = 250_000
    config.train.num_steps = 250_000
    return config


def use_reference_iterations(config: ml_collections.ConfigDict,
                             advent_steps: int) -> ml_collections.ConfigDict:
    """The output-space methods' iteration counts in their references: AdaptSegNet 150k,
    ADVENT `advent_steps` (120k from GTA5, 90k from SYNTHIA). Other methods: unchanged."""
    steps = {"adaptsegnet": 150_000, "advent": advent_steps}.get(config.method)
    if steps is not None:
        config.train.num_steps = steps
    return config


def use_cityscapes_target(config: ml_collections.ConfigDict,
                          held_out: int = 200) -> ml_collections.ConfigDict:
    """Cityscapes as the target at 1024x512 (GTA5 and SYNTHIA alike): adapt on the stored
    1024x512 train images except the last `held_out`, which stay labelled for model selection;
    evaluate on the full-resolution val set with logits from a 1024x512 input."""
    data = config.data
    data.target.name = "cityscapes_extracted/1024x512"
    data.target.split = f"train[:-{held_out}]"
    data.target.crop = (512, 1024)  # the whole (stored 1024x512) image
    data.eval.name = "cityscapes_extracted/full"
    data.eval.scale = (512, 1024)
    data.eval.batch_size = 8
    data.selection.name = "cityscapes_extracted/1024x512"
    data.selection.split = f"train[-{held_out}:]"
    data.selection.scale = (512, 1024)
    data.selection.batch_size = 8
    return config


def output_space_block(**fields) -> ml_collections.ConfigDict:
    """A method block with the optimisers AdaptSegNet and ADVENT share: S with SGD (momentum,
    coupled weight decay, classifiers at 10x), D with Adam; poly schedules over 250k steps."""
    return ml_collections.ConfigDict({
        **fields,
        "s_lr": 2.5e-4, "classifier_lr_mult": 10.0, "momentum": 0.9, "weight_decay": 5e-4,
        "d_lr": 1e-4, "d_b1": 0.9, "d_b2": 0.99,
        "poly_power": 0.9, "poly_steps": 250_000,
        # DAFormer's warmup of S's rates (not the references': 0 = none), linear from 1e-6 x
        # the rate over these steps, then the poly schedule; D keeps its own.
        "warmup_steps": 0,
    })


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # "lsd" (F+C, G and D adversarially), "source_only" (F+C with the segmentation loss alone),
    # "adaptsegnet" or "advent" (docs/methods.md, section 8; their blocks below), "adversarial"
    # (section 10).
    config.method = "lsd"
    config.seed = 1337  # the reference's seed
    config.num_classes = 19

    config.model = ml_collections.ConfigDict()
    # F+C: "fcn8s_vgg16" (LSD-seg's, every method), or for the output-space methods and the
    # baselines DeepLab-v2 "deeplabv2_resnet101" / "deeplabv2_vgg16" (LargeFOV), the published
    # comparison networks (docs/methods.md, section 6).
    config.model.backbone = "fcn8s_vgg16"
    # DeepLab's BatchNorm: "batch" statistics in training, the running ones updated by both
    # domains' passes, as the references train; or "frozen" running statistics.
    config.model.bn_statistics = "batch"
    # DeepLab's ASPP classifier: 4 branches summed, or 2 as the public AdaptSegNet code does.
    config.model.aspp_branches = 4
    # deeplabv2_resnet101's bottleneck blocks per stage (ResNet-50's would be 3, 4, 6, 3).
    config.model.resnet_blocks = (3, 4, 23, 3)
    config.model.width = 1.0        # multiplier on every channel count of F, G and D
    config.model.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (params stay f32)
    config.model.dropout_rate = 0.5  # fc6/fc7 channel dropout and the ResBlocks' dropout
    # Rematerialisation: recompute each VGG block / G stage in the backward pass instead of
    # keeping its activations (less memory, more compute; results unchanged).
    config.model.remat_f = False
    config.model.remat_g = False
    # XLA's plain pooling and (transposed) convolutions instead of the forms in models/layers.py
    # that are tuned for XLA:CPU (same parameters and results; see docs/performance.md).
    config.model.plain_kernels = False

    # "alternating": D steps, then G with the new D, then F with the new D and G.
    # "simultaneous": all three gradients from one forward pass at the start parameters.
    # (Every method with several updates: each sees the ones before it, or the start states.)
    config.update_mode = "alternating"

    config.loss = ml_collections.ConfigDict()
    config.loss.reduction = "sum"  # ce2d: "sum" over pixels / batch (reference) or "mean"
    config.loss.adv_weight = 0.1   # F: weight of the domain-confusion terms
    config.loss.c_weight = 0.1     # F: weight of D's class head on G(F(source))
    config.loss.g_adv_weight = 0.1  # G: weight of its real/fake terms
    config.loss.l1_weight = 1.0    # G: weight of the L1 reconstruction terms

    config.optim = ml_collections.ConfigDict()
    config.optim.f_lr = 1e-5
    config.optim.f_bias_lr_mult = 2.0  # F+C biases learn at 2x lr, as in the reference
    config.optim.f_b1 = 0.9
    config.optim.f_b2 = 0.999
    config.optim.lr_decay_steps = 23_800  # F's lr x lr_decay_factor every this many steps
    config.optim.lr_decay_factor = 0.1
    config.optim.gd_lr = 1e-4  # G and D: Adam, constant lr
    config.optim.gd_b1 = 0.7
    config.optim.gd_b2 = 0.999
    # DAFormer's warmup of F's rates for LSD and the adversarial family (not the references':
    # 0 = none), linear from 1e-6 x the rate over these steps; G's and D's keep theirs. The
    # baselines and DACS have their own (source_only.warmup_steps, dacs.warmup_steps).
    config.optim.warmup_steps = 0

    # The output-space methods' own blocks (docs/methods.md, section 8), their references'
    # values; `config.loss` and `config.optim` are LSD's (and the baselines'). S is F+C.
    config.adaptsegnet = output_space_block(
        multi_level=False,      # an auxiliary classifier (FCN-8s: on pool4) with its own D
        gan="bce",              # "bce" or "ls" (LS-GAN)
        seg_aux_weight=0.0,     # lambda_seg: the auxiliary source cross-entropy
        adv_weight=0.001,       # lambda_adv2: S's adversarial term on the main output
        adv_aux_weight=0.0,     # lambda_adv1: ... on the auxiliary output
    )
    config.advent = output_space_block(
        kind="advent",          # "advent" (D on self-information maps) or "minent" (no D)
        multi_level=True,
        seg_aux_weight=0.1,
        target_weight=0.001,    # S's target term (adversarial or entropy), main output
        target_aux_weight=0.0002,  # ... auxiliary output
    )

    # The unified adversarial framework (method "adversarial", docs/methods.md section 10):
    # D on S's features or class maps, tied or untied encoders, the mapping loss. S learns with
    # `config.optim` (LSD's and the baselines' Adam); the segmentation term is a per-pixel mean.
    # The source-only baseline (and the oracle): S's optimiser is that of the method it is the
    # baseline of, "lsd_adam" (config.optim) or "output_space_sgd" (config.adaptsegnet's SGD,
    # momentum, weight decay, 10x classifiers and poly schedule, as AdaptSegNet / ADVENT, with
    # their loss: the cross-entropy averaged over pixels, whatever config.loss.reduction says).
    # DAFormer's AdamW for DeepLab-v2 (a choice of source_only.optimizer / dacs.optimizer:
    # "daformer_adamw"): decoupled weight decay except on BatchNorm, the classifiers at 10x,
    # poly decay with power 1 (linear) to 0.
    config.daformer_optim = ml_collections.ConfigDict(dict(
        lr=6e-5, classifier_lr_mult=10.0, weight_decay=0.01, b1=0.9, b2=0.999,
        poly_power=1.0, poly_steps=40_000,
    ))
    config.source_only = ml_collections.ConfigDict(dict(
        optimizer="lsd_adam",
        warmup_steps=0,  # DAFormer's warmup: linear from 1e-6 x the rate over these steps
        # DACS's strong transform (config.dacs's colour jitter and blur) on the source images:
        # an option of the embedded benchmark's pre-training phase, off for every baseline.
        augment=False,
    ))

    # Self-training with a mean teacher (method "dacs", docs/methods.md section 12): DACS's
    # values, and MIC's masked image consistency (mic_weight > 0; the dacs_mic variant).
    config.dacs = ml_collections.ConfigDict(dict(
        # S's optimiser: "output_space_sgd" (DACS's: config.adaptsegnet's SGD 2.5e-4, momentum
        # 0.9, weight decay 5e-4, classifiers at 10x, poly 0.9), "lsd_adam" (config.optim) or
        # "daformer_adamw" (config.daformer_optim).
        optimizer="output_space_sgd",
        ema_alpha=0.99,         # the teacher's rate: min(1 - 1/(t + 1), ema_alpha)
        confidence_threshold=0.968,  # pseudo-labelled pixels weigh the fraction above this
        # "fraction" (DACS's): every pseudo-labelled pixel weighs that fraction; "pixel" (not
        # DACS's; FixMatch's mask): a pixel weighs 1 where its confidence reaches the
        # threshold, 0 elsewhere.
        pseudo_weight="fraction",
        jitter_strength=0.25, jitter_probability=0.8,  # the mixed images' colour jitter
        blur_probability=0.5, blur_sigma=(0.15, 1.15),  # ... and Gaussian blur
        # Then per-pixel Gaussian sensor noise (not DACS's: 0 = off), its std from U(noise_std)
        # on the 0-1 scale (0.1: 25.5 of 255).
        noise_probability=0.0, noise_std=(0.0, 0.1),
        # The same jitter and blur on the source term's images too (not DACS's: off by
        # default; ClassMix still pastes the source pixels as they are, then transforms).
        augment_source=False,
        mic_weight=0.0,         # MIC's masked image consistency (0 = off; dacs_mic: 1)
        mic_block_size=32,      # MIC's b at 512x512 crops (64 at HRDA's full resolution)
        mic_mask_ratio=0.7,     # the fraction of blocks masked
        # DAFormer's strategies (off by default): the optimiser's warmup, linear from 1e-6 x
        # the rate over these steps; pseudo-labelled pixels of the top and bottom rows weigh 0
        # (DAFormer: 15 and 120 of a 512x512 Cityscapes crop, the ego car and the margin).
        warmup_steps=0,
        pseudo_label_crop=(0, 0),
        # DAFormer's ImageNet feature distance (0 = off; DAFormer 0.005): the L2 distance
        # between F's and a frozen ImageNet copy's last-stage features on source images, over
        # the cells labelled with these classes. Needs ImageNet weights in config.init.
        feature_distance_weight=0.0,
        feature_distance_classes=("traffic light", "traffic sign", "person", "rider", "car",
                                  "truck", "bus", "train", "motorcycle", "bicycle"),
    ))

    config.adversarial = ml_collections.ConfigDict(dict(
        d_input="features",     # "features" (fc7; DeepLab ResNet: layer4) or "scores" (softmax)
        tied=True,              # one encoder for both domains; False: ADDA's untied encoders
        mapping_loss="gan",     # "gan" (inverted label), "confusion", "minimax" (reversal)
        seg_weight=1.0,         # source cross-entropy (untied: a safeguard through M_t, 0 = off)
        # The encoder's adversarial term. Tied: an unverified choice, AdaptSegNet's weight for
        # its output-space term (no segmentation reference gives one for features).
        adv_weight=0.001,
        d_gate=0.0,             # adversarial term only while D's accuracy > this (0 = always)
        discriminator="pixel",  # "pixel" (1x1 convs) or "aspp" (FCAN's, dilations 1-4)
        d_hidden=(1024, 512),   # pixel D's hidden widths (on scores, ADDA's are 512, 256)
        d_dropout=0.5,          # after each hidden ReLU
        d_channel_dropout=True,  # whole channels (Dropout2d), as ADDA's; False: single values
        d_lr=2e-4, d_b1=0.5, d_b2=0.999,  # ADDA's Adam
        d_weight_decay=2.5e-5,  # ADDA's L2 on D
        # FCNs in the Wild's category-specific term on the target (0 = off): the constrained
        # multiple-instance loss with the source's class size statistics, a file written once
        # by `python -m lsd_jax.size_constraints --config ... --output FILE`.
        size_weight=0.0,
        size_statistics=placeholder(str),
        size_slack_weight=2.0,  # price of lower-bound slack: at most exp(2) more mass (unverified)
        size_iterations=100,    # dual iterations per image, inside the compiled step
    ))

    # FCAN's appearance adaptation (AAN, docs/methods.md section 11): an offline stage,
    # `python -m lsd_jax.appearance_transfer --config ... --output DIR`, that writes an adapted
    # copy of data.source in data.target's appearance; the :fcan variant trains on such a copy.
    config.aan = ml_collections.ConfigDict(dict(
        layers=("conv1", "res2", "res3", "res4", "res5"),  # conv1, res2c, res3d, res4f, res5c
        content_weights=(1.0, 1.0, 1.0, 1.0, 1.0),  # w_s per layer (not given by the paper)
        style_weights=(1.0, 1.0, 1.0, 1.0, 1.0),    # w_t per layer (not given by the paper)
        alpha=1e-14,            # the style term's weight
        iterations=1000,
        step_size=10.0,         # w_i = step_size * (I - i) / I, grey levels per mean |g|
        batch_size=1,           # source images optimised together (equal sizes)
        resize=placeholder(tuple),  # (H, W) to adapt and store the source at; None = as stored
        max_target_images=placeholder(int),  # target images for the mean Grams; None = all
        # The feature network: ImageNet ResNet-50 from a Keras .h5/.keras file; None = a random
        # He-normal ResNet (see lsd_jax/appearance_transfer.py for what that is worth).
        weights=placeholder(str),
        resnet_blocks=(3, 4, 6, 3),
        width=1.0,              # channel multiplier (random features and tests only)
        start="noise",          # "noise" (the paper: white noise) or "source" (the image)
        seed=0,                 # the starting noise, and the random network's weights
    ))

    config.data = default_data_config()  # datasets, sizes, batch size: see docs/data.md

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 98_000  # iterations (one source + one target batch each)
    config.train.log_every = 50      # scalars and the console line every this many steps
    config.train.image_every = 1000  # picture summaries every this many steps (0 = never)
    config.train.eval_every = 5000   # periodic evaluation on data.selection (0 = never)
    # Also evaluate F as it starts (config.init's weights) on data.eval, before the first step
    # of a fresh run (results/eval_step_0.*): the figure an adapted F is compared with. With
    # --mode train_and_eval, the mode that evaluates on data.eval.
    config.train.eval_start = False
    # Every loss is checked for NaN/inf; the check waits for the device, so it runs on the
    # metrics gathered since the last check, at every log, checkpoint and evaluation.

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every = 2000     # save every this many steps, and at the end
    config.checkpoint.max_to_keep = 3  # the latest this many checkpoints are kept
    config.checkpoint.asynchronous = True  # write in the background while training goes on

    config.eval = ml_collections.ConfigDict()
    config.eval.step = placeholder(int)  # --mode eval: checkpoint step to evaluate; None = latest
    config.eval.num_images = 4       # eval pictures (prediction beside label) in the summaries
    config.eval.write_pngs = False   # --mode eval: also write colourised prediction PNGs
    config.eval.confusion_method = "scatter"  # "scatter" (CPU/GPU) or "matmul" (TPU)

    config.init = ml_collections.ConfigDict()
    # ImageNet VGG16 weights for F's backbone (a Keras .h5/.keras file, see README); None = He
    # initialisation, which is only good for small experiments.
    config.init.vgg16_weights = placeholder(str)
    # ImageNet ResNet-101 weights for a deeplabv2_resnet101 backbone (a Keras .h5/.keras file
    # of keras.applications.ResNet101, see README); None = N(0, 0.01).
    config.init.resnet_weights = placeholder(str)
    # PyTorch LSD-seg state_dicts (reference parameter names: docs/methods.md, section 2) to
    # start F, G, D from. With a DeepLab backbone, torch_f is an AdaptSegNet / ADVENT DeepLab
    # state_dict (section 9): their released models, or the initialisation they start from.
    config.init.torch_f = placeholder(str)
    config.init.torch_g = placeholder(str)
    config.init.torch_d = placeholder(str)
    # Another run's workdir whose F (parameters only, not its optimizer state) starts this run,
    # e.g. a source-only pre-training run that several methods then start from; its latest
    # checkpoint unless init.f_step names one.
    config.init.f_workdir = placeholder(str)
    config.init.f_step = placeholder(int)
    # The same from one file: an .npz of F's variables written by `python -m lsd_jax.export`
    # (e.g. the demo's pre-trained F, configs/demo/README.md).
    config.init.f_file = placeholder(str)

    config.lock()
    return config
