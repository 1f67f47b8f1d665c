"""Set up the course in ./.venv and run it: the two commands of the README's quick start.

    python3 bootstrap.py lab     install (first time) and open the course in JupyterLab
    python3 bootstrap.py test    install (first time, with test extras) and run the test suite

Only Python 3.10+ is needed. Set TORCH_SPEC (for example ``torch==2.13.0`` or a CPU-only
index) to choose the PyTorch build installed before the course; by default pip picks it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(*command: str | Path) -> None:
    print("+", " ".join(str(part) for part in command), flush=True)
    subprocess.run([str(part) for part in command], check=True, cwd=ROOT)


def install(extras: str) -> None:
    """Create .venv and install torch, then the course (editable) with ``extras``."""
    if not venv_python().exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    python = venv_python()
    has_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        run(python, "-m", "pip", "install", "--quiet", os.environ.get("TORCH_SPEC", "torch"))
    run(python, "-m", "pip", "install", "--quiet", "-e", f".[{extras}]" if extras else ".")


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in ("lab", "test"):
        print(__doc__)
        return 2
    if sys.version_info < (3, 10):
        print(f"the course needs Python 3.10 or newer, this is {sys.version.split()[0]}")
        return 2
    command, rest = argv[0], argv[1:]
    if command == "lab":
        install("")
        bin_dir = venv_python().parent
        return subprocess.call([str(bin_dir / "attention-course"), "lab", *rest], cwd=ROOT)
    install("test")
    env = dict(os.environ, PATH=os.pathsep.join([str(venv_python().parent), os.environ.get("PATH", "")]))
    return subprocess.call([str(venv_python()), "-m", "pytest", "-n", "2", "--dist", "loadgroup", *rest], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
