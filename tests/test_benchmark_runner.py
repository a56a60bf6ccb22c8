"""The benchmark runner (`python -m lsd_jax.benchmark`): tables, resuming, refusing bad input."""
import dataclasses
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import types

import pytest
from PIL import Image

from lsd_jax import benchmark, reporting, train
from train_helpers import REPO_ROOT, TINY_SCENES, load_config_file, tiny_programs

SYNTHETIC = os.path.join(REPO_ROOT, "configs", "synthetic.py")

# A config file with a variant of its own: the runner must take any variant a file accepts.
# source_only_noflip changes only the data, so its compiled programs are source_only's.
EXTRA_VARIANT_CONFIG = f'''
import importlib.util

_spec = importlib.util.spec_from_file_location("synthetic_for_benchmark_test", {SYNTHETIC!r})
_synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_synthetic)

VARIANTS = ("source_only", "source_only_noflip", "target_only")


def get_config(variant="source_only"):
    if variant not in VARIANTS:
        raise ValueError(f"variant {{variant!r}}: expected one of {{VARIANTS}}")
    config = _synthetic.get_config("source_only" if variant == "source_only_noflip" else variant)
    if variant == "source_only_noflip":
        config.data.source.flip = False
    return config
'''

VARIANTS = ("source_only", "source_only_noflip", "target_only")


def tiny_overrides(data_dir):
    """configs/synthetic.py at train_helpers.tiny_config's sizes, 2 steps, as --config flags."""
    scenes = json.dumps(TINY_SCENES)
    return [f"--config.data.data_dir={data_dir}", "--config.data.shuffle_buffer=16",
            "--config.data.source.crop=(32, 64)", "--config.data.target.crop=(32, 64)",
            "--config.data.target.split=train[:12]", "--config.data.selection.split=train[12:]",
            "--config.data.eval.scale=(32, 64)", "--config.data.selection.scale=(32, 64)",
            "--config.data.eval.batch_size=4", "--config.data.selection.batch_size=4",
            "--config.train.num_steps=2", "--config.train.log_every=2",
            "--config.train.image_every=0", "--config.train.eval_every=0",
            "--config.checkpoint.every=2", "--config.eval.num_images=2"] + [
        f"--config.data.{d}.config_overrides={scenes}"
        for d in ("source", "target", "eval", "selection")]


def programs_for(variant, config):
    """Compiled once per test process for 2 of the simulated devices (see train_helpers)."""
    return tiny_programs(config.method)


def summary(miou, per_class):
    return {"miou": miou, "per_class_iou": per_class}


# ----------------------------------------------------------------------------- pure functions

def test_statistics_and_gap_closed_on_hand_made_results():
    summaries = {
        "source_only": [summary(0.20, {"road": 0.5, "sky": None}),
                        summary(0.30, {"road": 0.7, "sky": 0.1})],
        "lsd": [summary(0.40, {"road": 0.8, "sky": 0.2}), summary(0.50, {"road": 0.9, "sky": 0.4})],
        "target_only": [summary(0.60, {"road": 1.0, "sky": 0.5}),
                        summary(0.70, {"road": 1.0, "sky": 0.7})],
    }
    results = benchmark.benchmark_results(summaries, "source_only", "target_only")
    lsd = results["lsd"]
    assert lsd["miou"] == [0.40, 0.50]
    assert lsd["miou_mean"] == pytest.approx(0.45)
    assert lsd["miou_std"] == pytest.approx(statistics.stdev([0.40, 0.50]))  # ddof=1
    assert lsd["miou_std"] == pytest.approx(0.0707107, abs=1e-6)
    assert lsd["per_class_iou_mean"] == pytest.approx({"road": 0.85, "sky": 0.3})
    # (0.45 - 0.25) / (0.65 - 0.25) = 50 %
    assert lsd["gap_closed_percent"] == pytest.approx(50.0)
    assert results["source_only"]["gap_closed_percent"] is None
    assert results["target_only"]["gap_closed_percent"] is None
    # An undefined IoU (None) of one seed is left out of that class's mean.
    assert results["source_only"]["per_class_iou_mean"]["sky"] == pytest.approx(0.1)


def test_gap_closed_needs_both_ends_and_a_gap():
    assert benchmark.gap_closed(0.3, 0.2, 0.6) == pytest.approx(25.0)
    assert benchmark.gap_closed(0.1, 0.2, 0.6) == pytest.approx(-25.0)  # worse than baseline
    assert benchmark.gap_closed(0.3, None, 0.6) is None
    assert benchmark.gap_closed(0.3, 0.2, None) is None
    assert benchmark.gap_closed(0.3, 0.4, 0.4) is None
    one_seed = benchmark.benchmark_results({"lsd": [summary(0.4, {"road": 0.4})]},
                                           "source_only", "target_only")
    assert one_seed["lsd"]["miou_std"] is None and one_seed["lsd"]["gap_closed_percent"] is None


def test_results_markdown_rows():
    results = benchmark.benchmark_results(
        {"source_only": [summary(0.2, {"road": 0.5})],
         "lsd": [summary(0.3, {"road": 0.6}), summary(0.5, {"road": 0.8})],
         "target_only": [summary(0.6, {"road": 0.9})]}, "source_only", "target_only")
    text = benchmark.results_markdown(results, "source_only", "target_only", "Title")
    assert text.startswith("# Title\n")
    assert "| lsd | 2 | 40.00 ± 14.14 | 30.00, 50.00 | 50.0 |" in text
    assert "| source_only | 1 | 20.00 | 20.00 | — |" in text
    assert "| road | 50.00 | 70.00 | 90.00 |" in text


def test_estimate_remaining_uses_each_variants_own_time_where_known():
    assert benchmark.estimate_remaining([], ["lsd"]) is None
    assert benchmark.estimate_remaining([("lsd", 10.0)], []) == 0.0
    finished = [("lsd", 30.0), ("lsd", 50.0), ("source_only", 10.0)]
    # lsd: its own mean 40; target_only: none yet, the mean of all (30).
    assert benchmark.estimate_remaining(finished, ["lsd", "target_only"]) == pytest.approx(70.0)
    assert benchmark.format_duration(3725) == "1h02m"
    assert benchmark.format_duration(None) == "?"


def test_target_values_are_numbers_where_they_are_numbers():
    assert benchmark.parse_target_overrides(["noise=20", "blur=2.5", "palette=photo"]) == {
        "noise": 20, "blur": 2.5, "palette": "photo"}
    assert benchmark.parse_value("nan") == "nan"
    with pytest.raises(benchmark.BenchmarkError, match="expected FIELD=VALUE"):
        benchmark.parse_target_overrides(["noise"])
    fields = {"noise": 0.0, "num_train": 1000, "palette": "game"}
    checked = benchmark.check_target_overrides({"noise": 20, "num_train": 8}, fields, "ds")
    assert checked == {"noise": 20.0, "num_train": 8} and isinstance(checked["noise"], float)
    with pytest.raises(benchmark.BenchmarkError,
                       match=r"--target nois: not a field of ds's builder config; valid fields: "
                             r"noise, num_train, palette"):
        benchmark.check_target_overrides({"nois": 1}, fields, "ds")
    with pytest.raises(benchmark.BenchmarkError, match="expected a number"):
        benchmark.check_target_overrides({"noise": "loud"}, fields, "ds")


def test_synthetic_scenes_builder_fields_exclude_tfds_own():
    fields = benchmark.builder_config_fields("synthetic_scenes/target")
    assert {"noise", "blur", "height", "num_train"} <= set(fields)
    assert "name" not in fields and "description" not in fields


def test_target_overrides_reach_every_set_that_reads_the_target():
    lsd = benchmark.with_target_overrides(load_config_file("synthetic", "lsd"), {"noise": 20.0})
    data = lsd.data
    for field in ("target", "selection", "eval"):
        assert data[field].config_overrides.to_dict() == {"noise": 20.0}, field
    assert data.source.config_overrides.to_dict() == {}  # the source is another dataset
    oracle = benchmark.with_target_overrides(load_config_file("synthetic", "target_only"),
                                             {"blur": 2.0})
    assert oracle.data.source.config_overrides.to_dict() == {"blur": 2.0}  # it trains on it
    merged = load_config_file("synthetic", "lsd")
    merged.data.eval.config_overrides = {"height": 64}
    benchmark.with_target_overrides(merged, {"noise": 1.0})
    assert merged.data.eval.config_overrides.to_dict() == {"height": 64, "noise": 1.0}


def test_seed_index_raises_both_seeds():
    config = load_config_file("synthetic", "lsd")
    second = benchmark.seeded(config, 2)
    assert (second.seed, second.data.seed) == (config.seed + 2, config.data.seed + 2)
    assert benchmark.run_dir("w", "lsd", 2) == os.path.join("w", "lsd", "seed2")


def test_f_workdir_with_seed_names_each_seeds_own_run():
    options = benchmark.Options(config_file=SYNTHETIC, variants=("lsd", "source_only"), seeds=2,
                                workdir="w", config_overrides=(
                                    "--config.init.f_workdir=runs/b/pretrain/seed{seed}",))
    configs = benchmark.resolve_configs(options)
    assert [benchmark.run_config(options, configs, v, k).init.f_workdir
            for v in ("lsd", "source_only") for k in (0, 1)] == [
        "runs/b/pretrain/seed0", "runs/b/pretrain/seed1"] * 2
    assert configs["lsd"].init.f_workdir == "runs/b/pretrain/seed{seed}"  # as recorded
    fixed = dataclasses.replace(options, config_overrides=("--config.init.f_workdir=runs/pre",))
    configs = benchmark.resolve_configs(fixed)
    assert benchmark.run_config(fixed, configs, "lsd", 1).init.f_workdir == "runs/pre"


def test_record_accepts_more_seeds_and_variants_and_names_what_differs():
    options = benchmark.Options(config_file=SYNTHETIC, variants=("lsd",), seeds=2, workdir="w",
                                config_overrides=("--config.train.num_steps=5",))
    configs = benchmark.resolve_configs(options)
    saved = benchmark.make_record(options, configs)
    more = benchmark.Options(config_file=SYNTHETIC, variants=("lsd", "source_only"), seeds=3,
                             workdir="w", config_overrides=("--config.train.num_steps=5",))
    bigger = benchmark.make_record(more, benchmark.resolve_configs(more))
    assert benchmark.record_conflict(saved, bigger) is None
    merged = benchmark.merge_records(saved, bigger)
    assert merged["variants"] == ["lsd", "source_only"] and merged["seeds"] == 3
    assert benchmark.record_conflict(merged, saved) is None  # fewer is the same benchmark too

    other = benchmark.make_record(
        benchmark.Options(config_file=SYNTHETIC, variants=("lsd",), seeds=2, workdir="w",
                          config_overrides=("--config.train.num_steps=6",)), configs)
    assert benchmark.record_conflict(saved, other).startswith("config_overrides is")
    changed = {**saved, "configs": {"lsd": {**saved["configs"]["lsd"], "seed": 1}}}
    assert benchmark.record_conflict(changed, saved) == (
        "variant lsd's config.seed is 1 there but 1337 here")
    # A field the saved record lacks came with a later version: its finished runs still count.
    # One only the saved record has is another benchmark.
    older = {**saved, "configs": {"lsd": {k: v for k, v in saved["configs"]["lsd"].items()
                                          if k != "adversarial"}}}
    assert benchmark.record_conflict(older, saved) is None
    assert benchmark.record_conflict(saved, older) == (
        "variant lsd's config.adversarial.adv_weight is 0.001 there but '<absent>' here")


def test_a_results_file_cut_short_is_not_a_finished_run(tmp_path):
    path = benchmark.final_results_path(str(tmp_path), 7)
    assert benchmark.read_final_summary(str(tmp_path), 7) is None
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write('{"miou": 0.')
    assert benchmark.read_final_summary(str(tmp_path), 7) is None
    with open(path, "w") as f:
        f.write('{"miou": 0.5}')
    assert benchmark.read_final_summary(str(tmp_path), 7) == {"miou": 0.5}
    assert benchmark.RESULTS_SUBDIR == reporting.RESULTS_SUBDIR


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, message", [
    (["--config", "configs/missing.py"], "config file configs/missing.py does not exist"),
    (["--config", "configs/synthetic.py", "--variants", "lsd,bogus"],
     "unknown variant 'bogus' for configs/synthetic.py: expected one of lsd, source_only, "
     "target_only, adaptsegnet, adaptsegnet_multi, adaptsegnet_ls, advent, minent, adda, grl, "
     "confusion, fcn_wild, fcan_ran, fcan, dacs, dacs_mic, pretrain, demo"),
    (["--config", "configs/synthetic.py", "--target", "nois=3"],
     "--target nois: not a field of synthetic_scenes/target's builder config; valid fields: "
     "blur, class_set, color_jitter, gamma, height, lighting, noise, num_train, num_validation, "
     "palette, seed, texture, width"),
    (["--config", "configs/synthetic.py", "--config.train.num_stepz=3"],
     "--config.train.num_stepz=3: no such config field: 'num_stepz' Did you mean \"num_steps\""),
    (["--config", "configs/synthetic.py", "--seeds", "0"], "--seeds 0: expected at least 1"),
    (["--config", "configs/synthetic.py", "--variants", "source_only,lsd", "--pretrain",
      "source_only"], "--pretrain source_only is also in --variants: a variant cannot start "
     "from its own run"),
    (["--config", "configs/synthetic.py", "--variants", "lsd", "--pretrain", "bogus"],
     "unknown variant 'bogus' for configs/synthetic.py"),
    (["--config", "configs/synthetic.py", "--variants", "lsd", "--pretrain", "source_only",
      "--config.init.f_workdir=runs/pre"], "--pretrain source_only and --config.init.f_workdir "
     "both say where F starts: give one"),
    (["--config", "configs/synthetic.py", "--variants", "lsd", "--pretrain", "source_only",
      "--config.init.f_file=f.npz"], "--pretrain source_only and --config.init.f_file "
     "both say where F starts: give one"),
])
def test_bad_input_is_one_line_and_trains_nothing(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(REPO_ROOT)
    workdir = tmp_path / "bench"
    assert benchmark.main([*args, "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lsd_jax.benchmark: {message}")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not workdir.exists()


def test_unknown_variant_lists_those_the_config_module_names(tmp_path, capsys):
    config_file = tmp_path / "extra.py"
    config_file.write_text(EXTRA_VARIANT_CONFIG)
    assert benchmark.main(["--config", str(config_file), "--variants", "lsd",
                           "--workdir", str(tmp_path / "bench")]) == 1
    assert capsys.readouterr().err == (
        f"lsd_jax.benchmark: unknown variant 'lsd' for {config_file}: expected one of "
        "source_only, source_only_noflip, target_only\n")


def test_a_workdir_that_is_no_benchmark_is_refused(tmp_path, capsys):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "config.json").write_text("{}")
    assert benchmark.main(["--config", SYNTHETIC, "--variants", "lsd",
                           "--workdir", str(tmp_path / "bench")]) == 1
    assert "not a benchmark workdir; use a new --workdir" in capsys.readouterr().err


@pytest.mark.slow
def test_the_module_runs_as_a_program_and_exits_1_on_bad_input(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lsd_jax.benchmark", "--config", "configs/synthetic.py",
         "--variants", "bogus", "--workdir", str(tmp_path / "bench")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("lsd_jax.benchmark: unknown variant 'bogus'")
    assert "Traceback" not in result.stderr


def test_a_run_stopped_by_the_user_or_an_error_stops_the_benchmark_with_its_status(
        monkeypatch):
    from lsd_jax import errors

    def stop(error):
        def train_and_evaluate(config, workdir, **kwargs):
            raise error
        monkeypatch.setattr(train, "train_and_evaluate", train_and_evaluate)

    stop(train.NonFiniteLossError("loss term 'f/seg' is nan at step 3"))
    with pytest.raises(benchmark.BenchmarkError, match=r"^run w/lsd/seed0: loss term") as error:
        benchmark.train_run(None, "w/lsd/seed0", None)
    assert error.value.exit_code == 1
    stop(errors.Interrupted("interrupted (Ctrl-C); the last good checkpoint is step 2"))
    with pytest.raises(benchmark.BenchmarkError,
                       match="step 2; run the same command again to continue$") as error:
        benchmark.train_run(None, "w/lsd/seed0", None)
    assert error.value.exit_code == 130


def test_a_run_stopped_by_sigterm_stops_the_benchmark_to_be_continued(monkeypatch):
    stopped = types.SimpleNamespace(step=1, eval_summary=None, stopped_by="SIGTERM")
    monkeypatch.setattr(train, "train_and_evaluate", lambda config, workdir, **kwargs: stopped)
    with pytest.raises(benchmark.StoppedBySignal,
                       match="stopped by SIGTERM at step 1 .* run the same command again"):
        benchmark.train_run(None, "w/lsd/seed0", None)


# ----------------------------------------------------------------------------- end to end

class TrainSpy:
    """Wraps train.train_and_evaluate: records the run workdirs it trains and, when told,
    stops the benchmark in the middle of a run (half its steps done and checkpointed), as a
    kill would."""

    def __init__(self, interrupt_at_call=None):
        self.real = train.train_and_evaluate
        self.calls = []
        self.f_workdirs = []  # config.init.f_workdir of each call
        self.interrupt_at_call = interrupt_at_call

    def __call__(self, config, workdir, **kwargs):
        self.calls.append(os.path.relpath(workdir, os.path.dirname(os.path.dirname(workdir))))
        self.f_workdirs.append(config.init.f_workdir)
        if len(self.calls) == self.interrupt_at_call:
            half = config.copy_and_resolve_references()
            half.train.num_steps = config.train.num_steps // 2
            self.real(half, workdir, programs=kwargs["programs"], evaluate_at_end=False)
            raise KeyboardInterrupt
        return self.real(config, workdir, **kwargs)


def run_with_spy(spy, options, capsys):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "train_and_evaluate", spy)
        try:
            benchmark.run_benchmark(options, programs_for=programs_for)
        finally:
            out = capsys.readouterr().out
    return out


def final_json_mtimes(workdir):
    return {(v, k): os.stat(benchmark.final_results_path(benchmark.run_dir(workdir, v, k), 2)
                            ).st_mtime_ns for v in VARIANTS for k in range(2)}


@pytest.fixture(scope="module")
def finished_benchmark(tmp_path_factory):
    """3 variants x 2 seeds, stopped in the middle of the second run, then run again to the
    end, then once more; what each invocation printed and trained."""
    root = tmp_path_factory.mktemp("benchmark")
    config_file = root / "extra.py"
    config_file.write_text(EXTRA_VARIANT_CONFIG)
    options = benchmark.Options(
        config_file=str(config_file), variants=VARIANTS, seeds=2, workdir=str(root / "bench"),
        config_overrides=tuple(tiny_overrides(str(root / "tfds"))), num_pictures=2)
    outputs, spies = [], []
    for interrupt_at_call in (2, None, None):
        spy = TrainSpy(interrupt_at_call)
        buffer = io.StringIO()  # capsys is per test; the progress lines go here instead
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train, "train_and_evaluate", spy)
            try:
                benchmark.run_benchmark(options, programs_for=programs_for, out=buffer)
                mtimes = final_json_mtimes(options.workdir)
            except KeyboardInterrupt:
                mtimes = None
        outputs.append(buffer.getvalue())
        spies.append((spy.calls, mtimes))
    return options, outputs, spies


@pytest.mark.slow
def test_an_interrupted_benchmark_resumes_and_a_finished_one_trains_nothing(finished_benchmark):
    """About 20 s: trains two tiny variants, is stopped, and resumes."""
    options, outputs, spies = finished_benchmark
    order = [os.path.join(v, f"seed{k}") for k in range(2) for v in VARIANTS]
    (first_calls, first_mtimes), (second_calls, second_mtimes), (third_calls, third_mtimes) = \
        spies
    assert first_calls == order[:2] and first_mtimes is None  # stopped in run 2
    assert "[1/6] source_only seed 0: starting" in outputs[0]
    assert "[2/6] source_only_noflip seed 0: starting" in outputs[0]

    assert second_calls == order[1:]  # run 1 is kept; run 2 resumes; the rest are new
    assert "[1/6] source_only seed 0: finished before, mIoU" in outputs[1]
    assert "[2/6] source_only_noflip seed 0: resuming" in outputs[1]
    assert "[6/6] target_only seed 1: finished, mIoU" in outputs[1]
    assert "0 runs left, ETA 0m00s" in outputs[1]
    assert "4 runs left, ETA" in outputs[1]

    assert third_calls == [] and third_mtimes == second_mtimes  # nothing redone or rewritten
    assert outputs[2].count("finished before") == 6


@pytest.mark.slow
def test_the_resumed_run_continued_from_its_checkpoint(finished_benchmark):
    options, _, _ = finished_benchmark
    from lsd_jax import checkpoint

    directory = benchmark.run_dir(options.workdir, "source_only_noflip", 0)
    manager = checkpoint.make_manager(directory, read_only=True)
    assert checkpoint.available_steps(manager) == [1, 2]
    manager.close()


@pytest.mark.slow
def test_tables_and_pictures_agree_with_every_runs_results(finished_benchmark):
    options, _, _ = finished_benchmark
    workdir = options.workdir
    with open(os.path.join(workdir, "results.json")) as f:
        document = json.load(f)
    assert list(document["variants"]) == list(VARIANTS)
    assert document["seeds"] == 2 and "ddof=1" in document["miou_std"]
    means = {}
    for variant in VARIANTS:
        runs = []
        for k in range(2):
            with open(benchmark.final_results_path(benchmark.run_dir(workdir, variant, k), 2)) as f:
                runs.append(json.load(f))
        stats = document["variants"][variant]
        mious = [r["miou"] for r in runs]
        assert stats["miou"] == mious
        assert stats["miou_mean"] == pytest.approx(statistics.fmean(mious))
        assert stats["miou_std"] == pytest.approx(statistics.stdev(mious))
        road = [r["per_class_iou"]["road"] for r in runs]
        assert stats["per_class_iou_mean"]["road"] == pytest.approx(statistics.fmean(road))
        assert runs[0]["step"] == 2 and runs[0]["split"] == "validation"
        means[variant] = stats["miou_mean"]
    expected_gap = 100 * (means["source_only_noflip"] - means["source_only"]) / (
        means["target_only"] - means["source_only"])
    assert document["variants"]["source_only_noflip"]["gap_closed_percent"] == pytest.approx(
        expected_gap)

    with open(os.path.join(workdir, "results.md")) as f:
        table = f.read()
    row = [line for line in table.splitlines() if line.startswith("| source_only_noflip |")]
    assert len(row) == 1 and f"{expected_gap:.1f} |" in row[0]
    for name in ("miou.png", "predictions.png"):
        with Image.open(os.path.join(workdir, name)) as picture:
            assert picture.format == "PNG" and min(picture.size) > 100
    with Image.open(os.path.join(workdir, "predictions.png")) as grid:
        assert grid.size[0] > grid.size[1]  # 5 columns (image, truth, 3 variants) x 2 rows

    with open(os.path.join(workdir, benchmark.RECORD_FILE)) as f:
        record = json.load(f)
    assert record["variants"] == list(VARIANTS) and record["seeds"] == 2
    assert record["configs"]["source_only_noflip"]["data"]["source"]["flip"] is False


@pytest.mark.slow
def test_another_config_in_the_same_workdir_is_refused_naming_the_field(finished_benchmark,
                                                                        capsys):
    options, _, _ = finished_benchmark
    before = final_json_mtimes(options.workdir)
    other_steps = [*options.config_overrides, "--config.train.num_steps=3"]
    args = ["--config", options.config_file, "--variants", ",".join(VARIANTS),
            "--workdir", options.workdir, *other_steps]
    assert benchmark.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lsd_jax.benchmark: {options.workdir} holds a benchmark of another "
                          "config (config_overrides is ")
    assert "use a new --workdir" in err and err.count("\n") == 1
    assert benchmark.main(["--config", SYNTHETIC, "--variants", "source_only", "--workdir",
                           options.workdir, *options.config_overrides]) == 1
    assert "(config_file is 'extra.py' there but 'synthetic.py' here)" in capsys.readouterr().err
    assert final_json_mtimes(options.workdir) == before


@pytest.mark.slow
def test_more_seeds_train_only_the_new_runs(finished_benchmark, tmp_path, capsys):
    options, _, _ = finished_benchmark
    workdir = str(tmp_path / "bench")
    shutil.copytree(options.workdir, workdir)
    more = benchmark.Options(config_file=options.config_file, variants=("source_only",),
                             seeds=3, workdir=workdir, config_overrides=options.config_overrides,
                             num_pictures=0)
    spy = TrainSpy()
    out = run_with_spy(spy, more, capsys)
    assert spy.calls == [os.path.join("source_only", "seed2")]
    assert "[3/3] source_only seed 2: starting" in out
    with open(os.path.join(workdir, "results.json")) as f:
        assert len(json.load(f)["variants"]["source_only"]["miou"]) == 3
    with open(os.path.join(workdir, benchmark.RECORD_FILE)) as f:
        record = json.load(f)
    assert record["seeds"] == 3 and record["variants"] == list(VARIANTS)


@pytest.mark.slow
def test_pretraining_runs_first_and_every_variant_starts_from_it(finished_benchmark, tmp_path,
                                                                  capsys):
    options, _, _ = finished_benchmark
    pretrained = benchmark.Options(
        config_file=options.config_file, variants=("source_only_noflip", "target_only"),
        pretrain="source_only", seeds=1, workdir=str(tmp_path / "bench"),
        config_overrides=options.config_overrides, num_pictures=0)
    spy = TrainSpy()
    out = run_with_spy(spy, pretrained, capsys)
    pre = benchmark.run_dir(pretrained.workdir, "source_only", 0)
    assert spy.calls == [os.path.join(v, "seed0") for v in pretrained.all_variants]
    assert spy.f_workdirs == [None, pre, pre]
    assert "[1/3] source_only seed 0: starting" in out
    with open(os.path.join(pretrained.workdir, "results.json")) as f:
        assert list(json.load(f)["variants"]) == ["source_only", "source_only_noflip",
                                                  "target_only"]

    # Pre-trained or not, or from another variant, is another benchmark.
    assert benchmark.main(["--config", options.config_file, "--variants",
                           "source_only_noflip,target_only", "--workdir", options.workdir,
                           "--pretrain", "source_only", *options.config_overrides]) == 1
    assert "(pretrain is None there but 'source_only' here)" in capsys.readouterr().err
