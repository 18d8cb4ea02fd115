"""Small models and batches shared by the in-process tests and the distributed workers."""

import torch


def tiny_bert(dropout: float = 0.1, seed: int = 0, num_labels: int = 2, hidden: int = 32):
    """A 2-layer BERT classifier with random weights (no download), 16 eligible tensors."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=hidden + hidden // 2,
        max_position_embeddings=32,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=num_labels,
    )
    model = BertForSequenceClassification(cfg)
    # The key bias's gradient is exactly zero in exact arithmetic (softmax is shift-invariant), so in
    # floating point it is rounding noise that Adam scales up to lr-sized steps: two correct
    # implementations then diverge on it. Freezing it also exercises parameters without .grad.
    for layer in model.bert.encoder.layer:
        layer.attention.self.key.bias.requires_grad_(False)
    model.train()
    return model


# Frozen in frozen_bert: the first parameter (whose optimizer state once gave RoseAdamW its step count)
# and two eligible tensors, as partial fine-tuning or LoRA leave a model.
FROZEN = (
    "bert.embeddings.word_embeddings.weight",
    "bert.encoder.layer.0.attention.self.query.weight",
    "bert.encoder.layer.1.output.LayerNorm.weight",
)


def frozen_bert(**kwargs):
    """tiny_bert with the parameters in FROZEN frozen (requires_grad=False): 14 eligible tensors."""
    model = tiny_bert(**kwargs)
    for name, p in model.named_parameters():
        if name in FROZEN:
            p.requires_grad_(False)
    return model


def random_batch(step: int, batch_size: int = 8, seq_len: int = 12, num_labels: int = 2):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, 64, (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, num_labels, (batch_size,), generator=g)
    return {"input_ids": ids, "attention_mask": mask}, labels


def decay_groups(model):
    """Two groups as fine-tuning recipes make them: decay on weights, none on biases and LayerNorm."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if ("bias" in name or "LayerNorm" in name) else decay).append(name)
    return decay, no_decay


def tiny_decoder(family: str, dropout: float = 0.1, seed: int = 0, vocab: int = 50):
    """A 2-layer causal LM of a decoder family ('llama', 'qwen2', 'mistral', 'gpt2') from config (no
    download)."""
    import transformers as tf

    torch.manual_seed(seed)
    shape = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, attention_dropout=dropout, bos_token_id=0, eos_token_id=1)  # fmt: skip
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**shape))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**shape))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**shape))
    else:
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                            eos_token_id=1, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)  # fmt: skip
        model = tf.GPT2LMHeadModel(cfg)
    model.train()
    return model


# A ChatML-like template for the tiny causal LMs' tokenizer (the embedded MiniLM's WordPiece
# tokenizer, which ships without one): each turn is "<role> content [SEP]".
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' [SEP] ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def save_tiny_causal_lm(path, family: str = "llama", chat_template: bool = True, seed: int = 0):
    """Saves a 2-layer causal LM from config ('llama', 'qwen2', 'gpt2') with the embedded MiniLM's real
    tokenizer ([SEP] as end token, CHAT_TEMPLATE unless ``chat_template`` is False) to ``path``."""
    import transformers as tf

    from rose_ds.training.data import embedded_model_path

    tokenizer = tf.AutoTokenizer.from_pretrained(embedded_model_path())
    tokenizer.eos_token = "[SEP]"
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    ids = dict(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=256, **ids)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        config_class, model_class = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                                     "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]  # fmt: skip
        cfg = config_class(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                           **ids)  # fmt: skip
        model = model_class(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


DECODERS = ("llama", "qwen2", "mistral", "gpt2")


def case_model(case: dict):
    """The model of a tests/test_zero.py case: ``case["model"]`` a decoder family, else (tiny/frozen) BERT;
    with gradient checkpointing (``case["grad_ckpt"]``) and LoRA adapters of rank 4 on every linear layer
    (``case["lora"]``, through the recipe's LoraArgs and PEFT), as launch/finetune.py builds them."""
    family = case.get("model", "bert")
    if family in DECODERS:
        model = tiny_decoder(family, dropout=case.get("dropout", 0.0), seed=case.get("seed", 0))
    else:
        build = frozen_bert if case.get("frozen") else tiny_bert
        model = build(dropout=case.get("dropout", 0.0), seed=case.get("seed", 0), hidden=case.get("hidden", 32))
    if case.get("grad_ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if case.get("lora"):
        import peft

        from rose_ds.training.args import LoraArgs

        lora = LoraArgs(lora_r=4, lora_alpha=8.0, lora_dropout=case.get("dropout", 0.0))
        model = peft.get_peft_model(model, lora.lora_config("CAUSAL_LM" if family in DECODERS else "SEQ_CLS"))
        model.train()
    return model


def random_lm_batch(step: int, batch_size: int = 8, seq_len: int = 12, vocab: int = 50):
    """Causal-LM inputs and labels: each row a masked prompt (label -100) of 1-5 tokens, then a response,
    then 0-3 padding tokens (attention 0, label -100): rows and ranks supervise different token counts."""
    g = torch.Generator().manual_seed(2000 + step)
    ids = torch.randint(2, vocab, (batch_size, seq_len), generator=g)
    labels = ids.clone()
    mask = torch.ones_like(ids)
    prompt = torch.randint(1, 6, (batch_size,), generator=g)
    pad = torch.randint(0, 4, (batch_size,), generator=g)
    for i in range(batch_size):
        labels[i, : prompt[i]] = -100
        if pad[i]:
            ids[i, -pad[i] :] = 1  # the end token as padding, as decoders without a pad token do
            labels[i, -pad[i] :] = -100
            mask[i, -pad[i] :] = 0
    return {"input_ids": ids, "attention_mask": mask}, labels


def case_batch(case: dict, step: int, batch_size: int):
    """The global batch of a case's step: random_lm_batch for decoders, random_batch for BERT."""
    if case.get("model", "bert") in DECODERS:
        return random_lm_batch(step, batch_size)
    return random_batch(step, batch_size=batch_size)


def assert_adapters_trained(weights: dict, initial: dict) -> None:
    """At least half the adapted modules have moved their B off zero and their A off its initial value:
    a selection that froze A or B for good (per-tensor scores of adapters) would leave none."""
    modules = [n for n in weights if "lora_B" in n]
    trained = [
        n
        for n in modules
        if weights[n].abs().max() > 0
        and not torch.equal(weights[n.replace("lora_B", "lora_A")], initial[n.replace("lora_B", "lora_A")])
    ]
    assert len(trained) >= 0.5 * len(modules), f"{len(trained)} of {len(modules)} adapted modules trained"
