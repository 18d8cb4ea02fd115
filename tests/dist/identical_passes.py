"""rose_ds.train_step on a dropout-free model, on every rank: the first ROSE-First micro-batch raises
IdenticalPassesError before any backward, the weights untouched; after rose_ds.set_dropout the
same engine trains. Run by tests/test_dropout.py under torchrun: identical_passes.py STAGE."""

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rose_ds.zero  # noqa: E402

rose_ds.zero.skip_shm_comm_build()

import deepspeed  # noqa: E402
import torch  # noqa: E402
from models import random_batch, tiny_bert  # noqa: E402

import rose_ds  # noqa: E402


def main() -> None:
    stage = int(sys.argv[1])
    model = tiny_bert(dropout=0.0)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage}}
    engine, *_ = rose_ds.initialize(model, config, rose=rose_ds.RoseConfig(mode="first", upper=70), lr=1e-3)
    rank = engine.global_rank
    inputs, labels = random_batch(rank, batch_size=4)
    before = [p.detach().clone() for p in engine.module.parameters()]
    try:
        rose_ds.train_step(engine, inputs, labels)
    except rose_ds.IdenticalPassesError as err:
        untouched = all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
        print(f"rank {rank} stopped (weights untouched: {untouched}): {err}", flush=True)
    rose_ds.set_dropout(engine.module, 0.1)
    for _ in range(2):
        rose_ds.train_step(engine, inputs, labels)
    print(f"rank {rank} trained {engine.global_steps} steps, kept {rose_ds.rose_optimizer(engine).kept_fraction:.2f}",
          flush=True)  # fmt: skip
    engine.destroy()


if __name__ == "__main__":
    main()
    rose_ds.shutdown()  # the engine and model are garbage now
