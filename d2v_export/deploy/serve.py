"""`d2v-export serve BUNDLE`: one bundle served over the KServe v2 inference protocol (REST), the protocol
Triton Inference Server, OpenVINO Model Server and KServe share, with FastAPI and uvicorn (the [serve] extra).

    app = create_app(Path("out/text/onnxruntime-fp32"), name="text")   # an ASGI app; serve() runs it with uvicorn

Routes: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``, ``GET /v2/models/NAME``,
``GET /v2/models/NAME/ready`` and ``POST /v2/models/NAME/infer`` (``/versions/1/`` after ``NAME`` too).
Inference takes the graph's own tensors (token ids and attention mask, pixel values, waveform samples),
prepared by the client as the bundle's manifest.json ``preprocessing`` says; it runs the bundle's artifact
with the target's runner (the one ``d2v-export run`` uses), so the outputs are ``run``'s raw outputs.
Tensors travel as JSON (``data``, row-major) or with the binary tensor data extension
(``Inference-Header-Content-Length``; what tritonclient sends by default). Errors are ``{"error": "..."}``:
400 for a bad request (unknown or missing input, wrong datatype, shape or size, an axis outside the
exported range), 404 for an unknown model or route, 500 when the runtime fails.
"""

import json
import socket
import threading
from collections.abc import Mapping
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np

from .bundle import Manifest, verify
from .serving import TRITON_TYPES, model_name, tensor_dims
from ..spec import D2VError, ExitCode

VERSION = "1"
HEADER = "Inference-Header-Content-Length"  # the binary tensor data extension's JSON length header
V2_TYPES = {dtype: triton[len("TYPE_") :] for dtype, triton in TRITON_TYPES.items()}  # float32 -> FP32
NUMPY_TYPES = {v2: np.dtype(dtype) for dtype, v2 in V2_TYPES.items() if dtype != "bfloat16"}
INSTALL = "pip install 'd2v-export[serve]'"


class V2Error(Exception):
    """A request the server answers with ``{"error": message}`` and ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ServedModel:
    """A verified bundle with its runner open: the v2 metadata of its graph, and inference on v2 tensors."""

    def __init__(self, bundle: Path, name: str | None = None, threads: int = 0) -> None:
        from .predict import open_runtime

        self.manifest: Manifest = verify(Path(bundle))
        self.name = model_name(self.manifest, name)
        self.backend, self.artifact, self.notes = open_runtime(self.manifest)
        self.threads = threads
        self.runner: Any = None
        self._lock = threading.Lock()  # one inference at a time: a runner's request object is not shared safely
        self._inputs = {str(t["name"]): t for t in self.manifest.inputs}

    def open(self, stack: ExitStack) -> None:
        self.runner = stack.enter_context(self.backend.runner(self.artifact, threads=self.threads))

    def metadata(self) -> dict[str, Any]:
        def port(t: Mapping[str, Any]) -> dict[str, Any]:
            return {
                "name": str(t["name"]),
                "datatype": V2_TYPES.get(str(t.get("dtype")), "BYTES"),
                "shape": tensor_dims(t, skip_first=False),
            }

        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": f"d2v-export_{self.artifact.target}",
            "inputs": [port(t) for t in self.manifest.inputs],
            "outputs": [port(t) for t in self.manifest.outputs],
        }

    def infer(self, request: Mapping[str, Any], binary: bytes) -> tuple[dict[str, Any], bytes]:
        feed = decode_inputs(self.manifest, self._inputs, request, binary)
        wanted = _requested(request, [str(t["name"]) for t in self.manifest.outputs])
        if self.runner is None:
            raise V2Error(f"model '{self.name}' is not ready", 503)
        with self._lock:
            try:
                outputs = self.runner.infer(feed)
            except Exception as exc:  # noqa: BLE001 - the runtime's message goes back to the client, the server stays up
                raise V2Error(f"inference failed: {' '.join(str(exc).split())[:300]}", 500) from None
        return encode_outputs(self.name, request, outputs, wanted)


def _requested(request: Mapping[str, Any], names: list[str]) -> dict[str, bool]:
    """Output name -> whether it goes back as binary data; all outputs when the request names none."""
    default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    asked = request.get("outputs")
    if not asked:
        return {n: default for n in names}
    if not isinstance(asked, list) or not all(isinstance(o, Mapping) and isinstance(o.get("name"), str) for o in asked):
        raise V2Error("'outputs' must be a list of objects with a 'name'")
    unknown = [o["name"] for o in asked if o["name"] not in names]
    if unknown:
        raise V2Error(f"unknown output '{unknown[0]}'; the model's outputs are {', '.join(names)}")
    return {o["name"]: bool((o.get("parameters") or {}).get("binary_data", default)) for o in asked}


def _check_shape(manifest: Manifest, spec: Mapping[str, Any], shape: list[int]) -> None:
    name, axes = spec["name"], list(spec.get("shape") or ())
    if len(shape) != len(axes):
        raise V2Error(
            f"input '{name}' has shape {shape}; the model takes rank {len(axes)} ({tensor_dims(spec, skip_first=False)}, -1 dynamic)"
        )
    ranges = manifest.dims()
    for axis, size, want in zip(axes, shape, tensor_dims(spec, skip_first=False)):
        if want != -1 and size != want:
            raise V2Error(f"input '{name}' has shape {shape}; axis '{axis}' must be {want}")
        if want == -1 and str(axis) in ranges:
            lo, _opt, hi = ranges[str(axis)]
            if not lo <= size <= hi:
                raise V2Error(
                    f"input '{name}' axis '{axis}' is {size}; the bundle was exported and checked for {lo}..{hi}"
                )


def _tensor(
    manifest: Manifest, spec: Mapping[str, Any], item: Mapping[str, Any], binary: bytes, offset: int
) -> tuple[np.ndarray, int]:
    """One v2 input tensor as a numpy array of the graph's type, and the binary offset after it."""
    name, want = spec["name"], V2_TYPES.get(str(spec.get("dtype")), "")
    if item.get("datatype") != want:
        raise V2Error(f"input '{name}' has datatype {item.get('datatype')!r}; the model takes {want}")
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise V2Error(f"input '{name}': 'shape' must be a list of non-negative integers")
    _check_shape(manifest, spec, shape)
    dtype, count = NUMPY_TYPES[want], int(np.prod(shape, dtype=np.int64))
    size = (item.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != count * dtype.itemsize or offset + size > len(binary):
            raise V2Error(
                f"input '{name}': binary_data_size {size} does not hold shape {shape} of {want} ({count * dtype.itemsize} bytes)"
            )
        return np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape), offset + size
    try:
        array = np.asarray(item.get("data"), dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise V2Error(f"input '{name}': 'data' is not a list of {want} numbers") from None
    if array.size != count:
        raise V2Error(f"input '{name}' has {array.size} values; shape {shape} needs {count}")
    return array.reshape(shape), offset


def decode_inputs(
    manifest: Manifest, specs: Mapping[str, Mapping[str, Any]], request: Mapping[str, Any], binary: bytes
) -> dict[str, np.ndarray]:
    """The feed of a v2 request: every graph input exactly once, checked against the manifest."""
    items = request.get("inputs")
    if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
        raise V2Error("the request has no 'inputs' list")
    feed: dict[str, np.ndarray] = {}
    offset = 0
    for item in items:
        name = item.get("name")
        if name not in specs:
            raise V2Error(f"unknown input {name!r}; the model's inputs are {', '.join(specs)}")
        if name in feed:
            raise V2Error(f"input '{name}' is given twice")
        feed[name], offset = _tensor(manifest, specs[name], item, binary, offset)
    missing = [n for n in specs if n not in feed]
    if missing:
        raise V2Error(f"missing input '{missing[0]}'; the model's inputs are {', '.join(specs)}")
    return feed


def encode_outputs(
    model: str, request: Mapping[str, Any], outputs: Mapping[str, np.ndarray], wanted: Mapping[str, bool]
) -> tuple[dict[str, Any], bytes]:
    """The v2 response JSON, and the binary data that follows it (empty when every output is JSON)."""
    tensors, blobs = [], []
    for name, as_binary in wanted.items():
        array = np.ascontiguousarray(outputs[name])
        tensor: dict[str, Any] = {
            "name": name,
            "datatype": V2_TYPES.get(array.dtype.name, "BYTES"),
            "shape": list(array.shape),
        }
        if as_binary:
            blobs.append(array.tobytes())
            tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            tensor["data"] = array.ravel().tolist()
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model, "model_version": VERSION, "outputs": tensors}
    if isinstance(request.get("id"), str):
        response["id"] = request["id"]
    return response, b"".join(blobs)


def _split_body(body: bytes, header: str | None) -> tuple[dict[str, Any], bytes]:
    """(request JSON, binary tensor data) of an infer request body."""
    try:
        length = int(header) if header is not None else len(body)
        if not 0 <= length <= len(body):
            raise ValueError
        request = json.loads(body[:length])
    except (ValueError, UnicodeDecodeError):
        raise V2Error(f"the request body is not v2 JSON (with {HEADER} for binary data)") from None
    if not isinstance(request, dict):
        raise V2Error("the request body must be a JSON object")
    return request, body[length:]


def create_app(bundle: Path, *, name: str | None = None, threads: int = 0) -> Any:
    """The FastAPI app serving ``bundle``; the runner opens at startup and closes at shutdown."""
    try:
        from fastapi import FastAPI, Request, Response
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException
    except ImportError:
        raise D2VError(f"serving needs FastAPI and uvicorn: {INSTALL}", ExitCode.TARGET_UNAVAILABLE) from None
    model = ServedModel(bundle, name, threads)

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        with ExitStack() as stack:
            model.open(stack)
            yield
            model.runner = None

    app = FastAPI(title=f"d2v-export serve: {model.name}", lifespan=lifespan)
    app.add_exception_handler(V2Error, lambda _r, e: JSONResponse({"error": str(e)}, status_code=e.status))  # type: ignore[arg-type, attr-defined]
    app.add_exception_handler(
        HTTPException, lambda _r, e: JSONResponse({"error": str(e.detail)}, status_code=e.status_code)
    )  # type: ignore[arg-type, attr-defined]

    def known(model_name: str) -> ServedModel:
        if model_name != model.name:
            raise V2Error(f"unknown model '{model_name}'; this server serves '{model.name}'", 404)
        return model

    @app.get("/v2/health/live")
    def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    @app.get("/v2/models/{model_name}/ready")
    @app.get("/v2/models/{model_name}/versions/{version}/ready")
    def ready(model_name: str | None = None, version: str = VERSION) -> JSONResponse:
        if model_name is not None:
            known(model_name)
        up = model.runner is not None
        return JSONResponse({"ready": up}, status_code=200 if up else 503)

    @app.get("/v2")
    def server() -> dict[str, Any]:
        return {"name": "d2v-export", "version": _version(), "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{model_name}")
    @app.get("/v2/models/{model_name}/versions/{version}")
    def metadata(model_name: str, version: str = VERSION) -> dict[str, Any]:
        return known(model_name).metadata()

    @app.post("/v2/models/{model_name}/infer")
    @app.post("/v2/models/{model_name}/versions/{version}/infer")
    async def infer(model_name: str, request: Request, version: str = VERSION) -> Response:
        served = known(model_name)
        body, binary = _split_body(await request.body(), request.headers.get(HEADER))
        import anyio.to_thread

        response, blobs = await anyio.to_thread.run_sync(served.infer, body, binary)
        if not blobs:
            return JSONResponse(response)
        head = json.dumps(response).encode()
        return Response(head + blobs, media_type="application/octet-stream", headers={HEADER: str(len(head))})

    return app


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("d2v-export")
    except metadata.PackageNotFoundError:
        return "0"


def _check_port(host: str, port: int) -> None:
    """A one-line error before the model loads when the address cannot be bound."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise D2VError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port or --host", ExitCode.USAGE
        ) from None


def serve(
    bundle: Path, *, host: str = "127.0.0.1", port: int = 8000, name: str | None = None, threads: int = 0
) -> None:
    """Serve ``bundle`` until interrupted (Ctrl-C or SIGTERM stop it cleanly)."""
    if not 0 <= port <= 65535:
        raise D2VError(f"--port {port}: give 0..65535", ExitCode.USAGE)
    try:
        import uvicorn
    except ImportError:
        raise D2VError(f"serving needs FastAPI and uvicorn: {INSTALL}", ExitCode.TARGET_UNAVAILABLE) from None
    _check_port(host, port)
    app = create_app(bundle, name=name, threads=threads)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False)).run()
