"""Under torch.distributed (gloo, CPU, two processes) every rank ends with the same bank.

The banks must also equal one process updated with the concatenated batches in
rank order. Batch sizes differ between ranks (one rank even sends an empty batch).
This file doubles as the worker script: ``python test_memory_distributed.py RANK WORLD PORT OUT``.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from cxrmem.config import MemoryConfig
from cxrmem.models.memory import STRATEGIES, MemoryBank

WORLD = 2
DIM, BANK_SIZE, CLASSES = 6, 8, 3
STEPS = 7


def batch_size(step: int, rank: int) -> int:
    """Unequal sizes per rank; rank 1 sends nothing at step 2."""
    return [5, 3][rank] if step != 2 else [4, 0][rank]


def local_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    size = batch_size(step, rank)
    features = torch.randn(size, DIM, generator=g) * torch.rand(size, 1, generator=g) * 3
    probs = torch.rand(size, CLASSES, generator=g)
    return features, probs


def new_bank(strategy: str) -> MemoryBank:
    cfg = MemoryConfig(bank_size=BANK_SIZE, update_strategy=strategy, rarity_threshold=0.4, memory_momentum=0.8)
    return MemoryBank(DIM, cfg, seed=5)


def worker(rank: int, world: int, port: int, out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        banks = {}
        for strategy in STRATEGIES:
            bank = new_bank(strategy)
            for step in range(STEPS):
                features, probs = local_batch(step, rank)
                bank.update(features, probs=probs)
            banks[strategy] = bank.state_dict()
        torch.save(banks, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_banks() -> dict:
    banks = {}
    for strategy in STRATEGIES:
        bank = new_bank(strategy)
        for step in range(STEPS):
            parts = [local_batch(step, rank) for rank in range(WORLD)]
            bank.update(torch.cat([f for f, _ in parts]), probs=torch.cat([p for _, p in parts]))
        banks[strategy] = bank.state_dict()
    return banks


def test_ranks_end_with_identical_banks_equal_to_one_process(tmp_path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(WORLD), str(port), str(tmp_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(WORLD)
    ]
    for process in workers:
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output

    per_rank = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    reference = single_process_banks()
    for strategy in STRATEGIES:
        for key, expected in reference[strategy].items():
            for rank in range(WORLD):
                torch.testing.assert_close(per_rank[rank][strategy][key], expected, rtol=0, atol=1e-6,
                                           msg=f"{strategy}.{key} on rank {rank}")
        assert torch.equal(per_rank[0][strategy]["memory"], per_rank[1][strategy]["memory"]), strategy
        assert int(reference[strategy]["seen"]) == sum(batch_size(s, r) for s in range(STEPS) for r in range(WORLD))
        assert int(reference[strategy]["filled"]) > 0


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
