"""Parse documented command lines of lsd_jax's programs the way each program does, and check
what the program would check before starting work (tests/test_documented_commands.py).

    python tests/command_check.py < commands.json > errors.json

commands.json: {program (module name): [command, ...]}, each command {"argv": [...],
"placeholders": [...], "partial": bool}: its arguments after `python -m MODULE`; the flags
whose values are placeholders in the documentation (`DIR`, `<file>`, `...`): those flags must
exist, their values are not parsed; and whether arguments were elided (a bare `...`), in which
case each flag is only checked to exist (`--config.*` ones as fields of configs/default.py,
which has every field). Prints {program: [error, ...]}: null for a command that passes, else
the error in one line.

The programs are checked one after the other, each program's flags removed before the next
defines its own (absl's flags are global: lsd_jax.main and lsd_jax.data.benchmark both define
--workdir). Nothing is trained, generated or written:
- lsd_jax.main, lsd_jax.size_constraints, lsd_jax.appearance_transfer: absl parses the flags
  (loading the config file with its variant and applying every `--config.*` override), then
  `preflight.check_config` runs the checks training starts with (the method's builder
  included), and appearance_transfer's own check of the source;
- lsd_jax.data.rare_class: its flags and config (it writes what training checks for);
- lsd_jax.benchmark: its own argument parsing, config resolution and the checks every run
  starts with;
- lsd_jax.data.prepare: its flags, and a dataset name that TFDS knows, with its config;
- lsd_jax.data.benchmark: its flags;
- lsd_jax.export: its argument parsing and the name of the file it writes.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "configs/default.py"


def one_line(error: BaseException) -> str:
    while isinstance(error, BaseException) and len(error.args) == 1 and isinstance(
            error.args[0], BaseException):
        error = error.args[0]
    return f"{type(error).__name__}: " + " ".join(str(error).split())


def field_exists(config, dotted: str) -> bool:
    node = config
    for name in dotted.split("."):
        try:
            node = node[name]
        except (KeyError, TypeError, AttributeError):
            return False
    return True


def with_values(argv, placeholders, value_for):
    """argv with each placeholder flag given `value_for(name)` as `--name=value`."""
    out, skip_next = [], False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        name = arg.split("=", 1)[0][2:] if arg.startswith("--") else None
        if name in placeholders:
            skip_next = "=" not in arg and i + 1 < len(argv)
            out.append(f"--{name}={value_for(name)}")
        else:
            out.append(arg)
    return out


class AbslProgram:
    """A program's absl flags, defined again for each command with that command as sys.argv,
    as the program defines them when it starts: ml_collections registers a `--config.*`
    override flag only if it is on the command line at definition time."""

    def __init__(self, module_name, define, dry_run):
        from absl import flags

        self.module_name, self.define, self.dry_run = module_name, define, dry_run
        self.flags = flags.FLAGS
        self.baseline = set(self.flags)  # absl's own; a program checked before removed its own
        self.redefine([])
        self.names = set(self.flags) - self.baseline

    def remove(self):
        """Every flag the program defined, the `--config.*` overrides ml_collections adds when
        it parses included (another program may define the same names)."""
        for name in set(self.flags) - self.baseline:
            delattr(self.flags, name)

    def redefine(self, argv):
        self.remove()
        sys.argv = [self.module_name, *argv]
        self.define()

    def placeholder_value(self, name):
        """A value of the flag's type for a placeholder (a required flag needs one)."""
        flag = self.flags[name]
        if getattr(flag.parser, "enum_values", None):
            return flag.parser.enum_values[0]
        return "1" if flag.parser.flag_type() in ("int", "float") else "placeholder"

    def check(self, argv, placeholders):
        """Parsed as the program parses it, then its dry run. A placeholder --config becomes
        configs/default.py, which has every field; `--config.*` placeholders must be fields;
        other placeholder flags get a value of their type."""
        kept, config_fields, skip_next = [], [], False
        for i, arg in enumerate(argv):
            if skip_next:
                skip_next = False
                continue
            name = arg.split("=", 1)[0][2:] if arg.startswith("--") else None
            if name not in placeholders:
                kept.append(arg)
                continue
            skip_next = "=" not in arg and i + 1 < len(argv)
            if name == "config":
                kept.append(f"--config={DEFAULT_CONFIG}")
            elif name.startswith("config."):
                config_fields.append(name)
            elif name not in self.names:
                raise KeyError(f"--{name}: {self.module_name} has no such flag")
            else:
                kept.append(f"--{name}={self.placeholder_value(name)}")
        self.redefine(kept)
        positional = self.flags([self.module_name, *kept])[1:]
        for name in config_fields:
            if not field_exists(self.flags.config, name.removeprefix("config.")):
                raise KeyError(f"--{name}: the config has no field {name!r}")
        self.dry_run(self.flags, positional)


def config_dry_run(flags, positional):
    from lsd_jax import preflight

    if positional:
        raise ValueError(f"unexpected arguments {positional}")
    preflight.check_config(flags.config)


def appearance_transfer_dry_run(flags, positional):
    from lsd_jax import appearance_transfer

    config_dry_run(flags, positional)
    appearance_transfer.check_source(flags.config)


def prepare_dry_run(flags, positional):
    """The dataset name checked as the program checks it before building anything."""
    from lsd_jax.data import prepare
    from lsd_jax.tf_quiet import import_tensorflow_datasets

    tfds = import_tensorflow_datasets()
    import lsd_jax.data.datasets  # noqa: F401  (registers the builders)

    if len(positional) != 1:
        raise ValueError(f"expected one dataset name, got {positional}")
    prepare.builder_class(tfds, positional[0])


def no_positional(flags, positional):
    if positional:
        raise ValueError(f"unexpected arguments {positional}")


def check_flag_names(argv, known_flags):
    """Each `--name` is one of the program's flags or a field of the full default config."""
    from configs import default

    config = default.get_config()
    for arg in argv:
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0]
        if name.startswith("config."):
            if not field_exists(config, name.removeprefix("config.")):
                raise KeyError(f"--{name}: the config has no field {name!r}")
        elif name not in known_flags:
            raise KeyError(f"--{name}: no such flag")


def checker(module_name):
    """(check(argv, placeholders): None or raises, the program's flag names, done(): removes
    its flags)."""
    if module_name == "lsd_jax.benchmark":
        from lsd_jax import benchmark

        def check(argv, placeholders):
            if placeholders:  # the flags alone: their values are not real
                values = {"config": DEFAULT_CONFIG, "target": None}  # others: "1" (str or int)
                kept = with_values(argv, placeholders, lambda name: values.get(name, "1"))
                benchmark.parse_args([arg for arg in kept if not arg.endswith("=None")])
                return
            options = benchmark.parse_args(argv)
            benchmark.check_run_configs(benchmark.resolve_configs(options))
        names = {option.lstrip("-") for action in benchmark._argument_parser()._actions
                 for option in action.option_strings}
        return check, names, lambda: None

    if module_name == "lsd_jax.export":
        from lsd_jax import export

        def check(argv, placeholders):
            values = {"step": "1", "output": "f.npz"}  # others: a path
            export.parse_args(with_values(argv, placeholders,
                                          lambda name: values.get(name, "placeholder")))
        names = {option.lstrip("-") for action in export.argument_parser()._actions
                 for option in action.option_strings}
        return check, names, lambda: None

    if module_name in ("lsd_jax.size_constraints", "lsd_jax.appearance_transfer",
                       "lsd_jax.data.rare_class"):
        from lsd_jax import commands

        own_flags = importlib.import_module(module_name).define_flags

        def define():
            commands.define_command_flags(own_flags)
        dry_run = {"lsd_jax.size_constraints": config_dry_run,
                   "lsd_jax.appearance_transfer": appearance_transfer_dry_run,
                   "lsd_jax.data.rare_class": no_positional}[module_name]
    elif module_name in ("lsd_jax.main", "lsd_jax.data.prepare", "lsd_jax.data.benchmark"):
        loaded = []

        def define():  # the module defines its flags when it runs: import, then reload
            if loaded:
                importlib.reload(loaded[0])
            else:
                loaded.append(importlib.import_module(module_name))
        dry_run = {"lsd_jax.main": config_dry_run, "lsd_jax.data.prepare": prepare_dry_run,
                   "lsd_jax.data.benchmark": no_positional}[module_name]
    else:
        raise SystemExit(f"command_check: no checker for {module_name}")
    program = AbslProgram(module_name, define, dry_run)
    return program.check, program.names, program.remove


def check_program(module_name, commands):
    check, known_flags, done = checker(module_name)
    errors = []
    for command in commands:
        try:
            if command["partial"]:
                check_flag_names(command["argv"], known_flags)
            else:
                check(command["argv"], set(command["placeholders"]))
            errors.append(None)
        except BaseException as error:  # noqa: BLE001  (SystemExit from argparse included)
            errors.append(one_line(error))
    done()
    return errors


def main():
    os.chdir(REPO_ROOT)
    sys.path.insert(0, REPO_ROOT)
    commands = json.load(sys.stdin)
    json.dump({module: check_program(module, listed) for module, listed in commands.items()},
              sys.stdout)


if __name__ == "__main__":
    main()
