"""Settings: one typed object shared by the CLI, environment variables and the Python API."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the server. Environment variables use the prefix ``LLAMASTREAM_``.

    >>> Settings(model_path="models/tiny.gguf", num_of_concurrent_executions=2).max_queue_size
    16
    """

    model_config = SettingsConfigDict(env_prefix="LLAMASTREAM_", extra="forbid")

    model_path: Path | None = Field(
        None,
        description="GGUF model file. When unset, `llamastream serve` downloads the default "
        "small instruct model into models_dir.",
    )
    models_dir: Path = Field(Path("models"), description="Where downloaded models are kept.")
    default_model: str = Field(
        "smollm2-135m", description="Download preset used when model_path is unset."
    )
    num_of_concurrent_executions: int = Field(
        2, ge=1, le=256, description="Generation slots: requests generating at the same time."
    )
    max_queue_size: int = Field(
        16, ge=0, le=100_000, description="Requests allowed to wait for a slot; more get 429."
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="llama.cpp workers: model copies, each on its own thread and batching its "
        "share of the slots into one decode step. More than one is for several GPUs or models.",
    )
    n_ctx: int = Field(2048, ge=64, le=1_048_576, description="Context length (tokens) of a slot.")
    n_batch: int = Field(512, ge=1, le=65_536, description="Prompt tokens decoded per step.")
    max_new_tokens: int = Field(
        256, ge=1, le=1_048_576, description="Default and upper bound of tokens per reply."
    )
    temperature: float = Field(0.7, ge=0.0, le=5.0, description="Default sampling temperature.")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Default nucleus sampling mass.")
    top_k: int = Field(40, ge=0, le=100_000, description="Default top-k (0 disables it).")
    repeat_penalty: float = Field(
        1.1, ge=0.0, le=10.0, description="Default repetition penalty (1.0 disables it)."
    )
    seed: int | None = Field(
        None,
        ge=0,
        lt=2**32,
        description="Default sampling seed; unset draws a fresh seed for every request.",
    )
    n_gpu_layers: int = Field(
        0, ge=-1, description="Layers offloaded to the GPU (-1: all, 0: CPU only)."
    )
    n_threads: int | None = Field(
        None, ge=1, description="CPU threads per worker for decoding; unset lets llama.cpp choose."
    )
    system_prompt: str | None = Field(
        None, description="System message placed first in every conversation."
    )
    session_dir: Path = Field(
        Path("sessions"), description="Directory of the diskcache session store."
    )
    session_ttl_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="Seconds a session lives after its last use."
    )
    session_cookie: str = Field("llamastream_session", description="Name of the session cookie.")
    cookie_secure: bool = Field(False, description="Mark the session cookie Secure (HTTPS only).")
    max_body_bytes: int = Field(
        1_000_000, ge=1024, description="Largest request body accepted (bytes)."
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Keys accepted as `Authorization: Bearer KEY` on the /v1 API; empty: open. "
        "Command line: comma-separated; environment: a JSON list.",
    )
    model_alias: str | None = Field(
        None, description="Model id the /v1 API serves under; unset: the GGUF file name's stem."
    )
    host: str = Field("127.0.0.1", description="Address `llamastream serve` listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port `llamastream serve` listens on.")
    log_level: str = Field("info", description="Logging level of `llamastream serve`.")

    @model_validator(mode="after")
    def _reply_fits_in_context(self) -> Settings:
        if self.max_new_tokens >= self.n_ctx:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must be below n_ctx ({self.n_ctx})"
            )
        return self
