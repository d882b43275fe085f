"""Semantic consistency: predicted maps through the classifier tail, against the true manipulated map."""
from __future__ import annotations

import numpy as np
import torch

from featmap.core.table import sample_rows
from featmap.data.images import View
from featmap.score.metrics import class_probabilities, jsd, top1_agree, topk_correct


class SemanticScorer:
    """Scores predicted maps of one (manipulation, layer) through the classifier tail, against the true
    manipulated map's class probabilities and, where test photos carry ImageNet labels, against the labels."""

    def __init__(self, tail, y_test: torch.Tensor, test: list[View], batch: int):
        self.tail, self.batch = tail, batch
        self.true = self.probabilities(y_test)
        labelled = [i for i, v in enumerate(test) if v.photo.imagenet_index is not None]
        self.labelled = torch.tensor(labelled, dtype=torch.long)
        self.labels = torch.tensor([test[i].photo.imagenet_index for i in labelled], dtype=torch.long)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def probabilities(self, maps: torch.Tensor) -> torch.Tensor:
        batches = [self.tail(maps[i:i + self.batch]) for i in range(0, len(maps), self.batch)]
        return class_probabilities(torch.cat(batches))

    def _of(self, pred: torch.Tensor) -> torch.Tensor:
        """Returns ``probabilities(pred)``, computed once for the prediction last asked about: a map's agreement
        and its accuracy read the same probabilities (the tail ran twice per map before: 13.4 s of the geometric
        chapter's one-thread profile went to the tail, which passes 306 Lite0 blocks.6 maps in 0.29 s). Kept by
        the tensor itself (``is``), so another prediction is never served them."""
        if self._last is None or self._last[0] is not pred:
            self._last = (pred, self.probabilities(pred))
        return self._last[1]

    def agreement(self, pred: torch.Tensor) -> dict[str, np.ndarray]:
        """Returns per-sample top1_agree and jsd of ``pred`` against the true manipulated map."""
        probs = self._of(pred)
        return {"top1_agree": top1_agree(probs, self.true).numpy(), "jsd": jsd(probs, self.true).numpy()}

    def accuracy_rows(self, base: dict, pred: torch.Tensor | None, n_boot: int, seed: int) -> list[dict]:
        """Returns top1_acc / top5_acc rows where test photos carry ImageNet labels (none otherwise).

        ``pred`` None scores the true manipulated map itself (the perfect map's ceiling).
        """
        if not len(self.labels):
            return []
        probs = self.true if pred is None else self._of(pred)
        return [sample_rows(base, f"top{k}_acc", topk_correct(probs[self.labelled], self.labels, k).numpy(), n_boot,
                            seed) for k in (1, 5)]
