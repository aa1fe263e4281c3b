"""Which model specs a file may name, without importing torch.

A spec read from a file (a checkpoint, a recipe, an export's metadata) must not choose code
to run: `check_spec_from_file` admits only the registered names, torchvision's model
builders, timm's architectures by name (``timm:NAME``), plus any spec the user named
themselves (`trust_model_spec`, which ``--model`` calls). The command line and a user's
own code keep accepting any ``module:callable``.
"""

from __future__ import annotations

import re

from compress.errors import CompressError

# the names `compress.models.REGISTRY` builds (it checks that both agree)
REGISTERED_NAMES = ("mlpnet", "lenet300", "lenet5", "vgg-small", "resnet20", "resnet32",
                    "resnet56", "wrn-28-2", "mobilenetv2-32")  # `compress.models.REGISTRY`

_TRUSTED_SPECS: set[str] = set()
# timm's registry, by name only (`compress.models.timm_models` looks nothing else up)
_TIMM_NAME = re.compile(r"timm:[a-z0-9_]+(\.[a-z0-9_]+)?")


def trust_model_spec(spec: str | None) -> None:
    """Let files name ``spec``: the user named it themselves (``--model``, or their own code
    before it loads a checkpoint that names ``mypkg.nets:make``)."""
    if spec:
        _TRUSTED_SPECS.add(spec)


def _torchvision_builder(spec: str) -> bool:
    """Whether ``spec`` names one of torchvision's registered model builders (found by name,
    without importing whatever module the spec names)."""
    module_name, _, attr = spec.partition(":")
    if module_name != "torchvision.models" and not module_name.startswith("torchvision.models."):
        return False
    from torchvision import models

    if attr not in models.list_models():
        return False
    builder = models.get_model_builder(attr)
    return module_name in ("torchvision.models", builder.__module__)


def check_spec_from_file(spec: object, source: str) -> str:
    """``spec`` as read from ``source`` (a file), refused in one line unless it is safe to
    resolve: a registered name, a torchvision model, or a spec the user named."""
    if not isinstance(spec, str):
        raise CompressError(f"{source} names the model {spec!r}, not a model name")
    if spec in REGISTERED_NAMES or spec in _TRUSTED_SPECS or _torchvision_builder(spec) or \
            _TIMM_NAME.fullmatch(spec):
        return spec
    raise CompressError(f"{source} names the model {spec!r}, which is neither registered nor "
                        "a torchvision model; a file never chooses code to run: if you trust "
                        f"it, name it yourself with --model {spec}")
