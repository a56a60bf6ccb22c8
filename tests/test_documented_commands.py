"""Every `python -m lsd_jax...` command in the README, docs/, launch/, the config files and
configs/*/README.md works: its flags exist, its config file and variant load, its `--config.*`
overrides name real fields and parse, and the checks a run starts with pass
(tests/command_check.py: parsed and checked the way each program does it, without training,
generating or writing anything). Commands in the launch scripts themselves are their tests'
business (tests/test_launch.py); the `--config.*` examples in their comments are checked here
as fields.

Values the documentation leaves to the reader (`DIR`, `<file>`, `...`, `$CONFIG`) are not
parsed: their flags must exist. A command with elided arguments (a bare `...`) has each of its
flags checked for existence only.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from train_helpers import REPO_ROOT, subprocess_env

COMMAND = re.compile(r"python3? -m (lsd_jax(?:\.\w+)*)")
SHELL_OPERATORS = {"&&", "||", "|", ";", ">", ">>", "2>&1", "&", ")"}


def documented_files() -> list[str]:
    patterns = ["README.md", "docs/*.md", "launch/*.md", "configs/*.py", "configs/*/README.md"]
    return sorted(path for pattern in patterns
                  for path in glob.glob(os.path.join(REPO_ROOT, pattern)))


def _continuation(line: str) -> str:
    """A following line of a command: without its indentation or a comment's '#'."""
    return line.strip().lstrip("#").strip()


def command_texts(text: str):
    """(line number, module, argument text) of every command in a file's text: a line that
    starts with it, with its backslash continuations, or an inline `...` span (which may
    wrap)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        for match in COMMAND.finditer(line):
            rest, j = line[match.end():], i
            before = line[:match.start()]
            inline = before.count("`") % 2 == 1
            if not inline and before.strip(" #$>"):
                continue  # a program named in prose, not a command line
            if inline:  # inside an inline code span
                while "`" not in rest and j + 1 < len(lines):
                    j += 1
                    rest += " " + _continuation(lines[j])
                rest = rest.split("`")[0]
            else:
                while rest.rstrip().endswith("\\") and j + 1 < len(lines):
                    j += 1
                    rest = rest.rstrip().rstrip("\\") + " " + _continuation(lines[j])
            yield i + 1, match.group(1), rest


def is_placeholder(value: str) -> bool:
    return ("..." in value or any(c in value for c in "<>$")
            or re.fullmatch(r"[A-Z][A-Z_:]*", value) is not None)


def tokens_of(text: str) -> list[str]:
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose
        tokens = text.replace('"', " ").replace("'", " ").split()
    kept = []
    for token in tokens:
        if token in SHELL_OPERATORS or token.startswith("("):
            break  # the shell's, or a remark in parentheses after the command
        token = token.strip("[]")  # [--optional flags]
        if token:
            kept.append(token)
    return kept


def parse_command(text: str) -> dict:
    """{"argv", "placeholders": flags whose value is a placeholder, "partial": arguments elided}."""
    tokens, argv, placeholders, partial = tokens_of(text), [], [], False
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            argv.append(token)
            following = tokens[i + 1] if i + 1 < len(tokens) else None
            if eq and is_placeholder(value):
                placeholders.append(name)
            elif not eq and following is not None and is_placeholder(following):
                placeholders.append(name)
                argv.append(following)
                i += 1
        elif is_placeholder(token):
            partial = True  # e.g. `python -m lsd_jax.benchmark ... --pretrain pretrain`
        else:
            argv.append(token)
        i += 1
    return {"argv": argv, "placeholders": placeholders, "partial": partial}


def documented_commands() -> dict[str, list[dict]]:
    """{module: [command, ...]}, each with "where" (file:line). A bare mention of a program
    (no arguments) is not a command."""
    commands: dict[str, list[dict]] = {}
    for path in documented_files():
        with open(path) as f:
            text = f.read()
        for line, module, rest in command_texts(text):
            command = parse_command(rest)
            if command["argv"] or command["partial"]:
                command["where"] = f"{os.path.relpath(path, REPO_ROOT)}:{line}"
                commands.setdefault(module, []).append(command)
    return commands


def launch_script_config_fields() -> list[tuple[str, str]]:
    """(where, `--config.x.y` flag) of every config override the launch scripts mention."""
    found = []
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "launch", "*"))):
        if path.endswith(".md"):
            continue
        with open(path) as f:
            for number, line in enumerate(f, 1):
                for flag in re.findall(r"--config\.[\w.]+", line):
                    found.append((f"{os.path.relpath(path, REPO_ROOT)}:{number}", flag))
    return found


def check(commands: dict[str, list[dict]]) -> dict[str, list[str | None]]:
    """tests/command_check.py's verdicts, one process for every program."""
    wire = {module: [{k: c[k] for k in ("argv", "placeholders", "partial")} for c in listed]
            for module, listed in commands.items()}
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "tests", "command_check.py")],
        input=json.dumps(wire), capture_output=True, text=True, cwd=REPO_ROOT,
        env=subprocess_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


# ----------------------------------------------------------------------------- extraction

def test_commands_are_read_from_code_blocks_inline_spans_and_docstrings():
    text = "\n".join([
        "Run `python -m lsd_jax.main --config configs/gta.py",
        "--workdir runs/x` inline, wrapped.",
        "    python -m lsd_jax.benchmark --config configs/synthetic.py \\",
        "        --seeds 3 --workdir runs/b   # a comment",
        "Mentioned alone: `python -m lsd_jax.main` is the program.",
        "    python -m lsd_jax.main --config <file>[:variant] --workdir DIR [--mode ...]",
        "    python -m lsd_jax.benchmark ... --pretrain pretrain",
    ])
    parsed = [(module, parse_command(rest)) for _, module, rest in command_texts(text)]
    assert parsed[0] == ("lsd_jax.main", {
        "argv": ["--config", "configs/gta.py", "--workdir", "runs/x"], "placeholders": [],
        "partial": False})
    assert parsed[1][1]["argv"] == ["--config", "configs/synthetic.py", "--seeds", "3",
                                    "--workdir", "runs/b"]
    assert parsed[2][1]["argv"] == []  # a mention, not a command
    assert parsed[3][1] == {"argv": ["--config", "<file>[:variant", "--workdir", "DIR",
                                     "--mode", "..."],
                            "placeholders": ["config", "workdir", "mode"], "partial": False}
    assert parsed[4][1] == {"argv": ["--pretrain", "pretrain"], "placeholders": [],
                            "partial": True}


def test_every_documenting_file_is_read():
    commands = documented_commands()
    where = {c["where"].split(":")[0] for cs in commands.values() for c in cs}
    assert {"README.md", "docs/training.md", "docs/results.md", "docs/benchmark.md",
            "launch/README.md", "configs/gta.py", "configs/synthetic.py",
            "configs/demo/README.md"} <= where
    assert {"lsd_jax.main", "lsd_jax.benchmark", "lsd_jax.data.prepare",
            "lsd_jax.size_constraints", "lsd_jax.appearance_transfer",
            "lsd_jax.export"} <= set(commands)


# ----------------------------------------------------------------------------- the check

# A misspelling of each kind the check must see, checked beside the documented commands of the
# same program.
MISSPELT = {
    "lsd_jax.main": [
        ["--config", "configs/gta.py", "--workdir", "runs/x", "--config.eval.stpe=5"],
        ["--config", "configs/synthetic.py:adaptsegnet_mutli", "--workdir", "runs/x"],
        ["--config", "configs/gta.py", "--wrokdir", "runs/x"],
        ["--config", "configs/gta.py", "--mode", "sumary"],
        ["--config", "configs/gta.py", "--config.update_mode=simultaneos"],
    ],
    "lsd_jax.benchmark": [
        ["--config", "configs/synthetic.py", "--varaints", "lsd"],
        ["--config", "configs/synthetic.py", "--variants", "lsd", "--config.train.num_step=3"],
        ["--config", "configs/synthetic.py", "--variants", "lsd", "--target", "nosie=3"],
    ],
    "lsd_jax.data.prepare": [["gta6/1280x720", "--manual_dir", "/data/gta5"]],
    "lsd_jax.size_constraints": [["--config", "configs/gta.py", "--ouput", "s.json"]],
    "lsd_jax.data.rare_class": [["--config", "configs/gta_deeplab.py:daformr", "--output", "r"]],
    "lsd_jax.appearance_transfer": [
        ["--config", "configs/gta.py", "--output", "d", "--config.aan.iteration=5"],
        ["--config", "configs/gta.py:fcan", "--output", "d"]],  # a copy from a copy
    "lsd_jax.export": [["--workdir", "runs/pre", "--ouptut", "f.npz"],
                       ["--workdir", "runs/pre", "--output", "f.pth"]],
}
PROGRAMS = sorted(MISSPELT) + ["lsd_jax.data.benchmark"]


def as_command(argv, where, partial=False):
    return {"argv": argv, "placeholders": [], "partial": partial, "where": where}


@pytest.fixture(scope="module")
def verdicts():
    """{program: [(command, error or None)]} for the documented commands, MISSPELT's, and (as
    lsd_jax.main's, elided) the launch scripts' `--config.*` examples and a misspelt one."""
    commands = documented_commands()
    for module in PROGRAMS:
        commands.setdefault(module, []).extend(
            as_command(argv, "misspelt") for argv in MISSPELT.get(module, []))
    commands["lsd_jax.main"] += [as_command([flag + "=1"], f"launch {where}", partial=True)
                                 for where, flag in launch_script_config_fields()]
    commands["lsd_jax.main"].append(as_command(["--config.data.batch_szie=1"], "misspelt launch",
                                               partial=True))
    errors = check(commands)
    return {module: list(zip(listed, errors[module])) for module, listed in commands.items()}


@pytest.mark.slow  # one subprocess for all programs: imports jax and TFDS, builds every config
@pytest.mark.parametrize("module", PROGRAMS)
def test_every_documented_command_parses_and_passes_the_checks_a_run_starts_with(
        verdicts, module):
    """About 25 s for all programs (their imports; every config is built, nothing compiled)."""
    failing = {f"{c['where']}: {' '.join(c['argv'])}": error for c, error in verdicts[module]
               if error is not None and not c["where"].startswith("misspelt")}
    assert not failing, json.dumps(failing, indent=1)
    missed = [c["argv"] for c, error in verdicts[module]
              if error is None and c["where"].startswith("misspelt")]
    assert not missed, f"misspelt commands that passed: {missed}"
    assert len(verdicts[module]) > len(MISSPELT.get(module, [])) or module not in MISSPELT


def test_the_launch_scripts_config_examples_are_found():
    assert ("launch/tpu_pod.sh" in {where.split(":")[0]
                                    for where, _ in launch_script_config_fields()})
