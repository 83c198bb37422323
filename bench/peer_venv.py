"""Scratch virtual environments for peer libraries (sparsify, SAELens).

The peers bring torch, which must not become a dependency of ours, so each runs from a venv of
its own under ``~/.cache/dictlearn``, made on first use with a CPU build of torch (a few
minutes, once). Used by ``bench/planted_quality.py`` and ``tests/export/test_saelens_parity.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TORCH_VERSION = "2.13.0"
"""The CPU torch every peer venv gets (the peers' own pins allow it)."""

PEER_VENVS = Path.home() / ".cache" / "dictlearn"


def peer_python(
    name: str, module: str, package: str, version: str, override_env: str | None = None
) -> str:
    """An interpreter that imports ``module`` at ``version`` (PyPI ``package``).

    ``override_env`` names an environment variable that, when set, is the interpreter to use
    instead. Otherwise ``~/.cache/dictlearn/<name>-venv`` is used, (re)made with
    ``torch==TORCH_VERSION`` (CPU) and ``package==version`` when it lacks that version.
    """
    configured = os.environ.get(override_env) if override_env else None
    if configured:
        return configured
    venv = PEER_VENVS / f"{name}-venv"
    python = venv / "bin" / "python"
    probe = [
        str(python),
        "-c",
        f"import {module}; assert {module}.__version__ == {version!r}",
    ]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return str(python)
    print(f"making {venv} (torch {TORCH_VERSION} CPU + {package} {version}) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    # A CPU build of torch: from the local wheel directory where the machine has one, else from
    # PyTorch's CPU index (PyPI's Linux wheel is the multi-GB CUDA build).
    index = (
        []
        if os.environ.get("PIP_FIND_LINKS")
        else ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    )
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            *index,
            f"torch=={TORCH_VERSION}",
            f"{package}=={version}",
        ],
        check=True,
    )
    return str(python)
