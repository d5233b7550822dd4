"""Peak-memory measurement for tests: run code in a fresh interpreter and read its RSS high-water mark.

Each measured snippet runs after ``/proc/self/clear_refs`` resets VmHWM; the result is VmHWM minus VmRSS
just before it. glibc would keep freed mid-size blocks in its heap (its mmap threshold grows
dynamically), so RSS would count memory no tensor holds; ``MALLOC_MMAP_THRESHOLD_`` fixes the
threshold so large buffers are mmapped and returned to the system when freed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_PRELUDE = textwrap.dedent("""
    import json, torch

    def _kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    def measure(fn):
        open("/proc/self/clear_refs", "w").write("5")
        before = _kib("VmRSS")
        value = fn()
        return {"peak_kib": _kib("VmHWM") - before, "value": value}

    torch.set_num_threads(1)
    torch.manual_seed(0)
""")


def peak_kib(setup: str, snippets: dict[str, str]) -> dict[str, dict]:
    """``{name: {"peak_kib", "value"}}``: each snippet is an expression (run after ``setup``) returning a float."""
    body = textwrap.dedent(setup) + "\nresults = {}\n"
    for name, expr in snippets.items():
        body += f"results[{name!r}] = measure(lambda: {expr})\n"
    body += "print(json.dumps(results))\n"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run([sys.executable, "-c", _PRELUDE + body], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])
