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
from dataclasses import dataclass, field, fields
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rose_ds import RoseConfig, RoseConfigError  # noqa: E402
from rose_ds import data as rose_data  # noqa: E402
from rose_ds.hf import RoseTrainer, join_cpu_processes  # noqa: E402
from rose_ds.methods import MethodConfig, MethodConfigError  # noqa: E402
from rose_ds.zero import UnsupportedConfigError  # noqa: E402


@dataclass
class ExampleArguments:
    """The model, the data and ROSE; ``TrainingArguments`` holds the rest."""

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
    rose_mode: str = field(default="ensemble", metadata={"help": "none, first, second, ensemble"})
    rose_upper: float = field(default=40.0, metadata={"help": "upper percentile of the kept band"})
    rose_lower: float = field(default=0.0, metadata={"help": "lower percentile of the kept band"})
    rose_gamma: float = field(default=0.5, metadata={"help": "weight of the first-order mask in the ensemble"})
    rose_eligibility: str = field(default="original", metadata={"help": "original, bert, gpt2, llama"})
    rose_granularity: str = field(default="tensor", metadata={"help": "tensor or element"})
    rose_scope: str = field(default="global", metadata={"help": "element granularity: global or tensor"})
    method: str = field(default="none", metadata={"help": "none, rdrop, r3f, childtuning-f, childtuning-d"})
    rdrop_alpha: float = field(default=1.0, metadata={"help": "R-Drop: weight of the two passes' symmetric KL"})
    r3f_lambda: float = field(default=1.0, metadata={"help": "R3F: weight of the clean/noisy symmetric KL"})
    r3f_eps: float = field(default=1e-5, metadata={"help": "R3F: scale of the input-embedding noise"})
    r3f_noise: str = field(default="uniform", metadata={"help": "R3F: uniform or normal"})
    childtuning_p: float = field(default=0.3, metadata={"help": "ChildTuning: kept fraction of gradient elements"})
    childtuning_fisher_batches: int = field(
        default=0, metadata={"help": "ChildTuning-D: batches of the Fisher pass (0: the whole training set)"}
    )

    def rose(self) -> RoseConfig:
        return RoseConfig(**{f.name[5:]: getattr(self, f.name) for f in fields(self) if f.name.startswith("rose_")})

    def method_config(self, seed: int) -> MethodConfig:
        knobs = {f.name: getattr(self, f.name) for f in fields(self) if f.name.startswith(("rdrop_", "r3f_", "child"))}
        return MethodConfig(name=self.method, seed=seed, **knobs)


def accuracy(prediction) -> dict[str, float]:
    # computed here: evaluate.load("accuracy") fetches its code from the hub, which offline runs cannot
    return {"accuracy": float(np.mean(prediction.predictions.argmax(-1) == prediction.label_ids))}


def main(argv: list[str] | None = None, trainer_class: type[RoseTrainer] = RoseTrainer) -> RoseTrainer:
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser((ExampleArguments, TrainingArguments))
    if any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv) and join_cpu_processes():
        parser.set_defaults(accelerator_config={"use_configured_state": True})  # the state just joined
    example, training = parser.parse_args_into_dataclasses(argv)
    try:
        rose = example.rose()
    except RoseConfigError as err:
        sys.exit(f"hf_trainer.py: error: {str(err).replace('RoseConfig.', '--rose_')}")
    try:
        method = example.method_config(training.seed)  # ChildTuning-F's masks follow --seed
    except MethodConfigError as err:
        message = str(err).replace("MethodConfig.name", "--method").replace("MethodConfig.", "--")
        sys.exit(f"hf_trainer.py: error: {message}")
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
        # the Trainer seeds, then builds the model: the new classifier head follows --seed
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=spec.num_labels)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    try:
        trainer = trainer_class(
            model_init=model_init, args=training, train_dataset=train, eval_dataset=evaluation,
            data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer, compute_metrics=accuracy,
            rose=rose, method=method,
        )  # fmt: skip
    except UnsupportedConfigError as err:  # one line, before any training
        sys.exit(f"hf_trainer.py: error: {err}")
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)  # a checkpoint-N folder
    trainer.save_model()
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    # leave the process group cleanly: exiting with gloo's threads still up can abort a rank
    trainer.accelerator.end_training()
    return trainer


if __name__ == "__main__":
    main()
