"""Predictions of a trained network on the evaluation splits (their files: cxrmem.runs.folder; their report: cxrmem.report)."""

from __future__ import annotations

import numpy as np
import torch

from ..data.loaders import build_dataloaders
from ..data.registry import model_findings
from ..data.split import phase_frame
from . import distributed, speed

EVAL_SPLITS = ("valid", "test")


def predict_splits(cfg, model, frame, device) -> dict:
    """{split: (probs [N, C], targets [N, C], image names)} for valid and, when present, test.

    Evaluation sees every image of a split (normal ones included), without augmentation,
    with the network in eval mode, so the memory bank is read but never written, in the
    precision and memory format training used (:mod:`cxrmem.train.speed`).
    Under torchrun each rank predicts its share of a split and rank 0 gets all of
    them back, in the split's order, each image exactly once; the other ranks get {}.
    """
    batch_size = distributed.per_rank_batch_size(cfg.evaluation_batch_size)
    findings = model_findings(cfg)
    pipeline_rows = phase_frame(frame, filter_normal=False, findings=findings)
    if pipeline_rows.empty:  # test images only (an external data set): the pipeline is built on them
        pipeline_rows = phase_frame(frame.assign(split="train"), filter_normal=False, findings=findings)
    dls = build_dataloaders(pipeline_rows, cfg.data, batch_size, device, distributed.unwrap(model).input_stats,
                            findings)
    model = speed.prepare_for_inference(distributed.unwrap(model), cfg.model, device)
    out = {}
    for split in EVAL_SPLITS:
        rows = frame[frame["split"] == split]
        if rows.empty:
            continue
        mine = distributed.shard_rows(rows)
        with speed.inference_autocast(cfg.model, device):  # the precision training used
            probs, targets = predict_rows(model, dls, mine, batch_size, len(findings))
        gathered = distributed.gather_predictions(probs, targets, mine["image_index"].tolist(),
                                                  rows["image_index"].tolist())
        if gathered is not None:  # None on the ranks other than 0
            out[split] = gathered
    return out


@torch.no_grad()
def predict_rows(model, dls, rows, batch_size, num_classes) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and targets ``[len(rows), num_classes]`` for the rows of a frame, on this process only:
    ``sigmoid(model(x))`` over the rows in order, with the validation pipeline (no augmentation)."""
    if rows.empty:  # a rank's share of a tiny split
        return np.zeros((0, num_classes), np.float32), np.zeros((0, num_classes), np.float32)
    model.eval()
    probs, targets = [], []
    for images, labels in dls.test_dl(rows, with_labels=True, bs=batch_size):
        probs.append(torch.sigmoid(model(images).float()).cpu())
        targets.append(labels.float().cpu())
    return torch.cat(probs).numpy(), torch.cat(targets).numpy()

