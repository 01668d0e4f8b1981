"""Training throughput on a GPU: images per second and peak memory per backbone, batch, precision,
memory format, cuDNN setting, with and without the memory bank.

    python bench/gpu_bench.py [--backbone efficientnet_v2_s,resnet50,densenet121] [--batch 64,128]
                              [--steps 30] [--warmup 10] [--full] [--loader] [--work DIR]
    torchrun --nproc_per_node N bench/gpu_bench.py ...     # the same, over N GPUs (DDP)

1. Data: a synthetic ChestX-ray14 (``data.synthetic``) and its cache at the input size (``data.cache``),
   made in DIR (default: <tmp>/cxrmem_gpu_bench) on the first run and reused after, through the
   pipeline's own ``prepare_data``.
2. Each variant is the phase-2 Learner of ``cxrmem.train.phases.make_learner`` (loss, callbacks, mixed
   precision and channels_last as ``cxrmem.train.speed`` sets them, seeded by ``speed.seed_run`` with the
   variant's ``train.deterministic``), trained by fastai's own loop for ``--warmup`` untimed batches, then
   ``--steps`` batches between two CUDA synchronisations.
   By default every step gets the same augmented batch, already on the GPU, so the figure is the
   model's (the loader has its own bench, bench/data_bench.py); ``--loader`` feeds the real DataLoaders.
3. Variants, per backbone and batch: the GPU default (bank, ``model.precision: auto`` = bf16 where the
   GPU has it, channels_last, ``train.deterministic: false``) and one change at a time from it: no bank,
   fp32, channels_last off, deterministic on; ``--full``: all 16 combinations.
4. One line per variant: images per second (all processes), peak memory allocated on this GPU, and the
   ratio to the default; per backbone and batch, the bank's cost and bf16 over fp32.

Without CUDA it prints one line and exits with status 0 (``--allow-cpu`` runs the same code on the CPU,
for checking the script itself with small settings).
"""

from __future__ import annotations

import argparse
import gc
import itertools
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
DEFAULT = {"bank": True, "precision": "auto", "channels_last": True, "deterministic": False}
CHANGES = [("bank", False), ("precision", "fp32"), ("channels_last", False), ("deterministic", True)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_v2_s,resnet50,densenet121", help="comma-separated")
    parser.add_argument("--batch", default="64,128", help="global batches, comma-separated (split over torchrun's processes)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30, help="timed training batches per variant")
    parser.add_argument("--warmup", type=int, default=10, help="untimed training batches first (cuDNN autotunes here)")
    parser.add_argument("--full", action="store_true", help="every combination instead of one change at a time")
    parser.add_argument("--loader", action="store_true", help="feed the real DataLoaders instead of one batch")
    parser.add_argument("--n-patients", type=int, default=200, help="size of the synthetic set (~3.6 images each)")
    parser.add_argument("--source-size", type=int, default=512, help="side of the generated PNGs")
    parser.add_argument("--cache-size", type=int, default=None, help="side of the cached PNGs (default: the input size)")
    parser.add_argument("--workers", default="auto", help="DataLoader workers per process (with --loader)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cxrmem_gpu_bench")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU (a check)")
    args = parser.parse_args(argv)
    args.backbones = [b for b in args.backbone.split(",") if b]
    args.batches = [int(b) for b in args.batch.split(",") if b]
    return args


def variants(full: bool) -> list[dict]:
    """The default first, then each change from it (or every combination)."""
    if full:
        keys = list(DEFAULT)
        values = [(True, False), ("auto", "fp32"), (True, False), (False, True)]
        return [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    return [dict(DEFAULT)] + [{**DEFAULT, key: value} for key, value in CHANGES]


def bench_config(args, backbone: str, batch: int, variant: dict):
    """The effv2s memory experiment, turned into this variant on the cached synthetic set."""
    overrides = [
        f"model.backbone={backbone}", "model.pretrained=false", f"model.precision={variant['precision']}",
        f"model.channels_last={str(variant['channels_last']).lower()}",
        f"memory.use_memory={str(variant['bank']).lower()}",
        f"train.deterministic={str(variant['deterministic']).lower()}",
        f"data.image_size={args.image_size}", f"data.num_workers={args.workers}",
        f"data.synthetic.n_patients={args.n_patients}", f"data.synthetic.size={args.source_size}",
        "data.synthetic.seed=0", f"data.cache.size={args.cache_size or args.image_size}",
        f"phase2.batch_size={batch}",
    ]
    return load_config(BASE_CONFIG, overrides, data_dir=str(args.work / "synthetic"),
                       output_dir=str(args.work / "runs" / "bench"))


def label(variant: dict, device: torch.device) -> str:
    from cxrmem.config import ModelConfig
    from cxrmem.train.speed import autocast_dtype

    dtype = autocast_dtype(ModelConfig(precision=variant["precision"]), device)
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return (f"{'bank' if variant['bank'] else 'no bank':<8}{precision:>5}  "
            f"{'NHWC' if variant['channels_last'] else 'NCHW'}  {'det' if variant['deterministic'] else 'tuned'}")


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
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
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


def fixed_batch_loaders(learn, batches: int):
    """DataLoaders whose training loader gives one augmented batch (already on the device) ``batches`` times."""
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader

    batch = tuple(t.detach() for t in learn.dls.train.one_batch())
    repeated = DataLoader([batch] * batches, bs=None, device=learn.dls.device)
    return DataLoaders(repeated, learn.dls.valid, device=learn.dls.device)


def measure(args, backbone: str, batch: int, variant: dict, frame, device) -> tuple[float, float]:
    """(training images per second over all processes, peak GiB allocated on this device) of one variant."""
    from fastai.callback.progress import ProgressCallback

    from cxrmem.models.net import build_model
    from cxrmem.train import distributed, speed
    from cxrmem.train.phases import make_learner

    cfg = bench_config(args, backbone, batch, variant)
    speed.seed_run(cfg.data.seed, cfg.train.deterministic)  # as training does
    model = build_model(cfg.model, cfg.memory)
    rows = one_epoch_frame(frame, (args.warmup + args.steps + 2) * batch)
    learn = make_learner(cfg, model, rows, cfg.phase2, phase=2, device=device)
    distributed.make_distributed(learn)  # DDP under torchrun, as training does after the LR finder
    if not args.loader:
        learn.dls = fixed_batch_loaders(learn, args.warmup + args.steps + 2)
    learn.remove_cbs(learn.cbs.filter(lambda cb: isinstance(cb, ProgressCallback)))
    learn.logger = lambda *_: None
    timer = timer_callback(args.warmup, args.steps, device)
    learn.fit(1, 1e-4, cbs=[timer])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del learn, model
    gc.collect()  # the Learner's reference cycles hold its loader workers and GPU memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if timer.seconds is None:
        raise SystemExit(f"gpu_bench: only {timer.seen} training batches ran")
    seconds = torch.tensor([timer.seconds], device=device)
    if distributed.is_distributed():  # the slowest rank sets the pace
        torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    return args.steps * distributed.per_rank_batch_size(batch) * distributed.world_size() / float(seconds), peak


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
        first = bench_config(args, args.backbones[0], args.batches[0], DEFAULT)
        frame = distributed.on_main(lambda: prepare_data(first)).frame
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"gpu_bench: {args.image_size} px, {distributed.world_size()} process(es), {args.steps} timed + "
              f"{args.warmup} warm-up batches, {'real DataLoaders' if args.loader else 'one batch on the device'}; "
              f"{name}, torch {torch.__version__}", flush=True)
        for backbone, batch in itertools.product(args.backbones, args.batches):
            results = {}
            for variant in variants(args.full):
                rate, peak = measure(args, backbone, batch, variant, frame, device)
                key = tuple(variant.values())
                results[key] = rate
                base = results[tuple(DEFAULT.values())]
                print(f"  {backbone:<18} batch {batch:>4}  {label(variant, device)}  {rate:9.1f} images/s  "
                      f"peak {peak:6.2f} GiB  x{rate / base:.2f} of the default", flush=True)
            default = tuple(DEFAULT.values())
            no_bank = tuple({**DEFAULT, "bank": False}.values())
            fp32 = tuple({**DEFAULT, "precision": "fp32"}.values())
            print(f"  {backbone} batch {batch}: the bank costs {100 * (1 - results[default] / results[no_bank]):.1f}% "
                  f"of the speed; {label(DEFAULT, device).split()[1]} over fp32 with the bank: "
                  f"{results[default] / results[fp32]:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
