"""Files of published weights in torch's own cache (``$TORCH_HOME/hub/checkpoints``, the
file names ``torch.hub`` downloads to)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from compress.errors import CompressError, first_line

_HASH = re.compile(r"-([a-f0-9]*)\.")  # the hash prefix torch.hub puts in its file names


def cached_url(url: str, label: str) -> Path:
    """Where torch keeps the file at ``url`` (weights named ``label``), downloaded there if
    it is missing."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    match = _HASH.search(path.name)
    try:
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None,
                                       progress=False)
    except Exception as exc:  # no network, a proxy, a hash that does not match
        raise CompressError(f"pretrained weights {label} are not in torch's cache and could "
                            f"not be downloaded ({first_line(exc)[:100]}): fetch {url} and "
                            f"put it at {path}") from None
    return path
