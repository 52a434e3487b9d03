"""`d2v-export serve`: real bundles served over the KServe v2 REST protocol on 127.0.0.1, asked by Triton's own
v2 HTTP client (tritonclient.http): health, metadata, inference equal to what `d2v-export run` feeds and gets from
the bundle's runner, and bad requests answered with errors while the server stays up."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from d2v_export.measure.bench import BenchSettings
from d2v_export.deploy.bundle import verify
from d2v_export.calibration import bundled_path
from d2v_export.models import parse_source
from d2v_export.options import RunOptions, ShapeRequest
from d2v_export.pipeline import run
from d2v_export.deploy.predict import Preparer, _load_parts, open_runtime
from d2v_export.spec import ExitCode, Modality

from .conftest import cli

pytest.importorskip("fastapi", reason="pip install 'd2v-export[serve]'")
pytest.importorskip("uvicorn", reason="pip install 'd2v-export[serve]'")
http = pytest.importorskip("tritonclient.http", reason="pip install 'd2v-export[test]' (tritonclient[http])")
from tritonclient.utils import InferenceServerException  # noqa: E402

STARTUP_S = 90  # the model loads before the server listens; a loaded 2-core machine is slow


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny text bundle for ONNX Runtime and a tiny audio (CTC) bundle for OpenVINO."""
    root = tmp_path_factory.mktemp("serve")
    out = {}
    for modality, target in ((Modality.TEXT, "onnxruntime"), (Modality.AUDIO, "openvino")):
        options = RunOptions(
            output=root / modality.value, targets=(target,), bench=BenchSettings(seconds=0.0), threads=1
        )
        run(parse_source("preset:tiny", modality, None), ShapeRequest(), options)
        out[modality.value] = root / modality.value / f"{target}-fp32"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def served(bundle: Path, name: str) -> Iterator[tuple[Any, str]]:
    """`d2v-export serve` in a subprocess on 127.0.0.1 (bounded wait until it is live, always stopped)."""
    port = free_port()
    exe = shutil.which("d2v-export") or str(Path(sys.executable).parent / "d2v-export")
    proc = subprocess.Popen(
        [exe, "serve", str(bundle), "--port", str(port), "--name", name, "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    url = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, (
                f"the server exited ({proc.returncode}): {proc.stdout.read() if proc.stdout else ''}"
            )
            try:
                with urllib.request.urlopen(f"http://{url}/v2/health/live", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the server did not answer within {STARTUP_S} s"
            time.sleep(0.25)
        client = http.InferenceServerClient(url, network_timeout=60.0)
        try:
            yield client, url
        finally:
            client.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def run_feed(bundle: Path, raw: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The feed `d2v-export run` prepares for ``raw`` and what the bundle's runner gives for it, in this process."""
    manifest = verify(bundle)
    processor, tokenizer = _load_parts(manifest)
    prepared = Preparer(manifest, processor, tokenizer)(raw)
    backend, artifact, _notes = open_runtime(manifest)
    with backend.runner(artifact, threads=1) as runner:
        return dict(prepared.feed), {k: np.asarray(v) for k, v in runner.infer(prepared.feed).items()}


def v2_inputs(feed: dict[str, np.ndarray], binary: bool) -> list[Any]:
    inputs = []
    for name, array in feed.items():
        item = http.InferInput(name, list(array.shape), {"int64": "INT64", "float32": "FP32"}[array.dtype.name])
        item.set_data_from_numpy(array, binary_data=binary)
        inputs.append(item)
    return inputs


def assert_error(call: Any, status: str, *words: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == status, str(info.value)
    for word in words:
        assert word in info.value.message(), info.value.message()


def post(url: str, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://{url}/v2/models/text/infer", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_text_bundle_answers_a_v2_client_as_run_does(bundles: dict[str, Path]) -> None:
    bundle = bundles["text"]
    feed, expected = run_feed(bundle, {"text": "a served sentence, tokenized as run does it"})
    manifest = verify(bundle)
    with served(bundle, "text") as (client, url):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("text") and not client.is_model_ready("other")
        meta = client.get_model_metadata("text")
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
            ("input_ids", "INT64", [-1, -1]),
            ("attention_mask", "INT64", [-1, -1]),
        ]
        labels = len(manifest.labels or {}) or 2
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [("logits", "FP32", [-1, labels])]
        for binary in (True, False):  # the binary tensor extension (tritonclient's default) and plain JSON
            result = client.infer(
                "text", v2_inputs(feed, binary), outputs=[http.InferRequestedOutput("logits", binary_data=binary)]
            )
            np.testing.assert_allclose(result.as_numpy("logits"), expected["logits"], rtol=0, atol=1e-5)
        ids, mask = feed["input_ids"], feed["attention_mask"]
        assert_error(
            lambda: client.infer("text", v2_inputs({"token_ids": ids, "attention_mask": mask}, True)),
            "400",
            "unknown input 'token_ids'",
        )
        assert_error(
            lambda: client.infer("text", v2_inputs({"input_ids": ids}, True)), "400", "missing input 'attention_mask'"
        )
        as_float = {"input_ids": ids.astype(np.float32), "attention_mask": mask}
        assert_error(lambda: client.infer("text", v2_inputs(as_float, True)), "400", "datatype 'FP32'", "INT64")
        flat = {"input_ids": ids.ravel(), "attention_mask": mask.ravel()}
        assert_error(lambda: client.infer("text", v2_inputs(flat, True)), "400", "rank 2")
        long = {k: np.tile(v, (1, 600)) for k, v in feed.items()}  # beyond the exported sequence range
        assert_error(lambda: client.infer("text", v2_inputs(long, True)), "400", "axis 'sequence'")
        assert_error(lambda: client.get_model_metadata("other"), "404", "unknown model 'other'")
        bad = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 8], "data": [1, 2, 3]}]}
        assert post(url, json.dumps(bad).encode()) == (
            400,
            {"error": "input 'input_ids' has 3 values; shape [1, 8] needs 8"},
        )
        assert post(url, b"{not json")[0] == 400
        result = client.infer("text", v2_inputs(feed, True))  # still serving after the bad requests
        np.testing.assert_allclose(result.as_numpy("logits"), expected["logits"], rtol=0, atol=1e-5)


def test_openvino_audio_bundle_answers_a_v2_client_as_run_does(bundles: dict[str, Path]) -> None:
    bundle = bundles["audio"]
    clip = sorted(p for p in bundled_path(Modality.AUDIO, "evaluation").iterdir() if p.suffix in (".wav", ".flac"))[0]
    feed, expected = run_feed(bundle, clip)
    with served(bundle, "asr") as (client, _url):
        meta = client.get_model_metadata("asr")
        inputs = [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]]
        assert inputs == [("input_values", "FP32", [-1, -1]), ("attention_mask", "INT64", [-1, -1])]
        assert meta["outputs"][0]["name"] == "logits" and meta["outputs"][0]["shape"][:2] == [-1, -1]
        result = client.infer("asr", v2_inputs(feed, True))  # no outputs named: all of them, as binary data
        np.testing.assert_allclose(result.as_numpy("logits"), expected["logits"], rtol=0, atol=1e-5)
        short = {k: v[:, :100] for k, v in feed.items()}  # shorter than the exported range
        assert_error(lambda: client.infer("asr", v2_inputs(short, True)), "400", "axis 'samples'")
        assert_padded_batch_answers_as_each_clip_alone(client, feed)
        assert client.is_server_live()


def assert_padded_batch_answers_as_each_clip_alone(client: Any, feed: dict[str, np.ndarray]) -> None:
    """Two clips of different lengths in one v2 request, the shorter zero-padded with 0 in ``attention_mask``: each row's
    logits on its own frames are what the clip gives alone (the frame-level mask, docs/bundles.md "Padding and masks")."""
    values = feed["input_values"][:, : int(feed["attention_mask"].sum())]
    n, cut = values.shape[1], values.shape[1] * 2 // 3
    shorter = np.pad(values[:, :cut], ((0, 0), (0, n - cut)))
    mask = np.ones((2, n), dtype=np.int64)
    mask[1, cut:] = 0
    both = client.infer(
        "asr", v2_inputs({"input_values": np.concatenate([values, shorter]), "attention_mask": mask}, True)
    )
    for row, length in enumerate((n, cut)):
        alone = {
            "input_values": np.ascontiguousarray(values[:, :length]),
            "attention_mask": np.ones((1, length), dtype=np.int64),
        }
        single = client.infer("asr", v2_inputs(alone, True)).as_numpy("logits")[0]
        assert single.shape[0] == (length - 400) // 320 + 1
        np.testing.assert_allclose(both.as_numpy("logits")[row, : single.shape[0]], single, rtol=0, atol=1e-4)


def test_a_taken_port_is_a_one_line_usage_error(bundles: dict[str, Path]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = cli("serve", str(bundles["text"]), "--port", str(taken.getsockname()[1]))
    assert r.returncode == ExitCode.USAGE, r.stderr
    assert "cannot listen on 127.0.0.1" in r.stderr and "--port" in r.stderr
