"""Training throughput on a GPU: efficientnet_v2_s at 224 px, with and without the memory bank,
in fp32 and in mixed precision.

    python bench/gpu_bench.py [--batch 64] [--steps 40] [--warmup 10] [--n-patients 600] [--work DIR]
    torchrun --nproc_per_node N bench/gpu_bench.py ...     # the same, over N GPUs (DDP)

1. Data: a synthetic ChestX-ray14 (``data.synthetic``, 512 px) and its 256 px cache
   (``data.cache``), made in DIR (default: <tmp>/cxrmem_gpu_bench) on the first run
   and reused after, both through the pipeline's own ``prepare_data``.
2. For each of four variants -- {no bank, bank} x {fp32, mixed} -- the training
   Learner of phase 2 (all images) as ``cxrmem.train.phases.make_learner`` builds it:
   the real DataLoaders (augmentation on), loss, callbacks, channels_last and
   ``model.precision`` (mixed = ``auto``: bf16 where the GPU supports it, else fp16).
   The training rows are repeated so that one epoch holds every batch needed (no
   validation, no epoch boundary); fastai's own loop trains ``--warmup`` batches
   untimed, then ``--steps`` batches between two CUDA synchronisations, then stops.
3. Prints one line per variant with training images per second (the global batch
   over all processes) and the bank's cost relative to the same precision without it.

Without CUDA it prints one line and exits with status 0 (``--allow-cpu`` runs the same
code on the CPU, for checking the script itself with small settings).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cxrmem.config import load_config  # noqa: E402

BASE_CONFIG = ROOT / "configs" / "experiments" / "memory_rarity_effv2s.yaml"
VARIANTS = [(False, "fp32"), (True, "fp32"), (False, "auto"), (True, "auto")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_v2_s")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64, help="global batch (split over torchrun's processes)")
    parser.add_argument("--steps", type=int, default=40, help="timed training batches per variant")
    parser.add_argument("--warmup", type=int, default=10, help="untimed training batches first")
    parser.add_argument("--n-patients", type=int, default=600, help="size of the synthetic set (~3.6 images each)")
    parser.add_argument("--source-size", type=int, default=512, help="side of the generated PNGs")
    parser.add_argument("--cache-size", type=int, default=256, help="side of the cached PNGs")
    parser.add_argument("--workers", default="auto", help="DataLoader workers per process")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cxrmem_gpu_bench")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU (a check)")
    return parser.parse_args(argv)


def bench_config(args, use_memory: bool, precision: str):
    """The effv2s memory experiment, turned into this variant on the cached synthetic set."""
    overrides = [
        f"model.backbone={args.backbone}", "model.pretrained=false", f"model.precision={precision}",
        f"memory.use_memory={str(use_memory).lower()}",
        f"data.image_size={args.image_size}", f"data.num_workers={args.workers}",
        f"data.synthetic.n_patients={args.n_patients}", f"data.synthetic.size={args.source_size}",
        "data.synthetic.seed=0", f"data.cache.size={args.cache_size}",
        f"phase2.batch_size={args.batch}",
    ]
    return load_config(BASE_CONFIG, overrides, data_dir=str(args.work / "synthetic"),
                       output_dir=str(args.work / "runs" / f"memory_{use_memory}_{precision}"))


def precision_label(precision: str, device: torch.device) -> str:
    """What ``apply_cuda_fast_paths`` makes of ``model.precision`` on this device."""
    if device.type != "cuda":
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def timer_callback(warmup: int, steps: int, device: torch.device):
    """A fastai callback: lets ``warmup`` training batches pass, times the next ``steps``, then stops the fit."""
    from fastai.callback.core import Callback, CancelFitException

    class Timer(Callback):
        order = 99

        def before_fit(self):
            self.seen, self.started, self.seconds = 0, None, None

        def before_batch(self):
            if self.training and self.seen == warmup:
                _synchronise(device)
                self.started = time.perf_counter()

        def after_batch(self):
            if not self.training:
                return
            self.seen += 1
            if self.seen == warmup + steps:
                _synchronise(device)
                self.seconds = time.perf_counter() - self.started
                raise CancelFitException()

    return Timer()


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_epoch_frame(frame, images: int):
    """``frame`` with its training rows repeated until they hold at least ``images`` images."""
    import pandas as pd

    train = frame[frame["split"] == "train"]
    copies = -(-images // len(train))
    return pd.concat([train] * copies + [frame[frame["split"] != "train"]], ignore_index=True)


def measure(args, use_memory: bool, precision: str, frame, device) -> float:
    """Training images per second (all processes together) of one variant."""
    from fastai.callback.progress import ProgressCallback
    from fastai.torch_core import set_seed

    from cxrmem.models.net import build_model
    from cxrmem.train import distributed
    from cxrmem.train.phases import make_learner

    cfg = bench_config(args, use_memory, precision)
    set_seed(cfg.data.seed, reproducible=True)  # as training does (cudnn deterministic, no autotuning)
    model = build_model(cfg.model, cfg.memory)
    rows = one_epoch_frame(frame, (args.warmup + args.steps + 2) * args.batch)
    learn = make_learner(cfg, model, rows, cfg.phase2, phase=2, device=device)
    distributed.make_distributed(learn)  # DDP under torchrun, as training does after the LR finder
    learn.remove_cbs(learn.cbs.filter(lambda cb: isinstance(cb, ProgressCallback)))
    learn.logger = lambda *_: None
    timer = timer_callback(args.warmup, args.steps, device)
    learn.fit(1, 1e-4, cbs=[timer])
    del learn, model
    gc.collect()  # the Learner's reference cycles hold its loader workers and GPU memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if timer.seconds is None:
        raise SystemExit(f"gpu_bench: only {timer.seen} training batches ran")
    seconds = torch.tensor([timer.seconds], device=device)
    if distributed.is_distributed():  # the slowest rank sets the pace
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    return args.steps * distributed.per_rank_batch_size(args.batch) * distributed.world_size() / float(seconds)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_bench: no CUDA device on this machine; nothing measured (run it where a GPU is visible)")
        return 0
    os.environ.setdefault("MPLBACKEND", "Agg")
    from cxrmem.data.prepare import prepare_data
    from cxrmem.train import distributed

    with distributed.session():
        device = distributed.device()
        frame = distributed.on_main(lambda: prepare_data(bench_config(args, True, "fp32"))).frame
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"gpu_bench: {args.backbone} {args.image_size} px, global batch {args.batch} over "
              f"{distributed.world_size()} process(es), {args.steps} timed + {args.warmup} warm-up batches, "
              f"{len(frame)} images cached at {args.cache_size} px; {name}, torch {torch.__version__}")
        results = {}
        for use_memory, precision in VARIANTS:
            rate = measure(args, use_memory, precision, frame, device)
            results[(use_memory, precision)] = rate
            label = precision_label(precision, device)
            line = f"  {'bank   ' if use_memory else 'no bank'}  {label:>5}  {rate:9.1f} images/s"
            if use_memory:
                line += f"  (the bank costs {100 * (1 - rate / results[(False, precision)]):.1f}% of the speed)"
            print(line, flush=True)
        speedup = results[(True, "auto")] / results[(True, "fp32")]
        print(f"{precision_label('auto', device)} over fp32 with the bank: {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
