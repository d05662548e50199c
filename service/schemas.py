"""Pydantic models at the HTTP boundary: what clients send and get back (and what /docs shows)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.scoring import ImageScore


class ScoreJSON(BaseModel):
    """JSON form of POST /v1/score."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(
        ..., min_length=1, description="base64-encoded image files (PNG, JPEG, ...); data: URLs accepted"
    )


class ScoreResponse(BaseModel):
    model: str
    version: int
    provider: str
    results: list[ImageScore] = Field(description="one row per image, in request order")


class ErrorBody(BaseModel):
    error: str
    code: str


class SelfCheckInfo(BaseModel):
    passed: bool
    equivariance_error: dict[str, float]
    probe_angle_error_deg: float
    probe_logit_error: float
    probes: int


class ProcessReload(BaseModel):
    """One server process's answer to a reload (`--processes N`)."""

    pid: int
    version: int | None = Field(description="the version this process serves after the reload; null: no answer")
    error: str | None = Field(None, description="why this process kept its old version")


class ModelInfo(BaseModel):
    name: str
    version: int | None = None
    state: Literal["serving", "unavailable"]
    provider: str | None = None
    default: bool = False
    input: dict[str, Any] | None = None
    classes: list[str] | None = None
    reflections: bool | None = None
    alpha: float | None = None
    self_check: SelfCheckInfo | None = None
    loaded_at: float | None = None
    versions_on_disk: list[int] = []
    last_error: str | None = None
    processes: list[ProcessReload] | None = Field(
        None, description="reload answers only, with --processes above 1: what every server process now serves"
    )


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class ReadyResponse(BaseModel):
    ready: bool
    process: int = Field(description="pid of the server process that answered (one of several with --processes)")
    models: list[dict[str, Any]]
    problems: dict[str, str] = {}


# ---- KServe V2 / Open Inference Protocol


class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor] = Field(..., min_length=1, max_length=1)
    outputs: list[V2RequestedOutput] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2Tensor]


class V2TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMeta]
    outputs: list[V2TensorMeta]
