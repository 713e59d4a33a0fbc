"""ViT in a fused-op style: configuration (config.py), modules (vision_transformer.py),
fused ops beside their references (ops.py), Triton kernels (kernels.py)."""
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer


@register_model
def vit_micro_patch8_32(pretrained=False, **kwargs):
    """A 2-block, 64-wide ViT registered by this project so the scripts run end to end in seconds
    on a CPU (tests, CI). Not a TIMM model: it has no pretrained weights."""
    if pretrained:
        raise ValueError("vit_micro_patch8_32 is a test model: it has no pretrained weights")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    args.update(kwargs)
    return VisionTransformer(**args)
