"""Command line: `tidal demo` and `tidal serve`."""

from __future__ import annotations

import argparse
import logging
import sys


def _add_model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, help="checkpoint folder or Hugging Face repo id")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None, help="default: bfloat16 on cuda, float32 on cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidal", description="Fast inference for Moondream 3 and friends.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run every skill once (default: the embedded tiny model, no download)")
    _add_model_args(demo, required=False)
    demo.add_argument("--image", default=None, help="image file (default: the bundled sample)")
    demo.add_argument("--max-tokens", type=int, default=48, help="tokens per text answer (default 48)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from tidal.demo import run_demo

        run_demo(args.model, args.image, args.device, args.dtype, args.max_tokens)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
