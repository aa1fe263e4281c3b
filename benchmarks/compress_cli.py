"""Run the ``compress`` command line from a benchmark and read its JSON summary.

Benchmarks drive the installed command, one process per run, as a user would; this is the
one place that knows how (the entry point next to this interpreter, ``--json --quiet``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

COMPRESS = str(Path(sys.executable).parent / "compress")


def compress_json(*args: object, quiet: bool = True) -> dict:
    """``compress ARGS --json --quiet``'s summary (``quiet=False`` for the commands that
    print no progress: export, evaluate, bench); a failed run raises with its stderr tail."""
    done = subprocess.run([COMPRESS, *map(str, args), "--json", *(["--quiet"] if quiet else [])],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"compress {' '.join(map(str, args))} failed: {done.stderr[-800:]}")
    return json.loads(done.stdout)
