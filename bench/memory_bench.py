"""Cost of the memory bank on this machine.

    python bench/memory_bench.py [--quick] [--threads N]

1. One retrieval forward+backward plus one update at batch 128, D 1280, with
   a full bank of 512 and of 1024 slots, compared with
   - the per-sample Python loop of tests/test_memory.py (the same retrieval,
     one query at a time), and
   - the similarity matrix product ``query @ memory.T`` alone (the floor).
   Goal on CPU: >= 3x faster than the loop (the product is shown for scale).
2. The bank's share of one efficientnet_v2_s training step (forward+backward,
   224 px, batch 8) at that batch. Goal: < 1%.

Timings are minima (and medians) over repeated runs; the variants are measured
in interleaved rounds so that load from other processes affects them alike,
and the ratios use the minima, the figure least disturbed by such load. With
one thread the clock is the CPU time of the process, which other jobs sharing
the cores barely move; with more threads it is wall-clock time.
"bank step" mirrors CXRNet in training: ``r = retrieve(z)``, backward of ``r``
with a dense upstream gradient, ``update(z.detach())``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from cxrmem.config import MemoryConfig  # noqa: E402
from cxrmem.models.backbones import build_backbone  # noqa: E402
from cxrmem.models.memory import MemoryBank  # noqa: E402
from cxrmem.models.net import CXRNet  # noqa: E402
from test_memory import reference_retrieve  # noqa: E402  (the loop the tests compare against)

DIM = 1280
BATCH = 128
STRATEGIES = ("rarity", "hybrid", "fifo")
CLOCK = time.perf_counter  # main() picks time.process_time with one thread


def feature_batch(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Post-ReLU, pooled-feature-like vectors whose norms vary (so rarity selects some)."""
    scale = torch.empty(batch, 1).log_normal_(0.0, 0.5, generator=generator)
    return torch.relu(torch.randn(batch, DIM, generator=generator)) * scale


def full_bank(bank_size: int, strategy: str, generator: torch.Generator) -> MemoryBank:
    """A full bank with the schema's default settings otherwise."""
    bank = MemoryBank(DIM, MemoryConfig(bank_size=bank_size, update_strategy=strategy, memory_momentum=0.9))
    bank.memory.copy_(feature_batch(bank_size, generator))
    bank.filled.fill_(bank_size)
    bank.mean_norm.fill_(float(bank.memory.norm(dim=1).mean()))
    return bank


def bank_step(bank: MemoryBank, features: torch.Tensor) -> None:
    """What the bank costs per training step, as CXRNet uses it: retrieve(z) forward + backward, update(z.detach())."""
    z = features.clone().requires_grad_(True)
    bank.retrieve(z).backward(features)  # any dense upstream gradient
    bank.update(z.detach())


def loop_step(bank: MemoryBank, features: torch.Tensor) -> None:
    """The same with the per-sample reference loop for the retrieval."""
    z = features.clone().requires_grad_(True)
    out = reference_retrieve(bank.memory, int(bank.filled), z, bank.normalize_retrieved,
                             bank.top_k, bank.self_match_threshold)
    out.backward(features)
    bank.update(z.detach())


def bank_step_retrieve_only(bank: MemoryBank, features: torch.Tensor) -> None:
    """Retrieval forward + backward only."""
    z = features.clone().requires_grad_(True)
    bank.retrieve(z).backward(features)


def product_only(bank: MemoryBank, features: torch.Tensor) -> None:
    """The floor: the similarity matrix product alone."""
    features @ bank.memory.T


def interleaved_times(variants: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, measured round-robin after one warm-up call each."""
    times = {name: [] for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            start = CLOCK()
            fn()
            times[name].append(CLOCK() - start)
    return times


def interleaved_medians(variants: dict, rounds: int) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in interleaved_times(variants, rounds).items()}


def bench_bank(bank_size: int, strategy: str, rounds: int) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(0)
    banks = {name: full_bank(bank_size, strategy, g) for name in ("vectorised", "loop", "product")}
    features = feature_batch(BATCH, g)
    return interleaved_times(
        {
            "vectorised": lambda: bank_step(banks["vectorised"], features),
            "retrieve": lambda: bank_step_retrieve_only(banks["vectorised"], features),
            "loop": lambda: loop_step(banks["loop"], features),
            "product": lambda: product_only(banks["product"], features),
        },
        rounds,
    )


def training_step_share(batch: int, size: int, steps: int) -> tuple[float, float]:
    """(seconds of one efficientnet_v2_s training step without the bank, seconds the bank adds at that batch)."""
    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_v2_s", pretrained=False)
    net = CXRNet(backbone, num_classes=14).train()
    images = torch.randn(batch, 3, size, size)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        net(images).sum().backward()

    step_time = interleaved_medians({"step": step}, steps)["step"]
    g = torch.Generator().manual_seed(1)
    bank = full_bank(512, "rarity", g)
    features = feature_batch(batch, g)
    bank_time = interleaved_medians({"bank": lambda: bank_step(bank, features)}, 200)["bank"]
    return step_time, bank_time


def machine_line() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = ", load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{load}")


def ms(values: list[float], pick) -> float:
    return pick(values) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.threads == 1 else time.perf_counter
    rounds = 5 if args.quick else 15

    print(f"machine: {machine_line()}; clock: {'CPU' if CLOCK is time.process_time else 'wall-clock'} time")
    print(f"\n1. retrieval fwd+bwd + update, batch {BATCH}, D {DIM}, full bank; ms as min / median of {rounds} rounds")
    print(f"{'bank':>5} {'strategy':>9} {'bank step':>13} {'retrieve f+b':>13} {'loop':>15} {'product':>11}"
          f" {'loop/bank':>10} {'bank/product':>13}")
    for bank_size in (512, 1024):
        for strategy in STRATEGIES:
            t = bench_bank(bank_size, strategy, rounds)
            low = {name: ms(values, min) for name, values in t.items()}
            med = {name: ms(values, statistics.median) for name, values in t.items()}
            cell = {name: f"{low[name]:.2f} / {med[name]:.2f}" for name in t}
            print(f"{bank_size:>5} {strategy:>9} {cell['vectorised']:>13} {cell['retrieve']:>13} {cell['loop']:>15}"
                  f" {cell['product']:>11} {low['loop'] / low['vectorised']:>9.1f}x"
                  f" {low['vectorised'] / low['product']:>12.2f}x")
    print("   ratios from the minima (least disturbed by other processes)")

    batch, size = 8, 224
    step_time, bank_time = training_step_share(batch, size, steps=2 if args.quick else 3)
    print(f"\n2. efficientnet_v2_s training step (fwd+bwd, {size} px, batch {batch}): {step_time * 1e3:.0f} ms; "
          f"bank (512 slots, rarity) at batch {batch}: {bank_time * 1e3:.3f} ms = "
          f"{100 * bank_time / step_time:.3f}% of the step")


if __name__ == "__main__":
    main()
