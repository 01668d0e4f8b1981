"""Predictions of a trained network on the evaluation splits (their files and report: cxrmem.report)."""

from __future__ import annotations

import numpy as np
import torch
from fastai.learner import Learner

from ..data.loaders import build_dataloaders
from ..data.split import phase_frame
from . import distributed

EVAL_SPLITS = ("valid", "test")


def predict_splits(cfg, model, frame, device) -> dict:
    """{split: (probs [N, C], targets [N, C], image names)} for valid and, when present, test.

    Evaluation sees every image of a split (normal ones included), without augmentation,
    with the network in eval mode, so the memory bank is read but never written.
    Under torchrun each rank predicts its share of a split and every rank gets all
    of them back, in the split's order, each image exactly once.
    """
    batch_size = distributed.per_rank_batch_size((cfg.phase2 or cfg.phase1).batch_size)
    dls = build_dataloaders(phase_frame(frame, filter_normal=False), cfg.data, batch_size, device)
    learn = Learner(dls, model.to(device), loss_func=torch.nn.BCEWithLogitsLoss())
    distributed.without_gathering(learn)  # under torchrun each rank predicts its share; gathered below
    learn.remove_cbs(learn.cbs.filter(lambda cb: type(cb).__name__ == "ProgressCallback"))
    out = {}
    for split in EVAL_SPLITS:
        rows = frame[frame["split"] == split]
        if rows.empty:
            continue
        mine = distributed.shard_rows(rows)
        probs, targets = predict_rows(learn, dls, mine, batch_size, cfg.model.num_classes)
        out[split] = distributed.gather_predictions(probs, targets, mine["image_index"].tolist(),
                                                    rows["image_index"].tolist())
    return out


def predict_rows(learn, dls, rows, batch_size, num_classes) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and targets ``[len(rows), num_classes]`` for the rows of a frame, on this process only."""
    if rows.empty:  # a rank's share of a tiny split
        return np.zeros((0, num_classes), np.float32), np.zeros((0, num_classes), np.float32)
    dl = dls.test_dl(rows, with_labels=True, bs=batch_size)
    probs, targets = learn.get_preds(dl=dl, act=torch.sigmoid)
    return probs.float().numpy(), targets.float().numpy()

