"""rose_ds: ROSE (robust selective fine-tuning) as an AdamW that runs on DeepSpeed ZeRO shards."""

from rose_ds.config import RoseConfig, RoseConfigError
from rose_ds.dropout import IdenticalPassesError, check_passes_differ, set_dropout
from rose_ds.losses import (
    RoseLosses,
    TokenLosses,
    causal_lm_losses,
    robust_loss,
    rose_losses,
    task_loss,
    token_losses,
)
from rose_ds.optim import RoseAdamW, masked_adamw_
from rose_ds.selection import NoEligibleTensorError

__version__ = "0.1.0"

# The DeepSpeed glue imports deepspeed (seconds); plain-PyTorch users do not pay for it.
_ZERO_API = (
    "initialize",
    "prepare_config",
    "bind",
    "childtuning_d",
    "train_step",
    "backward",
    "make_recompute",
    "rose_optimizer",
    "decay_param_groups",
    "UnsupportedConfigError",
    "shutdown",
)


def __getattr__(name):
    if name in _ZERO_API:
        from rose_ds import zero

        return getattr(zero, name)
    raise AttributeError(f"module 'rose_ds' has no attribute {name!r}")


__all__ = [
    "IdenticalPassesError",
    "NoEligibleTensorError",
    "RoseAdamW",
    "RoseConfig",
    "RoseConfigError",
    "RoseLosses",
    "TokenLosses",
    "causal_lm_losses",
    "check_passes_differ",
    "masked_adamw_",
    "robust_loss",
    "rose_losses",
    "set_dropout",
    "task_loss",
    "token_losses",
    *_ZERO_API,
]
