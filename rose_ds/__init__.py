"""rose_ds: ROSE (robust selective fine-tuning) as an AdamW that runs on DeepSpeed ZeRO shards."""

from rose_ds.config import RoseConfig, RoseConfigError
from rose_ds.losses import RoseLosses, robust_loss, rose_losses, task_loss
from rose_ds.optim import RoseAdamW, masked_adamw_
from rose_ds.selection import NoEligibleTensorError

__version__ = "0.1.0"

__all__ = [
    "NoEligibleTensorError",
    "RoseAdamW",
    "RoseConfig",
    "RoseConfigError",
    "RoseLosses",
    "masked_adamw_",
    "robust_loss",
    "rose_losses",
    "task_loss",
]
