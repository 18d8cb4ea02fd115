"""One process group for every launcher: deepspeed, torchrun, mpirun, srun, or a plain ``python``.

:func:`init_processes` maps each launcher's environment onto what ``deepspeed.init_distributed``
reads, starts the process group, binds the accelerator and tells where every rank runs, the way
torchtitan's ``distributed/utils.py`` and torchtune's ``training/_distributed.py`` do for their recipes.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from dataclasses import dataclass

import datasets
import deepspeed
import deepspeed.comm as dist
import torch
import transformers
from deepspeed.accelerator import get_accelerator

from rose_ds import zero
from rose_ds.training import RecipeError

MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


class LauncherError(RecipeError):
    """An environment no launcher would make (RANK without the rest, mpirun without mpi4py ...)."""


@dataclass(frozen=True)
class Processes:
    """This process's place in the run.

    Attributes:
        rank: Global rank.
        world_size: Number of processes.
        launcher: ``"deepspeed"``, ``"torchrun"``, ``"mpi"``, ``"srun"`` or ``"single process"``.
        placement: Per rank ``{"rank", "local_rank", "node"}`` (the same list on every rank).
        device: The accelerator device name this rank computes on (``"cpu"``, ``"cuda:0"`` ...).
    """

    rank: int
    world_size: int
    launcher: str
    placement: list[dict]
    device: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that prints and writes run files."""
        return self.rank == 0


def check_precision(args) -> None:
    """Refuses ``--fp16`` on an accelerator without fp16 (before any process group is started), and
    decides ``--bf16`` when it was not given: on for causal LMs on an accelerator other than the CPU
    that has bf16 (what decoder fine-tuning on GPUs uses), off otherwise.

    Args:
        args: The recipe's arguments (``fp16``, ``bf16``, ``objective``); ``bf16`` is set.

    Raises:
        LauncherError: naming the accelerator and what to pass instead.
    """
    accelerator = get_accelerator()
    if args.fp16 and not accelerator.is_fp16_supported():
        raise LauncherError(
            f"--fp16: the {accelerator.device_name()} accelerator has no fp16 support; use --bf16 or no flag"
        )
    if args.bf16 is None:
        args.bf16 = not args.fp16 and default_bf16(args.objective, accelerator.device_name(),
                                                   bool(accelerator.is_bf16_supported()))  # fmt: skip


def default_bf16(objective: str, device: str, bf16_supported: bool) -> bool:
    """Whether ``--bf16`` is on when not given: for causal LMs (decoders) on an accelerator other than the
    CPU that has bf16, the precision decoder fine-tuning uses on GPUs; never on a CPU, where bf16 is
    slower than fp32, nor for classification, whose published runs are fp32/fp16."""
    return objective == "causal_lm" and device != "cpu" and bf16_supported


def init_processes() -> Processes:
    """Starts the process group of whichever launcher started this process; every rank calls it.

    Only rank 0 keeps DeepSpeed's, Transformers' and Datasets' informational logging.

    Raises:
        LauncherError: an environment that names no complete rendezvous.
    """
    launcher = launcher_environment()
    if get_accelerator().device_name() == "cpu":
        # init_distributed would JIT-compile the shared-memory all-reduce op (minutes on a fresh
        # machine); only inference uses it
        zero.skip_shm_comm_build()
    deepspeed.init_distributed(distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # before the first collective: NCCL refuses ranks of one node that share a device
    get_accelerator().set_device(local_rank)
    placement = [None] * world
    # SLURMD_NODENAME tells apart the fake nodes of one host (tests' local SLURM cluster)
    dist.all_gather_object(placement, {"rank": rank, "local_rank": local_rank,
                                       "node": os.environ.get("SLURMD_NODENAME", socket.gethostname())})  # fmt: skip
    if rank != 0:
        deepspeed.utils.logger.setLevel(logging.ERROR)
        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    return Processes(rank, world, launcher, placement, get_accelerator().current_device_name())


def all_ranks_finite(finite: bool) -> bool:
    """Whether ``finite`` holds on every rank (an all-reduce: every rank must call it)."""
    flag = torch.tensor([0.0 if finite else 1.0], device=get_accelerator().current_device_name())
    dist.all_reduce(flag)
    return flag.item() == 0


def launcher_environment() -> str:
    """Maps each launcher's conventions onto what ``deepspeed.init_distributed`` reads; returns the launcher.

    ``deepspeed`` and ``torchrun`` set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; ``mpirun`` and
    ``srun --mpi=pmix`` are discovered by DeepSpeed through mpi4py; plain ``srun`` (one task per GPU)
    gives SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; ``python launch/finetune.py`` is one process.

    Raises:
        LauncherError: an incomplete environment.
    """
    env = os.environ
    if "RANK" in env:
        absent = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if absent:
            raise LauncherError(
                f"RANK is set but {', '.join(absent)} is not: start the run with deepspeed, torchrun, mpirun or srun "
                "(which set them all), or unset RANK for a single process"
            )
        return "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
    if any(k in env for k in MPI_RANK_VARIABLES):
        try:
            import mpi4py  # noqa: F401  (DeepSpeed's MPI discovery imports it)
        except ImportError:
            raise LauncherError(
                "started by mpirun/srun --mpi but mpi4py is not installed: pip install mpi4py (or rose_ds[mpi])"
            ) from None
        env.setdefault("MASTER_PORT", _job_port())  # passed on to the discovery, which would otherwise fix 29500
        return "mpi"
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        if "MASTER_ADDR" not in env:  # the first node of the allocation, as the sbatch scripts compute it
            nodes = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                                   text=True, check=False).stdout.split()  # fmt: skip
            if not nodes:
                raise LauncherError(
                    "srun without MASTER_ADDR and `scontrol show hostnames` failed: export MASTER_ADDR (the first "
                    "node of the job) before srun"
                )
            env["MASTER_ADDR"] = nodes[0]
        env.setdefault("MASTER_PORT", _job_port())
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        return "srun"
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    zero.set_single_process_port()
    return "single process"


def _job_port() -> str:
    """The rendezvous port: derived from the SLURM job id as the sbatch scripts do (parallel jobs on one node
    must not collide), else DeepSpeed's default."""
    job = os.environ.get("SLURM_JOB_ID")
    return str(20000 + int(job) % 20000) if job else "29500"


__all__ = ["LauncherError", "Processes", "all_ranks_finite", "check_precision", "default_bf16", "init_processes"]
