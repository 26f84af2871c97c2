"""`tidal serve`: load the model, warm it up, and run the HTTP server."""

from __future__ import annotations

import logging
import time

from PIL import Image

from tidal.api import Moondream
from tidal.engine.engine import EngineConfig
from tidal.server.app import create_app
from tidal.server.config import ServerConfig

logger = logging.getLogger("tidal.server")


def warm_up(md: Moondream) -> float:
    """Run every skill once on a small synthetic image so the first client
    request pays no first-call costs; then forget the warm-up's cache entries."""
    t0 = time.perf_counter()
    img = Image.new("RGB", (640, 480), (120, 160, 200))
    greedy = {"temperature": 0.0, "max_tokens": 2}
    md.batch_caption([img], "short", greedy)
    md.batch_query([(img, "what is this"), (None, "hello")], settings=greedy)
    md.batch_query([(img, "what is this")], reasoning=True, settings=greedy)
    md.batch_detect([(img, "object")], {"max_objects": 1})
    md.batch_point([(img, "object")], {"max_objects": 1})
    md.clear_cache()
    return time.perf_counter() - t0


def serve(model: str | None, host: str, port: int, device: str | None, dtype: str | None, engine: EngineConfig, server: ServerConfig) -> None:
    import uvicorn

    if model is None:
        from tidal.models.moondream3.tiny import ensure_tiny_checkpoint

        model = str(ensure_tiny_checkpoint())
        logger.warning("no --model given: serving the embedded tiny model with random weights (%s)", model)
    t0 = time.perf_counter()
    logger.info("loading %s", model)
    from tidal.models.checkpoint import resolve_checkpoint
    from tidal.models.registry import architecture

    folder = resolve_checkpoint(model)
    if architecture(folder) != "HfMoondream":
        _serve_llm(folder, host, port, device, dtype, engine, server)
        return
    md = Moondream.from_pretrained(folder, device=device, dtype=dtype, engine_config=engine)
    logger.info("loaded in %.1f s on %s (%s); KV cache: %d pages", time.perf_counter() - t0, md.model.device, md.model.dtype, md.engine.allocator.capacity)
    logger.info("warming up")
    logger.info("warm-up done in %.1f s", warm_up(md))
    app = create_app(md, server)
    logger.info("serving on http://%s:%d (Moondream API at /v1, OpenAI API at /v1/chat/completions)", host, port)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        md.close()


def _serve_llm(folder, host: str, port: int, device: str | None, dtype: str | None, engine: EngineConfig, server: ServerConfig) -> None:
    """A text model: OpenAI's completions and chat completions."""
    import uvicorn

    from tidal.engine.sampling import SamplingParams
    from tidal.llm import LLM
    from tidal.server.app import create_llm_app

    t0 = time.perf_counter()
    llm = LLM.from_pretrained(folder, device=device, dtype=dtype, engine_config=engine)
    logger.info("loaded in %.1f s on %s (%s); KV cache: %d pages", time.perf_counter() - t0, llm.model.device, llm.model.dtype, llm.engine.allocator.capacity)
    llm.generate({"prompt_token_ids": [0, 1, 2]}, SamplingParams(temperature=0.0, max_tokens=2), ignore_eos=True)  # first-call costs
    app = create_llm_app(llm, server)
    logger.info("serving on http://%s:%d (OpenAI API at /v1/completions and /v1/chat/completions)", host, port)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        llm.close()
