"""GTA5 -> Cityscapes (19 classes) at the paper's 1024x512, VGG16 FCN-8s from ImageNet weights.

    python -m lsd_jax.main --config configs/gta.py --workdir runs/gta \
        --config.init.vgg16_weights=/path/to/vgg16_weights_tf_dim_ordering_tf_kernels.h5
    python -m lsd_jax.main --config configs/gta.py --workdir runs/gta --mode eval
    python -m lsd_jax.main --config configs/gta.py:source_only --workdir runs/gta_source_only
    python -m lsd_jax.main --config configs/gta.py:target_only --workdir runs/gta_oracle
    python -m lsd_jax.main --config configs/gta.py:adaptsegnet --workdir runs/gta_adaptsegnet
        (likewise :adaptsegnet_multi, :adaptsegnet_ls, :advent, :minent)

The output-space variants (docs/methods.md, section 8) run here on FCN-8s with LSD's data
settings (1024x512 source crops, no flip), their references' weights, optimisers and iteration
counts (AdaptSegNet 150k, ADVENT 120k); their published numbers are for DeepLab-v2 backbones
at other sizes (GTA5 -> Cityscapes, ResNet-101: AdaptSegNet 41.4 single-level, 42.4
multi-level; MinEnt 42.3, AdvEnt 43.8), so they are not expected here.

Data (prepared once, see docs/data.md): `gta5/1280x720_jpeg` (source, random 1024x512 crops),
`cityscapes_extracted/1024x512` (target, whole images), `cityscapes_extracted/full` (evaluation
on the 500 val images, logits upsampled to 2048x1024). Model selection: the last 200 Cityscapes
train images (labelled, left out of the target's training images), never the val set.

Sized for: one accelerator with at least 40 GB per global batch of 1+1 images at 1024x512 (the
reference's batch); scale data.batch_size with the number of chips. Reference hyperparameters
(docs/methods.md, section 4): ~98k iterations, F's lr x0.1 every 23,800.
Expected result (published, VGG16 FCN-8s): LSD 37.1 mIoU, source-only about 29.6. Not yet
reproduced by this project: no run of this config has been measured here.
"""

import ml_collections

from lsd_jax.config_files import load_sibling


def get_config(variant: str = "lsd") -> ml_collections.ConfigDict:
    default = load_sibling(__file__)
    config = default.get_config()
    data = config.data
    data.batch_size = 1
    data.source.name = "gta5/1280x720_jpeg"
    data.source.crop = (512, 1024)
    default.use_cityscapes_target(config)
    config.train.eval_every = 5000
    return default.use_reference_iterations(default.apply_variant(config, variant), 120_000)
