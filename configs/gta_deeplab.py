"""GTA5 -> Cityscapes as AdaptSegNet and ADVENT published it: DeepLab-v2 ResNet-101, whole
1280x720 source images, whole 1024x512 target images, batch 1 + 1 (docs/methods.md, 8-9).

    python -m lsd_jax.main --config configs/gta_deeplab.py:adaptsegnet_multi \
        --workdir runs/gta_adaptsegnet_multi \
        --config.init.torch_f=/path/to/DeepLab_resnet_pretrained_init-f81d91e8.pth
    python -m lsd_jax.main --config configs/gta_deeplab.py:advent --workdir runs/gta_advent \
        --config.init.torch_f=/path/to/DeepLab_resnet_pretrained_imagenet.pth
        (likewise :adaptsegnet, :adaptsegnet_ls, :minent, :source_only, :target_only, :dacs;
        ImageNet weights from Keras instead:
        --config.init.resnet_weights=/path/to/resnet101_weights_tf_dim_ordering_tf_kernels.h5)

| variant | reference's iterations (stop; poly over 250k) | published mIoU (Cityscapes val) |
|---|---|---|
| `adaptsegnet` | 150,000 | 41.4 (single-level) |
| `adaptsegnet_multi` | 150,000 | 42.4 |
| `adaptsegnet_ls` | 150,000 | 44.1 (LS-GAN, single-level) |
| `minent` | 120,000 | 42.3 |
| `advent` | 120,000 | 43.8 |
| `source_only` | 150,000 (unverified: no paper gives it) | 36.6 (the baseline of both papers) |
| `target_only` | 150,000 | the oracle: S on Cityscapes' own labels |
| `dacs` | 250,000 (DACS: 512x512 crops, batch 2 + 2, two ASPP branches) | 52.1 |
| `daformer` | 40,000 (DAFormer's DeepLab-v2 recipe: AdamW, warmup, RCS, FD, crop) | 56.0 (DACS in it: 54.2) |
| `mic` | 40,000 (the same with masked image consistency) | not in these notes |

`:daformer` and `:mic` need ImageNet weights (`--config.init.resnet_weights=...`, for the
feature distance) and the source's class statistics for rare-class sampling, written once:

    python -m lsd_jax.data.rare_class --config configs/gta_deeplab.py:daformer \
        --output runs/gta_rcs.json
    python -m lsd_jax.main --config configs/gta_deeplab.py:daformer --workdir runs/gta_daformer \
        --config.init.resnet_weights=/path/to/resnet101_weights_tf_dim_ordering_tf_kernels.h5 \
        --config.data.rcs.statistics=runs/gta_rcs.json

S: SGD (momentum 0.9, weight decay 5e-4, lr 2.5e-4, classifiers 10x), D: Adam 1e-4 (0.9, 0.99),
poly 0.9; the baselines train S alone with the same SGD (`config.source_only.optimizer`). AdaptSegNet started from a COCO-trained DeepLab (`..._init-f81d91e8.pth`, its
`layer5` skipped), ADVENT from an ImageNet one; the ImageNet-only start costs about 1.4 mIoU
(docs/methods.md section 9). The public codes sum only two ASPP branches (a `return` inside
the loop) and their released models were trained so: `--config.model.aspp_branches=2`
reproduces that; the default is the four branches the papers describe.

Data (prepared once, docs/data.md): `gta5/1280x720` (whole images; `gta5/1280x720_jpeg` decodes
faster), `cityscapes_extracted/1024x512` (target, the last 200 train images held out, labelled,
for model selection), `cityscapes_extracted/full` (evaluation on val, logits from a 1024x512
input upsampled to 2048x1024).

Time per iteration on a CPU at small sizes: docs/performance.md (benchmarks/step_time.py
--config configs/gta_deeplab.py:VARIANT measures it on the machine at hand). The self-training
variants have been started on random files in the real formats (benchmarks/published_start.py:
two steps, a checkpoint, the evaluations; docs/results.md); no full run of this config has
been measured by this project.
"""

import ml_collections

from lsd_jax.config_files import load_sibling

VARIANTS = ("adaptsegnet_multi", "adaptsegnet", "adaptsegnet_ls", "advent", "minent",
            "source_only", "target_only", "dacs", "daformer", "mic")


def get_config(variant: str = "adaptsegnet_multi") -> ml_collections.ConfigDict:
    default = load_sibling(__file__)
    config = default.get_config()
    config.data.source.name = "gta5/1280x720"
    return default.use_published_deeplab_setting(config, variant, (720, 1280), 120_000)
