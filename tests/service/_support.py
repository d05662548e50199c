"""Test support: a real uvicorn server on 127.0.0.1 in a thread, and digit images encoded as real files."""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from PIL import Image

from service.api import create_app
from service.config import Settings
from service.geometry import apply_d4
from service.manifest import FileEntry, Manifest, sha256_file


class LiveServer:
    """uvicorn serving create_app(settings) on a socket we bound first (no port race), in a background thread."""

    def __init__(self, **settings: object) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        # the server's defaults on a 2-core machine, pinned so that tests do not depend on the core count
        pinned: dict[str, object] = {"intra_op_threads": 1, "inference_workers": 2}
        self.settings = Settings(host="127.0.0.1", port=port, **{**pinned, **settings})  # type: ignore[arg-type]
        self.app = create_app(self.settings)
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)  # type: ignore[arg-type]


def hold_request(url: str, body: bytes, sent: int | None = None) -> socket.socket:
    """A /v1/score request left in progress: its headers and the first `sent` bytes of its PNG body (default: half)
    written, the rest not (send it, or close the socket, to end it)."""
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    head = f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body[: len(body) // 2 if sent is None else sent])
    return sock


# ---------------------------------------------------------------- images


def pad29(digit28: np.ndarray) -> np.ndarray:
    """28x28 -> 29x29 exactly as the server's fit_pad places it, so D4 moves of the file are D4 moves of the input."""
    out = np.zeros((29, 29), np.uint8)
    out[:28, :28] = digit28
    return out


def png(arr: np.ndarray, **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **save)
    return buf.getvalue()


def moved_png(digit28: np.ndarray, k: int, mirrored: bool) -> bytes:
    return png(apply_d4(pad29(digit28), k, mirrored))


def angle_diff(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


def huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, then a tiny IDAT: a decompression-bomb shape."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------- bundles


def copy_version(repo: Path, name: str, src: int, dst: int, **manifest_update: object) -> Path:
    """A new version folder made from an existing one, with its manifest's version (and anything else) changed."""
    out = repo / name / str(dst)
    shutil.copytree(repo / name / str(src), out)
    m = Manifest.load(out)
    m.model_copy(update={"version": dst, **manifest_update}).write(out)
    return out


def rehash(bundle: Path) -> None:
    """Make the manifest's sha256 entries match the files again (after a test replaced one on purpose)."""
    m = Manifest.load(bundle)
    m.model_copy(
        update={"files": [FileEntry(path=f.path, sha256=sha256_file(bundle / f.path)) for f in m.files]}
    ).write(bundle)


def non_equivariant_graph(path: Path, size: int = 29, classes: int = 10, seed: int = 0) -> None:
    """A dense (not equivariant) graph with the bundle's input and output signature, written with onnx.helper."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    n_in = size * size
    dims = {"pose": 2, "reflection_logit": 1, "embedding": 16, "level": 2, "class_logits": classes, "rotation_score": 1}
    inits = [numpy_helper.from_array(rng.normal(size=(n_in, d)).astype(np.float32), f"W_{k}") for k, d in dims.items()]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "flat_shape"))
    nodes = [helper.make_node("Flatten", ["image"], ["flat"], axis=1)]
    for k, d in dims.items():  # [N, 1] products of the per-image scalars are reshaped to [N]
        nodes.append(helper.make_node("MatMul", ["flat", f"W_{k}"], [f"{k}_2d" if d == 1 else k]))
        if d == 1:
            nodes.append(helper.make_node("Reshape", [f"{k}_2d", "flat_shape"], [k]))
    outputs = [
        helper.make_tensor_value_info(k, TensorProto.FLOAT, ["N"] if d == 1 else ["N", d]) for k, d in dims.items()
    ]
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, size, size])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def fixed_batch_graph(path: Path, batch: int = 1) -> None:
    """The same graph with its input's batch axis fixed (what an export without a dynamic axis gives)."""
    import onnx

    model = onnx.load(str(path))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_value = batch
    onnx.save(model, str(path))


def batch_bound_graph(path: Path, rows: int) -> None:
    """The same graph behind a Reshape to a fixed `rows` images: the input still says any batch, but ONNX Runtime
    fails at run time on every batch of another size (a graph exported with a batch size baked into a Reshape)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    shape = [d.dim_value for d in g.input[0].type.tensor_type.shape.dim[1:]]
    g.initializer.append(numpy_helper.from_array(np.array([rows, *shape], np.int64), "batch_bound"))
    for node in g.node:
        node.input[:] = ["bound_image" if i == g.input[0].name else i for i in node.input]
    g.node.insert(0, helper.make_node("Reshape", [g.input[0].name, "batch_bound"], ["bound_image"]))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
