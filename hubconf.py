"""torch.hub entry points: the released CrOC and DINO backbones as this repository's ViT (model.py).

    import torch
    vit = torch.hub.load("/path/to/croc", "croc_vits16_coco", source="local")  # a clone; or "owner/repo:branch"
    vit = torch.hub.load("/path/to/croc", "vit", source="local", weights="checkpoint.pth")  # any, its own arch
    maps = vit.dense_features(images, n_last_blocks=4)   # (B, 4 D, H/p, W/p), CLS dropped
    f = vit.forward_features(images, which="k")          # f.cls, f.patch, f.tokens (the last block's keys)
    layers = vit.get_intermediate_layers(images, n=4)    # DINO's method; get_last_selfattention too

Each entry returns the teacher's backbone, heads dropped, frozen and in eval mode (`.requires_grad_(True)` to
fine-tune). pretrained=True downloads the authors' file (model.RELEASES: the official CrOC README's and DINO's
README's URLs) into torch.hub's cache; weights=PATH_OR_URL loads any checkpoint model.load_pretrained reads
instead; pretrained=False without weights: DINO's random init.
"""
import model as _model

dependencies = ["torch", "torchvision", "einops", "numpy", "PIL", "tqdm"]


def _release(name, pretrained, weights, checkpoint_key):
    release = _model.RELEASES[name]
    if weights is None and pretrained:
        weights = release.url
    return _model.load_backbone(release.arch, release.patch_size, weights, checkpoint_key)


def croc_vits16_coco(pretrained=True, weights=None, checkpoint_key="teacher"):
    """CrOC ViT-S/16 pretrained on COCO train2017 (official README: linear 54.9 / 55.7 / 49.9 mIoU on PVOC12 /
    COCO-Things / COCO-Stuff)."""
    return _release("croc_vits16_coco", pretrained, weights, checkpoint_key)


def croc_vits16_cocoplus(pretrained=True, weights=None, checkpoint_key="teacher"):
    """CrOC ViT-S/16 pretrained on COCO+ (train2017 + unlabeled2017; official README: 61.6 / 64.4 / 52.2)."""
    return _release("croc_vits16_cocoplus", pretrained, weights, checkpoint_key)


def croc_vits16_in1k(pretrained=True, weights=None, checkpoint_key="teacher"):
    """CrOC ViT-S/16 pretrained on ImageNet-1k (official README: 70.6 / 66.1 / 52.6)."""
    return _release("croc_vits16_in1k", pretrained, weights, checkpoint_key)


def dino_vits16(pretrained=True, weights=None, checkpoint_key="teacher"):
    """DINO ViT-S/16 pretrained on ImageNet-1k (DINO's README: k-NN 74.5%, linear 77.0% top-1)."""
    return _release("dino_vits16", pretrained, weights, checkpoint_key)


def dino_vits8(pretrained=True, weights=None, checkpoint_key="teacher"):
    """DINO ViT-S/8 pretrained on ImageNet-1k (DINO's README: k-NN 78.3%, linear 79.7%)."""
    return _release("dino_vits8", pretrained, weights, checkpoint_key)


def dino_vitb16(pretrained=True, weights=None, checkpoint_key="teacher"):
    """DINO ViT-B/16 pretrained on ImageNet-1k (DINO's README: k-NN 76.1%, linear 78.2%)."""
    return _release("dino_vitb16", pretrained, weights, checkpoint_key)


def vit(weights=None, checkpoint_key="teacher", arch=None, patch_size=None):
    """Any checkpoint model.load_pretrained reads (path or URL), built at its own architecture (its training args,
    else its shapes); without weights, a random vit_small/16 (or arch/patch_size)."""
    return _model.load_backbone(arch, patch_size, weights, checkpoint_key)
