"""Launch scripts (dry runs and fake gcloud/srun) and the multi-process start of JAX."""
import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap

import pytest

from train_helpers import REPO_ROOT, free_port, subprocess_env

TPU_SCRIPT = os.path.join(REPO_ROOT, "launch", "tpu_pod.sh")
SLURM_SCRIPT = os.path.join(REPO_ROOT, "launch", "gpu_slurm.sbatch")
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def run_script(script, *args, env, cwd=REPO_ROOT, path_prefix=None):
    """Run a launch script with a clean environment (no real SLURM/TPU variables leak in)."""
    path = SYSTEM_PATH if path_prefix is None else f"{path_prefix}:{SYSTEM_PATH}"
    return subprocess.run(["bash", script, *args], env={"PATH": path, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def dry_run_commands(stdout):
    """The argv of every '[dry-run] ...' line."""
    prefix = "[dry-run] "
    return [shlex.split(line[len(prefix):]) for line in stdout.splitlines()
            if line.startswith(prefix)]


def fake_program(directory, name, body):
    """An executable `name` in `directory` running the bash `body`."""
    path = directory / name
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def option(argv, name):
    """Value of --name=value in argv."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} appears {len(values)} times in {argv}"
    return values[0]


# --- Cloud TPU pod ----------------------------------------------------------------------------

TPU_ENV = {"PROJECT": "proj", "ZONE": "us-central2-b", "TPU_NAME": "lsd-pod",
           "ACCELERATOR_TYPE": "v4-32", "RUNTIME_VERSION": "tpu-ubuntu2204-base",
           "WORKDIR": "gs://bucket/runs/gta", "CONFIG": "configs/gta.py",
           "TFDS_DATA_DIR": "gs://bucket/tfds"}


def remote_commands(argv):
    """The shell command lines of `gcloud ... ssh --command=...`, split at '&&'."""
    return [shlex.split(part) for part in option(argv, "command").split("&&")]


def test_tpu_pod_dry_run_creates_installs_and_trains_on_all_workers(tmp_path):
    # A gcloud that leaves a mark: a dry run must never call it.
    fake_program(tmp_path, "gcloud", f"touch {tmp_path}/gcloud_was_called\n")
    result = run_script(TPU_SCRIPT, "all", env={**TPU_ENV, "DRY_RUN": "1"},
                        path_prefix=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "gcloud_was_called").exists()
    commands = dry_run_commands(result.stdout)
    assert all(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] for c in commands)
    assert [c[4] for c in commands] == ["create", "ssh", "scp", "ssh", "ssh"]
    assert all(option(c, "project") == "proj" and option(c, "zone") == "us-central2-b"
               for c in commands)

    create = commands[0]
    assert create[5] == "lsd-pod"
    assert option(create, "accelerator-type") == "v4-32"
    assert option(create, "version") == "tpu-ubuntu2204-base"
    # Everything after creation happens on every worker of the pod.
    assert all(option(c, "worker") == "all" for c in commands[1:])
    scp = commands[2]
    assert os.path.join(REPO_ROOT, "lsd_jax") in scp and scp[scp.index("--worker=all") - 1] \
        == "lsd-pod:lsd_jax/"
    assert ["pip", "install", "-e", "."] in remote_commands(commands[3])

    train = remote_commands(commands[4])
    assert train[0] == ["cd", "~/lsd_jax"]
    assert train[1] == ["TFDS_DATA_DIR=gs://bucket/tfds", "python3", "-m", "lsd_jax.main",
                        "--config", "configs/gta.py", "--workdir", "gs://bucket/runs/gta"]


def test_tpu_pod_eval_passes_mode_and_extra_flags_and_quotes_spaces():
    env = {**TPU_ENV, "DRY_RUN": "1", "WORKDIR": "gs://bucket/my runs",
           "EXTRA_FLAGS": "--config.batch_size=32"}
    result = run_script(TPU_SCRIPT, "eval", env=env)
    assert result.returncode == 0, result.stderr
    (command,) = dry_run_commands(result.stdout)
    program = remote_commands(command)[1]
    assert program[program.index("--workdir") + 1] == "gs://bucket/my runs"
    assert program[-2:] == ["--mode=eval", "--config.batch_size=32"]


def test_tpu_pod_runs_exactly_what_its_dry_run_prints(tmp_path):
    log = tmp_path / "gcloud_calls"
    fake_program(tmp_path, "gcloud", f"""\
        for arg in "$@"; do printf '%s\\x1f' "$arg" >> {log}; done
        echo >> {log}
        """)
    dry = run_script(TPU_SCRIPT, "train", env={**TPU_ENV, "DRY_RUN": "1"})
    real = run_script(TPU_SCRIPT, "train", env=TPU_ENV, path_prefix=str(tmp_path))
    assert real.returncode == 0, real.stderr
    called = [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]
    assert called == [argv[1:] for argv in dry_run_commands(dry.stdout)]


def test_tpu_pod_refuses_an_unknown_step():
    result = run_script(TPU_SCRIPT, "launch", env={"DRY_RUN": "1"})
    assert result.returncode == 2
    assert "usage" in result.stderr and "'launch'" in result.stderr


# --- SLURM ------------------------------------------------------------------------------------

def slurm_env(nodelist="gpu[003-004]", ntasks=8, job_id=4242, **extra):
    return {"SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": str(job_id),
            "SLURM_NTASKS": str(ntasks), "CONFIG": "configs/gta.py", "WORKDIR": "runs/gta",
            **extra}


def task_argv(task_script):
    """argv of the program in 'cd DIR && exec PROGRAM ...'."""
    change_dir, program = task_script.split("&&")
    assert shlex.split(change_dir) == ["cd", REPO_ROOT]
    argv = shlex.split(program)
    assert argv[0] == "exec"
    return argv[1:]


def test_slurm_dry_run_starts_one_process_per_task_coordinated_by_the_first_node():
    result = run_script(SLURM_SCRIPT, env=slurm_env(DRY_RUN="1"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("[dry-run]")]
    srun = shlex.split(lines[0][len("[dry-run] "):])
    assert srun[:5] == ["srun", "--ntasks=8", "--kill-on-bad-exit=1", "bash", "-c"]
    assert srun[5].endswith("--process_id=$SLURM_PROCID")   # expanded by each task

    processes = lines[1:]
    assert len(processes) == 8
    port = 4242 % 4096 + 61440   # JAX's own rule for SLURM
    for process_id, line in enumerate(processes):
        prefix = f"[dry-run] process {process_id}: "
        assert line.startswith(prefix)
        argv = task_argv(line[len(prefix):])
        assert argv[:7] == ["python", "-m", "lsd_jax.main", "--config", "configs/gta.py",
                            "--workdir", "runs/gta"]
        assert option(argv, "coordinator_address") == f"gpu003:{port}"
        assert option(argv, "num_processes") == "8"
        assert option(argv, "process_id") == str(process_id)
        assert "--mode=eval" not in argv


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[003-004,007],cpu01", "gpu003"),
    ("node7,node9", "node7"),
    ("a-b-01", "a-b-01"),
    ("gpu[12,15]", "gpu12"),
])
def test_slurm_coordinator_is_the_first_node_of_the_list(nodelist, first):
    result = run_script(SLURM_SCRIPT, env=slurm_env(nodelist, ntasks=2, job_id=1, DRY_RUN="1",
                                                    COORDINATOR_PORT="1234"))
    assert result.returncode == 0, result.stderr
    argv = task_argv(result.stdout.splitlines()[1].split(": ", 1)[1])
    assert option(argv, "coordinator_address") == f"{first}:1234"


def test_slurm_real_run_gives_each_task_its_own_process_id(tmp_path):
    # A fake srun that starts the task script once per task with SLURM_PROCID set, and a fake
    # python that prints its arguments: the real path, without a cluster.
    fake_program(tmp_path, "srun", """\
        ntasks=${1#--ntasks=}; shift 2; shift 2   # drop --ntasks, --kill-on-bad-exit, bash -c
        for (( i = 0; i < ntasks; i++ )); do SLURM_PROCID=$i bash -c "$1"; done
        """)
    fake_program(tmp_path, "python", 'echo "python $*"\n')
    env = slurm_env("node[1-2]", ntasks=3, MODE="eval", VENV=str(tmp_path / "no-venv"),
                    EXTRA_FLAGS="--config.batch_size=16")
    result = run_script(SLURM_SCRIPT, env=env, path_prefix=str(tmp_path))
    assert result.returncode == 0, result.stderr
    programs = [line.split() for line in result.stdout.splitlines()
                if line.startswith("python ")]
    assert [option(p, "process_id") for p in programs] == ["0", "1", "2"]
    assert all(option(p, "coordinator_address") == f"node1:{4242 % 4096 + 61440}" and
               option(p, "num_processes") == "3" and "--mode=eval" in p and
               "--config.batch_size=16" in p for p in programs)


def test_slurm_script_outside_a_job_says_so():
    result = run_script(SLURM_SCRIPT, env={"DRY_RUN": "1"})
    assert result.returncode != 0
    assert "SLURM_JOB_NODELIST" in result.stderr and "sbatch" in result.stderr


# --- jax.distributed --------------------------------------------------------------------------

@pytest.mark.slow
def test_single_process_without_configuration_is_a_no_op():
    code = ("import jax; from lsd_jax.distributed import initialize_distributed; "
            "print(initialize_distributed(), jax.process_count())")
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "1"]


def test_bad_distributed_arguments_are_refused_before_starting():
    from lsd_jax.distributed import initialize_distributed
    with pytest.raises(ValueError, match=r"process_id=2: expected a value in \[0, 2\)"):
        initialize_distributed("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="'localhost'.*host:port"):
        initialize_distributed("localhost", 2, 0)


WORKER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from lsd_jax import evaluate
from lsd_jax.distributed import initialize_distributed

address, process_id = sys.argv[1], int(sys.argv[2])
started = initialize_distributed(address, 2, process_id, initialization_timeout=30)
gathered = multihost_utils.process_allgather(np.array([10 * process_id + 1]))

# One global batch of 4 examples (the last one padding), each process holding two of them:
# the evaluation's counts must come out whole and identical on both processes.
rng = np.random.RandomState(0)
labels = rng.randint(0, 3, (4, 6, 8))
labels[..., 0] = 255
logits = rng.randn(4, 3, 4, 3).astype(np.float32)
mask = np.array([True, True, True, False])
sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), PartitionSpec("data"))
mine = slice(2 * process_id, 2 * process_id + 2)
batch = {key: jax.make_array_from_process_local_data(sharding, value[mine])
         for key, value in (("image", logits), ("label", labels), ("mask", mask))}
confusion = {method: evaluate.evaluate(lambda x: x, [batch], 3, method=method).tolist()
             for method in evaluate.CONFUSION_METHODS}
print("RESULT " + json.dumps({
    "started": started, "process_index": jax.process_index(),
    "process_count": jax.process_count(), "device_count": jax.device_count(),
    "gathered": np.asarray(gathered).ravel().tolist(), "confusion": confusion}), flush=True)
"""


@pytest.mark.slow
def test_two_processes_start_jax_distributed_and_agree(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    address = f"127.0.0.1:{free_port()}"
    processes = [subprocess.Popen([sys.executable, str(worker), address, str(i)],
                                  env=subprocess_env(), cwd=REPO_ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i in range(2)]
    outputs = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=90)
            assert process.returncode == 0, stderr[-3000:]
            outputs.append(stdout)
    finally:
        for process in processes:   # never leave a process waiting for its peer
            if process.poll() is None:
                process.kill()
                process.wait()
    results = [json.loads(line[len("RESULT "):]) for out in outputs
               for line in out.splitlines() if line.startswith("RESULT ")]
    assert [r["process_index"] for r in results] == [0, 1]
    for result in results:
        assert result["started"] and result["process_count"] == 2 and result["device_count"] == 2
        assert result["gathered"] == [1, 11]

    # The expected counts, computed here in one process from the whole batch.
    import numpy as np
    from lsd_jax import evaluate
    rng = np.random.RandomState(0)
    labels = rng.randint(0, 3, (4, 6, 8))
    labels[..., 0] = 255
    logits = rng.randn(4, 3, 4, 3).astype(np.float32)
    expected = evaluate.evaluate(lambda x: x, [{"image": logits[:3], "label": labels[:3]}], 3)
    for result in results:
        for counts in result["confusion"].values():
            assert counts == expected.tolist()
