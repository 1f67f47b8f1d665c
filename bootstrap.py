"""Set up the course in ./.venv and run it: the two commands of the README's quick start.

    python3 bootstrap.py lab [OPTIONS]        install (first time) and open the course in JupyterLab
    python3 bootstrap.py test [PYTEST ARGS]   install (first time, with test extras) and run the tests

Only Python 3.10+ is needed. The first run installs PyTorch, then the course (editable);
later runs install nothing (unless pyproject.toml changed), so the lab opens offline.

Which PyTorch: on Linux without an NVIDIA GPU (no ``nvidia-smi``), the CPU-only build from
PyTorch's own index (a few hundred MB, where PyPI's Linux build brings several GB of CUDA
libraries), or PyPI's build when that index cannot be reached; elsewhere PyPI's build. Set
TORCH_SPEC to choose: pip arguments such as ``torch==2.13.0`` or
``torch --index-url https://download.pytorch.org/whl/cu126``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import urllib.request
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / "attention-course-installed.json"  # what the last successful install covered
CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # PyTorch's CPU-only wheels
INDEX_TIMEOUT_S = 15


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def venv_script(name: str) -> Path:
    return venv_python().parent / (f"{name}.exe" if os.name == "nt" else name)


def run(*command: str | Path, check: bool = True) -> int:
    print("+", " ".join(str(part) for part in command), flush=True)
    return subprocess.run([str(part) for part in command], check=check, cwd=ROOT).returncode


def torch_choices(environ: dict[str, str], system: str, nvidia_gpu: bool) -> list[tuple[str, list[str]]]:
    """The PyTorch installs to try, in order: (what it is, the arguments of ``pip install``)."""
    spec = environ.get("TORCH_SPEC", "").strip()
    if spec:
        return [(f"TORCH_SPEC={spec}", shlex.split(spec))]
    if system == "Linux" and not nvidia_gpu:
        cpu = ("the CPU-only build (Linux, no NVIDIA GPU)",
               ["--index-url", CPU_INDEX, "--timeout", str(INDEX_TIMEOUT_S), "--retries", "1", "torch"])
        return [cpu, ("PyPI's build (on Linux it comes with CUDA, several GB)", ["torch"])]
    return [("PyPI's build", ["torch"])]


def unreachable(index: str) -> str | None:
    """Why ``index`` cannot be reached within a few seconds, or None when it answers."""
    try:
        with urllib.request.urlopen(f"{index}/torch/", timeout=INDEX_TIMEOUT_S):
            return None
    except OSError as error:
        return str(getattr(error, "reason", error))


def install_torch(python: Path) -> None:
    """Install the first PyTorch of :func:`torch_choices` that can be had, and say which."""
    choices = torch_choices(dict(os.environ), platform.system(), shutil.which("nvidia-smi") is not None)
    for number, (what, arguments) in enumerate(choices):
        last = number == len(choices) - 1
        index = arguments[arguments.index("--index-url") + 1] if "--index-url" in arguments else None
        problem = unreachable(index) if index and not last else None
        if problem:
            print(f"PyTorch: {index} cannot be reached ({problem}); trying the next choice", flush=True)
            continue
        print(f"PyTorch: installing {what}", flush=True)
        if run(python, "-m", "pip", "install", "--quiet", *arguments, check=last) == 0:
            break
        print(f"PyTorch: {what} could not be installed; trying the next choice", flush=True)
    build = subprocess.run([str(python), "-c", "import torch; print(torch.__version__, torch.version.cuda or '')"],
                           capture_output=True, text=True, check=True).stdout.split()
    kind = f"CUDA {build[1]} build" if len(build) > 1 else "CPU build"
    print(f"PyTorch: installed torch {build[0]} ({kind})", flush=True)


def install_record() -> dict:
    return json.loads(STAMP.read_text()) if STAMP.is_file() else {}


def pyproject_digest() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def installed(record: dict, digest: str, extras: str) -> bool:
    """Whether the install ``record`` covers the course with ``extras`` ("" for none: any
    install covers it) for the pyproject.toml whose digest is ``digest``."""
    done = record.get("extras", []) if record.get("pyproject") == digest else []
    return extras in done or (extras == "" and bool(done))


def install(extras: str) -> None:
    """Create .venv and install torch, then the course (editable) with ``extras``; nothing
    when a previous install covered these extras and pyproject.toml has not changed since."""
    record = install_record()
    if venv_python().exists() and installed(record, pyproject_digest(), extras):
        return
    if record.get("pyproject") != pyproject_digest():
        record = {"pyproject": pyproject_digest(), "extras": []}
    if not venv_python().exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    python = venv_python()
    if subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0:
        install_torch(python)
    run(python, "-m", "pip", "install", "--quiet", "-e", f".[{extras}]" if extras else ".")
    record["extras"] = sorted(set(record["extras"]) | {extras})
    STAMP.write_text(json.dumps(record, indent=1) + "\n")


def hand_over(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``command`` in this script's place, so that Ctrl-C reaches it alone and its exit
    status is ours (on Windows, where there is no exec, wait for it through Ctrl-C)."""
    sys.stdout.flush()
    if os.name == "posix":
        os.chdir(ROOT)
        os.execve(command[0], command, env if env is not None else dict(os.environ))
    with subprocess.Popen(command, cwd=ROOT, env=env) as child:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # the console sent it to the child too, which stops
                continue


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in ("lab", "test"):
        print(__doc__)
        return 2
    if sys.version_info < (3, 10):
        print(f"the course needs Python 3.10 or newer, this is {sys.version.split()[0]}")
        return 2
    command, rest = argv[0], argv[1:]
    try:
        install("test" if command == "test" else "")
    except subprocess.CalledProcessError as error:
        print(f"bootstrap: `{' '.join(map(str, error.cmd))}` failed (exit {error.returncode}); "
              "its messages are above")
        return 1
    if command == "lab":
        return hand_over([str(venv_script("attention-course")), "lab", *rest])
    env = dict(os.environ, PATH=os.pathsep.join([str(venv_python().parent), os.environ.get("PATH", "")]))
    return hand_over([str(venv_python()), "-m", "pytest", "-n", "2", "--dist", "loadgroup", *rest], env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
