"""The recipes' arguments: typed dataclasses whose field ``help`` is the documentation (``--help``, README).

:class:`RoseArgs` holds the ROSE and composed-method flags, shared by ``launch/finetune.py`` and
``launch/hf_trainer.py`` (which puts it beside ``TrainingArguments``); :class:`TrainArgs` the rest of
``finetune.py``'s. Every check that needs neither an accelerator nor a file runs in ``__post_init__``
and raises :class:`ArgumentError`, so bad input costs no model load.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields

from rose_ds.config import RoseConfig, RoseConfigError
from rose_ds.methods import MethodConfig, MethodConfigError
from rose_ds.training import RecipeError
from rose_ds.training.presets import preset


class ArgumentError(RecipeError):
    """A command-line value that cannot work (one line naming the flag and the fix)."""


@dataclass
class TrainArgs:
    """Model, data, optimisation, logging and checkpoint flags of ``launch/finetune.py``."""

    deepspeed: str = field(
        default="ds_configs/zero2.json",
        metadata={"help": 'DeepSpeed JSON config ("auto" values are filled from these arguments)'},
    )
    local_rank: int = field(
        default=-1, metadata={"help": "set by the deepspeed launcher; torchrun/srun use the environment"}
    )
    objective: str = field(
        default="classification",
        metadata={"help": "classification (a sequence-classification head) or causal_lm (instruction/chat SFT)"},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "a path or hub name of an AutoModelForSequenceClassification (classification) or "
            "AutoModelForCausalLM (causal_lm); default: the embedded MiniLM-L6 (classification)"
        },
    )
    task_name: str = field(
        default="rotten_tomatoes",
        metadata={
            "help": "rotten_tomatoes (embedded, offline); sst2, qnli, qqp, rte, mnli (GLUE, hub); not with "
            "--train_file. causal_lm: the AdvGLUE task of the label-word evaluation (rotten_tomatoes: sst2)"
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "causal_lm: a hub dataset with train and validation (or test) splits"}
    )
    train_on_prompt: bool = field(
        default=False, metadata={"help": "causal_lm: supervise the prompt / user tokens too (default: responses only)"}
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
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision (fills bf16.enabled); --bf16 or --bf16 true/false. Default: on for "
            "--objective causal_lm on a GPU with bf16, off otherwise (on CPUs bf16 is slower than fp32)"
        },
    )
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision with loss scaling (fills fp16.enabled)"})
    report_to: str = field(
        default="none", metadata={"help": "'tensorboard' also writes TensorBoard logs to --output_dir/runs"}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "recompute each transformer block's activations in the backward instead of keeping them "
            "(less memory, one more forward of each block per backward)"
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "attention kernel: eager, sdpa, or flash_attention_2 (where flash-attn is installed); default: "
            "the model's (sdpa where it has it)"
        },
    )

    def __post_init__(self) -> None:
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "max_seq_length", "logging_steps"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ArgumentError(f"--{name} {getattr(self, name)}: must be at least 1")
        for name in ("eval_steps", "save_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ArgumentError(f"--{name} {getattr(self, name)}: must be 0 or more")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ArgumentError(
                f"--save_total_limit {self.save_total_limit}: keep at least 1 checkpoint (or leave it unset: keep all)"
            )
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ArgumentError(f"--learning_rate {self.learning_rate}: must be a positive number")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ArgumentError(f"--num_train_epochs {self.num_train_epochs}: must be positive (or pass --max_steps)")
        if self.bf16 and self.fp16:
            raise ArgumentError("--bf16 and --fp16 are exclusive; pass one")
        if self.report_to not in ("none", "tensorboard"):
            raise ArgumentError(f"--report_to {self.report_to!r}: use 'none' or 'tensorboard'")
        if self.max_nonfinite_steps < 1:
            raise ArgumentError(f"--max_nonfinite_steps {self.max_nonfinite_steps}: must be at least 1")
        if self.attn_implementation not in (None, *ATTENTION_KERNELS):
            raise ArgumentError(
                f"--attn_implementation {self.attn_implementation!r}: use one of {', '.join(ATTENTION_KERNELS)}"
            )


# Attention kernels of --attn_implementation (Transformers' names).
ATTENTION_KERNELS = ("eager", "sdpa", "flash_attention_2")


@dataclass
class LoraArgs:
    """LoRA's flags: with ``--lora_r`` > 0 the model is wrapped in a PEFT LoRA model and only the
    adapters (and a new classification head) train; ROSE then selects among the adapters."""

    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0: full fine-tuning (no adapters)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator: the update is (alpha/r) B A"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapters' input"})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={
            "help": "comma-separated names of the modules to adapt (q_proj,v_proj), or all-linear (every linear "
            "layer but the output head)"
        },
    )
    merge_lora: bool = field(
        default=False,
        metadata={
            "help": "also export the model with the adapters merged into its weights (--output_dir/merged), "
            "loadable with from_pretrained without peft"
        },
    )

    def __post_init__(self) -> None:
        if self.lora_r < 0:
            raise ArgumentError(f"--lora_r {self.lora_r}: must be 0 (no LoRA) or a positive rank")
        if self.merge_lora and not self.lora_r:
            raise ArgumentError("--merge_lora needs adapters to merge: pass --lora_r (8, 16, ...)")
        if not self.lora_alpha > 0 or not math.isfinite(self.lora_alpha):
            raise ArgumentError(f"--lora_alpha {self.lora_alpha}: must be a positive number")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ArgumentError(f"--lora_dropout {self.lora_dropout}: must be in [0, 1)")
        if not self.target_modules:
            raise ArgumentError("--lora_target_modules is empty: name the modules (q_proj,v_proj) or all-linear")

    @property
    def target_modules(self) -> list[str] | str:
        """``--lora_target_modules`` as PEFT takes it."""
        names = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        return "all-linear" if names == ["all-linear"] else names

    def lora_config(self, task_type: str):
        """The ``peft.LoraConfig`` of these flags for a ``task_type`` (``SEQ_CLS``, ``CAUSAL_LM``), or None
        without ``--lora_r``."""
        if not self.lora_r:
            return None
        import peft

        return peft.LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                               target_modules=self.target_modules, task_type=task_type)  # fmt: skip


@dataclass
class RoseArgs:
    """ROSE's flags (``--rose_*``, the :class:`~rose_ds.RoseConfig` fields) and the composed method's
    (``--method`` and its knobs, the :class:`~rose_ds.methods.MethodConfig` fields)."""

    rose_mode: str = field(default="ensemble", metadata={"help": "none (vanilla AdamW), first, second, ensemble"})
    rose_upper: float = field(default=40.0, metadata={"help": "upper percentile of the kept band"})
    rose_lower: float = field(default=0.0, metadata={"help": "lower percentile of the kept band"})
    rose_gamma: float = field(default=0.5, metadata={"help": "weight of the first-order mask in the ensemble"})
    rose_second_order_coef: float = field(default=0.1, metadata={"help": "constant k in |k ||g|| / ||m|| - 1|"})
    rose_warmup_steps: int = field(default=0, metadata={"help": "first optimizer steps without masking"})
    rose_dropout: float = field(
        default=0.1,
        metadata={
            "help": "dropout probability of ROSE's two passes, set on every dropout site of the model "
            "(the authors' 0.1; Llama-style configs ship 0, which would make the passes identical)"
        },
    )
    rose_eligibility: str | None = field(
        default=None,
        metadata={
            "help": "preset: original, bert, gpt2, llama, lora (and aliases); default: lora with --lora_r, "
            "else original"
        },
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

    def __post_init__(self) -> None:
        if not 0.0 <= self.rose_dropout < 1.0:
            raise ArgumentError(f"--rose_dropout {self.rose_dropout}: must be in [0, 1) (0.1 is the authors' value)")
        if self.rose_dropout == 0 and self.rose_mode in ("first", "ensemble"):
            raise ArgumentError(
                f"--rose_dropout 0 with --rose_mode {self.rose_mode}: ROSE-First scores the KL between two dropout "
                "passes, identical without dropout; pass --rose_dropout 0.1, or --rose_mode second or none"
            )
        self.rose_config()
        self.method_config(seed=0)  # the seed only seeds ChildTuning-F's masks: any value validates

    def rose_config(self) -> RoseConfig:
        """The :class:`~rose_ds.RoseConfig` of the ``--rose_*`` flags.

        Raises:
            ArgumentError: a value RoseConfig refuses, named by its flag.
        """
        values = {f.name[len("rose_"):]: getattr(self, f.name) for f in fields(RoseArgs)
                  if f.name.startswith("rose_") and f.name != "rose_dropout"}  # fmt: skip
        if values["eligibility"] is None:  # a LoRA model (LoraArgs beside these flags): the adapters
            values["eligibility"] = "lora" if getattr(self, "lora_r", 0) else "original"
        try:
            # --rose_dropout acts on the model, not on the optimizer's selection
            return RoseConfig(**values)
        except RoseConfigError as err:
            raise ArgumentError(str(err).replace("RoseConfig.", "--rose_")) from None

    def method_config(self, seed: int) -> MethodConfig:
        """The :class:`~rose_ds.methods.MethodConfig` of ``--method`` and its knobs; ``seed`` seeds
        ChildTuning-F's masks.

        Raises:
            ArgumentError: a value MethodConfig refuses, named by its flag.
        """
        prefixes = ("rdrop_", "r3f_", "childtuning_")
        knobs = {f.name: getattr(self, f.name) for f in fields(RoseArgs) if f.name.startswith(prefixes)}
        try:
            return MethodConfig(name=self.method, seed=seed, **knobs)
        except MethodConfigError as err:
            message = str(err).replace("MethodConfig.name", "--method").replace("MethodConfig.", "--")
            raise ArgumentError(message) from None


@dataclass
class FinetuneArgs(RoseArgs, LoraArgs, TrainArgs):
    """Every flag of ``launch/finetune.py``: :class:`TrainArgs`, :class:`LoraArgs`, :class:`RoseArgs` and
    ``--rose_preset``."""

    rose_preset: str | None = field(
        default=None,
        metadata={
            "help": "{task}-{base|large}-{first|second|ensemble}: published lr, mode and upper (override the flags)"
        },
    )

    def __post_init__(self) -> None:
        if self.rose_preset:
            try:
                self.learning_rate, self.rose_mode, self.rose_upper = preset(self.rose_preset)
            except ValueError as err:
                raise ArgumentError(str(err)) from None
        TrainArgs.__post_init__(self)
        LoraArgs.__post_init__(self)
        RoseArgs.__post_init__(self)


def _boolean(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not true or false")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, as every other bad input (argparse prints usage too)
        raise ArgumentError(f"{message}; see --help")


def parse_args(argv: list[str] | None = None, description: str | None = None) -> FinetuneArgs:
    """``launch/finetune.py``'s command line (``sys.argv`` when ``argv`` is None) as :class:`FinetuneArgs`.

    Raises:
        ArgumentError: an unknown or malformed flag, or a value that cannot work.
    """
    # no abbreviations: a misspelt flag (--learning_rat) must not silently become another one
    parser = _Parser(description=description, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False)
    for f in dataclasses.fields(FinetuneArgs):
        if f.type == "bool":
            parser.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        elif f.type == "bool | None":  # --bf16, --bf16 true, --bf16 false; absent: decided by the program
            parser.add_argument(f"--{f.name}", nargs="?", const=True, default=None, type=_boolean,
                                help=f.metadata["help"])  # fmt: skip
        else:  # "int", "float | None", ...: the first word names the type
            caster = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
            parser.add_argument(f"--{f.name}", type=caster, default=f.default, help=f.metadata["help"])
    parser.add_argument("--resume", dest="resume_from_checkpoint", help="short for --resume_from_checkpoint")
    return FinetuneArgs(**vars(parser.parse_args(argv)))


__all__ = ["ATTENTION_KERNELS", "ArgumentError", "FinetuneArgs", "LoraArgs", "RoseArgs", "TrainArgs", "parse_args"]
