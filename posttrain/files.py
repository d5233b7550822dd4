"""Small file helpers shared by the CLI and the quickstart."""

from __future__ import annotations

import os
import shutil

__all__ = ["copy_file"]


def copy_file(src: str, dst: str) -> bool:
    """Copy `src` to `dst` if it exists (creating folders); returns whether it was copied."""
    if not os.path.exists(src):
        return False
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    shutil.copyfile(src, dst)
    return True
