"""`--mode summary`: a method's networks, their parameter counts and output shapes."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from clu import parameter_overview

from lsd_jax import methods
from lsd_jax.preflight import training_size


def model_summary(config) -> str:
    """The method's networks: parameter overviews (totals in full) and output shapes at the
    config's training size and batch, from shapes alone (jax.eval_shape): no data, no compute."""
    method = methods.build(config)
    height, width = training_size(config)
    batch = config.data.batch_size
    states = jax.eval_shape(method.init, jax.random.key(0))
    image = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
    outputs = method.output_shapes(states, image)

    def count(tree):
        return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

    sections = [
        f"Config: method={config.method}, num_classes={config.num_classes}, "
        f"model.backbone={config.model.backbone}, model.width={config.model.width}, "
        f"model.dtype={config.model.dtype}, "
        f"input {batch}x{height}x{width}x3 (data.batch_size x data.source crop/resize)"]
    for name, module in method.networks.items():
        title, state = f"{name.upper()} ({type(module).__name__})", states[name]
        trainable, frozen = count(state.params), count(state.frozen)
        kind = ("parameters (a copy of F's at the start, never trained)"
                if name in method.copies_of_f else
                "parameters (a copy of F's at the start, then their moving average; no "
                "gradient)" if name in method.averages_of_f else "trainable parameters")
        sections.append(f"{title}: {kind}\n" + parameter_overview.get_parameter_overview(
            state.params, include_stats=False))
        if frozen:
            sections.append(f"{title}: frozen variables (never trained)\n"
                            + parameter_overview.get_parameter_overview(state.frozen,
                                                                        include_stats=False))
            sections.append(f"{name.upper()} total: {trainable + frozen:,} parameters "
                            f"({trainable:,} trainable + {frozen:,} frozen)")
        else:
            sections.append(f"{name.upper()} total: {trainable:,} parameters")
        if state.batch_stats:
            sections.append(f"{name.upper()} BatchNorm running statistics: "
                            f"{count(state.batch_stats):,} values")
        sections.append(f"{name.upper()} outputs (for the input above):\n" + "\n".join(
            f"  {n:<8} {tuple(o.shape)} {o.dtype}" for n, o in outputs[name].items()))
    return "\n\n".join(sections)
