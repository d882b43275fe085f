"""Image space: reconstruct predicted and true manipulated maps with an inverter, and score the images.

For one (manipulation, layer) the manipulated test images, the inverter's image of the true manipulated map
(``target``) and their features for the re-extraction cosines are computed once; every map's prediction is
then inverted once, re-extracted once, and scored against both (the reference protocol's two comparisons):

- against the manipulated image: ``ssim``, ``lpips``, ``st_lpips``, ``cos_reextract_mean/median`` (the
  defaults), and ``lpips_vgg`` where asked for in ``metrics``;
- against the inverter's image of the true map: the same names with suffix ``_vs_inv_target`` (this separates
  the map's error from the inverter's).

The ``target`` rows (the true map's reconstruction against the manipulated image) are the inverter's own
quality: no map can be judged more precisely than that.
"""
from __future__ import annotations

import numpy as np
import torch

from featmap.data.images import to_uint8_images
from featmap.features.backbone import Backbone
from featmap.score.images import (
    ALL_IMAGE_METRICS,
    IMAGE_METRICS,
    VS_INV_TARGET,
    absent_image_metrics,
    lpips_distance,
    lpips_vgg_distance,
    ssim,
    st_lpips_distance,
)
from featmap.score.inversion import Inverter
from featmap.score.metrics import position_cosines

# The perceptual distances take one network call per batch; each call has a large fixed cost on a CPU.
_PERCEPTUAL = {"lpips": lpips_distance, "lpips_vgg": lpips_vgg_distance, "st_lpips": st_lpips_distance}


class ImageScorer:
    """Scores reconstructions of one (manipulation, layer) against the manipulated test images and against the
    reconstruction of the true manipulated map."""

    def __init__(self, inverter: Inverter, judge: Backbone, layer: str, manipulated: np.ndarray,
                 y_true: torch.Tensor, metrics: list[str] | None = None, batch_size: int = 32):
        """``manipulated``: uint8 (N, S, S, 3) test images as the backbone saw them; ``y_true``: their maps.

        ``metrics``: image metric names (default ``IMAGE_METRICS``; ``lpips_vgg`` only where named). Pixel metrics
        (SSIM, LPIPS, LPIPS-VGG, ST-LPIPS) compare at the inverter's output size (the manipulated images are
        resized down to it: a reconstruction has no finer detail to judge); the re-extraction cosines pass both
        images through the judge at its own input size.
        """
        if layer not in judge.layers:
            raise ValueError(f"the judge backbone is not hooked at {layer!r} (hooked: {judge.layers})")
        self.inverter, self.judge, self.layer, self.batch = inverter, judge, layer, batch_size
        wanted = list(metrics or IMAGE_METRICS)
        unknown = [m for m in wanted if m not in ALL_IMAGE_METRICS]
        if unknown:
            raise ValueError(f"{unknown} are not image metrics; image metrics: {', '.join(ALL_IMAGE_METRICS)}")
        self.absent = absent_image_metrics(wanted)
        self.metrics = [m for m in wanted if m not in self.absent]
        self.size = inverter.image_size
        self.reference_feats = self._features(to_uint8_images(manipulated))
        self.reference = to_uint8_images(manipulated, self.size)
        self.target = self.reconstruct(y_true)
        self.target_feats = self._features(self.target)

    def reconstruct(self, maps: torch.Tensor) -> np.ndarray:
        """Returns the inverter's uint8 (N, s, s, 3) images of ``maps`` (s: the inverter's output size)."""
        return to_uint8_images(self.inverter.invert(maps, self.batch), self.size)

    def _features(self, images: np.ndarray) -> torch.Tensor:
        side = self.judge.preprocessing.size
        images = to_uint8_images(images, side)
        return torch.cat([self.judge.features(images[i:i + self.batch], [self.layer])[self.layer]
                          for i in range(0, len(images), self.batch)])

    def _compare(self, images: np.ndarray, feats: torch.Tensor, reference: np.ndarray,
                 reference_feats: torch.Tensor) -> dict[str, np.ndarray]:
        out = {}
        for name in self.metrics:
            if name == "ssim":
                out[name] = ssim(images, reference)
            elif name in _PERCEPTUAL:
                out[name] = _PERCEPTUAL[name](images, reference, batch_size=len(images))
        cos = position_cosines(feats, reference_feats)
        if "cos_reextract_mean" in self.metrics:
            out["cos_reextract_mean"] = cos.mean(1).double().numpy()
        if "cos_reextract_median" in self.metrics:
            out["cos_reextract_median"] = cos.quantile(0.5, dim=1).double().numpy()
        return out

    def target_scores(self) -> dict[str, np.ndarray]:
        """Returns per-sample scores of the true map's reconstruction against the manipulated images."""
        return self._compare(self.target, self.target_feats, self.reference, self.reference_feats)

    def unrelated_scores(self) -> dict[str, np.ndarray]:
        """Returns per-sample scores of another test photo's manipulated image against each manipulated image (photo
        i against photo i + 1): what the metrics give for an unrelated real photo, the baseline a judge must beat.
        Empty with fewer than two photos."""
        if len(self.reference) < 2:
            return {}
        order = np.roll(np.arange(len(self.reference)), -1)
        return self._compare(self.reference[order], self.reference_feats[order], self.reference, self.reference_feats)

    def scores(self, pred: torch.Tensor) -> dict[str, np.ndarray]:
        """Returns per-sample scores of ``pred``'s reconstruction against the manipulated images, and (suffix
        ``_vs_inv_target``) against the true map's reconstruction."""
        images = self.reconstruct(pred)
        feats = self._features(images)
        out = self._compare(images, feats, self.reference, self.reference_feats)
        vs = self._compare(images, feats, self.target, self.target_feats)
        return {**out, **{name + VS_INV_TARGET: v for name, v in vs.items()}}
