"""How fast images reach the model: 1024 px originals against the pre-resized cache.

    python bench/data_bench.py [--images DIR] [--n-patients 80] [--cache-size 224] [--workers 1,2]
                               [--target 2500] [--rounds 3] [--work DIR]

1. The originals: with ``--images DIR``, the PNGs in DIR (e.g. real ChestX-ray14 images) made into a
   data set folder (a CSV naming them, random labels: this data is for speed only); else a synthetic
   ChestX-ray14 at 1024 px, ChestX-ray14's own size. Both in DIR (default: <tmp>/cxrmem_data_bench),
   with their caches (png and jpg) at ``--cache-size`` (default 224, what ``data.cache: {}`` makes for
   ``image_size: 224``), built with ``cxrmem.data.cache.build_cache``.
2. Raw cost per image, PIL alone: decode + resize to 224 px (what any loader must
   pay), for each source. CPU time of this process, best of ``--rounds``.
3. The real fastai DataLoaders of ``cxrmem.data.loaders.build_dataloaders``
   (image_size 224, batch 32) over each source:
   - images per second delivered by ``dls.train`` with each number of ``--workers`` (wall clock, best round);
   - the CPU cost per image of the whole item pipeline (reader, labels, collation)
     measured in-process on one thread, i.e. what one worker can deliver, and the
     part of it that is fastai's per-item overhead (pipeline minus raw);
   - the workers a GPU training at ``--target`` images per second needs from each source.
   Batch transforms (IntToFloatTensor, augmentation, three channels, Normalize) are excluded: in
   real training they run on the GPU, after the batch has been delivered (and
   ``augment`` changes only them, so the item pipeline measured here is the same
   for augment true and false).
4. The demo (configs/experiments/demo_synthetic.yaml: resnet18, 48 px, batch 32,
   memory bank on): one forward+backward+optimizer step on CPU beside the time the
   DataLoader takes to deliver one batch from 128 px images (the demo's data).

Variants are measured in interleaved rounds so that load from other processes hits
them alike. The last line is ``cache speedup: X.Xx``: DataLoader images per second
from the png cache (the default format) over the originals, with the most workers.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch
from fastai.data.load import DataLoader
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cxrmem.config import load_config  # noqa: E402
from cxrmem.data.cache import build_cache, cached_name, default_cache_dir  # noqa: E402
from cxrmem.data.chestxray14 import load_frame  # noqa: E402
from cxrmem.data.loaders import build_dataloaders, default_num_workers  # noqa: E402
from cxrmem.data.split import phase_frame  # noqa: E402
from cxrmem.data.synthetic import generate  # noqa: E402
from cxrmem.models.net import build_model  # noqa: E402
from cxrmem.models.backbones import IMAGENET_STATS

IMAGE_SIZE = 224
BATCH = 32
ORIGINALS = "originals"
DEMO_CONFIG = ROOT / "configs" / "experiments" / "demo_synthetic.yaml"


# --------------------------------------------------------------------------- data sets


def real_data_set(images: Path, out: Path) -> Path:
    """A ChestX-ray14-like folder holding the PNGs of ``images`` (copied once) and a CSV naming them."""
    import random
    import shutil

    folder = out / "images_001" / "images"
    names = sorted(p.name for p in images.glob("*.png"))
    if not names:
        raise SystemExit(f"data_bench: no PNG files in {images}")
    if not (out / "Data_Entry_2017.csv").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(images / name, folder / name)
        rng = random.Random(0)
        findings = ["Atelectasis", "Effusion", "Infiltration", "Nodule", "Mass", "Cardiomegaly"]
        rows = [{"Image Index": n, "Finding Labels": "No Finding" if rng.random() < 0.5 else rng.choice(findings),
                 "Follow-up #": 0, "Patient ID": int(n[:8]) if n[:8].isdigit() else i, "Patient Age": 50,
                 "Patient Gender": "M", "View Position": "PA"} for i, n in enumerate(names)]
        pd.DataFrame(rows).to_csv(out / "Data_Entry_2017.csv", index=False)
    return out


def prepare_sources(work: Path, n_patients: int, images: Path | None, cache_size: int) -> dict[str, Path]:
    """name -> data folder: the originals and their png and jpg caches at ``cache_size``."""
    if images is not None:
        originals = real_data_set(images, work / f"real_{images.name}")
    else:
        originals = work / "synthetic_1024"
        generate(originals, n_patients=n_patients, size=1024, seed=0)
    sources = {ORIGINALS: originals}
    for fmt in ("png", "jpg"):
        out = Path(f"{default_cache_dir(originals, cache_size)}_{fmt}")
        result = build_cache(originals, out, size=cache_size, fmt=fmt, progress=False)
        if result.written:
            print(f"built the {fmt} cache: {result.written} images in {result.seconds:.1f} s "
                  f"({result.seconds / result.written * 1e3:.1f} ms per image over the pool)")
        sources[f"cache {cache_size} px {fmt}"] = out
    return sources


def frame_for(source: Path, originals: Path, epoch_images: int):
    """The originals' train+valid frame with paths pointing into ``source`` (same folders, same stems).

    The rows are repeated until an epoch has at least ``epoch_images`` training images, so
    that the start and end of epochs (workers filling up, draining) weigh little.
    """
    with warnings.catch_warnings():  # a folder of real images has no official lists: a derived split
        warnings.simplefilter("ignore")
        frame, _, _ = load_frame(originals, 0.1, 0)
    if source != originals:
        fmt = "jpg" if source.name.endswith("jpg") else "png"
        frame["path"] = [str(source / Path(p).relative_to(originals).parent / cached_name(Path(p).name, fmt))
                         for p in frame["path"]]
    rows = phase_frame(frame, filter_normal=False)
    repeats = max(1, math.ceil(epoch_images / max(1, int((~rows["is_valid"]).sum()))))
    return pd.concat([rows] * repeats, ignore_index=True)


# --------------------------------------------------------------------------- measurements


def raw_read(path: str, size: int) -> Image.Image:
    """PIL alone: decode (JPEG at reduced scale) and squish-resize to ``size``."""
    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft(image.mode, (size, size))
        image.load()
        factor = min(image.size) // (2 * size)
        if factor >= 2:
            image = image.reduce(factor)
        return image.resize((size, size), Image.Resampling.BILINEAR)


def raw_seconds(paths: list[str]) -> float:
    """CPU seconds per image of :func:`raw_read`."""
    started = time.process_time()
    for path in paths:
        raw_read(path, IMAGE_SIZE)
    return (time.process_time() - started) / len(paths)


def train_loader(frame, workers: int, image_size: int = IMAGE_SIZE, batch: int = BATCH) -> DataLoader:
    """``dls.train`` of the project's DataLoaders, batch transforms removed (they run on the GPU)."""
    cfg = SimpleNamespace(image_size=image_size, augment=False, num_workers=workers)
    loader = build_dataloaders(frame, cfg, batch, torch.device("cpu"), IMAGENET_STATS).train
    loader.after_batch = type(loader.after_batch)([])
    return loader


def images_per_second(loader: DataLoader, min_images: int) -> float:
    """Wall-clock images per second over whole epochs (at least ``min_images``), after a warm-up epoch."""
    for _ in loader:
        pass
    count, started = 0, time.perf_counter()
    while count < min_images:
        for images, _ in loader:
            count += len(images)
    return count / (time.perf_counter() - started)


def pipeline_seconds(loader: DataLoader) -> float:
    """CPU seconds per image of the whole item pipeline + collation, in this process on one thread."""
    inline = loader.new(num_workers=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        count, started = 0, time.process_time()
        for images, _ in inline:
            count += len(images)
        return (time.process_time() - started) / count
    finally:
        torch.set_num_threads(threads)


def demo_step_seconds(repeats: int = 10) -> tuple[float, float]:
    """(minimum, median) seconds of one demo training step (forward, backward, AdamW step) on CPU."""
    cfg = load_config(DEMO_CONFIG)
    model = build_model(cfg.model, cfg.memory).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    size, batch = cfg.data.image_size, cfg.phase1.batch_size
    images = torch.randn(batch, 3, size, size)
    targets = (torch.rand(batch, cfg.model.num_classes) < 0.2).float()
    times = []
    for i in range(repeats + 3):
        started = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(images), targets).backward()
        optimizer.step()
        if i >= 3:
            times.append(time.perf_counter() - started)
    return min(times), statistics.median(times)


# --------------------------------------------------------------------------- report


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.processor() or platform.machine()}, {cores} usable CPU cores, torch {torch.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "cxrmem_data_bench"))
    parser.add_argument("--images", type=Path, default=None, help="a folder of PNGs to use as the originals")
    parser.add_argument("--n-patients", type=int, default=80, help="synthetic originals: about 3.6 images each")
    parser.add_argument("--cache-size", type=int, default=IMAGE_SIZE, help=f"side of the cache (default {IMAGE_SIZE})")
    parser.add_argument("--workers", default="1,2", help="DataLoader worker counts to measure, comma-separated")
    parser.add_argument("--target", type=float, default=2500.0, help="images per second a GPU trains at")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-images", type=int, default=2000, help="images per throughput measurement")
    parser.add_argument("--epoch-images", type=int, default=1000,
                        help="repeat the rows until a training epoch has this many images")
    args = parser.parse_args(argv)
    work = Path(args.work)
    counts = [int(w) for w in args.workers.split(",") if w]
    print(f"machine: {machine()}; DataLoader workers: {', '.join(map(str, counts))}; "
          f"num_workers auto on CUDA here: {default_num_workers(on_cuda=True)}")

    sources = prepare_sources(work, args.n_patients, args.images, args.cache_size)
    originals = sources[ORIGINALS]
    frames = {name: frame_for(path, originals, args.epoch_images) for name, path in sources.items()}
    loaders = {(name, w): train_loader(frame, w) for name, frame in frames.items() for w in counts}
    n_files = len(set(frames[ORIGINALS]["path"]))
    print(f"{n_files} image files per source ({'from ' + str(args.images) if args.images else 'synthetic, 1024 px'}), "
          f"repeated to {len(frames[ORIGINALS])} rows; batch {BATCH}; input {IMAGE_SIZE} px; batch transforms "
          f"excluded (GPU side)")

    raw, cost = ({name: [] for name in sources} for _ in range(2))
    rate = {key: [] for key in loaders}
    for _ in range(args.rounds):
        for name in sources:
            raw[name].append(raw_seconds(sorted(set(frames[name]["path"]))))
            cost[name].append(pipeline_seconds(loaders[name, counts[0]]))
            for w in counts:
                rate[name, w].append(images_per_second(loaders[name, w], args.min_images))

    header = "".join(f"{f'{w} worker(s) img/s':>20}" for w in counts)
    print(f"\n{'source':<22}{'raw PIL ms/img':>16}{'pipeline ms/img':>17}{'fastai extra ms':>17}"
          f"{'1 worker img/s (CPU)':>22}{header}{f'workers for {args.target:.0f}/s':>20}")
    for name in sources:
        r, c = min(raw[name]), min(cost[name])
        cells = "".join(f"{max(rate[name, w]):>20.0f}" for w in counts)
        print(f"{name:<22}{r * 1e3:>16.2f}{c * 1e3:>17.2f}{(c - r) * 1e3:>17.2f}{1 / c:>22.0f}{cells}"
              f"{math.ceil(args.target * c):>20d}")
    for name in sources:
        if name != ORIGINALS:
            print(f"{name}: raw decode speedup {min(raw[ORIGINALS]) / min(raw[name]):.1f}x, "
                  f"pipeline CPU speedup {min(cost[ORIGINALS]) / min(cost[name]):.1f}x, "
                  f"DataLoader speedup with {counts[-1]} worker(s) "
                  f"{max(rate[name, counts[-1]]) / max(rate[ORIGINALS, counts[-1]]):.1f}x")

    demo_cfg = load_config(DEMO_CONFIG)
    demo_source = work / "synthetic_128"
    generate(demo_source, n_patients=args.n_patients, size=demo_cfg.data.synthetic.size, seed=0)
    demo_frame = phase_frame(load_frame(demo_source, 0.1, 0)[0], filter_normal=True)
    demo_workers = default_num_workers(on_cuda=False)
    demo_loader = train_loader(demo_frame, demo_workers, demo_cfg.data.image_size, demo_cfg.phase1.batch_size)
    batch_data = demo_cfg.phase1.batch_size / images_per_second(demo_loader, args.min_images)
    batch_cpu = pipeline_seconds(demo_loader) * demo_cfg.phase1.batch_size
    step, step_median = demo_step_seconds()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    step_one_thread = demo_step_seconds()[0]
    torch.set_num_threads(threads)
    print(f"\ndemo ({demo_cfg.model.backbone}, {demo_cfg.data.image_size} px from {demo_cfg.data.synthetic.size} px "
          f"PNGs, batch {demo_cfg.phase1.batch_size}, CPU): training step {step * 1e3:.0f} ms min / "
          f"{step_median * 1e3:.0f} ms median on {threads} threads, {step_one_thread * 1e3:.0f} ms min on one; data {batch_data * 1e3:.0f} ms "
          f"per batch from {demo_workers} worker(s), {batch_cpu * 1e3:.0f} ms of CPU -> "
          f"{'data-bound' if batch_cpu > min(step, step_one_thread) else 'compute-bound'} "
          f"(delivering a batch costs {100 * batch_cpu / min(step, step_one_thread):.0f}% of the fastest step)")
    png = f"cache {args.cache_size} px png"
    print(f"cache speedup: {max(rate[png, counts[-1]]) / max(rate[ORIGINALS, counts[-1]]):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
