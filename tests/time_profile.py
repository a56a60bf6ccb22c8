"""Where the suite's time goes: per test phase, seconds of XLA compilation, of tracing and
lowering, and of waiting on subprocesses (docs/testing.md).

On when LSD_TEST_PROFILE names a folder: every test process appends one JSON line per test
phase (setup, call, teardown) to a file of its own there; `python tests/time_profile.py FOLDER`
sums them by cause and by file. Off, nothing is patched or registered.
"""
import collections
import json
import os
import subprocess
import sys
import time

EVENTS = {
    "/jax/core/compile/backend_compile_duration": "compile_s",
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/compilation_cache/cache_retrieval_time_sec": "cache_load_s",
}
CAUSES = ("compile_s", "trace_s", "lower_s", "cache_load_s", "subprocess_s")

_totals = collections.Counter()
_programs = []  # (name, seconds) of every backend compilation (or cache load) of the phase
_subprocesses = []  # (command, seconds) of every subprocess the phase waited on


def _on_duration(event, seconds, fun_name=None, **_):
    cause = EVENTS.get(event)
    if cause:
        _totals[cause] += seconds
    if cause == "compile_s":
        _programs.append((fun_name, round(seconds, 2)))


def _timed_popen():
    """Popen whose wall time, start to the first wait that returns, counts as subprocess_s."""
    original_init, original_wait = subprocess.Popen.__init__, subprocess.Popen.wait

    def init(self, *args, **kwargs):
        self._profile_start = time.perf_counter()
        original_init(self, *args, **kwargs)

    def wait(self, *args, **kwargs):
        result = original_wait(self, *args, **kwargs)
        start = getattr(self, "_profile_start", None)
        if start is not None:
            seconds = time.perf_counter() - start
            _totals["subprocess_s"] += seconds
            command = self.args if isinstance(self.args, str) else " ".join(map(str, self.args))
            _subprocesses.append((command[:160], round(seconds, 2)))
            self._profile_start = None
        return result

    subprocess.Popen.__init__, subprocess.Popen.wait = init, wait


def install(folder):
    """Called from conftest before any test runs."""
    from jax import monitoring
    monitoring.register_event_duration_secs_listener(_on_duration)
    _timed_popen()
    os.makedirs(folder, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return open(os.path.join(folder, f"{worker}-{os.getpid()}.jsonl"), "a", buffering=1)


def record(out, nodeid, phase, seconds):
    line = {"test": nodeid, "phase": phase, "wall_s": seconds}
    line.update({cause: _totals.get(cause, 0.0) for cause in CAUSES})
    line.update(programs=list(_programs), subprocesses=list(_subprocesses))
    _totals.clear()
    _programs.clear()
    _subprocesses.clear()
    out.write(json.dumps(line) + "\n")


def rows(folder):
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            yield from map(json.loads, f)


# A compilation under this many seconds is, in this suite, one operation compiled on its own
# (eager evaluation, or a jnp call outside jit); the whole networks and updates take longer.
SINGLE_OPERATION_S = 1.0


def summarise_programs(folder):
    """Per file: XLA compilations of whole programs (by name) and of single operations."""
    by_file = collections.defaultdict(collections.Counter)
    counts = collections.defaultdict(collections.Counter)
    for row in rows(folder):
        file = row["test"].split("::")[0]
        for name, seconds in row.get("programs", ()):
            kind = name if seconds >= SINGLE_OPERATION_S else "single operations"
            by_file[file][kind] += seconds
            counts[file][kind] += 1
    lines = ["| file | compilations (count, seconds), largest first |", "|---|---|"]
    for file, seconds in sorted(by_file.items(), key=lambda kv: -sum(kv[1].values())):
        parts = [f"{kind} {counts[file][kind]}, {s:.0f} s"
                 for kind, s in seconds.most_common(4)]
        lines.append(f"| {file} | {'; '.join(parts)} |")
    return "\n".join(lines)


def summarise(folder):
    """Markdown tables: the whole run by cause, then by file, slowest first."""
    by_file = collections.defaultdict(collections.Counter)
    for row in rows(folder):
        counter = by_file[row["test"].split("::")[0]]
        counter["wall_s"] += row["wall_s"]
        counter["tests"] += row["phase"] == "call"
        for cause in CAUSES:
            counter[cause] += row[cause]
    total = sum(by_file.values(), collections.Counter())
    header = ("| file | tests | wall s | XLA compile | trace+lower | cache loads | subprocesses "
              "| the rest |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    table = [header]
    for name, c in sorted(by_file.items(), key=lambda kv: -kv[1]["wall_s"]) + [("all", total)]:
        rest = c["wall_s"] - c["compile_s"] - c["trace_s"] - c["lower_s"] - c["cache_load_s"] \
            - c["subprocess_s"]
        table.append(f"| {name} | {c['tests']} | {c['wall_s']:.0f} | {c['compile_s']:.0f} | "
                    f"{c['trace_s'] + c['lower_s']:.0f} | {c['cache_load_s']:.0f} | "
                    f"{c['subprocess_s']:.0f} | {rest:.0f} |")
    return "\n".join(table)


if __name__ == "__main__":
    print(summarise(sys.argv[1]))
    print()
    print(summarise_programs(sys.argv[1]))
