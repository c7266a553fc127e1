"""``infllm-lite serve``: an OpenAI-compatible HTTP server on the continuous-batching
engine, with conversations whose attention memory persists across requests.

One concept a module: ``app`` (the routes), ``completions`` (one request through the
engine: collected or streamed), ``schemas`` (the OpenAI wire format and errors),
``conversations`` (the persistent conversations and their snapshots), ``runner`` (the
engine thread), ``metrics`` (Prometheus), ``auth`` (API keys), ``settings``, ``command``
(the CLI's body). Needs the ``serve`` extra: ``pip install "infllm-lite[serve]"``.
"""

from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def create_app(model, tokenizer, settings: ServerSettings):
    """The FastAPI application (imported here on first use: FastAPI is the serve extra's)."""
    from .app import create_app as create
    return create(model, tokenizer, settings)
