"""Loading a config file's sibling (e.g. configs/default.py) by path.

Config files are loaded by path (`--config configs/gta.py`), not imported as a package, so
`from configs import default` only works when the working directory happens to be the
repository root. Loading the sibling next to the calling file works from anywhere.
"""

import importlib.util
import os
import types


def load_sibling(config_file: str, name: str = "default.py") -> types.ModuleType:
    """The module `name` that lies in the same folder as `config_file` (pass `__file__`)."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{config_file}: expected its shared config {path} beside it")
    spec = importlib.util.spec_from_file_location(f"lsd_jax_configs_{name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
