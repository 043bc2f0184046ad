"""The perceptual networks: LPIPS (VGG16 trunk, the ``lpips`` package's linear heads) for the synchronization loss,
and VGG19 style features with Gram matrices for Intra-Style-L. Plain torch."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from .trunks import vgg_features

def _lpips_heads_path() -> Path:
    import lpips

    return Path(lpips.__file__).resolve().parent / "weights" / "v0.1" / "vgg.pth"


def _freeze(module: nn.Module, device) -> nn.Module:
    module = module.to(device=device, dtype=torch.float32).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class LPIPSLoss(nn.Module):
    """LPIPS (v0.1, VGG16 trunk, the ``lpips`` package's linear heads) as ``loss(images, targets) -> (B,)``.

    ``images`` and ``targets``: (B, 3, h, w) in [-1, 1] (``targets`` may have batch 1, broadcast); any float
    dtype. The distance is computed in float32 (autocast is turned off inside), differentiable w.r.t. both
    inputs; the module's own parameters never require grad. ``features`` / ``distance`` split the computation
    so that many pairs of few images need one trunk pass per image.
    """

    def __init__(self, inner: nn.Module, source: str = ""):
        super().__init__()
        self.inner = inner
        self.source = source

    @property
    def device(self) -> torch.device:
        return self.inner.scaling_layer.shift.device

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects images (batch, 3, height, width) in [-1, 1], got {tuple(x.shape)}")
        if x.is_inference() and not torch.is_inference_mode_enabled():
            x = x.clone()  # an inference tensor cannot be saved for backward
        return x.to(device=self.device, dtype=torch.float32)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised (over channels) trunk features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""
        import lpips

        x = self._prep(images)
        with torch.autocast(device_type=x.device.type, enabled=False):
            outs = self.inner.net(self.inner.scaling_layer(x))
            return [lpips.normalize_tensor(o) for o in outs]

    def distance(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> torch.Tensor:
        """LPIPS between two lists of :meth:`features` (same batch, or one side batch 1): shape (B,)."""
        with torch.autocast(device_type=feats_a[0].device.type, enabled=False):
            total = 0
            for lin, fa, fb in zip(self.inner.lins, feats_a, feats_b):
                total = total + lin((fa - fb) ** 2).mean(dim=(2, 3))
            return total.reshape(-1)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if images.shape[1:] != targets.shape[1:] or targets.shape[0] not in (1, images.shape[0]):
            raise ValueError(
                f"LPIPS: images {tuple(images.shape)} and targets {tuple(targets.shape)} must have the same "
                "channels and size, and targets batch 1 or the images' batch"
            )
        return self.distance(self.features(images), self.features(targets))


def build_lpips(trunk_state_dict: dict[str, torch.Tensor], device="cpu", source: str = "") -> LPIPSLoss:
    """An :class:`LPIPSLoss` from a VGG16 ``features`` state dict (keys ``"0.weight"`` ... as
    :func:`load_trunk_state_dict` returns them, or with the ``features.`` prefix) and the package's heads.

    The module is built with the package's random-trunk option (nothing is downloaded) on the meta device
    (nothing is initialised twice), then every parameter and buffer is loaded strictly.
    """
    import lpips

    sd16 = {k[len("features."):] if k.startswith("features.") else k: v for k, v in trunk_state_dict.items()}
    with torch.inference_mode(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's `pretrained` deprecation; no-op copies into meta tensors
        with torch.device("meta"):
            inner = lpips.LPIPS(net="vgg", version="0.1", pretrained=False, pnet_rand=True, verbose=False)
        inner = inner.to_empty(device="cpu")
        state = {}
        for key in inner.state_dict():
            head, _, rest = key.partition(".")
            if head == "net":  # net.slice<k>.<torchvision index>.<param>
                _, index, param = rest.split(".")
                state[key] = sd16[f"{index}.{param}"]
        heads = torch.load(str(_lpips_heads_path()), map_location="cpu", weights_only=True)
        for key, value in heads.items():  # lin<k>.model.1.weight, also reachable as lins.<k>.model.1.weight
            state[key] = value
            state[f"lins.{key[3]}{key[4:]}"] = value
        scaling = lpips.ScalingLayer()  # the package's input normalisation constants
        state["scaling_layer.shift"] = scaling.shift
        state["scaling_layer.scale"] = scaling.scale
        inner.load_state_dict(state, strict=True)
        return _freeze(LPIPSLoss(inner, source), device)


# ----------------------------------------------------------------------------------------------------------------
# Style features (VGG19) and Gram matrices

#: torchvision indices of relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 in VGG19's ``features``.
STYLE_LAYERS = (1, 6, 11, 20, 29)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class StyleFeatures(nn.Module):
    """VGG19 activations at relu1_1, relu2_1, relu3_1, relu4_1 and relu5_1 (Gatys et al.'s style layers).

    Input: (B, 3, h, w) in [-1, 1], mapped to [0, 1] and normalised with ImageNet's mean and std (torchvision's
    convention for its VGG weights); computed in float32.
    """

    def __init__(self, features: nn.Sequential, source: str = ""):
        super().__init__()
        self.features = features
        self.source = source
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).reshape(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (batch, 3, height, width) in [-1, 1], got {tuple(images.shape)}")
        x = images.to(device=self.mean.device, dtype=torch.float32)
        if x.is_inference() and not torch.is_inference_mode_enabled():
            x = x.clone()
        out = []
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = ((x + 1) / 2 - self.mean) / self.std
            for i, layer in enumerate(self.features):
                h = layer(h)
                if i in STYLE_LAYERS:
                    out.append(h)
        return out


def build_style_features(trunk_state_dict: dict[str, torch.Tensor], device="cpu", source: str = "") -> StyleFeatures:
    """:class:`StyleFeatures` from a VGG19 ``features`` state dict (as :func:`load_trunk_state_dict` returns)."""
    upto = STYLE_LAYERS[-1] + 1
    sd = {k[len("features."):] if k.startswith("features.") else k: v for k, v in trunk_state_dict.items()}
    with torch.inference_mode(False):
        with torch.device("meta"):
            feats = vgg_features("vgg19", upto)
        feats = feats.to_empty(device="cpu")
        feats.load_state_dict({k: sd[k] for k in feats.state_dict()}, strict=True)
        module = StyleFeatures(feats, source)
        return _freeze(module, device)


def gram(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix of (B, C, h, w) features, normalised by C·h·w: (B, C, C)."""
    b, c, h, w = features.shape
    f = features.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)
