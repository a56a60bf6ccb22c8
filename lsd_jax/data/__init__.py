"""Data: class sets and label maps (`classes`, numpy only), TFDS builders (`datasets`) and the
tf.data input pipeline (`pipeline`).

Importing this package does not import TensorFlow: `lsd_jax.data.classes` is numpy only, and
`lsd_jax.data.datasets` / `lsd_jax.data.pipeline` (which need TensorFlow and TFDS) are imported
explicitly by the code that reads data.
"""
