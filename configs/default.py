"""SPEC's reference hyperparameters, shared by every other config.

Not meant to be run by itself: the experiment configs (gta.py, synthia.py, synthetic.py) start
from this one and set the data and the sizes.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # "lsd" (F+C, G and D adversarially) or "source_only" (F+C with the segmentation loss alone).
    config.method = "lsd"
    config.seed = 1337  # the reference's seed
    config.num_classes = 19

    config.model = ml_collections.ConfigDict()
    config.model.width = 1.0        # multiplier on every channel count of F, G and D
    config.model.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (params stay f32)
    config.model.dropout_rate = 0.5  # fc6/fc7 channel dropout and the ResBlocks' dropout

    # "alternating": D steps, then G with the new D, then F with the new D and G.
    # "simultaneous": all three gradients from one forward pass at the start parameters.
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
    return config
