"""ROSE in the Hugging Face Trainer: a complete example with ``rose_ds.hf.RoseTrainer``.

Every ``TrainingArguments`` flag works as in any Trainer script (``--deepspeed``, ``--bf16``,
``--gradient_accumulation_steps``, ``--eval_strategy``, ``--save_steps``, ``--report_to`` ...); the
flags below choose the model, the data, ROSE and a composed method (``--method``, as in
``launch/finetune.py``). With no model or task it fine-tunes the embedded offline default of
``launch/finetune.py`` (MiniLM-L6 on Rotten Tomatoes) and evaluates on the validation split and on
AdvGLUE SST-2.

    deepspeed --num_gpus 2 launch/hf_trainer.py --deepspeed ds_configs/zero2.json --output_dir runs/hf
    python launch/hf_trainer.py --output_dir runs/hf --max_steps 50          # one process, no DeepSpeed
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)

from rose_ds.dropout import IdenticalPassesError, set_dropout
from rose_ds.hf import RoseTrainer, join_cpu_processes
from rose_ds.training import classification
from rose_ds.training import data as rose_data
from rose_ds.training.args import ArgumentError, LoraArgs, RoseArgs
from rose_ds.training.model import ModelError, apply_lora, merge_lora
from rose_ds.zero import UnsupportedConfigError, shutdown


@dataclass
class ExampleArguments(RoseArgs, LoraArgs):
    """The model and the data, ROSE's flags (:class:`RoseArgs`) and LoRA's (:class:`LoraArgs`), as in
    ``launch/finetune.py``; ``TrainingArguments`` holds the rest."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "any AutoModelForSequenceClassification path or hub name; default: MiniLM-L6"}
    )
    task_name: str = field(
        default="rotten_tomatoes", metadata={"help": "rotten_tomatoes (embedded, offline); sst2, qnli, qqp, rte, mnli"}
    )
    adv_file: str | None = field(
        default=None, metadata={"help": "AdvGLUE dev.json; default: ../shared/data/advglue/dev.json, else the hub"}
    )
    max_seq_length: int = field(default=128, metadata={"help": "tokens per example (longer are truncated)"})
    max_train_samples: int | None = field(default=None, metadata={"help": "first N training examples (shuffled)"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "first N validation examples"})

    def __post_init__(self) -> None:
        LoraArgs.__post_init__(self)
        RoseArgs.__post_init__(self)


def accuracy(prediction) -> dict[str, float]:
    # computed here: evaluate.load("accuracy") fetches its code from the hub, which offline runs cannot
    return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


def main(argv: list[str] | None = None, trainer_class: type[RoseTrainer] = RoseTrainer) -> RoseTrainer:
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ExampleArguments, TrainingArguments))
    if any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv) and join_cpu_processes():
        parser.set_defaults(accelerator_config={"use_configured_state": True})  # the state just joined
    try:
        example, training = parser.parse_args_into_dataclasses(argv)
    except ArgumentError as err:  # a --rose_* or --method value RoseConfig / MethodConfig refuses
        sys.exit(f"hf_trainer.py: error: {err}")
    rose, method = example.rose_config(), example.method_config(training.seed)  # ChildTuning-F follows --seed
    set_seed(training.seed)

    # data: the same splits, order and tokens as launch/finetune.py
    model_path = example.model_name_or_path or rose_data.embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:  # decoder models
        tokenizer.pad_token = tokenizer.eos_token
    spec = rose_data.TASKS[example.task_name]
    adv_file = example.adv_file or (str(rose_data.SHARED_ADVGLUE) if rose_data.SHARED_ADVGLUE.is_file() else None)
    if example.task_name == "rotten_tomatoes":
        raw = rose_data.load_rotten_tomatoes(adv_file, seed=training.seed)
    else:
        raw = rose_data.load_glue(example.task_name)
    limits = (example.max_train_samples, example.max_eval_samples)
    train, validation = rose_data.training_splits(raw, training.seed, *limits)
    evaluation = {"validation": validation}
    adv = rose_data.load_advglue(example.task_name, adv_file)
    if adv is not None:
        evaluation["advglue"] = adv
    train, *evaluation_sets = (rose_data.encode(d, tokenizer, spec.text_columns, example.max_seq_length)
                               for d in (train, *evaluation.values()))  # fmt: skip
    evaluation = dict(zip(evaluation, evaluation_sets))

    def model_init():
        # the Trainer seeds, then builds the model: the new classifier head (and LoRA's A) follow --seed
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=spec.num_labels)
        model.config.pad_token_id = tokenizer.pad_token_id
        set_dropout(model, example.rose_dropout)
        return apply_lora(model, example, classification.OBJECTIVE.peft_task_type)

    try:
        trainer = trainer_class(
            model_init=model_init, args=training, train_dataset=train, eval_dataset=evaluation,
            data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer, compute_metrics=accuracy,
            rose=rose, method=method,
        )  # fmt: skip
    except (UnsupportedConfigError, ModelError) as err:  # one line, before any training
        sys.exit(f"hf_trainer.py: error: {err}")
    try:
        trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)  # a checkpoint-N folder
    except IdenticalPassesError as err:
        sys.exit(f"hf_trainer.py: error: {err}")
    trainer.save_model()  # a LoRA model: its adapter
    if example.merge_lora and trainer.is_world_process_zero():
        out = Path(training.output_dir)
        merge_lora(out, out / "merged", AutoModelForSequenceClassification, model_path, tokenizer,
                   {"num_labels": spec.num_labels})  # fmt: skip
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    return trainer


if __name__ == "__main__":
    main()
    shutdown()  # after main has returned: the Trainer, its engine and model are garbage now
