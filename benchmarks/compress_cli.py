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


def pair_table(rows: list[dict], first: str, second: str, labels: tuple[str, str]) -> str:
    """Markdown: per model, seconds per epoch of two variants of a run (``row[first]``,
    ``row[second]``, each with ``epoch_seconds`` and ``test_top1``), their ratio and top-1."""
    a, b = labels
    lines = [f"| model | {a} s/epoch | {b} s/epoch | {b} / {a} | top-1 ({a}) | top-1 ({b}) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        one, two = r[first], r[second]
        lines.append(f"| {r['model']} | {one['epoch_seconds']:.1f} | "
                     f"{two['epoch_seconds']:.1f} | "
                     f"{two['epoch_seconds'] / one['epoch_seconds']:.2f} | "
                     f"{100 * one['test_top1']:.2f} | {100 * two['test_top1']:.2f} |")
    return "\n".join(lines)

