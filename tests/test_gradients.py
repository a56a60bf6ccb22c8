"""Gradients where they are used: networks and whole iterations, compiled, against references.

A gradient rewrite can pass a unit test of its own and still be wrong where it runs: the first
custom max-pool VJP routed each window's gradient by float equality between its input and its
saved output, and under `jit` XLA recomputed the input with another rounding, so whole windows
lost their gradient in every training run (its own test pooled an input array directly, where
nothing could be recomputed). So every check here differentiates whole networks and whole
compiled iterations and compares

- `jit(grad)` with eager `grad` (op by op, nothing recomputed or fused),
- the float32 gradient with the same function evaluated in float64,
- the CPU-tuned kernels of `models/layers.py` with XLA's plain operations, both in float64,
  where rounding cannot hide a difference in what they compute. (In float32 the two differ by
  their rounding alone, and how much depends on the CPU's kernels: 3e-6 of a tensor on one
  machine, 2e-3 on another; the float32 error that matters, against float64, is bounded above.)

Inputs are continuous random values: with flat image regions, windows of the max-pools hold
exact ties, and which member of a tie gets the gradient legitimately depends on rounding.

Errors are per parameter tensor, relative to that tensor's largest reference element. Measured
float32 noise (float32 against float64, at width 1/8): at most 2e-5 in any tensor. The
tolerance, 1e-3, sits well above that and below the 3e-3 reported for a PyTorch float32 run of
the same iteration; the defect above gave errors of 1e-1 and more.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from lsd_jax import methods
from lsd_jax.methods import lsd
from lsd_jax.models import Discriminator, FCN8s, Generator
from lsd_jax.models import layers
from lsd_jax.models.generator import G_STAGES

pytestmark = pytest.mark.slow  # compiled and eager gradients of whole networks, float64 included

TOLERANCE = 1e-3  # of the largest element of each gradient tensor
FLOAT64_TOLERANCE = 1e-9  # between two float64 evaluations (measured: 7e-15)
FULL_WIDTH_TOLERANCE = 2e-5  # float32 against float64 at full width, kinks aligned (measured: 1.4e-6)
HEIGHT, WIDTH, CLASSES = 32, 64, 19  # the iteration checks' size too: eager programs are shared
# Network width multiplier. Whether XLA recomputes a value for the backward pass depends on
# the sizes it fuses: at 1/16 the float-equality pool above happened to stay exact, at 1/8 and
# wider D's kernel gradients were off by 10-24% (jit against eager).
NETWORK_WIDTH = 1 / 8


def _is_cancelled_by_instance_norm(path: str) -> bool:
    """A conv bias followed by InstanceNorm: its exact gradient is zero (the norm removes any
    per-channel constant), so only rounding noise is left to compare."""
    return "bias" in path and ("conv_layer" in path or "stem" in path)


def relative_errors(grads, reference) -> dict[str, float]:
    """max |grads - reference| per tensor, over the tensor's largest reference element (over
    the network's largest, for tensors whose exact gradient is zero)."""
    flat = {jax.tree_util.keystr(p): np.asarray(x, np.float64)
            for p, x in jax.tree_util.tree_leaves_with_path(grads)}
    ref = {jax.tree_util.keystr(p): np.asarray(x, np.float64)
           for p, x in jax.tree_util.tree_leaves_with_path(reference)}
    assert flat.keys() == ref.keys()
    largest = max(np.abs(r).max() for r in ref.values())
    errors = {}
    for name, r in ref.items():
        scale = largest if _is_cancelled_by_instance_norm(name) else np.abs(r).max()
        errors[name] = float(np.abs(flat[name] - r).max() / max(scale, 1e-30))
    return errors


def assert_close(grads, reference, what: str, tolerance: float = TOLERANCE) -> None:
    errors = relative_errors(grads, reference)
    bad = {k: f"{v:.2e}" for k, v in errors.items() if not v <= tolerance}
    assert not bad, f"{what}: gradient tensors off by more than {tolerance:.0e}: {bad}"


def to_float64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64)
                        if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


# ----------------------------------------------------------------------------- networks

def _features_like_f(key, width):
    f = FCN8s(CLASSES, width, dropout_rate=0.0)
    shapes = jax.eval_shape(lambda: f.init_with_output(
        jax.random.key(0), jnp.zeros((1, HEIGHT, WIDTH, 3)), train=False)[0])[1:]
    keys = jax.random.split(key, len(shapes))
    return tuple(jax.random.uniform(k, s.shape, jnp.float32) for k, s in zip(keys, shapes))


def network_case(name: str, width: float, dtype=jnp.float32, plain: bool = False):
    """(module, inputs) for F, G or D with dropout off, at a small size."""
    key = jax.random.key(7)
    if name == "F":
        image = jax.random.uniform(key, (1, HEIGHT, WIDTH, 3), minval=-120, maxval=130)
        return FCN8s(CLASSES, width, 0.0, dtype, plain_kernels=plain), (image,)
    if name == "G":
        return Generator(width, 0.0, dtype, plain_kernels=plain), _features_like_f(key, width)
    image = jax.random.uniform(key, (1, HEIGHT, WIDTH, 3))
    return Discriminator(CLASSES, width, 0.0, dtype, plain_kernels=plain), (image,)


@functools.cache
def network_setup(name: str, width: float = NETWORK_WIDTH):
    """Initial variables, inputs and a loss with random output weights for one network."""
    module, inputs = network_case(name, width)
    variables = module.init(jax.random.key(1), *inputs, train=False)
    outputs = jax.eval_shape(lambda: module.apply(variables, *inputs, train=False))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    cotangents = tuple(jax.random.normal(jax.random.key(i), o.shape) for i, o in
                       enumerate(outputs))
    return variables, inputs, cotangents


def loss_fn(module, variables, inputs, cotangents):
    """The network's outputs dotted with fixed random weights, as a function of its params."""
    def loss(params):
        outputs = module.apply({**variables, "params": params}, *inputs, train=False)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return sum(jnp.vdot(o.astype(c.dtype), c) for o, c in zip(outputs, cotangents))
    return loss


def network_grads(name: str, *, dtype=jnp.float32, plain=False, compiled=True):
    module, _ = network_case(name, NETWORK_WIDTH, dtype, plain)
    variables, inputs, cotangents = network_setup(name)
    if dtype == jnp.float64:
        variables, inputs, cotangents = to_float64((variables, inputs, cotangents))
    grad = jax.grad(loss_fn(module, variables, inputs, cotangents))
    if compiled:
        return jax.jit(grad)(variables["params"])
    with jax.disable_jit():
        return grad(variables["params"])


@functools.cache
def unpatched_network_grads(name: str, *, dtype=jnp.float32, plain=False, compiled=True):
    """network_grads as NumPy arrays, computed once for the tests that leave the layers as they
    are (each evaluation is a trace and a lowering of a whole network's gradient)."""
    return jax.tree.map(np.asarray, network_grads(name, dtype=dtype, plain=plain,
                                                  compiled=compiled))


NETWORKS = ("F", "G", "D")


@pytest.mark.parametrize("name", NETWORKS)
def test_compiled_network_gradient_equals_eager(name):
    """20-35 s: the network's gradient compiled, then op by op (each operation compiled on
    its own)."""
    assert_close(unpatched_network_grads(name), unpatched_network_grads(name, compiled=False),
                 f"{name}: jit(grad) against eager grad")


@pytest.mark.parametrize("name", NETWORKS)
def test_compiled_float32_network_gradient_matches_float64(name):
    with jax.enable_x64(True):
        reference = unpatched_network_grads(name, dtype=jnp.float64)
    assert_close(unpatched_network_grads(name), reference, f"{name}: float32 against float64")


@pytest.mark.parametrize("name", NETWORKS)
def test_cpu_tuned_kernels_match_plain_xla_operations_in_compiled_gradients(name):
    """Im2col fc6/fc7, col2im and sub-pixel transposed convolutions and both pools against
    reduce_window and conv_general_dilated, differentiated through the whole network."""
    with jax.enable_x64(True):
        assert_close(unpatched_network_grads(name, dtype=jnp.float64),
                     unpatched_network_grads(name, dtype=jnp.float64, plain=True),
                     f"{name}: tuned kernels against plain XLA, float64", FLOAT64_TOLERANCE)


DEFAULT_PHASE_LIMIT = layers.NARROW_PHASE_CHANNELS  # the test below patches the module's


@pytest.mark.parametrize("phase_matmul_channels", [DEFAULT_PHASE_LIMIT, 10**9])
def test_accelerator_forms_match_plain_xla_operations_in_compiled_gradients(
        monkeypatch, phase_matmul_channels):
    """On a GPU, G's to_image (and, given a wider limit, every strided transposed convolution)
    computes its phase convolution as a matrix product; the same checks, run here by making
    the layers believe they are on an accelerator. With the default limit only the choice of
    layers is checked (traced, not compiled): the wide limit computes every layer as a
    product, to_image's as with the default, and its gradients are compared."""
    monkeypatch.setattr(layers, "on_accelerator", lambda: True)
    monkeypatch.setattr(layers, "NARROW_PHASE_CHANNELS", phase_matmul_channels)
    phase_products = []
    im2col = layers.conv_valid_im2col
    monkeypatch.setattr(layers, "conv_valid_im2col",
                        lambda x, k: phase_products.append(k.shape) or im2col(x, k))
    with jax.enable_x64(True):
        module, _ = network_case("G", NETWORK_WIDTH, jnp.float64)
        variables, inputs, cotangents = to_float64(network_setup("G"))
        jax.make_jaxpr(jax.grad(loss_fn(module, variables, inputs, cotangents)))(
            variables["params"])
        # to_image's 2 x 2 phases of 3 channels, 4 x 4 taps over G's last 64 * width maps.
        assert (4, 4, layers.scaled(64, NETWORK_WIDTH), 12) in phase_products
        # G's stride-2 layers (up2-up5, to_image; up1 has stride 1) with at most that many
        # phase outputs (2 x 2 phases of c channels), all five with the wide limit, are
        # products; the others are not. (F's layers use products too: its conv1_1 and fc6/fc7
        # always, its frozen upsamplings with the wide limit.)
        ngf = layers.scaled(64, NETWORK_WIDTH)
        outputs = [ngf * mult for _, s, _, mult in G_STAGES if s == 2] + [3]
        product_outputs = {shape[-1] for shape in phase_products}
        assert [4 * c in product_outputs for c in outputs] == [
            4 * c <= phase_matmul_channels for c in outputs]
        if phase_matmul_channels == DEFAULT_PHASE_LIMIT:
            return
        assert_close(network_grads("G", dtype=jnp.float64),
                     network_grads("G", dtype=jnp.float64, plain=True),
                     "G: accelerator forms against plain XLA, float64", FLOAT64_TOLERANCE)
    assert_close(network_grads("G"), network_grads("G", compiled=False),
                 "G: accelerator forms, jit(grad) against eager grad")


def test_pool_gradient_goes_to_the_first_maximum_of_a_tie():
    """PyTorch's rule: a tied window gives its whole gradient to its first maximum (row-major)."""
    x = jnp.array([[1.0, 3.0], [3.0, 3.0]]).reshape(1, 2, 2, 1)
    for pool in (layers.max_pool_ceil, layers.max_pool_floor):
        g = jax.jit(jax.grad(lambda x: jnp.sum(pool(x))))(x)
        np.testing.assert_array_equal(g.reshape(2, 2), [[0.0, 1.0], [0.0, 0.0]])


# ----------------------------------------------------------------------------- iterations

def recording_sgd(learning_rate: float) -> optax.GradientTransformation:
    """Plain SGD whose state is the last gradient it was given, so that a compiled iteration
    shows the gradients it computed."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(lambda g: -learning_rate * g, grads),
                                           grads))


def iteration_method(mode: str, dtype: str = "float32") -> methods.Method:
    config = default.get_config()
    config.model.width = NETWORK_WIDTH
    config.model.dtype = dtype
    config.model.dropout_rate = 0.0  # float64 would draw other masks
    config.update_mode = mode
    nets = lsd.build_networks(config)
    # A small step, so that "alternating" evaluates G and F at a new D (and G) that is still
    # close to the old one: a large one would amplify rounding differences chaotically.
    sgd = recording_sgd(1e-6)
    return lsd.build(config, dataclasses.replace(nets, f_tx=sgd, g_tx=sgd, d_tx=sgd))


@functools.cache
def initial_states():
    return iteration_method("alternating").init(jax.random.key(0))


def iteration_batch(labelled: bool):
    keys = jax.random.split(jax.random.key(5), 3)
    image01 = jax.random.uniform(keys[0], (2, 1, 32, 64, 3))
    labels = jax.random.randint(keys[1], (1, 32, 64), 0, CLASSES)
    labels = jnp.where(jax.random.uniform(keys[2], labels.shape) < 0.1, 255, labels)
    if not labelled:
        labels = jnp.full_like(labels, 255)
    return {"source_image": image01[0] * 255 - 117.0, "source_image01": image01[0],
            "source_label": labels.astype(jnp.int32),
            "target_image": image01[1] * 255 - 117.0, "target_image01": image01[1]}


def iteration_grads(mode: str, batch, *, dtype="float32", how="composed"):
    """The gradients of D, G and F computed by one whole iteration: compiled as one step
    ("composed"), as three ("separate") or op by op ("eager")."""
    method = iteration_method(mode, dtype)
    states = initial_states()
    if dtype == "float64":
        states, batch = to_float64((states, batch))
        states = {name: dataclasses.replace(s, opt_state=jax.tree.map(jnp.zeros_like, s.params))
                  for name, s in states.items()}
    key = jax.random.key(3)
    if how == "composed":
        new, _ = methods.compile_method(method, donate=False).step(states, batch, key)
    elif how == "separate":
        new, _ = methods.compile_method(method, donate=False).separate_step(states, batch, key)
    else:
        with jax.disable_jit():
            new, _ = methods.run_iteration(method.updates, mode, states, batch, key)
    return {name: jax.tree.map(np.asarray, new[name].opt_state) for name in "dgf"}


# Each mode once, each labelling once: a case costs minutes of compiling at NETWORK_WIDTH.
@pytest.mark.parametrize("mode,labelled", [("alternating", True), ("simultaneous", False)],
                         ids=["alternating-labelled", "simultaneous-adversarial_only"])
def test_compiled_iteration_gradients_match_eager_and_float64(mode, labelled):
    """The whole iteration compiled as one step (as training runs it) against eager and float64,
    for every network (the separately compiled updates give the same result as the composed
    step: test_steps). Without labels F's gradient is its adversarial part alone (through G and
    D), which the segmentation loss would otherwise dominate."""
    batch = iteration_batch(labelled)
    composed = iteration_grads(mode, batch)
    eager = iteration_grads(mode, batch, how="eager")
    with jax.enable_x64(True):
        # Through the three updates compiled one by one, which both modes run (the composed
        # step equals them: test_steps), so the second case loads them from the cache.
        reference = iteration_grads(mode, batch, dtype="float64", how="separate")
    for name in "dgf":
        assert_close(composed[name], eager[name], f"{mode} {name}: composed step against eager")
        assert_close(composed[name], reference[name], f"{mode} {name}: float32 against float64")


# ----------------------------------------------------------------------------- full width

class KinkSides:
    """The branch every LeakyReLU element and every pool window took in one evaluation, recorded
    by `record` and imposed on another by `replay` (patched in for both: flax.linen's
    leaky_relu and the pools' first-maximum rule).

    A piecewise-linear network's gradient jumps where an element crosses a kink: an element
    1e-7 from zero in float64 may land on the other side in float32, and the gradient through
    it is then 0.2 of what it was, or 5 times. At width 1/8 such near-zero elements are rare; at
    full width D holds millions of activations and one or two of them fall that close. Both
    evaluations forced down the same branches compute the same function, in which float32's
    lost digits are all that is left to see.
    """

    def __init__(self, monkeypatch):
        self.sides, self.mode, self.index, self.crossings = [], None, 0, 0
        leaky, first_max = nn.leaky_relu, layers._first_max_corner
        monkeypatch.setattr(nn, "leaky_relu", lambda x, slope=0.01: self._leaky(leaky, x, slope))
        monkeypatch.setattr(layers, "_first_max_corner",
                            lambda corners: self._first_max(first_max, corners))

    def start(self, mode):
        """"record", "replay", or None (the patched functions as they were)."""
        self.mode, self.index = mode, 0

    def _next(self, own_side):
        """This trace's side for the next kink (trace order is the same in every evaluation)."""
        i, self.index = self.index, self.index + 1
        if self.mode == "record":
            self.sides.append(None)
            jax.debug.callback(lambda v: self.sides.__setitem__(i, np.asarray(v)), own_side)
            return own_side
        jax.debug.callback(lambda v: setattr(self, "crossings", self.crossings + int(
            np.sum(np.asarray(v) != self.sides[i]))), own_side)
        return jnp.asarray(self.sides[i])

    def _leaky(self, leaky, x, slope):
        return jnp.where(self._next(x >= 0), x, slope * x) if self.mode else leaky(x, slope)

    def _first_max(self, first_max, corners):
        value, index = first_max(corners)
        if not self.mode:
            return value, index
        index = self._next(index)
        return jnp.choose(index.astype(jnp.int32), corners, mode="clip"), index


def test_full_width_d_gradient_matches_float64_along_the_same_kinks(monkeypatch):
    """LSD's D loss (its four inputs: real images and G's, as in the D update) at full width on
    64x128 images: float32 against float64, every kink taken on float32's side (KinkSides).

    Width 1/8 hides digits that full width loses (sums over 16x more channels), so this is
    where a precision defect of D's layers would show. Measured: 1.4e-6 with the kinks aligned,
    where one LeakyReLU element of res1_2 that float64 puts 1.4e-7 above zero and float32 below
    made the D update's gradient 3.6e-3 off without aligning them (docs/testing.md). About
    40 s: two compilations of D at full width.
    """
    height, width = 64, 128
    keys = jax.random.split(jax.random.key(11), 4)
    real = jax.random.uniform(keys[0], (2, height, width, 3))
    # G's images (its checkerboard and saturated pixels) at width 1/8, from features like F's.
    g = Generator(NETWORK_WIDTH, 0.0)
    f = FCN8s(CLASSES, NETWORK_WIDTH, dropout_rate=0.0)
    shapes = jax.eval_shape(lambda: f.init_with_output(
        jax.random.key(0), jnp.zeros((2, height, width, 3)), train=False)[0])[1:]
    features = tuple(100 * jax.random.uniform(k, s.shape) for k, s in zip(
        jax.random.split(keys[1], 3), shapes))
    fake = jax.jit(lambda v: g.apply(v, *features, train=False))(
        g.init(keys[2], *features, train=False))
    labels = jax.random.randint(keys[3], (2, height, width), 0, CLASSES)
    config = default.get_config()
    config.model.dropout_rate = 0.0
    sides = KinkSides(monkeypatch)
    params = lsd.build_networks(config).d.init(jax.random.key(1), real[:1], train=False)["params"]

    def d_grads(dtype):
        config.model.dtype = dtype
        nets = lsd.build_networks(config)
        cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)  # noqa: E731
        batch = {"source_image01": cast(real[:1]), "target_image01": cast(real[1:]),
                 "source_label": labels[:1]}
        keys = lsd.DropoutKeys.from_step_key(jax.random.key(3))
        loss = lambda p: lsd.d_loss(nets, p, cast((fake[:1], fake[1:])), batch, keys)[0]  # noqa
        return jax.jit(jax.grad(loss))(cast(params))

    sides.start("record")
    float32 = jax.tree.map(np.asarray, d_grads("float32"))
    jax.effects_barrier()
    sides.start("replay")
    with jax.enable_x64(True):
        float64 = jax.tree.map(np.asarray, d_grads("float64"))
        jax.effects_barrier()
    assert len(sides.sides) == 4 * (1 + 3 * 3 + 2)  # per input: stem, 9 res blocks, 2 pools
    assert_close(float32, float64, f"D at full width, float32 against float64 along float32's "
                 f"kinks (float64 alone: {sides.crossings} elements on the other side)",
                 FULL_WIDTH_TOLERANCE)
