"""Training on a union of data sets (``data.datasets``): each member read and split on its own road, then stacked.

Every member is loaded exactly as it would be alone (its split, labels, ``data.views`` and
``data.uncertain``), onto the model's findings: a finding a member does not grade is missing for
its images, so it adds neither loss nor any figure there. The union's frame has a ``dataset``
column; patient ids are prefixed with the member's name (patient 1 of one data set is not patient
1 of another); image names must be distinct across members (ChestX-ray14 and nih_google share
images, so they cannot be stacked).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..utils.errors import UserError
from .registry import get_dataset
from .release import Loaded
from .split import SPLITS


def member_config(data_cfg, member):
    """The data section as the member alone would have it."""
    return replace(data_cfg, dataset=member.dataset, data_dir=member.data_dir, datasets=[])


def load_training_data(data_cfg, findings: Sequence[str], data_dir=None) -> Loaded:
    """What a run trains on: the union of ``data.datasets``, else ``data.dataset`` read at ``data_dir``
    (default ``data.data_dir``; training passes its pre-resized cache)."""
    if data_cfg.datasets:
        return load_union(data_cfg, findings)
    return get_dataset(data_cfg.dataset).load(Path(data_dir or data_cfg.data_dir), data_cfg, findings)


def load_union(data_cfg, findings: Sequence[str]) -> Loaded:
    """The members' frames stacked (``Loaded.members``: each member's own Loaded, by name)."""
    members = {}
    for member in data_cfg.datasets:
        if not Path(member.data_dir).is_dir():
            raise UserError(f"data.datasets: data_dir {member.data_dir} of {member.dataset} does not exist; point it at "
                            f"the {member.dataset} folder")
        name = member.dataset if member.dataset not in members else f"{member.dataset}@{member.data_dir}"
        members[name] = get_dataset(member.dataset).load(Path(member.data_dir), member_config(data_cfg, member), findings)
    frames = [loaded.frame.assign(dataset=name, patient_id=name + ":" + loaded.frame["patient_id"].astype(str))
              for name, loaded in members.items()]
    frame = pd.concat(frames, ignore_index=True)
    repeated = frame["image_index"].duplicated(keep=False)
    if repeated.any():
        image = frame.loc[repeated, "image_index"].iloc[0]
        owners = frame.loc[frame["image_index"] == image, "dataset"].unique()
        raise UserError(f"data.datasets: image {image} is in {' and '.join(owners)}; a union needs distinct images "
                        f"(ChestX-ray14 and nih_google are the same images: list one of them)")
    labels = {split: {f"{name}: {label}": counts for name, loaded in members.items()
                      for label, counts in loaded.labels[split].items()} for split in SPLITS}
    sources = {loaded.split_source for loaded in members.values()}
    source = sources.pop() if len(sources) == 1 else \
        ", ".join(f"{name} {loaded.split_source}" for name, loaded in members.items())
    boxes = pd.concat([loaded.boxes for loaded in members.values()], ignore_index=True)
    missing = [image for loaded in members.values() for image in loaded.missing]
    return Loaded(frame, source, missing, labels, boxes, members)
