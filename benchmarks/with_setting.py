"""Run a benchmark script with module settings changed first, for an A/B of a
knob in one device call (the knob read at call time, as tidal's kernel flags are):

    PYTHONPATH=. python3 benchmarks/with_setting.py tidal.kernels.moe_route.ROUTER_WARPS=4 -- \\
        benchmarks/bench_qwen.py --model moe --batches 1 --no-hf --no-concurrent

Each SETTING is MODULE.NAME=VALUE with VALUE a Python literal; the script's
output and files are its own (give it another --out where both runs write).
"""

from __future__ import annotations

import ast
import importlib
import runpy
import sys


def apply(setting: str) -> None:
    """Set MODULE.NAME to the literal VALUE; the name must exist already."""
    target, sep, value = setting.partition("=")
    module_name, _, name = target.rpartition(".")
    if not sep or not module_name:
        raise SystemExit(f"not MODULE.NAME=VALUE: {setting!r}")
    module = importlib.import_module(module_name)
    if not hasattr(module, name):
        raise SystemExit(f"{module_name} has no {name}")
    setattr(module, name, ast.literal_eval(value))
    print(f"with {module_name}.{name} = {getattr(module, name)!r}", flush=True)


def main() -> None:
    args = sys.argv[1:]
    if "--" not in args:
        raise SystemExit(__doc__)
    split = args.index("--")
    for setting in args[:split]:
        apply(setting)
    sys.argv = args[split + 1 :]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
