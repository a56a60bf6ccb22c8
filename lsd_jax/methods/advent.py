"""ADVENT (docs/methods.md, section 8.3): entropy minimisation, direct or adversarial.

AdaptSegNet's machine (`adaptsegnet.py`: S, the fully convolutional D, the optimisers and the
update functions) with S's target term changed:

    kind "advent": D sees the self-information maps -P log2(P) / log2(C) instead of P.
    kind "minent": no D; S minimises the normalised entropy of its target predictions.

`config.advent` holds the reference's values (configs/default.py): multi-level (on FCN-8s the
auxiliary classifier is on pool4), weights 0.1 (auxiliary cross-entropy), 0.001 and 0.0002
(the main and auxiliary target terms, for both kinds), BCE.
"""

from lsd_jax import output_space
from lsd_jax.methods import adaptsegnet, base

KINDS = ("advent", "minent")


def build_parts(config) -> adaptsegnet.Parts:
    block = config.advent
    base.check_choice("advent.kind", block.kind, KINDS)
    adaptsegnet.check_block(block, "advent", ("seg_aux_weight", "target_weight",
                                              "target_aux_weight"))
    adversarial = block.kind == "advent"
    return adaptsegnet.Parts(
        s=base.segmentation_network(config, block.multi_level),
        d=adaptsegnet.discriminator(config) if adversarial else None,
        s_tx=adaptsegnet.warmed_up_s_optimizer(block),
        d_tx=adaptsegnet.d_optimizer(block) if adversarial else None,
        gan="bce",
        weights=adaptsegnet.Weights(block.seg_aux_weight, block.target_weight,
                                    block.target_aux_weight),
        multi_level=bool(block.multi_level),
        d_input=output_space.self_information if adversarial else None,
        direct_term=None if adversarial else output_space.entropy_loss,
    )


def build(config) -> base.Method:
    return adaptsegnet.method_from_parts("advent", config, build_parts(config), config.advent)
