"""The benchmark: every variant of an experiment config, trained with several seeds, in one table.

    python -m lsd_jax.benchmark --config configs/synthetic.py \\
        --variants source_only,lsd,target_only --seeds 3 --workdir runs/bench \\
        [--target noise=20.0 --target blur=2.0] [--config.train.num_steps=600]

Each run is `configs/<file>.py:<variant>` with `config.seed` and `config.data.seed` raised by the
seed index k (0, 1, ...), trained and evaluated on `data.eval` in `<workdir>/<variant>/seed<k>/`
exactly as `python -m lsd_jax.main` would. Any variant the config file accepts can be named;
`--baseline` and `--oracle` (source_only and target_only by default) only decide how the
"gap closed" column is computed.

`--target field=value` changes the target domain's appearance: the value goes into the
`config_overrides` of every data set that reads the target dataset (data.target, data.selection,
data.eval, and data.source of target_only), so the whole benchmark sees the same shifted target.
`--config.x.y=v` overrides any config field of every run, as with lsd_jax.main.

`--pretrain VARIANT` runs that variant first for each seed (in `<workdir>/<VARIANT>/seed<k>/`,
a row of the table like any other) and starts every listed variant's F from its final
checkpoint (`config.init.f_workdir`): a pre-training phase that all methods share, as LSD-seg
starts from pretrained weights and ADDA and FCAN from a source-trained network. To reuse
another benchmark's pre-training runs instead (e.g. for another --target: source-only training
never reads the target), name them with the seed index as "{seed}":
`--config.init.f_workdir=runs/bench/pretrain/seed{seed}`.

Resumable: re-running the same command continues where it stopped. A run whose final results
(`results/eval_step_<num_steps>.json`) exist is finished and never trained or evaluated again;
an unfinished one resumes from its latest checkpoint. `<workdir>/benchmark.json` records the
settings; the same workdir refuses another config, other --target or --config overrides (more
seeds or more variants are fine).

Outputs in <workdir>: results.md and results.json (mIoU mean and sample standard deviation over
the seeds, per-seed mIoUs, per-class IoU means, gap closed), miou.png (bar chart with error bars)
and predictions.png (a few target validation scenes: image, ground truth, and the seed-0 run of
every variant). See docs/benchmark.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import statistics
import sys
import time
import types
from typing import Any, Callable, Mapping, Sequence, TextIO

DEFAULT_VARIANTS = ("source_only", "lsd", "target_only")
DEFAULT_BASELINE = "source_only"
DEFAULT_ORACLE = "target_only"

RECORD_FILE = "benchmark.json"
RESULTS_SUBDIR = "results"  # lsd_jax.reporting.RESULTS_SUBDIR (not imported: it pulls in JAX)

# The data sets of a config that may read the target dataset.
DATA_SETS = ("source", "target", "selection", "eval")

STD_DESCRIPTION = "sample standard deviation over seeds (ddof=1); null with one seed"


class BenchmarkError(Exception):
    """Bad input, a workdir that cannot be used, or a run that had to stop: reported as one
    line, `lsd_jax.benchmark: <message>`, with exit status `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class StoppedBySignal(Exception):
    """A run stopped early by SIGTERM (preemption) after saving a checkpoint to resume from:
    the benchmark stops too, as planned, and continues when run again."""


# ----------------------------------------------------------------------------- command line

@dataclasses.dataclass(frozen=True)
class Options:
    config_file: str
    variants: tuple[str, ...]
    seeds: int
    workdir: str
    target_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    config_overrides: tuple[str, ...] = ()  # "--config.x.y=v", in command-line order
    baseline: str = DEFAULT_BASELINE
    oracle: str = DEFAULT_ORACLE
    num_pictures: int = 4
    pretrain: str | None = None  # variant run first per seed; the others' F starts from it

    @property
    def all_variants(self) -> tuple[str, ...]:
        """Every variant trained, in order: the pre-training one first."""
        return ((self.pretrain,) if self.pretrain else ()) + self.variants


class _Parser(argparse.ArgumentParser):
    """argparse that raises BenchmarkError instead of printing usage and exiting."""

    def error(self, message):
        raise BenchmarkError(message)


def _argument_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lsd_jax.benchmark", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="experiment config file, without a variant (configs/synthetic.py)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated config arguments, e.g. source_only,lsd,target_only")
    parser.add_argument("--seeds", type=int, default=3, help="runs per variant (seeds 0..N-1)")
    parser.add_argument("--workdir", required=True, help="where the runs and tables go")
    parser.add_argument("--target", action="append", default=[], metavar="FIELD=VALUE",
                        help="target dataset builder-config override (repeatable), e.g. noise=20")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE,
                        help="variant that 'gap closed' starts from (0 %%)")
    parser.add_argument("--oracle", default=DEFAULT_ORACLE,
                        help="variant that 'gap closed' ends at (100 %%)")
    parser.add_argument("--pretrain", metavar="VARIANT",
                        help="variant run first for each seed; every other variant's F starts "
                             "from its final checkpoint")
    parser.add_argument("--num_pictures", type=int, default=4,
                        help="target validation scenes in predictions.png (0 = no picture)")
    return parser


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the --config.x.y=v overrides, everything else): the overrides are parsed by
    ml_collections for each variant's config, the rest by argparse."""
    overrides, rest = [], []
    for arg in argv:
        if arg.startswith("--config."):
            if "=" not in arg:
                raise BenchmarkError(f"{arg}: write config overrides as {arg}=VALUE")
            overrides.append(arg)
        else:
            rest.append(arg)
    return overrides, rest


def parse_value(text: str) -> Any:
    """An int or a float where the text is one, else the text (e.g. palette=photo)."""
    for number_type in (int, float):
        try:
            number = number_type(text)
        except ValueError:
            continue
        if math.isfinite(number):  # "nan" and "inf" are no dataset settings: keep the text
            return number
    return text


def parse_target_overrides(items: Sequence[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        field, equals, value = item.partition("=")
        if not equals or not field.strip():
            raise BenchmarkError(f"--target {item!r}: expected FIELD=VALUE, e.g. noise=20.0")
        overrides[field.strip()] = parse_value(value.strip())
    return overrides


def parse_variants(text: str) -> tuple[str, ...]:
    variants = tuple(v.strip() for v in text.split(",") if v.strip())
    if not variants:
        raise BenchmarkError("--variants: expected at least one variant, e.g. source_only,lsd")
    duplicates = sorted({v for v in variants if variants.count(v) > 1})
    if duplicates:
        raise BenchmarkError(f"--variants names {duplicates} more than once")
    return variants


def parse_args(argv: Sequence[str]) -> Options:
    config_overrides, rest = split_config_overrides(argv)
    args = _argument_parser().parse_args(rest)
    if args.seeds < 1:
        raise BenchmarkError(f"--seeds {args.seeds}: expected at least 1")
    if args.num_pictures < 0:
        raise BenchmarkError(f"--num_pictures {args.num_pictures}: expected 0 or more")
    variants = parse_variants(args.variants)
    if args.pretrain is not None and args.pretrain in variants:
        raise BenchmarkError(f"--pretrain {args.pretrain} is also in --variants: a variant "
                             "cannot start from its own run")
    if ":" in os.path.basename(args.config):
        raise BenchmarkError(f"--config {args.config}: give the file alone and the variants "
                             "with --variants")
    return Options(config_file=args.config, variants=variants, pretrain=args.pretrain,
                   seeds=args.seeds, workdir=args.workdir,
                   target_overrides=parse_target_overrides(args.target),
                   config_overrides=tuple(config_overrides), baseline=args.baseline,
                   oracle=args.oracle, num_pictures=args.num_pictures)


# ----------------------------------------------------------------------------- configs

def one_line(error: BaseException) -> str:
    """An exception's message on one line, without the quotes KeyError adds (ml_collections
    chains its KeyError into an AttributeError: the innermost message is the readable one)."""
    message = error
    while isinstance(message, BaseException) and len(message.args) == 1:
        message = message.args[0]
    return " ".join(str(message).replace("\\n", " ").split())


def load_config_module(path: str) -> types.ModuleType:
    """The config file as a module (loaded by path, as ml_collections' config_flags does)."""
    if not os.path.isfile(path):
        raise BenchmarkError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(
        "lsd_jax_benchmark_config_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise BenchmarkError(f"config file {path} has no get_config function")
    return module


def variant_config(module: types.ModuleType, path: str, variant: str):
    """`get_config(variant)`; an unknown variant is a BenchmarkError listing the valid ones
    where the module says which (VARIANTS), else carrying the config's own message."""
    known = getattr(module, "VARIANTS", None)
    if known is not None and variant not in known:
        raise BenchmarkError(f"unknown variant {variant!r} for {path}: expected one of "
                             f"{', '.join(known)}")
    try:
        return module.get_config(variant)
    except TypeError as error:  # a get_config() without an argument
        raise BenchmarkError(f"{path} takes no variant (asked for {variant!r}): "
                             f"{one_line(error)}") from None
    except (ValueError, KeyError) as error:
        raise BenchmarkError(f"unknown variant {variant!r} for {path}: "
                             f"{one_line(error)}") from None


def apply_config_overrides(config, overrides: Sequence[str]):
    """`--config.x.y=v` onto `config` (in place), parsed by ml_collections' config_flags like
    lsd_jax.main's: typed fields, tuples, dicts; a field that does not exist is an error."""
    from absl import flags
    from ml_collections import config_flags

    # One at a time, so that an error can name the override it comes from.
    for override in overrides:
        argv = ["lsd_jax.benchmark", override]
        flag_values = flags.FlagValues()  # private to this call: no clash with the global FLAGS
        try:
            config_flags.DEFINE_config_dict("config", config, flag_values=flag_values,
                                            sys_argv=argv)
            flag_values(argv)
        except flags.Error as error:  # its message names the flag already
            raise BenchmarkError(one_line(error)) from None
        except (AttributeError, KeyError) as error:
            raise BenchmarkError(f"{override}: no such config field: {one_line(error)}") from None
        except (TypeError, ValueError) as error:
            raise BenchmarkError(f"{override}: {one_line(error)}") from None
    return config


def builder_config_fields(dataset_name: str) -> dict[str, Any]:
    """{field: default} of the builder config of a TFDS dataset `name[/config]`: the fields that
    `config_overrides` may set (the builder's own, not TFDS's name/version/description...)."""
    from lsd_jax.tf_quiet import import_tensorflow_datasets

    tfds = import_tensorflow_datasets()
    import lsd_jax.data.datasets  # noqa: F401  (registers our builders with TFDS)

    base_name, _, config_name = dataset_name.partition("/")
    try:
        builder_cls = tfds.builder_cls(base_name)
    except Exception as error:  # TFDS raises its own not-found types
        raise BenchmarkError(f"target dataset {dataset_name!r} is unknown to TFDS: "
                             f"{str(error).splitlines()[0]}") from None
    configs = getattr(builder_cls, "builder_configs", None) or {}
    config = configs.get(config_name or getattr(builder_cls, "DEFAULT_BUILDER_CONFIG_NAME", ""))
    if config is None:
        return {}
    generic = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in generic}


def check_target_overrides(overrides: Mapping[str, Any], fields: Mapping[str, Any],
                           dataset_name: str) -> dict[str, Any]:
    """The overrides with ints made floats where the field is a float (so that noise=20 and
    noise=20.0 name the same dataset); an unknown field is a BenchmarkError listing the valid
    ones. Checked before any training."""
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise BenchmarkError(f"--target {', '.join(unknown)}: not a field of {dataset_name}'s "
                             f"builder config; valid fields: {', '.join(sorted(fields)) or '(none)'}")
    checked = {}
    for field, value in overrides.items():
        default = fields[field]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(default, (int, float)) and not isinstance(value, (int, float)):
            raise BenchmarkError(f"--target {field}={value!r}: expected a number (the default "
                                 f"is {default!r})")
        checked[field] = value
    return checked


def with_target_overrides(config, overrides: Mapping[str, Any]):
    """`config` (in place) with `overrides` merged into the config_overrides of every data set
    that reads the target dataset: the target, model selection, evaluation, and the source too
    where a variant trains on the target (target_only)."""
    if not overrides:
        return config
    data = config.data
    target_name = data.target.name
    for field in DATA_SETS:
        if field in data and data[field].name == target_name:
            data[field].config_overrides = {**data[field].config_overrides.to_dict(),
                                            **overrides}
    return config


def seeded(config, seed_index: int):
    """A copy of `config` for seed index k: config.seed and config.data.seed raised by k."""
    config = config.copy_and_resolve_references()
    config.seed = config.seed + seed_index
    if "seed" in config.data:
        config.data.seed = config.data.seed + seed_index
    return config


SEED_FIELD = "{seed}"  # in --config.init.f_workdir: the seed index of the run


def run_config(options: Options, configs: Mapping[str, Any], variant: str, seed_index: int):
    """The config of one run: seeded, and started from the seed's pre-training run if any
    (--pretrain, or --config.init.f_workdir with "{seed}" in it, e.g. another benchmark's
    pre-training runs: runs/bench/pretrain/seed{seed})."""
    config = seeded(configs[variant], seed_index)
    if options.pretrain and variant != options.pretrain:
        config.init.f_workdir = run_dir(options.workdir, options.pretrain, seed_index)
    elif config.init.f_workdir:
        config.init.f_workdir = config.init.f_workdir.replace(SEED_FIELD, str(seed_index))
    return config


def resolve_configs(options: Options) -> dict[str, Any]:
    """{variant: its config with every override, for seed index 0}; every bad input (missing
    file, unknown variant, unknown --config or --target field) is reported here, before any
    training."""
    module = load_config_module(options.config_file)
    configs = {v: variant_config(module, options.config_file, v) for v in options.all_variants}
    for config in configs.values():
        apply_config_overrides(config, options.config_overrides)
    if options.target_overrides:
        checked_by_dataset = {}
        for config in configs.values():
            name = config.data.target.name
            if name not in checked_by_dataset:
                checked_by_dataset[name] = check_target_overrides(
                    options.target_overrides, builder_config_fields(name), name)
            with_target_overrides(config, checked_by_dataset[name])
    for field in ("f_workdir", "f_file"):
        if options.pretrain and any(c.init[field] for c in configs.values()):
            raise BenchmarkError(f"--pretrain {options.pretrain} and --config.init.{field} both "
                                 "say where F starts: give one (--config.init.f_workdir="
                                 "DIR/seed{seed} starts each seed from its own run in DIR)")
    return configs


def check_run_configs(configs: Mapping[str, Any]) -> None:
    """The checks training starts with, for every variant before the first run starts."""
    from lsd_jax import preflight

    for variant, config in configs.items():
        try:
            preflight.check_config(config)
            preflight.check_selection_is_not_eval(config.data)
        except ValueError as error:
            raise BenchmarkError(f"variant {variant}: {error}") from None


# ----------------------------------------------------------------------------- the record

def json_ready(config) -> dict:
    """The config as it reads back from JSON (tuples as lists), so that a saved config and a
    fresh one compare equal."""
    return json.loads(json.dumps(config.to_dict(), sort_keys=True, default=repr))


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"train.num_steps": 300, ...}: dotted paths to the leaves of nested dicts."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def make_record(options: Options, configs: Mapping[str, Any]) -> dict:
    return {
        "config_file": os.path.basename(options.config_file),
        "config_path": options.config_file,
        "target_overrides": dict(options.target_overrides),
        "config_overrides": sorted(options.config_overrides),
        "variants": list(options.variants),
        "pretrain": options.pretrain,
        "seeds": options.seeds,
        "configs": {v: json_ready(c) for v, c in configs.items()},
    }


def record_conflict(saved: Mapping, new: Mapping) -> str | None:
    """What makes `new` another benchmark than `saved` (the first differing field), or None.
    More seeds or variants are the same benchmark; other settings, or another resolved config
    of a variant both have, are not. A config field the saved record lacks is one a later
    version added (at its default, or the overrides would differ): no conflict, so that an
    upgrade does not orphan a benchmark's finished runs."""
    for field in ("config_file", "target_overrides", "config_overrides", "pretrain"):
        if saved.get(field) != new.get(field):
            return f"{field} is {saved.get(field)!r} there but {new.get(field)!r} here"
    for variant in new["configs"]:
        if variant not in saved.get("configs", {}):
            continue
        old, fresh = flatten(saved["configs"][variant]), flatten(new["configs"][variant])
        for key in sorted(old):
            if old[key] != fresh.get(key, "<absent>"):
                return (f"variant {variant}'s config.{key} is {old[key]!r} there but "
                        f"{fresh.get(key, '<absent>')!r} here")
    return None


def merge_records(saved: Mapping, new: Mapping) -> dict:
    """The record after this command: the variants and configs of both, the most seeds."""
    merged = dict(new)
    merged["variants"] = list(saved.get("variants", [])) + [
        v for v in new["variants"] if v not in saved.get("variants", [])]
    merged["seeds"] = max(saved.get("seeds", 0), new["seeds"])
    merged["configs"] = {**saved.get("configs", {}), **new["configs"]}
    return merged


def _write_json(path: str, value: Any) -> None:
    """Atomically: a benchmark killed while writing never leaves half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(path + ".tmp", path)


def claim_workdir(workdir: str, record: Mapping) -> None:
    """Create the workdir's record, or check this command against it and add to it."""
    path = os.path.join(workdir, RECORD_FILE)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        conflict = record_conflict(saved, record)
        if conflict:
            raise BenchmarkError(f"{workdir} holds a benchmark of another config ({conflict}); "
                                 "use a new --workdir for this one, or repeat the settings "
                                 f"recorded in {path}")
        record = merge_records(saved, record)
    elif os.path.isdir(workdir) and os.listdir(workdir):
        raise BenchmarkError(f"{workdir} is not empty and has no {RECORD_FILE}: it is not a "
                             "benchmark workdir; use a new --workdir")
    os.makedirs(workdir, exist_ok=True)
    _write_json(path, record)


# ----------------------------------------------------------------------------- runs

def run_dir(workdir: str, variant: str, seed_index: int) -> str:
    return os.path.join(workdir, variant, f"seed{seed_index}")


def final_results_path(directory: str, num_steps: int) -> str:
    return os.path.join(directory, RESULTS_SUBDIR, f"eval_step_{num_steps}.json")


def read_final_summary(directory: str, num_steps: int) -> dict | None:
    """The run's final evaluation, or None while it is not finished. A results file cut short
    by a kill does not count: the run is evaluated again."""
    path = final_results_path(directory, num_steps)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError:
        return None


def has_checkpoint(directory: str) -> bool:
    """Whether a run saved a checkpoint to resume from (orbax names each by its step; an
    unfinished save has another name)."""
    checkpoints = os.path.join(directory, "checkpoints")
    return os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))


def run_order(variants: Sequence[str], seeds: int) -> list[tuple[str, int]]:
    """Seed-major: every variant's seed 0 first, so an early stop still compares them all."""
    return [(variant, k) for k in range(seeds) for variant in variants]


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def estimate_remaining(finished: Sequence[tuple[str, float]],
                       remaining: Sequence[str]) -> float | None:
    """Seconds left for the runs of variants `remaining`, from (variant, wall seconds) of the
    runs trained so far: a variant's own mean where it has one (variants cost differently:
    LSD's step trains three networks), else the mean over all; None before any run finished."""
    if not remaining:
        return 0.0
    if not finished:
        return None
    overall = statistics.fmean(t for _, t in finished)
    total = 0.0
    for variant in remaining:
        own = [t for v, t in finished if v == variant]
        total += statistics.fmean(own) if own else overall
    return total


def format_miou(miou: float | None) -> str:
    return "n/a" if miou is None else f"{100 * miou:.2f} %"


def default_programs_for() -> Callable[[str, Any], Any]:
    """variant, config -> compiled programs, built once per variant (the seeds of a variant
    differ only in seeds, which the programs do not depend on)."""
    cache = {}

    def programs_for(variant, config):
        if variant not in cache:
            from lsd_jax.programs import build_programs
            cache[variant] = build_programs(config)
        return cache[variant]

    return programs_for


def run_stopping_errors() -> tuple[type[BaseException], ...]:
    """What training raises for the user to act on (a NaN loss, a missing dataset, a failed
    checkpoint save, Ctrl-C): lsd_jax.errors.UserError."""
    from lsd_jax.errors import UserError
    return (UserError,)


def train_run(config, directory: str, programs) -> dict:
    """Train (or resume) one run to the end and evaluate it; its final summary."""
    from lsd_jax import train

    try:
        result = train.train_and_evaluate(config, directory, programs=programs,
                                          evaluate_at_end=True)
    except run_stopping_errors() as error:
        exit_code = getattr(error, "exit_code", 1)
        hint = "; run the same command again to continue" if exit_code == 130 else ""
        raise BenchmarkError(f"run {directory}: {one_line(error)}{hint}", exit_code) from None
    if getattr(result, "stopped_by", None):  # SIGTERM: saved, not evaluated
        raise StoppedBySignal(f"run {directory} stopped by {result.stopped_by} at step "
                              f"{result.step} with a checkpoint saved; run the same command "
                              "again to continue")
    return result.eval_summary


def run_all(options: Options, configs: Mapping[str, Any], programs_for, out: TextIO
            ) -> dict[str, list[dict]]:
    """Train every run not finished yet, printing a line as each starts and finishes;
    {variant: [final summary of seed 0, 1, ...]}."""
    order = run_order(options.all_variants, options.seeds)
    summaries: dict[str, list[dict]] = {v: [None] * options.seeds for v in options.all_variants}
    trained: list[tuple[str, float]] = []
    width = len(str(len(order)))

    def say(line):
        print(line, file=out, flush=True)

    for index, (variant, k) in enumerate(order, 1):
        config = run_config(options, configs, variant, k)
        directory = run_dir(options.workdir, variant, k)
        tag = f"[{index:>{width}}/{len(order)}] {variant} seed {k}"
        summary = read_final_summary(directory, config.train.num_steps)
        if summary is None:
            resuming = has_checkpoint(directory)
            say(f"{tag}: {'resuming' if resuming else 'starting'} in {directory}")
            start = time.perf_counter()
            summary = train_run(config, directory, programs_for(variant, config))
            seconds = time.perf_counter() - start
            trained.append((variant, seconds))
            remaining = [v for v, seed in order[index:]
                         if read_final_summary(run_dir(options.workdir, v, seed),
                                               configs[v].train.num_steps) is None]
            eta = estimate_remaining(trained, remaining)
            say(f"{tag}: finished, mIoU {format_miou(summary['miou'])}, "
                f"{format_duration(seconds)}; {len(remaining)} "
                f"run{'' if len(remaining) == 1 else 's'} left, "
                f"ETA {format_duration(eta)}")
        else:
            say(f"{tag}: finished before, mIoU {format_miou(summary['miou'])} (kept)")
        summaries[variant][k] = summary
    return summaries


# ----------------------------------------------------------------------------- tables

def mean_or_none(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return statistics.fmean(defined) if defined else None


def sample_std_or_none(values: Sequence[float | None]) -> float | None:
    """Sample standard deviation (ddof=1): the seeds are a sample of what the method gives.
    None with fewer than two values, where it is undefined."""
    defined = [v for v in values if v is not None]
    return statistics.stdev(defined) if len(defined) > 1 else None


def gap_closed(value: float | None, baseline: float | None, oracle: float | None
               ) -> float | None:
    """How much of the baseline-to-oracle gap `value` closes, in %: 100 (v - b) / (o - b).
    None where a number is missing or the gap is zero."""
    if value is None or baseline is None or oracle is None or oracle == baseline:
        return None
    return 100.0 * (value - baseline) / (oracle - baseline)


def variant_statistics(summaries: Sequence[Mapping]) -> dict:
    """mIoU mean, sample std and per-seed values, and per-class IoU means, of one variant's runs
    (fractions in [0, 1], as in the runs' results JSON)."""
    mious = [s["miou"] for s in summaries]
    class_names = list(summaries[0]["per_class_iou"])
    return {
        "num_seeds": len(summaries),
        "miou": mious,
        "miou_mean": mean_or_none(mious),
        "miou_std": sample_std_or_none(mious),
        "per_class_iou_mean": {name: mean_or_none([s["per_class_iou"].get(name)
                                                   for s in summaries])
                               for name in class_names},
    }


def benchmark_results(summaries: Mapping[str, Sequence[Mapping]], baseline: str, oracle: str
                      ) -> dict:
    """{variant: statistics, with gap_closed_percent for every variant but the baseline and
    the oracle} from each variant's per-seed final summaries."""
    results = {v: variant_statistics(s) for v, s in summaries.items()}
    base = results.get(baseline, {}).get("miou_mean")
    top = results.get(oracle, {}).get("miou_mean")
    for variant, stats in results.items():
        stats["gap_closed_percent"] = (None if variant in (baseline, oracle)
                                       else gap_closed(stats["miou_mean"], base, top))
    return results


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def results_markdown(results: Mapping[str, Mapping], baseline: str, oracle: str,
                     title: str) -> str:
    """The mIoU table (mean ± sample std, per seed, gap closed) and the per-class IoU means."""
    lines = [f"# {title}", "",
             f"mIoU in % on the target evaluation set: mean ± sample std (ddof=1) over seeds; "
             f"gap closed = 100 (variant - {baseline}) / ({oracle} - {baseline}).", "",
             "| variant | seeds | mIoU (%) | per seed (%) | gap closed (%) |",
             "|---|---:|---:|---|---:|"]
    for variant, stats in results.items():
        mean, std = stats["miou_mean"], stats["miou_std"]
        miou = _percent(mean) + ("" if std is None else f" ± {100 * std:.2f}")
        per_seed = ", ".join(_percent(m) for m in stats["miou"])
        gap = stats["gap_closed_percent"]
        gap_text = "—" if gap is None else f"{gap:.1f}"
        lines.append(f"| {variant} | {stats['num_seeds']} | {miou} | {per_seed} | {gap_text} |")
    variants = list(results)
    class_names = list(next(iter(results.values()))["per_class_iou_mean"]) if results else []
    lines += ["", "Per-class IoU (%), mean over seeds:", "",
              "| class | " + " | ".join(variants) + " |",
              "|---|" + "---:|" * len(variants)]
    for name in class_names:
        lines.append(f"| {name} | " + " | ".join(
            _percent(results[v]["per_class_iou_mean"].get(name)) for v in variants) + " |")
    return "\n".join(lines) + "\n"


def results_document(options: Options, results: Mapping[str, Mapping],
                     summaries: Mapping[str, Sequence[Mapping]]) -> dict:
    return {
        "config_file": options.config_file,
        "target_overrides": dict(options.target_overrides),
        "config_overrides": list(options.config_overrides),
        "seeds": options.seeds,
        "baseline": options.baseline,
        "oracle": options.oracle,
        "miou_std": STD_DESCRIPTION,
        "evaluated_on": {v: {"dataset": s[0].get("dataset"), "split": s[0].get("split"),
                             "step": s[0].get("step")} for v, s in summaries.items()},
        "runs": {v: [run_dir(options.workdir, v, k) for k in range(len(s))]
                 for v, s in summaries.items()},
        "variants": dict(results),
    }


def benchmark_title(options: Options) -> str:
    target = ", ".join(f"{k}={v}" for k, v in options.target_overrides.items())
    return (f"Benchmark: {os.path.basename(options.config_file)}"
            + (f", target {target}" if target else "") + f", {options.seeds} seeds")


# ----------------------------------------------------------------------------- pictures

def _pyplot():
    """matplotlib, imported only to draw (headless: the Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_miou(results: Mapping[str, Mapping], title: str, path: str) -> None:
    """Bars of the mean mIoU with sample-std error bars and the per-seed values as dots."""
    plt = _pyplot()
    variants = list(results)
    means = [100 * (results[v]["miou_mean"] or 0.0) for v in variants]
    errors = [100 * (results[v]["miou_std"] or 0.0) for v in variants]
    figure, axes = plt.subplots(figsize=(1.6 * len(variants) + 2, 4))
    positions = range(len(variants))
    axes.bar(positions, means, yerr=errors, capsize=6, color="#8fb3d9", edgecolor="#2b5a8a")
    for x, variant in zip(positions, variants):
        seeds = [100 * m for m in results[variant]["miou"] if m is not None]
        axes.scatter([x] * len(seeds), seeds, color="black", s=12, zorder=3)
    axes.set_xticks(list(positions), variants)
    axes.set_ylabel("mIoU (%) on the target")
    axes.set_title(title + "\nmean ± sample std over seeds; dots: seeds", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_predictions(images: Sequence, labels: Sequence, predictions: Mapping[str, Sequence],
                     colors, path: str) -> None:
    """Rows of scenes: RGB image, ground truth, then each variant's prediction (colourised)."""
    from lsd_jax import visualize

    plt = _pyplot()
    columns = ["image", "ground truth", *predictions]
    rows = len(images)
    height, width = images[0].shape[:2]
    panel_inches = 2.4  # wide; high as the scenes' aspect says
    figure, axes = plt.subplots(rows, len(columns), squeeze=False,
                                figsize=(len(columns) * panel_inches,
                                         rows * panel_inches * height / width + 0.4))
    for r in range(rows):
        panels = [images[r], visualize.colorize(labels[r], colors)] + [
            visualize.resize_nearest(visualize.colorize(p[r], colors), height, width)
            for p in predictions.values()]
        for c, panel in enumerate(panels):
            axes[r][c].imshow(panel, interpolation="nearest")
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
            if r == 0:
                axes[r][c].set_title(columns[c], fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def first_eval_examples(config, mesh, count: int) -> dict:
    """The first `count` real examples of `config.data.eval`: F's input (global arrays, for the
    predictions), and as host numpy the RGB images and labels."""
    import numpy as np

    from lsd_jax import visualize
    from lsd_jax.data import pipeline

    batch = next(iter(pipeline.eval_batches(config.data, mesh)))
    mask = np.asarray(batch["mask"]) if "mask" in batch else None
    count = min(count, int(mask.sum()) if mask is not None else len(batch["label"]))
    return {"input": batch["image"], "count": count,
            "images": visualize.denormalize_image(np.asarray(batch["image"])[:count]),
            "labels": np.asarray(batch["label"])[:count]}


def restored_predictions(config, directory: str, programs, inputs, label_size) -> Any:
    """Class maps (N, H, W) at label size from the final checkpoint of the run in `directory`."""
    import numpy as np

    from lsd_jax import checkpoint, evaluate

    # F alone, as saved: the run's other networks and optimizer states are not needed, and
    # need not have the layout this version would give them.
    _, variables = checkpoint.read_network(directory, "f", config.train.num_steps)
    variables = {k: v for k, v in variables.items() if k == "params" or v}
    logits = programs.predict(variables, inputs)
    return np.asarray(evaluate.predict_labels(logits, *label_size))


def write_prediction_grid(options: Options, configs: Mapping[str, Any], programs_for,
                          path: str, out: TextIO) -> None:
    """predictions.png: the same target validation scenes through every variant's seed-0 run.
    Skipped, with a note, where a run's final checkpoint is gone (deleted to save space): the
    tables do not need it."""
    from lsd_jax.data import classes

    first = configs[options.variants[0]]
    examples = first_eval_examples(first, programs_for(options.variants[0], first).mesh,
                                   options.num_pictures)
    count, labels = examples["count"], examples["labels"]
    predictions = {}
    for variant in options.all_variants:
        config = configs[variant]
        try:
            maps = restored_predictions(config, run_dir(options.workdir, variant, 0),
                                        programs_for(variant, config), examples["input"],
                                        labels.shape[1:3])
        except FileNotFoundError as error:
            print(f"No {os.path.basename(path)}: {variant} seed 0 has no final checkpoint "
                  f"({str(error).splitlines()[0]})", file=out, flush=True)
            return
        predictions[variant] = maps[:count]
    plot_predictions(examples["images"], labels, predictions,
                     classes.class_colors(first.data.class_set), path)


# ----------------------------------------------------------------------------- the program

def run_benchmark(options: Options, *, programs_for: Callable | None = None,
                  out: TextIO | None = None) -> dict:
    """Everything after parsing: check the inputs, train what is not finished, write the
    tables and pictures; the results.json document. Progress lines go to `out` (stdout)."""
    out = sys.stdout if out is None else out  # looked up now: stdout may have been replaced
    configs = resolve_configs(options)
    check_run_configs(configs)
    claim_workdir(options.workdir, make_record(options, configs))
    programs_for = programs_for or default_programs_for()

    summaries = run_all(options, configs, programs_for, out)
    results = benchmark_results(summaries, options.baseline, options.oracle)
    document = results_document(options, results, summaries)
    title = benchmark_title(options)
    workdir = options.workdir
    _write_json(os.path.join(workdir, "results.json"), document)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(results_markdown(results, options.baseline, options.oracle, title))
    plot_miou(results, title, os.path.join(workdir, "miou.png"))
    if options.num_pictures:
        write_prediction_grid(options, configs, programs_for,
                              os.path.join(workdir, "predictions.png"), out)
    print(f"Results: {os.path.join(workdir, 'results.md')}", file=out, flush=True)
    return document


class _DropRepeatedDatasetNotes:
    """TFDS warns 'Using custom data configuration' at every load of an overridden dataset,
    several times per run; the benchmark's own lines say more."""

    def filter(self, record) -> bool:
        return "Using custom data configuration" not in record.getMessage()


def quiet_console() -> None:
    """The benchmark's progress lines, not the libraries' repeated notes and progress bars."""
    from lsd_jax.tf_quiet import import_tensorflow_datasets

    tfds = import_tensorflow_datasets()
    logging.getLogger("absl").addFilter(_DropRepeatedDatasetNotes())
    tfds.disable_progress_bar()  # datasets generated on first use announce themselves anyway


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        options = parse_args(argv)
        quiet_console()
        run_benchmark(options)
    except BenchmarkError as error:
        print(f"lsd_jax.benchmark: {error}", file=sys.stderr)
        return error.exit_code
    except StoppedBySignal as stop:  # as lsd_jax.main: a planned stop, not a failure
        print(f"lsd_jax.benchmark: {stop}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:  # outside a run's training (which reports it itself)
        print("lsd_jax.benchmark: interrupted (Ctrl-C); run the same command again to continue",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
