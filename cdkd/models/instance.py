"""Instance segmentation on a cdkd student: a ViTDet-style simple feature pyramid feeding torchvision's Mask R-CNN.

ViTDet (Li et al. 2022, "Exploring Plain Vision Transformer Backbones for Object Detection") showed that a plain,
single-scale ViT needs no hierarchical backbone for detection: its last feature map (stride 16) is turned into a
pyramid by deconvolutions and pooling alone (the *simple feature pyramid*), and that pyramid feeds a standard
Mask R-CNN. That is what ``Detector`` builds, written from the paper:

* ``SimpleFeaturePyramid``: the student's map at stride 16 -> strides 4 (two 2x2 transposed convolutions),
  8 (one), 16 (identity), 32 (2x2 max pool), each followed by a 1x1 and a 3x3 convolution with a norm, plus
  torchvision's ``LastLevelMaxPool`` for stride 64 (the RPN's largest anchors), keys ``"0".."3", "pool"``.
* ``StudentBackbone``: the student (any of ``STUDENT_REGISTRY``: it speaks timm's ``forward_intermediates``) and
  that pyramid; a frozen student runs without a graph (its activations are freed at once), as in ``Segmenter``.
* Everything after the pyramid is torchvision's ``MaskRCNN``: anchors (``AnchorGenerator``), RPN, RoIAlign
  (``MultiScaleRoIAlign``), box and mask heads, losses and post-processing. Nothing of it is rewritten here.

One departure from torchvision's defaults: its input transform normalises with ImageNet constants and resizes every
image to 800-1333 px. cdkd tiles arrive normalised with the model's own statistics (like every cdkd runtime) and at
their ground resolution, where an object's pixel size is information, so ``TileTransform`` does neither; it only
pads the batch to a multiple of 32. Anchors default to 16-256 px (torchvision: 32-512), the size of vehicles,
tanks and buildings in 0.3-2 m imagery. The mask head's four convolutions have the pyramid's width (torchvision
fixes them at 256), so a narrow pyramid makes a cheap model end to end.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn as nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from cdkd.errors import CdkdValueError

LEVELS = ("0", "1", "2", "3")  # strides 4, 8, 16, 32; torchvision's LastLevelMaxPool adds "pool" (stride 64)
DEFAULT_ANCHORS = (16, 32, 64, 128, 256)  # one size per level, as torchvision's FPN models do
ASPECT_RATIOS = (0.5, 1.0, 2.0)
BOX_REPRESENTATION = 1024  # torchvision's TwoMLPHead width


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups: batch-size independent (detection trains on 1-4 tiles per step)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _conv_norm(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), group_norm(cout))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: (B, D, h, w) stride-16 map -> OrderedDict of (B, C, ...) maps.

    Keys "0", "1", "2", "3" at strides 4, 8, 16, 32 (sizes 4h, 2h, h, ceil(h/2)) and "pool" at stride 64.
    """

    def __init__(self, embed_dim: int, channels: int = 256) -> None:
        super().__init__()
        d = embed_dim
        if d % 4:
            raise CdkdValueError(f"the simple feature pyramid needs an embedding width divisible by 4, got {d}")
        self.scales = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(d, d // 2, 2, stride=2),
                    group_norm(d // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(d // 2, d // 4, 2, stride=2),
                ),
                nn.ConvTranspose2d(d, d // 2, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, stride=2, ceil_mode=True),  # ceil: an odd grid keeps its last row and column
            ]
        )
        widths = (d // 4, d // 2, d, d)
        self.outputs = nn.ModuleList(
            nn.Sequential(_conv_norm(w, channels, 1), _conv_norm(channels, channels, 3)) for w in widths
        )
        self.top = LastLevelMaxPool()
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = [out(scale(x)) for scale, out in zip(self.scales, self.outputs)]
        names = list(LEVELS)
        maps, names = self.top(maps, maps, names)
        return OrderedDict(zip(names, maps))


class StudentBackbone(nn.Module):
    """A cdkd student + ``SimpleFeaturePyramid``: (B, C, H, W), H, W multiples of 16 -> the pyramid (dict).

    ``layer``: 1-based student block whose output feeds the pyramid (ViTDet: the last one).
    """

    def __init__(self, student: nn.Module, layer: int, channels: int, freeze: bool, feature_norm: bool = False) -> None:
        super().__init__()
        for attr in ("forward_intermediates", "embed_dim", "depth", "patch_size"):
            if not hasattr(student, attr):
                raise CdkdValueError(
                    f"encoder {type(student).__name__} lacks {attr!r}; use a student from cdkd.models.student"
                )
        depth = int(student.depth)
        if not 1 <= layer <= depth:
            raise CdkdValueError(f"layer {layer} out of range: 1-based student blocks 1..{depth}")
        self.body = student
        self.layer, self.freeze, self.feature_norm = int(layer), bool(freeze), bool(feature_norm)
        self.fpn = SimpleFeaturePyramid(int(student.embed_dim), channels)
        self.out_channels = channels
        if self.freeze:
            self.body.requires_grad_(False)
            self.body.eval()

    def train(self, mode: bool = True) -> StudentBackbone:
        super().train(mode)
        if self.freeze:
            self.body.eval()  # a frozen student keeps its inference behaviour (dropout off)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the student's block ``layer`` output (B, D, H/16, W/16)."""

        def run() -> torch.Tensor:
            return self.body.forward_intermediates(
                x,
                indices=[self.layer - 1],
                norm=self.feature_norm,
                stop_early=True,
                output_fmt="NCHW",
                intermediates_only=True,
            )[0]

        if self.freeze:
            with torch.no_grad():
                return run()
        return run()

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.features(x))


class TileTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without its normalisation and resizing (see the module docstring):
    tiles come normalised with the model's statistics and at their own resolution; batches are padded to 32."""

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        return image, target


class Detector(nn.Module):
    """Mask R-CNN (torchvision) on a cdkd student through a simple feature pyramid.

    Training: ``detector(images, targets)`` with images a list of (C, H, W) float32 tiles, normalised, and targets
    a list of dicts ``boxes`` (N, 4) float32 x0, y0, x1, y1 in px, ``labels`` (N,) int64 **1..K** (0 is
    torchvision's background), ``masks`` (N, H, W) uint8 -> dict of the five Mask R-CNN losses.
    Inference (eval mode): ``detector(images)`` -> per image a dict ``boxes``, ``labels`` (1..K), ``scores``,
    ``masks`` (N, 1, H, W) float probabilities pasted into the image.

    Args:
        encoder: a student (``cdkd.models.student``), frozen unless ``freeze_encoder=False``.
        num_classes: object classes K, background not counted.
        layer: 1-based student block feeding the pyramid; None = the last.
        channels: pyramid width (ViTDet and torchvision: 256).
        anchor_sizes: anchor side in px for each of the five levels (strides 4..64).
        box_batch_size_per_image: RoIs sampled per image for the box head's loss (torchvision: 512).
        detections_per_image: most detections kept per tile after NMS.
        score_threshold: detections below it are dropped (keep it low for COCO AP; scenes filter with min_score).
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        layer: int | None = None,
        channels: int = 256,
        freeze_encoder: bool = True,
        anchor_sizes: Sequence[int] = DEFAULT_ANCHORS,
        box_batch_size_per_image: int = 512,
        detections_per_image: int = 100,
        score_threshold: float = 0.05,
        feature_norm: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise CdkdValueError(f"num_classes must be a positive int, got {num_classes!r}")
        anchor_sizes = tuple(int(s) for s in anchor_sizes)
        if len(anchor_sizes) != len(LEVELS) + 1 or min(anchor_sizes) < 1:
            raise CdkdValueError(
                f"anchor_sizes needs {len(LEVELS) + 1} positive sizes (strides 4..64), got {list(anchor_sizes)}"
            )
        if channels < 1:
            raise CdkdValueError(f"channels must be >= 1, got {channels}")
        layer = int(encoder.depth) if layer is None else int(layer)
        self.num_classes, self.layer, self.channels = num_classes, layer, int(channels)
        self.freeze_encoder, self.anchor_sizes = bool(freeze_encoder), anchor_sizes
        self.box_batch_size_per_image, self.detections_per_image = (
            int(box_batch_size_per_image),
            int(detections_per_image),
        )
        self.score_threshold, self.feature_norm = float(score_threshold), bool(feature_norm)
        self.patch_size = int(encoder.patch_size)
        backbone = StudentBackbone(encoder, layer, self.channels, self.freeze_encoder, self.feature_norm)
        anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), (ASPECT_RATIOS,) * len(anchor_sizes))
        self.mask_rcnn = MaskRCNN(
            backbone,
            rpn_anchor_generator=anchors,
            box_predictor=FastRCNNPredictor(BOX_REPRESENTATION, num_classes + 1),  # torchvision's, as it builds it
            box_roi_pool=MultiScaleRoIAlign(list(LEVELS), output_size=7, sampling_ratio=2),
            mask_roi_pool=MultiScaleRoIAlign(list(LEVELS), output_size=14, sampling_ratio=2),
            # torchvision's mask head and predictor at the pyramid's width (its default is 256 whatever the width)
            mask_head=MaskRCNNHeads(self.channels, (self.channels,) * 4, 1),
            mask_predictor=MaskRCNNPredictor(self.channels, self.channels, num_classes + 1),
            box_batch_size_per_image=self.box_batch_size_per_image,
            box_detections_per_img=self.detections_per_image,
            box_score_thresh=self.score_threshold,
        )
        # min/max size, mean and std are unused: TileTransform neither resizes nor normalises
        self.mask_rcnn.transform = TileTransform(
            min_size=64, max_size=64, image_mean=[0.0], image_std=[1.0], size_divisible=32
        )

    @property
    def encoder(self) -> nn.Module:
        """The student (its weights are ``mask_rcnn.backbone.body.*`` in the state dict)."""
        return self.mask_rcnn.backbone.body

    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain types: ``Detector(encoder, **config)`` rebuilds the network."""
        return {
            "num_classes": self.num_classes,
            "layer": self.layer,
            "channels": self.channels,
            "freeze_encoder": self.freeze_encoder,
            "anchor_sizes": list(self.anchor_sizes),
            "box_batch_size_per_image": self.box_batch_size_per_image,
            "detections_per_image": self.detections_per_image,
            "score_threshold": self.score_threshold,
            "feature_norm": self.feature_norm,
        }

    def forward(
        self, images: list[torch.Tensor] | torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None
    ) -> Any:
        """See the class docstring; a (B, C, H, W) tensor stands for a list of B images."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise CdkdValueError(f"expected images (B, C, H, W) or a list of (C, H, W), got {tuple(images.shape)}")
            images = list(images.unbind(0))
        p = self.patch_size
        for img in images:
            if img.shape[-2] % p or img.shape[-1] % p:
                raise CdkdValueError(
                    f"input size {img.shape[-2]}x{img.shape[-1]} is not a multiple of the patch size {p}"
                )
        return self.mask_rcnn(images, targets)


__all__ = ["DEFAULT_ANCHORS", "Detector", "SimpleFeaturePyramid", "StudentBackbone", "TileTransform", "group_norm"]
