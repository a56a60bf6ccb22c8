"""SYNTHIA-RAND-CITYSCAPES -> Cityscapes: 16 classes trained and reported, plus the 13-class
score of the same model (docs/methods.md, sections 5-6), at 1024x512.

    python -m lsd_jax.main --config configs/synthia.py --workdir runs/synthia \
        --config.init.vgg16_weights=/path/to/vgg16_weights_tf_dim_ordering_tf_kernels.h5
    python -m lsd_jax.main --config configs/synthia.py --workdir runs/synthia --mode eval
    python -m lsd_jax.main --config configs/synthia.py:source_only --workdir runs/synthia_so
    python -m lsd_jax.main --config configs/synthia.py:advent --workdir runs/synthia_advent
        (likewise :adaptsegnet, :adaptsegnet_multi, :adaptsegnet_ls, :minent)

The output-space variants (docs/methods.md, section 8) run on FCN-8s with LSD's data settings
and their references' weights, optimisers and iteration counts (AdaptSegNet 150k, ADVENT 90k);
their published numbers are for DeepLab-v2 ResNet-101 (13 classes: AdaptSegNet multi-level
46.7; AdvEnt 47.6), not this network.

Data (see docs/data.md): `synthia/16` (source, random 1024x512 crops of the 1280x760 frames), `cityscapes_extracted/1024x512` (target),
`cityscapes_extracted/full` (evaluation; Cityscapes labels mapped to the 16 classes). Model
selection on the last 200 Cityscapes train images, never the val set.

Sized for: like configs/gta.py (one accelerator, 1+1 images of 1024x512 per step).
Expected result (published, VGG16 FCN-8s, 16 classes): LSD 36.1 mIoU, source-only about 26.8.
Not yet reproduced by this project: no run of this config has been measured here.
"""

import ml_collections

from lsd_jax.config_files import load_sibling


def get_config(variant: str = "lsd") -> ml_collections.ConfigDict:
    default = load_sibling(__file__)
    config = default.get_config()
    config.num_classes = 16
    data = config.data
    data.class_set = "synthia16"
    data.batch_size = 1
    data.source.name = "synthia/16"
    data.source.crop = (512, 1024)
    default.use_cityscapes_target(config)
    config.train.eval_every = 5000
    return default.use_reference_iterations(default.apply_variant(config, variant), 90_000)
