"""The README's examples run as written."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 4


# Optional packages (the test extra) a block may import, and the kalmanopt modules that need some of them.
OPTIONAL = {"sklearn", "matplotlib", "tqdm", "pytorch_optimizer", "peft", "transformers", "accelerate",
            "pytorch_lightning", "hypothesis", "schedulefree", "momo"}
NEEDS = {"kalmanopt.integrations.hf": ("transformers", "accelerate"), "kalmanopt.integrations.peft": ("peft",),
         "kalmanopt.integrations.lightning": ("pytorch_lightning",), "transformers": ("accelerate",)}


def optional_imports(code: str) -> list[str]:
    """The optional packages a block needs, from its import statements."""
    modules = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    needed = {m.split(".")[0] for m in modules} & OPTIONAL
    for m in modules:
        needed |= set(NEEDS.get(m, ()))
    return sorted(needed)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write output folders
    code = BLOCKS[index]
    for package in optional_imports(code):
        pytest.importorskip(package, reason=f"README block {index} needs {package}: install kalmanopt[test]")
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_torchrun_example(fsdp):
    torchrun = shutil.which("torchrun")
    command = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    # --standalone: a rendezvous on a free port (the default fixed port 29500 collides with concurrent runs)
    command += ["--standalone", "--nproc_per_node=2", str(ROOT / "examples" / "distributed.py"), "--steps", "5"]
    if fsdp:
        command.append("--fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 2 ranks" in result.stdout


def test_readme_torchrun_commands_match_the_example():
    """The README's single-machine commands are the ones this file runs (same launcher flags, same script)."""
    readme = (ROOT / "README.md").read_text()
    assert "torchrun --standalone --nproc_per_node=2 examples/distributed.py " in readme
    assert "torchrun --standalone --nproc_per_node=2 examples/distributed.py --fsdp" in readme
