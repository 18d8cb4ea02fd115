"""ROSE's dropout on every architecture (rose_ds.dropout), and the stop for identical passes in the
library API (rose_ds.train_step under DeepSpeed, 2 processes) and RoseTrainer."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import random_batch, tiny_bert, tiny_decoder

from rose_ds import IdenticalPassesError, RoseConfig, causal_lm_losses, check_passes_differ, rose_losses, set_dropout
from rose_ds.dropout import IDENTICAL_PER_ROW

ROOT = Path(__file__).resolve().parents[1]


def _robust_per_row(model, seed=0):
    if model.config.model_type == "bert":
        inputs, labels = random_batch(seed, batch_size=8)
        losses = rose_losses(model, inputs, labels)
        return losses, losses.robust.item() / 8
    ids = torch.randint(2, 50, (4, 11), generator=torch.Generator().manual_seed(seed))
    losses = causal_lm_losses(model, {"input_ids": ids}, ids)
    return losses, losses.robust.item() / losses.tokens


@pytest.mark.parametrize("family", ["bert", "llama", "qwen2", "mistral", "gpt2"])
def test_set_dropout_makes_the_passes_of_a_dropout_free_model_differ_and_back(family):
    model = tiny_bert(dropout=0.0) if family == "bert" else tiny_decoder(family, dropout=0.0)
    config_before = model.config.to_dict()
    losses, per_row = _robust_per_row(model)
    assert per_row <= IDENTICAL_PER_ROW  # no dropout: the passes are the same up to rounding
    with pytest.raises(IdenticalPassesError, match="--rose_dropout 0.1"):
        check_passes_differ(losses)
    sites = set_dropout(model, 0.1)
    if family in ("llama", "qwen2", "mistral"):  # no nn.Dropout: the attention modules' attention_dropout, one a layer
        assert (sites.modules, sites.attention) == (0, 2)
    else:
        assert sites.modules > 0 and sites.attention == 0
    losses, per_row = _robust_per_row(model, seed=1)
    assert per_row > 1e-3 * 1e-3  # orders of magnitude above the threshold
    assert check_passes_differ(losses)
    assert model.config.to_dict() == config_before  # an exported model keeps its own dropout
    set_dropout(model, 0.0)  # the same sites really are the source of the randomness
    assert _robust_per_row(model, seed=2)[1] <= IDENTICAL_PER_ROW


def test_set_dropout_refuses_a_bad_probability_and_a_model_without_dropout():
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        set_dropout(tiny_bert(), 1.0)
    with pytest.raises(ValueError, match="has no dropout module"):
        set_dropout(torch.nn.Linear(3, 3), 0.1)
    assert set_dropout(torch.nn.Linear(3, 3), 0.0).total == 0  # nothing to switch off is fine


def test_a_micro_batch_without_supervised_tokens_is_not_taken_for_identical_passes():
    model = tiny_decoder("llama", dropout=0.0)
    ids = torch.randint(2, 50, (2, 7))
    losses = causal_lm_losses(model, {"input_ids": ids}, torch.full_like(ids, -100))
    assert losses.tokens == 0
    assert not check_passes_differ(losses)  # nothing to judge by: the next micro-batch is checked


@pytest.mark.parametrize("stage", [2, 3])
def test_train_step_stops_rose_first_on_a_dropout_free_model_on_every_rank(stage):
    """The library API under real DeepSpeed on 2 processes (tests/dist/identical_passes.py)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "tests" / "dist" / "identical_passes.py"), str(stage)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} stopped (weights untouched: True): ROSE's two dropout passes were identical" in proc.stdout
        assert re.search(rf"rank {rank} trained 2 steps, kept 0\.\d+", proc.stdout), proc.stdout


def test_rose_trainer_stops_the_ensemble_on_a_dropout_free_model(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from rose_ds.hf import RoseTrainer

    inputs, labels = random_batch(0, batch_size=16)
    data = Dataset.from_dict({**{k: v.tolist() for k, v in inputs.items()}, "labels": labels.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, use_cpu=True,
                             save_strategy="no", report_to="none", disable_tqdm=True,
                             dataloader_pin_memory=False)  # fmt: skip
    trainer = RoseTrainer(model=tiny_bert(dropout=0.0), args=args, train_dataset=data, rose=RoseConfig(mode="ensemble"))
    with pytest.raises(IdenticalPassesError):
        trainer.train()
    trainer = RoseTrainer(model=tiny_bert(dropout=0.1), args=args, train_dataset=data, rose=RoseConfig(mode="ensemble"))
    assert trainer.train().global_step == 2


def test_a_zero_robust_loss_from_a_model_with_active_dropout_is_saturation_not_identical_passes():
    """Weights that blew up saturate both passes' softmax to one-hot: the KL is 0 with dropout on. Only a
    model without an active dropout site (none, p = 0, or eval mode) is stopped."""
    from rose_ds import RoseLosses

    zero = RoseLosses(torch.tensor(0.7), torch.tensor(0.0), torch.zeros(8, 2), torch.zeros(8, 2))
    assert check_passes_differ(zero, tiny_bert(dropout=0.1))
    assert check_passes_differ(zero, tiny_decoder("llama", dropout=0.1))
    for model in (tiny_bert(dropout=0.0), tiny_bert(dropout=0.1).eval(), tiny_decoder("llama", dropout=0.0)):
        with pytest.raises(IdenticalPassesError):
            check_passes_differ(zero, model)


def test_rose_trainer_fine_tunes_a_causal_lm_through_the_objective_seam(tmp_path):
    """RoseTrainer with the causal-LM objective's losses and collator (rose_ds.training.causal_lm): a
    tiny Llama with its dropout set trains, ROSE freezing tensors; left without dropout it stops."""
    from datasets import Dataset
    from models import random_lm_batch
    from transformers import TrainingArguments

    from rose_ds.hf import RoseTrainer
    from rose_ds.training import objective

    causal = objective.get("causal_lm")
    inputs, labels = random_lm_batch(0, batch_size=16)
    rows = [{"input_ids": [t for t, m in zip(ids, mask) if m], "labels": [y for y, m in zip(ys, mask) if m]}
            for ids, mask, ys in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist(),
                                     labels.tolist())]  # fmt: skip
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, use_cpu=True,
                             save_strategy="no", report_to="none", disable_tqdm=True, learning_rate=1e-3,
                             dataloader_pin_memory=False, remove_unused_columns=False)  # fmt: skip

    class Pad:  # the objective's collator wants a tokenizer only for its pad id
        pad_token_id, eos_token_id = 1, 1

    def trainer(model):
        return RoseTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                           data_collator=causal.collator(Pad()), rose=RoseConfig(mode="ensemble", upper=70),
                           loss_fn=causal.loss_fn(None))  # fmt: skip

    with pytest.raises(IdenticalPassesError):
        trainer(tiny_decoder("llama", dropout=0.0)).train()
    model = tiny_decoder("llama", dropout=0.0)
    set_dropout(model, 0.1)
    run = trainer(model)
    assert run.train().global_step == 3
    assert any(v < 1 for masks in run.mask_history for v in masks)
