"""Mixed precision and memory options (issue 5, item 3).

- config.model.dtype = "bfloat16": F, G and D compute in bfloat16 while parameters, optimizer
  states and every loss reduction stay float32, and training on a fixed batch still lowers the
  losses; the first iteration's losses are those of float32 within bfloat16's precision.
- "float32" (the default) is unchanged: no bfloat16 value anywhere in the compiled iteration.
- config.model.remat_f / remat_g: the same parameters (names and values) and the same outputs
  and gradients, with the rematerialisation visible in the program.

The training runs in a subprocess with XLA's CPU optimisation turned down (the same programs,
compiled twice as fast), tiny networks (model.width = 1/16) and 64x64 images.
"""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from lsd_jax import methods
from train_helpers import REPO_ROOT, subprocess_env

pytestmark = pytest.mark.slow  # a bfloat16 training subprocess

BF16_STEPS = 6

TRAIN = r"""
import json, sys
import jax, numpy as np
from configs import default
from lsd_jax import methods
from lsd_jax.methods import lsd

def config(dtype):
    c = default.get_config()
    c.model.width = 1 / 16
    c.model.dtype = dtype
    c.optim.f_lr, c.optim.gd_lr = 1e-4, 1e-3   # so that a few steps visibly fit the batch
    return c

rng = np.random.default_rng(0)
batch = {}
for domain in ("source", "target"):
    x01 = rng.random((2, 64, 64, 3), np.float32)
    batch[domain + "_image01"], batch[domain + "_image"] = x01, x01 * 255.0 - 110.0
batch["source_label"] = rng.integers(0, 19, (2, 64, 64)).astype(np.int32)

out = {}
for dtype, iterations in (("bfloat16", int(sys.argv[2])), ("float32", int(sys.argv[2]))):
    method = methods.build(config(dtype))
    states = method.init(jax.random.key(0))
    step = methods.compile_method(method).step
    losses = []
    for i in range(iterations):
        # The same key every step: the same dropout masks, a truly fixed objective.
        states, metrics = step(states, batch, jax.random.key(1))
        losses.append({k: float(v) for k, v in metrics.items()})
    out[dtype] = {
        "losses": losses,
        "metric_dtypes": sorted({str(v.dtype) for v in metrics.values()}),
        "state_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(states)}),
    }

# Rematerialisation: the same loss and gradients through F and G (module attributes remat).
import jax.numpy as jnp
x = batch["source_image"][:1]
remat = {}
for flag in (False, True):
    c = config("float32")
    c.model.remat_f = c.model.remat_g = flag
    nets = lsd.build_networks(c)
    states = lsd.init_states(nets, jax.random.key(0))

    def loss(f_params, g_params, nets=nets, frozen=states["f"].frozen):
        score, *features = nets.f.apply({"params": f_params, "frozen": frozen}, x, train=True,
                                        rngs={"dropout": jax.random.key(1)})
        image = nets.g.apply({"params": g_params}, *features, train=True,
                             rngs={"dropout": jax.random.key(2)})
        return jnp.mean(score ** 2) + jnp.mean((image - batch["source_image01"][:1]) ** 2)
    grad = jax.value_and_grad(loss, argnums=(0, 1))
    program = str(jax.make_jaxpr(grad)(states["f"].params, states["g"].params))
    value, grads = jax.jit(grad)(states["f"].params, states["g"].params)
    remat[flag] = {"attributes": [nets.f.remat, nets.g.remat],
                   "checkpoints": program.count("remat") + program.count("checkpoint"),
                   "value": float(value),
                   "grads": {jax.tree_util.keystr(p): np.asarray(g).tolist()
                             for p, g in jax.tree_util.tree_leaves_with_path(grads)},
                   "params": sorted(jax.tree_util.keystr(p) for p, _ in
                                    jax.tree_util.tree_leaves_with_path(states))}
out["remat"] = {str(k): v for k, v in remat.items()}
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
"""


def tiny_config(dtype="float32", remat=False):
    config = default.get_config()
    config.model.width = 1 / 16
    config.model.dtype = dtype
    config.model.remat_f = remat
    config.model.remat_g = remat
    return config


def tiny_batch(n=1, hw=64):
    rng = np.random.default_rng(0)
    batch = {}
    for domain in ("source", "target"):
        x01 = rng.random((n, hw, hw, 3), np.float32)
        batch[domain + "_image01"], batch[domain + "_image"] = x01, x01 * 255.0 - 110.0
    batch["source_label"] = rng.integers(0, 19, (n, hw, hw)).astype(np.int32)
    return batch


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("precision")
    script, out = tmp / "train.py", tmp / "out.json"
    script.write_text(TRAIN)
    result = subprocess.run([sys.executable, str(script), str(out), str(BF16_STEPS)],
                            env=subprocess_env(),
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def test_bfloat16_training_lowers_the_losses_on_a_fixed_batch(trained):
    """About 100 s, for the module: the training subprocess (bfloat16 and float32 iterations
    and the remat gradients, each compiled) runs before the first test that reads it."""
    losses = trained["bfloat16"]["losses"]
    assert len(losses) == BF16_STEPS
    series = {name: [step[name] for step in losses] for name in losses[0]}
    assert all(np.isfinite(v).all() for v in series.values()), series
    for name in ("d/loss", "g/loss"):
        assert series[name][-1] < 0.9 * series[name][0], (name, series[name])
    # F's scores start at zero (uniform prediction); Adam's first step overshoots (the loss is
    # summed over pixels), after which the segmentation loss comes down.
    assert series["f/seg"][-1] < 0.97 * series["f/seg"][1], series["f/seg"]


def test_bfloat16_training_follows_float32(trained):
    bf16, f32 = trained["bfloat16"]["losses"], trained["float32"]["losses"]
    for step, (a, b) in enumerate(zip(bf16, f32)):
        for name in ("d/loss", "g/loss", "f/seg", "g/l1"):
            np.testing.assert_allclose(a[name], b[name], rtol=0.05, err_msg=f"{name} step {step}")


def test_bfloat16_keeps_float32_states_and_losses(trained):
    assert trained["bfloat16"]["state_dtypes"] == ["float32", "int32"]   # int32: Adam's count
    assert trained["bfloat16"]["metric_dtypes"] == ["float32"]


def test_bfloat16_first_iteration_matches_float32(trained):
    bf16, f32 = trained["bfloat16"]["losses"][0], trained["float32"]["losses"][0]
    for name in ("d/loss", "g/loss", "g/l1", "f/loss", "f/seg", "f/adv", "d/aux"):
        np.testing.assert_allclose(bf16[name], f32[name], rtol=0.03, err_msg=name)


def step_program(config):
    method = methods.build(config)
    states = jax.eval_shape(lambda: method.init(jax.random.key(0)))
    step = methods.compile_method(method, donate=False).step
    return method, states, jax.make_jaxpr(step)(states, tiny_batch(), jax.random.key(1))


def jaxpr_dtypes(closed):
    """Every dtype of every value the program computes, sub-programs included."""
    dtypes = set()

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                dtypes.add(str(var.aval.dtype))
            for sub in jax.core.jaxprs_in_params(eqn.params):
                visit(sub)
    visit(closed.jaxpr)
    return dtypes


def test_float32_is_unchanged_and_bfloat16_computes_in_bfloat16():
    _, states, f32 = step_program(tiny_config("float32"))
    assert "bfloat16" not in jaxpr_dtypes(f32)
    assert {str(x.dtype) for x in jax.tree.leaves(states)} == {"float32", "int32"}
    _, states16, bf16 = step_program(tiny_config("bfloat16"))
    assert "bfloat16" in jaxpr_dtypes(bf16)
    convs = [e for e in bf16.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert all(str(e.outvars[0].aval.dtype) == "bfloat16" for e in convs)
    # Parameters and optimizer states are float32 whatever the compute dtype.
    assert jax.tree.map(lambda x: x.dtype, states16) == jax.tree.map(lambda x: x.dtype, states)
    # The iteration's outputs (states, metrics) are float32 too.
    assert {str(v.dtype) for v in bf16.out_avals} <= {"float32", "int32"}


def test_remat_keeps_parameters_outputs_and_gradients(trained):
    plain, rematted = trained["remat"]["False"], trained["remat"]["True"]
    assert plain["attributes"] == [False, False] and rematted["attributes"] == [True, True]
    assert plain["checkpoints"] == 0 and rematted["checkpoints"] >= 10   # 5 VGG blocks, 5 stages
    assert plain["params"] == rematted["params"]
    np.testing.assert_allclose(rematted["value"], plain["value"], rtol=1e-6)
    assert plain["grads"].keys() == rematted["grads"].keys()
    for name, grad in plain["grads"].items():
        np.testing.assert_allclose(rematted["grads"][name], grad, rtol=1e-5, atol=1e-7,
                                   err_msg=name)
