"""launch/hf_trainer.py with one change: the training batches come in launch/finetune.py's order.

The Trainer deals examples with its own sampler (accelerate shards one random order over the
ranks); launch/finetune.py uses a seeded DistributedSampler. Giving both the same loader leaves the
ROSE integration as the only difference, which tests/test_hf.py compares.

    deepspeed --num_gpus 2 tests/dist/hf_same_order.py --deepspeed ds_configs/zero2.json ...
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))
import hf_trainer  # noqa: E402

from rose_ds.hf import RoseTrainer  # noqa: E402


class SameOrderAsFinetune(RoseTrainer):
    def get_train_dataloader(self):
        args = self.args
        sampler = torch.utils.data.DistributedSampler(self.train_dataset, num_replicas=args.world_size,
                                                      rank=args.process_index, shuffle=True, seed=args.seed)  # fmt: skip
        loader = torch.utils.data.DataLoader(self.train_dataset, batch_size=args.per_device_train_batch_size,
                                             sampler=sampler, collate_fn=self.data_collator, drop_last=True,
                                             generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
        loader.set_epoch = sampler.set_epoch  # the Trainer calls it at each epoch, as finetune.py does
        return loader


if __name__ == "__main__":
    rank = int(os.environ.get("RANK", "0"))
    out = Path(sys.argv[sys.argv.index("--output_dir") + 1])
    hf_trainer.main(sys.argv[1:], SameOrderAsFinetune)
    hf_trainer.shutdown()

    # what is left running once the group is gone (tests/test_hf.py: no gloo thread may be)
    threads = sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
    (out / f"threads{rank}.json").write_text(json.dumps(threads))
