"""``--weights timm:ARCH[.TAG]``: timm's published weights, read from the cache timm
downloads them to (Hugging Face's, ``$HF_HOME/hub``; the few weights published only as a
URL, from torch's), and downloaded there when missing and the network allows; else one line
says which file to fetch and where to put it.

timm itself fits the weights to the model: it drops a classifier trained on another number
of classes, adapts the first convolution to another number of input channels and resamples
position embeddings to another image size, exactly as ``timm.create_model(pretrained=True)``
would. Weights are read from ``safetensors`` or with ``weights_only``; nothing in them runs.
"""

from __future__ import annotations

import difflib
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from torch import nn

from compress.errors import CompressError, first_line
from compress.hub_cache import cached_url
from compress.models.timm_models import NAME, PREFIX, create, import_timm

HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub loader looks for


def is_timm_weights(weights: str | None) -> bool:
    return bool(weights) and weights.startswith(PREFIX)


def pretrained_config(weights: str):
    """timm's pretrained configuration of ``timm:ARCH[.TAG]`` (no tag: timm's default)."""
    timm = import_timm()
    wanted = weights.removeprefix(PREFIX)
    config = None
    if NAME.fullmatch(wanted):
        try:
            config = timm.models.get_pretrained_cfg(wanted)
        except RuntimeError:  # an architecture timm knows, with a tag it does not
            config = None
    if config is None or not (config.hf_hub_id or config.url):
        close = difflib.get_close_matches(wanted, timm.list_pretrained(), n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(PREFIX + c for c in close)}" if close else \
            " (a name of timm.list_pretrained(), such as timm:resnet18.a1_in1k)"
        raise CompressError(f"unknown pretrained weights {weights!r}{hint}")
    return config


def hub_cache_path(repo: str, filename: str) -> Path:
    """Where a file put by hand is found by Hugging Face's cache lookup (the ``main``
    snapshot)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / \
        "snapshots" / "main" / filename


def cached_file(config) -> Path:
    """The weights file of ``config`` in its cache, downloaded there if it is missing."""
    if not config.hf_hub_id:
        return cached_url(config.url, f"timm:{config.architecture}.{config.tag}")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo = config.hf_hub_id
    names = (config.hf_hub_filename,) if config.hf_hub_filename else HUB_FILES
    for filename in names:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    from huggingface_hub import constants

    url = f"{constants.ENDPOINT}/{repo}/resolve/main/{names[0]}"
    missing = (f"pretrained weights timm:{config.architecture}.{config.tag} are not in "
               "Hugging Face's cache and could not be downloaded")
    where = f"fetch {url} and put it at {hub_cache_path(repo, names[0])}"
    if not _hub_reachable():  # else the hub's client retries for half a minute, loudly
        raise CompressError(f"{missing} (no connection to the hub): {where}")
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retries are warnings; the outcome is ours to say
    try:
        return Path(hf_hub_download(repo, names[0]))
    except Exception as exc:  # no network, a proxy, offline mode
        from huggingface_hub.errors import LocalEntryNotFoundError

        reason = "offline, or the network refused" if isinstance(
            exc, LocalEntryNotFoundError) else first_line(exc)[:100]
        raise CompressError(f"{missing} ({reason}): {where}") from None
    finally:
        hub_logger.setLevel(level)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a connection at all (offline mode: no). Behind a proxy the
    proxy decides, so the download is tried."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True  # the client then fails at once, with its own offline error
    if any(os.environ.get(name) for name in ("https_proxy", "HTTPS_PROXY", "all_proxy",
                                             "ALL_PROXY")):
        return True
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def weights_file(weights: str, model_spec: str) -> Path:
    """The cached file of ``weights``, once they are known to be ``model_spec``'s
    architecture's (a ``timm:`` model)."""
    config = pretrained_config(weights)
    model_name = model_spec.removeprefix(PREFIX).partition(".")[0]
    if not model_spec.startswith(PREFIX) or model_name != config.architecture:
        raise CompressError(f"{weights} are weights of timm:{config.architecture}, not of "
                            f"{model_spec!r}: use --model timm:{config.architecture}")
    return cached_file(config)


def pretrained_model(weights: str, path: Path, num_classes: int,
                     input_shape: tuple[int, int, int]) -> tuple[nn.Module, list[str]]:
    """timm's model of ``weights`` for the data, loaded by timm from ``path``
    (`weights_file`), and notes on what timm had to fit."""
    config = pretrained_config(weights)
    overlay = {"file": str(path), "custom_load": False}  # the hub's files are timm's format
    try:
        model = create(f"{config.architecture}.{config.tag}", num_classes, input_shape[0],
                       tuple(input_shape[1:]), pretrained=True, pretrained_cfg_overlay=overlay)
    except CompressError as exc:
        raise CompressError(f"{path} did not load as {weights}: "
                            f"{str(exc).partition(': ')[2][:160]}") from None
    return model, _fitting_notes(config, num_classes, input_shape[0])


def _fitting_notes(config, num_classes: int, in_channels: int) -> list[str]:
    notes = []
    if config.num_classes != num_classes:
        notes.append(f"the classifier ({config.classifier}) was trained on "
                     f"{config.num_classes} classes; it is replaced by a fresh one for the "
                     f"data's {num_classes}")
    trained_channels = (config.input_size or (3,))[0]
    if trained_channels != in_channels:
        notes.append(f"the first convolution ({config.first_conv}) was trained on "
                     f"{trained_channels} input channels; timm adapted it to {in_channels}")
    return notes


def normalisation(weights: str) -> tuple[list[float], list[float]] | None:
    """The mean and std the weights were trained with."""
    config = pretrained_config(weights)
    return (list(config.mean), list(config.std)) if config.mean and config.std else None
