"""The embedded benchmark: LSD on procedural street scenes, sized for a 2-core CPU.

    python -m lsd_jax.main --config configs/synthetic.py --workdir runs/demo
    python -m lsd_jax.main --config configs/synthetic.py:source_only --workdir runs/demo_so
    python -m lsd_jax.main --config configs/synthetic.py:target_only --workdir runs/demo_oracle

Source: `synthetic_scenes/source` (flat "game" colours); target: `synthetic_scenes/target`
(photographic colours, lighting, texture, noise, blur), both 128x256, generated on first use
(about 20 s per domain on one core, no download). F, G and D at 1/16 of the reference widths,
trained from scratch (no VGG weights), so the learning rates are higher than the reference's.

Sized for a 2-core CPU. Expected time and result: see the table in README.md ("The embedded
demo"), measured with exactly the commands above.

Model selection evaluates a held-out labelled slice of target *train* (never the target
validation set, which results are reported on); that slice is left out of the target's
training images.
"""

import ml_collections

from lsd_jax.config_files import load_sibling

HELD_OUT = 100  # target train scenes kept for model selection (of 1,000)


def get_config(variant: str = "lsd") -> ml_collections.ConfigDict:
    default = load_sibling(__file__)
    config = default.get_config()
    config.model.width = 1 / 16
    config.optim.f_lr = 3e-4
    config.optim.gd_lr = 2e-4
    config.optim.lr_decay_steps = 0  # constant: the run is short

    data = config.data
    data.batch_size = 2
    # Random 64x128 crops of the 128x256 scenes: 4x cheaper steps, same scale; evaluation sees
    # whole scenes (F works at any size).
    data.source.crop = (64, 128)
    data.target.crop = (64, 128)
    data.target.split = f"train[:-{HELD_OUT}]"
    data.selection.name = "synthetic_scenes/target"
    data.selection.split = f"train[-{HELD_OUT}:]"
    data.eval.scale = data.selection.scale = (128, 256)

    config.train.num_steps = 300
    config.train.log_every = 25
    config.train.image_every = 150
    config.train.eval_every = 150
    config.checkpoint.every = 150
    return default.apply_variant(config, variant)
