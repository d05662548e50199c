"""`symguard guard` settings: every `symguard serve` setting plus the proxy's own.

Flags and environment variables are the same fields. Each setting is read from SYMGUARD_GUARD_<NAME> first, then
from SYMGUARD_<NAME>, so a guard can share SYMGUARD_REPOSITORY & co. with a `symguard serve` and still override
any of them for itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import httpx
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from service.config import Settings

Mode = Literal["monitor", "annotate", "gate", "canonicalize"]
OnFailure = Literal["fail_open", "fail_closed"]


@dataclass(frozen=True)
class ImageLocation:
    """Where a request carries its one image: the whole body, one multipart field, or a base64 string in JSON."""

    kind: Literal["raw", "multipart", "json"]
    field: str = ""  # multipart field name
    pointer: tuple[str, ...] = ()  # RFC 6901 JSON pointer, already split and unescaped

    @staticmethod
    def parse(text: str) -> ImageLocation:
        kind, sep, arg = text.partition(":")
        if kind == "raw" and not sep:
            return ImageLocation("raw")
        if kind == "multipart" and arg:
            return ImageLocation("multipart", field=arg)
        if kind == "json" and arg.startswith("/"):
            # RFC 6901: "~1" is "/", "~0" is "~" (in that order)
            tokens = tuple(t.replace("~1", "/").replace("~0", "~") for t in arg[1:].split("/"))
            return ImageLocation("json", pointer=tokens)
        raise ValueError(f"{text!r}: use raw, multipart:FIELD or json:/json/pointer (RFC 6901, e.g. json:/image)")


class GuardSettings(Settings):
    """symguard guard settings: the server's, plus the proxy's. Env: SYMGUARD_GUARD_<NAME>, then SYMGUARD_<NAME>."""

    model_config = SettingsConfigDict(
        **{**Settings.model_config, "env_prefix": "SYMGUARD_GUARD_", "cli_prog_name": "symguard guard"}
    )

    upstream: str = Field(
        description="the classifier to protect, http(s)://HOST[:PORT][/BASE]; requests go to BASE + their path"
    )
    mode: Mode = Field(
        "monitor",
        description="monitor: score and count only; annotate: add X-Symguard-* headers; gate: answer OOD images "
        "with 422 instead of forwarding them; canonicalize: forward the image turned upright and un-mirrored",
    )
    image_location: str = Field(
        "raw", description="where requests carry the image: raw (the body), multipart:FIELD, json:/json/pointer"
    )
    score_timeout_s: float = Field(
        2.0, gt=0, description="longest the guard spends decoding and scoring one image before --on-failure applies"
    )
    on_failure: OnFailure = Field(
        "fail_open",
        description="when scoring fails or times out: fail_open forwards the request unscored, fail_closed answers "
        "503 (monitor mode always fails open)",
    )
    upstream_timeout_s: float = Field(
        30.0, gt=0, description="connect/read/write limit for the upstream; past it the client gets 504"
    )
    upstream_max_connections: int = Field(100, ge=1, description="pooled connections to the upstream")
    api_prefix: str = Field(
        "/symguard",
        description="where symguard's own /v1, /v2 and /docs live (\"\" keeps them at the root, shadowing the "
        "upstream's); /healthz, /readyz and /metrics always stay at the root",
    )

    @field_validator("upstream")
    @classmethod
    def _http_url(cls, v: str) -> str:
        try:
            url = httpx.URL(v)
        except httpx.InvalidURL as e:
            raise ValueError(f"not a URL: {e}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be http://HOST[:PORT][/BASE] or https://...")
        if url.query or url.fragment:
            raise ValueError("must not carry a query or fragment: the request's own are forwarded")
        return str(url).rstrip("/")

    @field_validator("image_location")
    @classmethod
    def _location(cls, v: str) -> str:
        ImageLocation.parse(v)
        return v

    @field_validator("api_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.rstrip("/")
        if v and not v.startswith("/"):
            raise ValueError("must be empty or start with '/', e.g. /symguard")
        return v

    @cached_property
    def location(self) -> ImageLocation:
        return ImageLocation.parse(self.image_location)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # SYMGUARD_GUARD_* (env_settings) wins over the SYMGUARD_* names shared with `symguard serve`
        shared = EnvSettingsSource(settings_cls, env_prefix="SYMGUARD_")
        return init_settings, env_settings, shared, dotenv_settings, file_secret_settings
