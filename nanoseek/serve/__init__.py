"""The HTTP face of nanoseek: an OpenAI/DeepSeek-compatible API and a web chat page on the engine.

`create_app(engine, cfg)` builds the FastAPI app (tests and embedders use it); `serve(cfg)` is the
`nanoseek serve` command. See docs/serving.md.
"""

from .api import ServeConfig, create_app, serve

__all__ = ["ServeConfig", "create_app", "serve"]
