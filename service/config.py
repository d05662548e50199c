"""The server's one settings model: environment variables (SYMGUARD_*) and `symguard serve --flags` are the same fields."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def available_cores() -> int:
    """Cores this process may run on (the cgroup/affinity view, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    """symguard server settings. Every flag can also be set as SYMGUARD_<NAME> (e.g. SYMGUARD_PORT=9000)."""

    model_config = SettingsConfigDict(
        env_prefix="SYMGUARD_",
        cli_prog_name="symguard serve",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_show_env_vars=True,
        extra="ignore",
    )

    # ---- network
    host: str = Field("127.0.0.1", description="interface to bind; use 0.0.0.0 only behind a trusted network or proxy")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")

    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes sharing the port, each with its own models, event loop and inference workers "
        "(more Python in parallel, for many small requests; RSS grows per process). Above 1, /metrics adds up all "
        "processes and a reload reaches every one",
    )

    # ---- models
    repository: Path | None = Field(
        None, description="model repository REPO/NAME/VERSION/ (unset: this project's models/repository)"
    )
    model: str | None = Field(
        None, description="serve only this model, NAME or NAME:VERSION (unset: the newest version of every model)"
    )
    require_cuda: bool = Field(
        False, description="refuse to start unless ONNX Runtime actually runs on CUDAExecutionProvider"
    )
    # Several single-threaded session.run calls at once beat one call on several threads here: on 2 cores the event
    # loop competes for a core, and an intra-op thread that loses it stalls the whole call (BENCHMARKS.md).
    inference_workers: int | None = Field(
        None,
        ge=1,
        description="batches run at once, each on its own thread; a lone batch is split across idle workers "
        "(unset: the cores this process may use, divided by --intra-op-threads)",
    )
    intra_op_threads: int = Field(1, ge=1, description="ONNX Runtime threads inside each session.run")

    # ---- batching
    max_batch: int = Field(32, ge=1, le=4096, description="most images per session.run")
    max_delay_ms: float = Field(
        2.0, ge=0.0, le=1000.0, description="how long a batch waits for more requests once the first arrives"
    )
    queue_size: int = Field(256, ge=1, description="requests waiting per model before new ones get 503 + Retry-After")
    max_in_flight: int = Field(
        512,
        ge=1,
        description="requests in progress at once (reading, decoding, queued, scoring; GETs not counted); beyond "
        "it, 503 + Retry-After before the body is read",
    )

    # ---- limits
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="largest request body; larger gets 413 before it is read"
    )
    max_pixels: int = Field(
        16_000_000, ge=1, description="largest width*height per image; larger gets 413 before decoding"
    )
    max_images: int = Field(64, ge=1, description="most images in one request")
    request_timeout_s: float = Field(30.0, gt=0, description="give up waiting for inference after this long (504)")
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="longest time to receive a request body once its headers are in; a slower (slow-drip) body "
        "gets 408 and the connection is closed",
    )
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM/SIGINT: stop accepting, wait this long for in-flight requests"
    )

    # ---- auth
    admin_token: SecretStr | None = Field(
        None, description="bearer token for admin routes (reload); unset = admin routes disabled"
    )
    api_token: SecretStr | None = Field(
        None, description="bearer token required for scoring routes; unset = scoring is open"
    )

    log_level: str = Field("info", description="debug, info, warning, error")

    @property
    def workers(self) -> int:
        """inference_workers, or (unset) as many as fill the cores at intra_op_threads each."""
        return self.inference_workers or max(1, available_cores() // self.intra_op_threads)

    @field_validator("admin_token", "api_token")
    @classmethod
    def _empty_is_unset(cls, v: SecretStr | None) -> SecretStr | None:
        return v if v is not None and v.get_secret_value() else None
