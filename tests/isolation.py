"""Running compress in a fresh interpreter where some packages are missing, as on a device
that installs onnxruntime, onnx and numpy but not torch."""

from __future__ import annotations

import os
import subprocess
import sys


def run_without(modules: tuple[str, ...], body: str) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter where importing any of ``modules`` fails as if
    they were not installed."""
    code = (
        "import importlib.abc, sys\n"
        "class Absent(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.partition('.')[0] in {modules!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Absent())\n" + body)
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


CLI_WITHOUT_TORCH = (
    "from cli.app import main\n"
    "sys.argv = ['compress', *sys.argv[1:]]\n"
    "try:\n"
    "    main()\n"
    "except SystemExit as exc:\n"
    "    code = exc.code or 0\n"
    "else:\n"
    "    code = 0\n"
    "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules\n"
    "sys.exit(code)\n")
