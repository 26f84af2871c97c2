"""Command line: `tidal demo` and `tidal serve`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tidal.engine.engine import EngineConfig
    from tidal.server.config import ServerConfig


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    demo.add_argument("--max-tokens", type=_positive_int, default=48, help="tokens per text answer (default 48)")

    serve = sub.add_parser("serve", help="serve the Moondream and OpenAI-compatible HTTP APIs")
    _add_model_args(serve, required=False)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_positive_int, default=2020)
    serve.add_argument("--served-model-name", default=None, help="name reported by /v1/models (default: the model folder name)")
    serve.add_argument("--max-running", type=_positive_int, default=64, help="requests batched at once")
    serve.add_argument("--kv-pages", type=_positive_int, default=None, help="KV cache size in tokens (default: from free GPU memory)")
    serve.add_argument("--token-budget", type=_positive_int, default=2048, help="positions fed per engine step")
    serve.add_argument("--kv-memory-fraction", type=float, default=0.85, help="share of the GPU memory left after the weights that the KV cache takes (default 0.85)")
    serve.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly (debugging)")
    serve.add_argument("--no-prefix-cache", action="store_true", help="turn off prefix (and image) caching")
    serve.add_argument(
        "--skinny-gemm", choices=["auto", "all", "off"], default="auto",
        help="decode-sized projections through tidal's Triton kernel: where it measured faster than cuBLAS (auto), all, or none",
    )
    serve.add_argument(
        "--kv-dtype", choices=["auto", "fp8"], default="auto",
        help="what the KV cache stores: the model's dtype (auto, exact) or float8 e4m3 (half the memory and K/V reads; results differ)",
    )
    serve.add_argument("--no-prefill-graphs", action="store_true", help="run prefill and mixed steps eagerly instead of replaying them from CUDA graphs")
    serve.add_argument("--encode-ahead", action="store_true", help="encode the images of requests held back by the token budget while the current step runs (CUDA: on a stream of their own)")
    serve.add_argument("--no-overlap", action="store_true", help="read each decode step's results before launching the next (by default the next is queued behind the running one)")
    serve.add_argument("--no-warm-prefill", action="store_true", help="skip compiling the prefill kernels at start-up (the first requests compile them)")
    serve.add_argument("--max-queue", type=_positive_int, default=256, help="waiting requests before 503")
    serve.add_argument("--request-threads", type=_positive_int, default=None, help="requests validated and their images decoded at once (default: the server's shared pool of 40 threads)")
    serve.add_argument("--max-body-mb", type=float, default=32, help="largest request body")
    serve.add_argument("--max-image-pixels", type=_positive_int, default=50_000_000)
    serve.add_argument("--allow-local-files", metavar="DIR", default=None, help="let image_url name files under this folder (absolute paths or file:// URLs)")
    return parser


def _local_root(folder: str | None):
    from pathlib import Path

    if folder is None:
        return None
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise SystemExit(f"tidal serve: --allow-local-files {folder!r} is not a folder")
    return root


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """`tidal serve`'s engine options -> EngineConfig (ValueError on a bad value)."""
    from tidal.engine.engine import EngineConfig

    return EngineConfig(
        max_running=args.max_running,
        kv_pages=args.kv_pages,
        token_budget=args.token_budget,
        kv_memory_fraction=args.kv_memory_fraction,
        prefix_cache=not args.no_prefix_cache,
        cuda_graphs=not args.no_cuda_graphs,
        prefill_graphs=not args.no_prefill_graphs,
        encode_ahead=args.encode_ahead,
        skinny_gemm=args.skinny_gemm,
        kv_dtype=args.kv_dtype,
        warm_prefill=not args.no_warm_prefill,
        overlap=False if args.no_overlap else None,
    )


def server_config(args: argparse.Namespace, name: str) -> ServerConfig:
    """`tidal serve`'s server options -> ServerConfig, served under `name`."""
    from tidal.server.config import ServerConfig

    return ServerConfig(
        model_name=name,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels,
        max_queue=args.max_queue,
        request_threads=args.request_threads,
        local_files_root=_local_root(args.allow_local_files),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from tidal.demo import run_demo

        run_demo(args.model, args.image, args.device, args.dtype, args.max_tokens)
        return 0
    if args.command == "serve":
        from pathlib import Path

        from tidal.server.serve import serve

        name = args.served_model_name or (Path(args.model).name if args.model else "moondream3-tiny")
        try:
            engine = engine_config(args)
        except ValueError as exc:
            parser.error(str(exc))
        serve(args.model, args.host, args.port, args.device, args.dtype, engine, server_config(args, name))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
