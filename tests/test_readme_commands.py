"""Every command the documentation shows runs as written: the Markdown documents' code blocks
(a benchmark settings block's `command:` lines included) and the usage lines of every tool's docstring. Each `.venv/bin/python <script> ...` line must name an
existing script, its arguments must parse with the script's own parser, and its config file and
KEY VALUE overrides must load; each `make X` must be a Makefile target. One process checks them
all (the scripts are run with runpy up to their argument parsing)."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import REPO

DOCS = ["README.md", "INSTALL.md", "GETTING_STARTED.md", "CONTRIBUTING.md", "datasets/README.md",
        "ops/README.md", "docs/ADVANCED.md", "docs/CITY.md", "docs/BENCHMARKS.md"]
README_LIMIT = 8192  # bytes: the README is a short hub that links one document per job
SCRIPT_DIRS = ["tools", "datasets", "benchmarks"]
SCRIPT_RE = r"(?:tools|datasets|benchmarks)/\w+\.py"
PYTHON = ".venv/bin/python"
# Shell lines in the docs that are not ours to check (package managers, environment set-up).
OTHER_COMMANDS = ("python3 -m venv", ".venv/bin/pip ", "pip ", "export ", "cd ", "git ", "source ")


def _code_blocks(text):
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def _join_continuations(block):
    return block.replace("\\\n", " ").splitlines()


def _clean(line):
    """No trailing comment, no `command:` label (a benchmark settings block); optional arguments
    shown in brackets (a synopsis) dropped."""
    line = re.sub(r"^\s*command:\s+", "", line.split("  #")[0].split(" # ")[0])
    return re.sub(r"\[[^\]]*\]", "", line).strip()


def _runs_something(line):
    """A shell line whose command (after VAR=value prefixes) is a Python, make, or one of our
    scripts; not a layout listing such as ``tools/x.py, y.py: ...``."""
    words = re.sub(r"^(\s*[A-Z_][A-Z0-9_]*=\S+\s+)+", "", line).split()
    return bool(words) and (words[0] in (PYTHON, "python", "python3", "make", "srun")
                            or re.fullmatch(SCRIPT_RE, words[0]) is not None)


def _command_lines(text):
    """Lines of code blocks that run something of ours."""
    out = []
    for block in _code_blocks(text):
        for line in _join_continuations(block):
            line = _clean(line)
            if _runs_something(line):
                out.append(line)
    return out


def _docstring_lines(path):
    text = path.read_text()
    doc = re.match(r'(?:#![^\n]*\n)?\s*(?:r?""")(.*?)"""', text, flags=re.S)
    if not doc:
        return []
    lines = doc.group(1).replace("\\\\\n", " ").replace("\\\n", " ").splitlines()
    return [_clean(line) for line in lines
            if re.search(SCRIPT_RE, line) and line.strip().startswith(
                (PYTHON, "python", "tools/", "benchmarks/"))]


def _all_commands():
    commands = []
    for doc in DOCS:
        commands += [(doc, line) for line in _command_lines((REPO / doc).read_text())]
    for folder in SCRIPT_DIRS:
        for script in sorted((REPO / folder).glob("*.py")):
            commands += [(str(script.relative_to(REPO)), line) for line in _docstring_lines(script)]
    return commands


def _strip_env(words):
    """The command without its VAR=value prefixes and without a launcher: under ``srun`` the
    command it starts; under torchrun (``PYTHON -m torch.distributed.run``) the script and its
    arguments after PYTHON, torchrun's own options checked with torchrun's parser."""
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words = words[1:]
    if words and words[0] == "srun":
        words = words[next((i for i, w in enumerate(words) if w == PYTHON), len(words)):]
    if words[:3] == [PYTHON, "-m", "torch.distributed.run"]:
        from torch.distributed.run import get_args_parser

        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        get_args_parser().parse_args(words[3:script + 1])  # exits on a bad torchrun option
        words = [PYTHON, *words[script:]]
    return words


def test_documented_commands_use_the_one_way_to_run_tools():
    commands = _all_commands()
    assert len(commands) >= 15, commands
    problems = []
    for where, line in commands:
        words = _strip_env(shlex.split(line))
        if not words or line.startswith(OTHER_COMMANDS):
            continue
        if words[0] == "make":
            continue
        if words[0] != PYTHON:
            problems.append(f"{where}: `{line}` does not start with {PYTHON}")
    assert not problems, "\n".join(problems)


def test_documented_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
    missing = []
    for where, line in _all_commands():
        words = _strip_env(shlex.split(line))
        if words and words[0] == "make":
            missing += [f"{where}: make {t}" for t in words[1:] if "=" not in t and t not in targets]
    assert not missing, missing


DRIVER = r'''
import argparse, json, os, runpy, sys
sys.path.insert(0, os.getcwd())
from rooftop_m2f.cli import UserError
from rooftop_m2f.engine import build_cfg

class Parsed(Exception):
    pass

original = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    raise Parsed(original(self, args, namespace))
argparse.ArgumentParser.parse_args = parse_args

results = []
for where, script, argv in json.load(sys.stdin):
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script` does
    try:
        runpy.run_path(script, run_name="__main__")
        results.append([where, script, "did not parse its arguments"])
        continue
    except Parsed as p:
        ns = vars(p.args[0])
    except SystemExit as e:
        results.append([where, script, f"argument parsing exited with {e.code}"])
        continue
    finally:
        sys.path.pop(0)
    config, opts = ns.get("config_file"), list(ns.get("opts") or [])
    inputs = ns.get("input")
    if inputs:  # predict.py: the first config key ends the inputs
        from rooftop_m2f.cli import split_trailing_overrides
        inputs, trailing = split_trailing_overrides(inputs)
        opts = trailing + opts
    if config or opts:
        try:
            build_cfg(config, opts)
        except UserError as e:
            results.append([where, script, f"config: {e}"])
            continue
    results.append([where, script, "ok"])
print(json.dumps(results))
'''


def test_documented_tool_commands_parse_and_their_configs_load():
    jobs = []
    for where, line in _all_commands():
        words = _strip_env(shlex.split(line))
        if not words or words[0] != PYTHON or len(words) < 2:
            continue
        script = words[1]
        assert (REPO / script).is_file(), f"{where}: {script} does not exist"
        jobs.append([where, script, words[2:]])
    assert len(jobs) >= 10
    result = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(jobs), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    failed = [f"{where}: {script}: {status}" for where, script, status in results if status != "ok"]
    assert not failed, "\n".join(failed)
    assert len(results) == len(jobs)


def test_every_markdown_document_is_checked():
    """A new document cannot escape the checks above: every Markdown file of the tree is listed."""
    found = {str(p.relative_to(REPO)) for p in REPO.rglob("*.md")
             if not any(part.startswith(".") or part in ("output", "build") for part in p.relative_to(REPO).parts)}
    assert found <= set(DOCS), sorted(found - set(DOCS))


def test_readme_is_a_short_hub():
    size = (REPO / "README.md").stat().st_size
    assert size < README_LIMIT, f"README.md is {size} bytes; move sections into the documents it links"


def _anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_relative_links_resolve():
    """Every relative link of the documents names an existing file, and its `#anchor` a heading."""
    broken = []
    for doc in DOCS:
        path = REPO / doc
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{doc}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{doc}: {target}: no such heading")
    assert not broken, "\n".join(broken)
