"""Structural rules that make torch-pruning's DependencyGraph work on torchvision classifiers.

``rules_for(model)`` inspects the module tree (types and structure, never the model's name) and
returns what `compress.structured.engine` gives ``tp.DependencyGraph.build_dependency``
(``graph_kwargs()``) and which layers it must never cut (``ignored_layers``: the
classifiers), so that a cut keeps the classifier's outputs, keeps the model runnable and can be
replayed onto a fresh copy of the same model. ``after_prune(model)`` then fixes attributes
that forward() reads but torch-pruning does not update (ViT's ``hidden_dim``, Swin's
``head_dim``). Both run again when a checkpoint's structure is replayed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch_pruning.pruner import function as tp_function
from torchvision.models import maxvit as tv_maxvit
from torchvision.models import shufflenetv2 as tv_shufflenet
from torchvision.models import swin_transformer as tv_swin
from torchvision.models import vision_transformer as tv_vit
from torchvision.models.convnext import CNBlock

CONV_OR_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)
# Module types whose parameters tp's built-in pruners already handle.
_TP_MODULES = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.PReLU,
    nn.Embedding,
    nn.MultiheadAttention,
    nn.LSTM,
)

# Every model of torchvision.models.list_models(module=torchvision.models) is covered (torch
# 2.14.1, torchvision 0.29.1, torch-pruning 1.6; half the channels, rounded to 8, 10 classes:
# forward in eval and training mode, class count, replay onto a fresh model). Partly pruned:
#   shufflenet_v2_*: widths that pass through channel_shuffle stay (MACs ratio about 0.5);
#   regnet_* with odd group counts cannot keep 50 % of a group width of 8/24 as a multiple of 8;
#   inception_v3: the example input must be big enough for the aux head (299 works, 160 not).


@dataclass
class EngineRules:
    """Everything torch-pruning needs for one model, decided from its module tree."""

    ignored_layers: list[nn.Module] = field(default_factory=list)
    unwrapped_parameters: dict[nn.Parameter, int] = field(default_factory=dict)
    customized_pruners: dict = field(default_factory=dict)
    num_heads: dict[nn.Module, int] = field(default_factory=dict)
    root_module_types: tuple = CONV_OR_LINEAR
    notes: list[str] = field(default_factory=list)
    # Forward used while tracing (tp calls it as forward_fn(model, example_inputs)). None means
    # a plain model(x). It must also be used when replaying a pruning history.
    forward_fn: Callable[[nn.Module, Any], Any] | None = None

    def graph_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``tp.DependencyGraph().build_dependency``."""
        kwargs: dict[str, Any] = {
            # tp iterates this as (param, dim) pairs; a dict would be iterated by key only.
            "unwrapped_parameters": list(self.unwrapped_parameters.items()) or None,
            "customized_pruners": dict(self.customized_pruners) or None,
        }
        if self.forward_fn is not None:
            kwargs["forward_fn"] = self.forward_fn
        return kwargs


# --------------------------------------------------------------------------------------------
# Small tensor helpers for the customized pruners


def _keep(n: int, idxs: Sequence[int]) -> list[int]:
    drop = set(int(i) for i in idxs)
    return [i for i in range(n) if i not in drop]


def _select(param: nn.Parameter | None, keep: Sequence[int], dim: int) -> nn.Parameter | None:
    if param is None:
        return None
    index = torch.as_tensor(list(keep), dtype=torch.long, device=param.device)
    return nn.Parameter(param.data.index_select(dim, index), requires_grad=param.requires_grad)


def _prune_linear(layer: nn.Linear, keep_out: Sequence[int] | None,
                  keep_in: Sequence[int] | None) -> None:
    if keep_out is not None:
        layer.weight = _select(layer.weight, keep_out, 0)
        if layer.bias is not None:
            layer.bias = _select(layer.bias, keep_out, 0)
        layer.out_features = len(keep_out)
    if keep_in is not None:
        layer.weight = _select(layer.weight, keep_in, 1)
        layer.in_features = len(keep_in)


def _prune_layernorm(norm: nn.LayerNorm, keep: Sequence[int]) -> None:
    if norm.elementwise_affine:
        norm.weight = _select(norm.weight, keep, 0)
        if norm.bias is not None:
            norm.bias = _select(norm.bias, keep, 0)
    norm.normalized_shape = (*tuple(norm.normalized_shape)[:-1], len(keep))


def _repeat(keep: Sequence[int], width: int, times: int) -> list[int]:
    """Indices of ``keep`` inside each of ``times`` stacked blocks of ``width`` (q|k|v, x0..x3)."""
    return [k + t * width for t in range(times) for k in keep]


# --------------------------------------------------------------------------------------------
# Customized pruners. Each treats one attention-like module as a single node whose input and
# output width is the residual width (prune_in == prune_out), so tp never looks inside it.


class _HeadGroupedMHAPruner(tp_function.MultiheadAttentionPruner):
    """nn.MultiheadAttention pruned head-aligned: every head loses the same positions.

    tp's own MHA pruner removes arbitrary embedding dims, which shifts dims across head
    boundaries and only keeps ``embed_dim % num_heads == 0`` by luck of the ratio. Reporting
    ``num_heads`` channel groups makes MetaPruner rank and remove dims per head slot.
    """

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        return layer.num_heads

    get_in_channel_groups = get_out_channel_groups


class _WindowAttentionPruner(tp_function.BasePruningFunc):
    """torchvision Swin ShiftedWindowAttention(V2): qkv/proj are applied with F.linear.

    Its forward splits qkv into (3, heads, C // heads) with C the *input* width, so the
    q/k/v width, the proj width and the residual width are one and the same dimension.
    """

    TARGET_MODULES = tv_swin.ShiftedWindowAttention

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        width = layer.qkv.in_features
        keep = _keep(width, idxs)
        _prune_linear(layer.qkv, _repeat(keep, width, 3), keep)
        _prune_linear(layer.proj, keep, keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.qkv.in_features

    get_in_channels = get_out_channels

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        return layer.num_heads

    get_in_channel_groups = get_out_channel_groups


class _RelPosAttentionPruner(tp_function.BasePruningFunc):
    """MaxViT RelativePositionalMultiHeadAttention: to_qkv is chunked on the last dim and the
    heads are merged back with reshape(B, G, P, D) using the input width D, so q/k/v width,
    merge width and residual width are tied. Heads are kept; head_dim shrinks."""

    TARGET_MODULES = tv_maxvit.RelativePositionalMultiHeadAttention

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        width = layer.to_qkv.in_features
        keep = _keep(width, idxs)
        _prune_linear(layer.to_qkv, _repeat(keep, width, 3), keep)
        _prune_linear(layer.merge, keep, keep)
        layer.head_dim = len(keep) // layer.n_heads
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.to_qkv.in_features

    get_in_channels = get_out_channels

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        return layer.n_heads

    get_in_channel_groups = get_out_channel_groups


class _PatchMergingPruner(tp_function.BasePruningFunc):
    """Swin PatchMerging(V2): cat of four strided slices on the channel dim (C -> 4C), then a
    Linear 4C -> 2C. Input channel i lives at i, C+i, 2C+i, 3C+i of the Linear's input, which tp
    cannot map through the slices and the last-dim cat."""

    TARGET_MODULES = (tv_swin.PatchMerging, tv_swin.PatchMergingV2)

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        width = layer.reduction.in_features // 4
        keep4 = _repeat(_keep(width, idxs), width, 4)
        _prune_linear(layer.reduction, None, keep4)
        if layer.norm.normalized_shape[-1] == 4 * width:  # v1 normalises before reduction
            _prune_layernorm(layer.norm, keep4)
        layer.dim = width - len(set(idxs))
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        width = layer.reduction.out_features
        keep = _keep(width, idxs)
        _prune_linear(layer.reduction, keep, None)
        if layer.norm.normalized_shape[-1] == width:  # v2 normalises after reduction
            _prune_layernorm(layer.norm, keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.reduction.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.reduction.in_features // 4


# --------------------------------------------------------------------------------------------
# Tracing helpers


class _Opaque(torch.autograd.Function):
    """Runs ``fn(x)`` as one autograd node whose only input is ``x``.

    tp walks grad_fn chains; inside Swin/MaxViT attention it would meet slices on the H axis
    of NHWC tensors and last-dim cat/chunk that it maps as channel ops. One opaque node makes
    the module a single graph node that its customized pruner handles as a whole."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]):
        return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # never used: tracing does not backprop
        return None, None


_TENSOR_CHUNK = torch.Tensor.chunk
_TENSOR_SPLIT = torch.Tensor.split
_TORCH_CHUNK = torch.chunk


def _split_with_sizes(x: torch.Tensor, size: int, dim: int) -> tuple[torch.Tensor, ...]:
    length = x.shape[dim]
    return _TENSOR_SPLIT(x, [min(size, length - i) for i in range(0, length, size)], dim)


def _chunk(x: torch.Tensor, chunks: int, dim: int = 0) -> tuple[torch.Tensor, ...]:
    return _split_with_sizes(x, -(-x.shape[dim] // chunks), dim)


def _split(x: torch.Tensor, split_size: Any, dim: int = 0) -> tuple[torch.Tensor, ...]:
    if isinstance(split_size, int):
        return _split_with_sizes(x, split_size, dim)
    return _TENSOR_SPLIT(x, split_size, dim)


@contextlib.contextmanager
def _explicit_split_sizes() -> Iterator[None]:
    """Trace chunk()/split(int) as split_with_sizes.

    With torch 2.14 the SplitBackward0 node of chunk()/split(int) only saves ``_saved_split_size``
    and ``_saved_self_sym_sizes``; tp 1.6 then falls back to guessing each piece's width from
    its consumers, which is wrong when a piece goes into a cat (ShuffleNetV2: x1 -> cat) and
    later fails with IndexError. SplitWithSizesBackward0 saves the sizes tp reads."""
    try:
        torch.Tensor.chunk = _chunk
        torch.Tensor.split = _split
        torch.chunk = _chunk
        yield
    finally:
        torch.Tensor.chunk = _TENSOR_CHUNK
        torch.Tensor.split = _TENSOR_SPLIT
        torch.chunk = _TORCH_CHUNK


def _opaque_forward(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _Opaque.apply(x, lambda t: forward(t, *args, **kwargs))

    return run


@dataclass
class _TraceForward:
    """forward_fn for tp: exact split sizes, opaque modules, opaque channel shuffle, aux heads."""

    opaque: list[nn.Module] = field(default_factory=list)
    shuffle_globals: list[dict] = field(default_factory=list)
    aux_heads: bool = False

    @contextlib.contextmanager
    def _patched(self, model: nn.Module) -> Iterator[None]:
        saved_shuffles = [(g, g["channel_shuffle"]) for g in self.shuffle_globals]
        was_training = model.training
        try:
            for module in self.opaque:
                module.forward = _opaque_forward(module.forward)
            for namespace, shuffle in saved_shuffles:
                namespace["channel_shuffle"] = (
                    lambda x, groups, _s=shuffle: _Opaque.apply(x, lambda t: _s(t, groups))
                )
            if self.aux_heads:
                # Only the top module: its forward runs the aux heads when training, while BN
                # and dropout below stay in eval mode (no running-stat updates).
                model.training = True
            yield
        finally:
            model.training = was_training
            for namespace, shuffle in saved_shuffles:
                namespace["channel_shuffle"] = shuffle
            for module in self.opaque:
                module.__dict__.pop("forward", None)

    def __call__(self, model: nn.Module, example_inputs: Any) -> Any:
        with self._patched(model), _explicit_split_sizes():
            if isinstance(example_inputs, dict):
                return model(**example_inputs)
            if isinstance(example_inputs, (list, tuple)):
                return model(*example_inputs)
            return model(example_inputs)


# --------------------------------------------------------------------------------------------
# Detection


def _convs_and_linears(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, CONV_OR_LINEAR)]


def _out_width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The final classifier plus auxiliary classifiers, found structurally.

    The final one is the last Conv/Linear registered (Linear for most, a 1x1 Conv for
    SqueezeNet). An aux head is the last Conv/Linear of a direct child that holds a Linear and
    has the same output width (GoogLeNet aux1/aux2, Inception3 AuxLogits)."""
    layers = _convs_and_linears(model)
    if not layers:
        return []
    final = layers[-1]
    num_classes = _out_width(final)
    heads = [final]
    for child in model.children():
        inner = _convs_and_linears(child)
        if (
            inner
            and inner[-1] is not final
            and _out_width(inner[-1]) == num_classes
            and any(isinstance(m, nn.Linear) for m in inner)
        ):
            heads.append(inner[-1])
    return heads


def _exact_types(model: nn.Module, base: type | tuple[type, ...]) -> list[type]:
    """Concrete classes present in the model that derive from ``base``.

    tp looks customized pruners up by ``module.__class__`` (no isinstance), so a user's
    subclass has to be registered under its own class."""
    seen: list[type] = []
    for m in model.modules():
        if isinstance(m, base) and type(m) not in seen:
            seen.append(type(m))
    return seen


def _shufflenet_rules(model: nn.Module, rules: EngineRules, trace: _TraceForward) -> None:
    """ShuffleNetV2: channel_shuffle = view(B, 2, C/2, H, W) + transpose + view.

    tp's reshape index mapping divides by zero on the 5-D view, and even as an identity the map
    would be wrong (shuffled channels). The shuffle is traced as one opaque op and the convs
    that feed it (last conv of each branch, output concatenated then shuffled) are ignored, so
    every group that crosses a shuffle is skipped: only branch-internal widths, the stem and
    the last conv shrink. ``chunk`` halves stay equal because the stream is never pruned."""
    blocks = [m for m in model.modules() if isinstance(m, tv_shufflenet.InvertedResidual)]
    if not blocks:
        return
    for block in blocks:
        for branch in (block.branch1, block.branch2):
            convs = [m for m in branch.modules() if isinstance(m, nn.Conv2d)]
            if convs:
                rules.ignored_layers.append(convs[-1])
    for cls in _exact_types(model, tv_shufflenet.InvertedResidual):
        namespace = cls.forward.__globals__  # where this class's forward finds channel_shuffle
        if "channel_shuffle" in namespace and namespace not in trace.shuffle_globals:
            trace.shuffle_globals.append(namespace)
    rules.notes.append(
        "ShuffleNetV2: channel_shuffle traced as one opaque op; the last conv of every branch "
        "is ignored, so only branch-internal widths, the stem and conv5 are pruned")


def _attention_rules(model: nn.Module, rules: EngineRules, trace: _TraceForward) -> None:
    """Attention blocks whose q/k/v width is tied to the residual width."""
    for cls in _exact_types(model, nn.MultiheadAttention):
        rules.customized_pruners[cls] = _HeadGroupedMHAPruner()
    if rules.customized_pruners:
        rules.notes.append(
            "nn.MultiheadAttention: customized pruner reporting num_heads channel groups, so "
            "the embedding width is cut head-aligned and stays divisible by num_heads")
    for vit in model.modules():
        if isinstance(vit, tv_vit.VisionTransformer):
            rules.unwrapped_parameters[vit.class_token] = 2
            rules.unwrapped_parameters[vit.encoder.pos_embedding] = 2
            rules.notes.append(
                "ViT: class_token and pos_embedding (1, n, hidden) pruned on dim 2; after_prune "
                "resets VisionTransformer.hidden_dim, which _process_input reshapes with")

    opaque: dict[type, tp_function.BasePruningFunc] = {}
    for cls in _exact_types(model, tv_swin.ShiftedWindowAttention):
        opaque[cls] = _WindowAttentionPruner()
    for cls in _exact_types(model, (tv_swin.PatchMerging, tv_swin.PatchMergingV2)):
        opaque[cls] = _PatchMergingPruner()
    for cls in _exact_types(model, tv_maxvit.RelativePositionalMultiHeadAttention):
        opaque[cls] = _RelPosAttentionPruner()
    if opaque:
        rules.customized_pruners.update(opaque)
        trace.opaque = [m for m in model.modules() if type(m) in opaque]
        names = ", ".join(sorted(t.__name__ for t in opaque))
        rules.notes.append(
            f"{names}: traced as opaque nodes with customized pruners (tp would map their "
            "internal H-axis slices and last-dim cat/chunk as channel ops); residual width "
            "drives q/k/v/proj together, heads are kept and head_dim shrinks")
    # num_heads stays empty: tp's num_heads path expects a traced qkv Linear followed by
    # reshape/unbind on the channel dim (timm style); none of torchvision's attentions is that.
    _fused_qkv_rules(model, rules)


def _fused_qkv_rules(model: nn.Module, rules: EngineRules) -> None:
    """Attention with one fused ``qkv`` Linear reshaped by ``num_heads`` (timm's ViT, Swin,
    MobileViT... blocks): its reshape reads the head count and size from attributes the cut
    cannot update, so qkv's outputs (and the attention width behind them) are kept whole;
    the residual width that feeds qkv and leaves ``proj``, and the MLP widths, are cut."""
    kept = 0
    for module in model.modules():
        qkv = getattr(module, "qkv", None)
        if type(module) in rules.customized_pruners or not isinstance(qkv, nn.Linear) or \
                not isinstance(getattr(module, "num_heads", None), int):
            continue
        rules.ignored_layers.append(qkv)
        kept += 1
    if kept:
        rules.notes.append(f"{kept} fused-qkv attention block(s): q/k/v widths kept whole "
                           "(their reshape reads num_heads and head_dim); residual and MLP "
                           "widths cut")


def _parameter_rules(model: nn.Module, rules: EngineRules) -> None:
    """Pin the channel dim of parameters that do not belong to a module tp can prune."""
    for block in model.modules():
        if isinstance(block, CNBlock):
            rules.unwrapped_parameters[block.layer_scale] = 0
    if any(isinstance(m, CNBlock) for m in model.modules()):
        rules.notes.append("ConvNeXt: CNBlock.layer_scale (C, 1, 1) pruned on dim 0")
    owned = set(rules.unwrapped_parameters)
    owner_types = (*_TP_MODULES, *rules.customized_pruners)
    for m in model.modules():
        if isinstance(m, owner_types):
            owned.update(m.parameters())
    unknown = [n for n, p in model.named_parameters() if p not in owned]
    if unknown:
        rules.notes.append(
            f"unknown free parameters, tp guesses their last non-singleton dim: {unknown[:5]}")


def rules_for(model: nn.Module) -> EngineRules:
    """Detect by module types/structure (NOT by the model's name string) which rules apply."""
    rules = EngineRules()
    trace = _TraceForward()
    heads = classifier_layers(model)
    rules.ignored_layers.extend(heads)
    if heads:
        rules.notes.append(
            f"protect {len(heads)} classifier layer(s) with {_out_width(heads[0])} outputs; "
            "only round_to=8 with 10 classes happens to spare an unprotected one")
    if len(heads) > 1:
        trace.aux_heads = True
        rules.notes.append(
            "aux heads: trace with the top module in training mode so they run; otherwise "
            "their first convs are not in the graph and keep their unpruned input width "
            "(the example input must be large enough for them: Inception3 needs 299)")
    _shufflenet_rules(model, rules, trace)
    _attention_rules(model, rules, trace)
    _parameter_rules(model, rules)
    rules.forward_fn = trace
    return rules


def after_prune(model: nn.Module) -> None:
    """Fix attributes torch-pruning does not update (e.g. ViT hidden_dim, MHA head_dim),
    deterministic from shapes; safe to call on any model."""
    for m in model.modules():
        if isinstance(m, tv_vit.VisionTransformer):
            m.hidden_dim = m.conv_proj.out_channels
        elif isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim:
            m.head_dim = m.embed_dim // m.num_heads
            m.kdim = m.vdim = m.embed_dim
        elif isinstance(m, tv_maxvit.RelativePositionalMultiHeadAttention):
            m.head_dim = m.to_qkv.in_features // m.n_heads
        elif isinstance(m, tv_maxvit.PartitionAttentionLayer):
            attn = next(a for a in m.attn_layer.modules()
                        if isinstance(a, tv_maxvit.RelativePositionalMultiHeadAttention))
            m.head_dim = attn.to_qkv.in_features // attn.n_heads
        elif isinstance(m, (tv_swin.PatchMerging, tv_swin.PatchMergingV2)):
            m.dim = m.reduction.in_features // 4
