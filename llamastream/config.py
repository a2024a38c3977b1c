"""Settings: one typed object shared by the CLI, environment variables and the Python API."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from llamastream.limits import (
    FlashAttn,
    KvType,
    MaxNewTokens,
    RepeatPenalty,
    Seed,
    Temperature,
    TopK,
    TopP,
)

# Endpoint → role needed. The ChatStream endpoints serve the caller's own session, so they are
# public like the chat page; the /v1 API takes API keys.
DEFAULT_ROLES: dict[str, Literal["public", "user", "admin"]] = {
    "chat_stream": "public",
    "clear_context": "public",
    "get_prompt": "public",
    "set_generation_params": "public",
    "get_generation_params": "public",
    "get_load": "public",
    "metrics": "public",
    "v1": "user",
    "tokenize": "user",
    "ollama": "user",
    "get_models": "public",
    "admin": "admin",
}

# The settings a model of `models` may set for itself; the others are the server's.
PER_MODEL = (
    "num_of_concurrent_executions",
    "max_queue_size",
    "workers",
    "n_ctx",
    "n_batch",
    "max_new_tokens",
    "max_tokens_limit",
    "temperature",
    "top_p",
    "top_k",
    "repeat_penalty",
    "seed",
    "n_gpu_layers",
    "main_gpu",
    "tensor_split",
    "flash_attn",
    "offload_kqv",
    "type_k",
    "type_v",
    "n_threads",
    "n_threads_batch",
    "chat_template_file",
    "prompt_lookup",
    "draft_model_path",
    "draft_p_min",
    "draft_max",
    "draft_min",
    "reasoning_format",
    "reasoning_budget",
    "system_prompt",
    "keep_alive_s",
)


class ModelConfig(BaseModel):
    """One model of a server serving several: where it is, what it is called, and the
    settings of its own (any of `PER_MODEL`; the rest are the server's).

    >>> ModelConfig(name="coder", model_path="models/coder.gguf", n_ctx=4096).overrides()
    {'n_ctx': 4096}
    """

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[^\s/]+$")
    model_path: Path | None = None
    preset: str | None = None  # a download preset, fetched into models_dir on first load
    aliases: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _known(self) -> ModelConfig:
        unknown = sorted(set(self.model_extra or {}) - set(PER_MODEL))
        if unknown:
            raise ValueError(
                f"{unknown[0]!r} is not a per-model setting; a model may set: "
                + ", ".join(PER_MODEL)
            )
        if (self.model_path is None) == (self.preset is None):
            raise ValueError("give a model exactly one of model_path and preset")
        return self

    def overrides(self) -> dict[str, Any]:
        """The settings this model sets for itself."""
        return dict(self.model_extra or {})


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
    models: list[ModelConfig] = Field(
        default_factory=list,
        description="More models to serve, loaded when a request names one: tables of name, "
        "model_path or preset, aliases and per-model settings (see Several models). Command "
        "line and environment: JSON; config_file: [[models]] tables.",
    )
    serve_models_dir: bool = Field(
        False,
        description="Also serve every GGUF file in models_dir, each under its file name's "
        "stem, with the server's settings.",
    )
    config_file: Path | None = Field(
        None,
        description="A TOML file of settings (the same names; [[models]] tables for several "
        "models). Flags and environment variables win over it.",
    )
    keep_alive_s: float = Field(
        -1,
        ge=-1,
        description="Seconds a model stays loaded after its last request (0: unloaded as soon "
        "as it is idle; -1: never). Per model in models; per request on /api (keep_alive).",
    )
    memory_budget_mib: int | None = Field(
        None,
        ge=1,
        description="Memory (MiB) the loaded models may take together (weights and KV caches, "
        "as estimated from each GGUF); loading past it first unloads idle models, least "
        "recently used first. Unset: what the host and GPUs have free.",
    )
    device_memory_mib: int | None = Field(
        None,
        ge=1,
        description="GPU memory (MiB) per device that n_gpu_layers auto plans with, when less "
        "than the card has free; on a build without GPU support it stands in for a card "
        "(the plan is made and shown; everything runs on the CPU).",
    )
    default_model: str = Field(
        "smollm2-135m", description="Download preset used when model_path is unset."
    )
    num_of_concurrent_executions: int = Field(
        2, ge=1, le=256, description="Generation slots: requests generating at the same time."
    )
    max_queue_size: int = Field(
        16, ge=0, le=100_000, description="Requests allowed to wait for a slot; more get 429."
    )
    workers: int | Literal["auto"] = Field(
        1,
        description="llama.cpp workers: model copies, each on its own thread and batching its "
        "share of the slots into one decode step. More than one is for several GPUs; `auto`: "
        "one per visible GPU (one on a CPU-only build).",
    )
    n_ctx: int = Field(2048, ge=64, le=1_048_576, description="Context length (tokens) of a slot.")
    n_batch: int = Field(512, ge=1, le=65_536, description="Prompt tokens decoded per step.")
    max_new_tokens: MaxNewTokens = Field(
        256,
        description="Default tokens per reply (a request or session may ask for more, up to "
        "max_tokens_limit).",
    )
    max_tokens_limit: MaxNewTokens | None = Field(
        None,
        description="Upper bound of the tokens a request or session may ask for per reply; "
        "unset: what the context allows (a reply is cut to the room left in the context, "
        "finish_reason length).",
    )
    temperature: Temperature = Field(0.7, description="Default sampling temperature.")
    top_p: TopP = Field(0.95, description="Default nucleus sampling mass.")
    top_k: TopK = Field(40, description="Default top-k (0 disables it).")
    repeat_penalty: RepeatPenalty = Field(
        1.1, description="Default repetition penalty (1.0 disables it)."
    )
    seed: Seed | None = Field(
        None, description="Default sampling seed; unset draws a fresh seed for every request."
    )
    n_gpu_layers: int | Literal["auto"] = Field(
        "auto",
        description="Layers offloaded to the GPU (-1: all, 0: CPU only; auto: the most that "
        "fit beside the KV cache of the slots, logged with what would fit more).",
    )
    main_gpu: int = Field(
        0, ge=0, description="GPU holding the model when it is not split (split_mode none)."
    )
    tensor_split: list[float] | None = Field(
        None,
        description="Share of the model per GPU, e.g. 3,1; unset: llama.cpp splits by free "
        "memory. Command line: comma-separated.",
    )
    flash_attn: FlashAttn = Field(
        "auto", description="Flash attention (auto: where the backend supports it)."
    )
    offload_kqv: bool = Field(
        True, description="Keep the KV cache and attention on the GPU with offloaded layers."
    )
    type_k: KvType = Field("f16", description="KV cache type of keys (q8_0 halves its memory).")
    type_v: KvType = Field(
        "f16",
        description="KV cache type of values (quantized types need flash attention).",
    )
    gpu_headroom_mib: int = Field(
        512,
        ge=0,
        description="GPU memory (MiB) left free per device when checking that the model and "
        "the KV cache fit; start-up is refused when they do not.",
    )
    n_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads per worker for generating tokens; unset: one per physical "
        "core this process may use (split between CPU workers; at most 4 with every layer on "
        "a GPU).",
    )
    n_threads_batch: int | None = Field(
        None,
        ge=1,
        description="CPU threads per worker for reading prompts; unset: n_threads when it is "
        "set, else every logical CPU this process may use (at most 4 with every layer on a "
        "GPU).",
    )
    prompt_lookup: bool = Field(
        False,
        description="Speculative decoding by prompt lookup: each step, a generating slot also "
        "verifies the tokens that followed its last n-gram earlier in the prompt or the reply "
        "(the same reply, sampled the same way; faster when replies repeat their input, e.g. "
        "edits and extraction).",
    )
    draft_model_path: Path | None = Field(
        None,
        description="Speculative decoding with a draft model: a small GGUF with the model's "
        "vocabulary drafts greedily, verified as prompt lookup's drafts are (used instead of "
        "prompt lookup; loaded beside the model, in each worker).",
    )
    draft_p_min: float = Field(
        0.0,
        ge=0,
        le=1,
        description="A draft model's drafting stops at a token it finds less likely than this.",
    )
    draft_max: int = Field(8, ge=1, le=64, description="Most tokens drafted per slot and step.")
    draft_min: int = Field(
        1, ge=1, le=64, description="Fewest drafted tokens worth verifying; shorter: none."
    )
    chat_template_file: Path | None = Field(
        None,
        description="A Jinja chat template file used instead of the one in the GGUF (Hugging "
        "Face's variables: messages, tools, add_generation_prompt, bos_token, eos_token).",
    )
    reasoning_format: Literal["auto", "none"] = Field(
        "auto",
        description="A thinking model's reasoning (<think>...</think>): `auto` keeps it apart "
        "from the answer (reasoning_content on /v1; its own part of the session chat and its "
        "history); `none` leaves it in the answer's text.",
    )
    reasoning_budget: int = Field(
        -1,
        ge=-1,
        description="A thinking model's reasoning closed after this many tokens (its closing "
        "tag written for it; the answer follows); 0 closes it at once, -1: no budget.",
    )
    embedding_model_path: Path | None = Field(
        None,
        description="An embedding GGUF serving /v1/embeddings (pooled as its metadata says), "
        "on a thread and context of its own.",
    )
    embeddings_from_chat_model: bool = Field(
        False,
        description="Serve /v1/embeddings with the chat model (mean of its token states) when "
        "no embedding_model_path is set; it gets a context and thread of its own.",
    )
    embedding_pooling: Literal["auto", "mean", "cls", "last"] = Field(
        "auto",
        description="How token states become one vector: `auto` follows the model's metadata "
        "(mean for a model without pooling, such as a chat model).",
    )
    embedding_n_ctx: int = Field(
        2048, ge=8, le=1_048_576, description="Most tokens per embedding input (and per batch)."
    )
    embedding_max_inputs: int = Field(
        256, ge=1, le=100_000, description="Most inputs in one /v1/embeddings request."
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
    session_max_count: int = Field(
        100_000, ge=1, description="Sessions kept at most; past it the oldest are evicted."
    )
    session_max_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        description="Size cap of the session store (bytes); past it the oldest are evicted.",
    )
    session_backend: Literal["disk", "redis"] = Field(
        "disk",
        description="Where sessions live: `disk` (diskcache in session_dir, one server) or "
        "`redis` (redis_url, shared by replicas).",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis server of the `redis` session backend."
    )
    session_lock_ttl_s: float = Field(
        10.0,
        ge=1,
        description="Expiry of a session's turn lock, renewed while the turn runs: how long a "
        "session stays locked after its server died mid-turn.",
    )
    kv_state_bytes: int = Field(
        2 << 30,
        ge=0,
        description="Disk (bytes) for the KV caches of conversations that lost their slot, "
        "kept in session_dir/kv-states and restored when they come back; 0: off.",
    )
    kv_state_ram_bytes: int = Field(
        512 << 20,
        ge=0,
        description="Memory (bytes) keeping the most recent of those KV caches, so that "
        "restoring one does not read the disk.",
    )
    max_body_bytes: int = Field(
        1_000_000, ge=1024, description="Largest request body accepted (bytes); more gets 413."
    )
    max_input_chars: int = Field(
        32_000, ge=1, description="Longest user input or message accepted (characters); 400."
    )
    max_queue_wait_s: float = Field(
        60.0, gt=0, description="Longest wait for a slot; then 503 with Retry-After."
    )
    max_generation_s: float = Field(
        600.0, gt=0, description="Longest generation of one reply; then it ends as `length`."
    )
    shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM: seconds running streams may take to finish before they are "
        "cancelled (new requests get 503 meanwhile).",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Keys of the `user` role, sent as `Authorization: Bearer KEY`; empty: the "
        "`user` role is open. Command line: comma-separated; environment: a JSON list.",
    )
    admin_keys: list[str] = Field(
        default_factory=list,
        description="Keys of the `admin` role (which may also do what `user` may).",
    )
    endpoint_roles: dict[str, Literal["public", "user", "admin"]] = Field(
        default_factory=lambda: dict(DEFAULT_ROLES),
        description="Role needed per endpoint (public: anyone; user: an api or admin key when "
        "api_keys is set; admin: an admin key). Given entries replace the defaults; "
        "command line and environment: JSON.",
    )
    model_alias: str | None = Field(
        None, description="Model id the /v1 API serves under; unset: the GGUF file name's stem."
    )
    model_aliases: list[str] = Field(
        default_factory=list,
        description="More model names requests may give for the served model (for clients "
        "that insist on one). Command line: comma-separated; environment: a JSON list.",
    )
    host: str = Field("127.0.0.1", description="Address `llamastream serve` listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port `llamastream serve` listens on.")
    log_level: str = Field("info", description="Logging level of `llamastream serve`.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags and keyword arguments, then the environment, then ``config_file``."""
        given = getattr(init_settings, "init_kwargs", {}).get("config_file")
        path = given or os.environ.get("LLAMASTREAM_CONFIG_FILE")
        sources = [init_settings, env_settings, dotenv_settings, file_secret_settings]
        if path:
            if not Path(path).is_file():
                raise ValueError(f"config_file {path}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)

    def reply_limit(self) -> int:
        """The most tokens a reply may be asked for."""
        return self.max_tokens_limit or self.n_ctx - 1

    @classmethod
    def merged(cls, settings: Settings | None, **overrides: Any) -> Settings:
        """``settings`` (or the environment's) with ``overrides`` by name, validated again."""
        base = settings.model_dump() if settings is not None else {}
        return cls(**{**base, **overrides})

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_new_tokens >= self.n_ctx:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must be below n_ctx ({self.n_ctx})"
            )
        if self.draft_min > self.draft_max:
            raise ValueError(
                f"draft_min ({self.draft_min}) must be at most draft_max ({self.draft_max})"
            )
        if self.max_tokens_limit is not None and self.max_tokens_limit < self.max_new_tokens:
            raise ValueError(
                f"max_tokens_limit ({self.max_tokens_limit}) must be at least max_new_tokens "
                f"({self.max_new_tokens})"
            )
        unknown = set(self.endpoint_roles) - set(DEFAULT_ROLES)
        if unknown:
            raise ValueError(
                f"endpoint_roles: unknown endpoint {sorted(unknown)[0]!r}; "
                f"known: {', '.join(DEFAULT_ROLES)}"
            )
        asked = {k for k, v in self.endpoint_roles.items() if v == "admin" != DEFAULT_ROLES[k]}
        if asked and not self.admin_keys:
            raise ValueError("endpoint_roles names the admin role but admin_keys is empty")
        self.endpoint_roles = {**DEFAULT_ROLES, **self.endpoint_roles}
        names = [m.name for m in self.models]
        twice = {n for n in names if names.count(n) > 1}
        if twice:
            raise ValueError(f"models: the name {sorted(twice)[0]!r} is given twice")
        if isinstance(self.workers, int) and not 1 <= self.workers <= 64:
            raise ValueError("workers must be between 1 and 64, or auto")
        return self
