"""Evaluate a fine-tuned model exactly as launch/finetune.py does: clean validation and AdvGLUE.

    python launch/evaluate.py runs/finetune                      # the exported model of a run
    python launch/evaluate.py runs/finetune/global_step200       # a DeepSpeed checkpoint of that run

The data arguments (task, files, columns, sample limits, seed) come from the run's
``run_config.json``; ``--adv_file`` and ``--max_eval_samples`` override them. One process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deepspeed.accelerator import get_accelerator
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from rose_ds.training import RecipeError
from rose_ds.training.args import FinetuneArgs
from rose_ds.training.data import load_task
from rose_ds.training.evaluation import evaluate_all


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a run's --output_dir (exported model) or one of its global_stepN folders")
    parser.add_argument("--adv_file", default=None, help="AdvGLUE dev.json ('none' skips it); default: the run's")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="default: the run's")
    parser.add_argument("--batch_size", type=int, default=64, help="evaluation batch size")
    parser.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    cli = parser.parse_args(argv)

    path = Path(cli.path)
    checkpoint = path.name.startswith("global_step")
    run_dir = path.parent if checkpoint else path
    config_file = run_dir / "run_config.json"
    if not config_file.is_file():
        sys.exit(f"evaluate.py: error: {config_file} not found: pass a finetune.py --output_dir or a checkpoint in it")
    run = json.loads(config_file.read_text())
    try:
        args = FinetuneArgs(**run["args"])
    except RecipeError as err:
        sys.exit(f"evaluate.py: error: {config_file}: {err}")
    if cli.adv_file is not None:
        args.adv_file = cli.adv_file
    if cli.max_eval_samples is not None:
        args.max_eval_samples = cli.max_eval_samples

    tokenizer = AutoTokenizer.from_pretrained(
        run_dir if (run_dir / "tokenizer_config.json").is_file() else run["model_path"]
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        task = load_task(args, tokenizer)
    except RecipeError as err:
        sys.exit(f"evaluate.py: error: {err}")
    if checkpoint:  # DeepSpeed's files need full unpickling: only for checkpoints you trust (docs/checkpoints.md)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        model = AutoModelForSequenceClassification.from_pretrained(run["model_path"], num_labels=task.num_labels)
        state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir), tag=path.name)
        model.load_state_dict(state)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(run_dir, use_safetensors=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    device = get_accelerator().current_device_name()
    model.to(device).eval()

    collate = DataCollatorWithPadding(tokenizer)
    metrics = evaluate_all(model, task.validation, task.adv, collate, cli.batch_size, device, task.task)
    results = {f"eval_{k}": v for k, v in metrics.items()}
    print(json.dumps(results))
    if cli.output:
        Path(cli.output).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
