"""timm models of every family through the channel engine: prune, export, check, time (the
steps are zoo.py's, with live weights).

60 architectures at their smallest sizes, across ResNet/ResNeXt (and their SE, SK, Res2Net,
ResNeSt, CSP variants), RegNet, EfficientNet, MobileNet V2/V3, MNASNet, GhostNet, RepVGG,
RepGhost, MobileOne, ConvNeXt, DeiT/ViT, Swin, MaxViT, CoAtNet, MobileViT, EfficientFormer,
FastViT, LeViT, PVT, PoolFormer, XCiT, NesT, TinyViT, EfficientViT, DenseNet, DLA, HRNet,
DPN, VoVNet, HGNet, Inception. Input 3x64x64 (timm's transformers take it as their image
size), except where the architecture needs 224x224 (efficientformer_l1's fixed attention
biases, inception_v3's stem).

    .venv/bin/python benchmarks/timm_zoo.py [--models NAME ...] [--timeout 1800]
"""

from __future__ import annotations

from pathlib import Path

import zoo

MODELS = (
    "resnet18", "resnet10t", "resnet26d", "resnext26ts", "seresnext26d_32x4d", "regnetx_002",
    "regnety_002", "regnetz_b16", "efficientnet_b0", "efficientnet_lite0",
    "tf_efficientnetv2_b0", "mobilenetv3_small_100", "mobilenetv3_large_100",
    "mobilenetv2_100", "mnasnet_small", "ghostnet_100", "ghostnetv2_100", "repvgg_a0",
    "convnext_atto", "convnextv2_atto", "deit_tiny_patch16_224", "vit_tiny_patch16_224",
    "vit_small_patch16_224", "swin_tiny_patch4_window7_224", "mobilevit_xxs",
    "mobilevitv2_050", "efficientformer_l1", "efficientformerv2_s0", "fastvit_t8",
    "levit_128s", "pvt_v2_b0", "poolformer_s12", "densenet121", "dla34", "hrnet_w18_small",
    "cspresnet50", "cspdarknet53", "rexnet_100", "lcnet_050", "tinynet_a", "mixnet_s",
    "hardcorenas_a", "edgenext_xx_small", "maxvit_nano_rw_256", "xcit_nano_12_p16_224",
    "inception_v3", "res2net50_14w_8s", "resnest14d", "skresnet18", "ese_vovnet19b_dw",
    "gernet_s", "hgnetv2_b0", "repghostnet_050", "mobileone_s0", "efficientvit_b0",
    "tiny_vit_5m_224", "inception_next_atto", "coatnet_nano_rw_224", "dpn48b", "nest_tiny_jx",
)
INPUT = {"efficientformer_l1": (3, 224, 224), "inception_v3": (3, 224, 224)}
DEFAULT_INPUT = (3, 64, 64)
RESULTS = Path("benchmarks/results/timm_zoo.jsonl")

if __name__ == "__main__":
    zoo.main(__file__, __doc__.splitlines()[0], lambda: MODELS, lambda name: f"timm:{name}",
             lambda name: INPUT.get(name, DEFAULT_INPUT), RESULTS)
