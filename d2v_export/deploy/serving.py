"""Model-server layouts of a bundle (`d2v-export deploy`): a Triton Inference Server model repository and an
OpenVINO Model Server (OVMS) model folder, written from the bundle's manifest.

    write_triton(bundle, repository)   # repository/<name>/config.pbtxt + repository/<name>/1/<model files>
    write_ovms(bundle, root)           # root/<name>/1/<IR files> + root/config.json (OVMS multi-model)

config.pbtxt comes from the export's shape profile as the manifest records it: ``max_batch_size`` is the
profile's largest batch and the batch axis is left out of ``dims`` (with ``dynamic_batching``) when every input
and output starts with a dynamic batch axis; otherwise ``max_batch_size: 0`` and the full shapes. A dynamic
axis is -1, a fixed one its size; data types map from the graph's element types. Which Triton backend loads a
target, which files go into the version folder and whether OVMS takes it is the target's own answer
(``BackendBase.serving``, a ``backends.base.ServingLayout``; a plug-in without it has no layout). Needs only the standard library and the bundle.

Each model folder is written in a hidden staging folder beside it and renamed into place at the end, so a
repository holds whole models only; several bundles can be deployed into one repository under different names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import backends
from .bundle import Manifest, verify
from ..spec import D2VError, ExitCode

VERSION = "1"  # the model version folder the writers fill
OVMS_CONFIG = "config.json"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float64": "TYPE_FP64",
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "int16": "TYPE_INT16",
    "int8": "TYPE_INT8",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "bool": "TYPE_BOOL",
}


def _layout(manifest: Manifest, server: str, wants: str = "triton") -> Any:
    """The bundle target's ServingLayout for ``server``, or a one-line D2VError naming the targets that have one."""
    try:
        layout = getattr(backends.get(manifest.target), "serving", None)
    except D2VError:
        layout = None
    if layout is not None and (wants != "ovms" or layout.ovms):
        return layout
    offered = [
        n
        for n in backends.names()
        if (lay := getattr(backends.get(n), "serving", None)) is not None and (wants != "ovms" or lay.ovms)
    ]
    raise D2VError(
        f"bundle '{manifest.folder}' is for target '{manifest.target}', which has no {server} layout; "
        f"deploy a bundle of {', '.join(offered) or 'no target here'} (export with that --target)",
        ExitCode.BAD_INPUT,
    )


def model_name(manifest: Manifest, name: str | None) -> str:
    """``name`` or the bundle folder's name, checked as a model name both servers take (it names a folder)."""
    chosen = name if name is not None else manifest.folder.resolve().name
    if not _NAME.fullmatch(chosen):
        raise D2VError(
            f"model name '{chosen}' is not a plain folder name (letters, digits, '_', '.', '-'); pass --name",
            ExitCode.USAGE,
        )
    return chosen


# --------------------------------------------------------------------------------------- config.pbtxt


def _batch_axis(manifest: Manifest) -> tuple[str, int] | None:
    """(axis name, its max) when every input and output starts with the same dynamic axis (the batch), else None."""
    first = {str(t["shape"][0]) if t.get("shape") else "" for t in (*manifest.inputs, *manifest.outputs)}
    if len(first) != 1:
        return None
    axis = first.pop()
    found = [(t.get("dynamic") or {}).get(axis) for t in manifest.inputs]
    ranges = [r for r in found if r is not None]
    if (
        not ranges or len(ranges) < len(found) or any(int(r["min"]) == int(r["max"]) for r in ranges)
    ):  # min == max: baked in
        return None
    return axis, min(int(r["max"]) for r in ranges)


def tensor_dims(tensor: Mapping[str, Any], skip_first: bool) -> list[int]:
    """The tensor's dims as Triton writes them: -1 for a dynamic axis, the size of a fixed one (a range with
    min == max is one number the exporter baked in)."""
    fixed = dict(tensor.get("fixed") or {})
    fixed |= {
        axis: int(r["min"]) for axis, r in (tensor.get("dynamic") or {}).items() if int(r["min"]) == int(r["max"])
    }
    dims = [axis if isinstance(axis, int) else int(fixed.get(axis, -1)) for axis in tensor.get("shape") or ()]
    return dims[1:] if skip_first else dims


def _triton_type(manifest: Manifest, tensor: Mapping[str, Any]) -> str:
    dtype = str(tensor.get("dtype", ""))
    if dtype not in TRITON_TYPES:
        raise D2VError(
            f"bundle '{manifest.folder}' has tensor '{tensor['name']}' of type '{dtype}', which Triton has no type for; rebuild it"
        )
    return TRITON_TYPES[dtype]


def _tensors(manifest: Manifest, key: str, tensors: Sequence[Mapping[str, Any]], skip_first: bool) -> list[str]:
    lines = [f"{key} ["]
    for i, t in enumerate(tensors):
        dims = ", ".join(str(d) for d in tensor_dims(t, skip_first))
        lines += [
            "  {",
            f"    name: {json.dumps(str(t['name']))}",
            f"    data_type: {_triton_type(manifest, t)}",
            f"    dims: [ {dims} ]",
        ]
        lines.append("  }," if i + 1 < len(tensors) else "  }")
    return lines + ["]"]


def triton_config(manifest: Manifest, name: str, layout: Any) -> str:
    """config.pbtxt (protobuf text of Triton's ModelConfig) for the bundle, from its manifest."""
    key, value = layout.triton
    batch = _batch_axis(manifest)
    ranges = ", ".join(f"{axis} {lo}..{hi}" for axis, (lo, _opt, hi) in manifest.dims().items())
    lines = [
        f"# d2v-export deploy: {manifest.modality.value} {manifest.task} ({manifest.class_name}), {manifest.target} {manifest.precision}",
        f"# from bundle '{manifest.folder.name}'; dynamic axes (-1) accept {ranges or 'no range: all axes fixed'}",
        f"name: {json.dumps(name)}",
        f"{key}: {json.dumps(value)}",
    ]
    if any(dst == "model.xml" for _src, dst in layout.files):
        lines.append('default_model_filename: "model.xml"')
    lines.append(f"max_batch_size: {batch[1] if batch else 0}")
    lines += _tensors(manifest, "input", manifest.inputs, batch is not None)
    lines += _tensors(manifest, "output", manifest.outputs, batch is not None)
    if batch is not None:
        lines += ["dynamic_batching { }"]
    lines += ["instance_group [", "  {", "    count: 1", f"    kind: {layout.instance_kind}", "  }", "]"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- writing


@contextmanager
def _model_folder(root: Path, name: str, force: bool) -> Iterator[Path]:
    """A staging folder that becomes ``root/name`` when the body succeeds; removed on any failure."""
    if root.exists() and not root.is_dir():
        raise D2VError(f"'{root}' is a file; give a folder for the repository")
    final = root / name
    _refuse_existing(final, force)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=root))
    try:
        tmp.chmod(0o777 & ~_umask())
        yield tmp
        old = root / f".{name}.old-{os.getpid()}"
        if final.exists():
            final.rename(old)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _refuse_existing(final: Path, force: bool) -> None:
    if final.exists() and not force:
        raise D2VError(f"'{final}' already exists; pass --force to replace it or choose another --name")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _copy_model_files(manifest: Manifest, layout: Any, version: Path) -> list[str]:
    """Copy the files Triton loads into the version folder; returns their names there."""
    listed = {f.path for f in manifest.files}
    model = Path(manifest.model_file)
    copied = []
    for i, (src_pattern, dst_pattern) in enumerate(layout.files):
        src = src_pattern.format(name=model.name, stem=model.stem)
        rel = (model.parent / src).as_posix()
        if rel not in listed:
            if i == 0:
                raise D2VError(f"bundle '{manifest.folder}' has no '{rel}' to serve; rebuild it")
            continue
        dst = dst_pattern.format(name=model.name, stem=model.stem)
        shutil.copyfile(manifest.folder / rel, version / dst)
        copied.append(dst)
    return copied


def write_triton(bundle: Path, repository: Path, *, name: str | None = None, force: bool = False) -> Path:
    """Write ``repository/<name>/`` (config.pbtxt, ``1/`` with the model files) for a bundle; returns that folder.

    A target whose file is built on the device (TensorRT's engine) gets the config and an empty version folder, and
    ``repository/install_plan_<name>.sh`` that copies the engine in once build_engine.sh has built it."""
    manifest = verify(Path(bundle))
    layout = _layout(manifest, "Triton Inference Server")
    chosen = model_name(manifest, name)
    config = triton_config(manifest, chosen, layout)
    with _model_folder(Path(repository), chosen, force) as tmp:
        (tmp / "config.pbtxt").write_text(config, encoding="utf-8")
        version = tmp / VERSION
        version.mkdir()
        _copy_model_files(manifest, layout, version)
    if layout.deferred is not None:
        _write_install_script(manifest, layout, Path(repository), chosen)
    return Path(repository) / chosen


def install_script(bundle: Path, name: str, built: str, dst: str) -> str:
    """The script that copies the engine built on the device from ``bundle`` into ``<repository>/<name>/1/``."""
    return f"""#!/usr/bin/env sh
# Copy the engine that build_engine.sh built in the bundle into this Triton model repository (d2v-export deploy).
# Run it on the device after `bash BUNDLE/build_engine.sh`: an engine is tied to the GPU and the runtime version
# that built it, and Triton's backend must run that same version.
# Usage: sh install_plan_{name}.sh [BUNDLE]   (default: the bundle this repository was written from)
set -eu
bundle="${{1:-{bundle}}}"
here="$(cd "$(dirname "$0")" && pwd)"
if [ ! -f "$bundle/{built}" ]; then
    echo "error: '$bundle/{built}' not found: build the engine first (bash '$bundle/build_engine.sh' on the device) or pass the bundle folder" >&2
    exit 3
fi
cp "$bundle/{built}" "$here/{name}/{VERSION}/.{dst}.partial"
mv -f "$here/{name}/{VERSION}/.{dst}.partial" "$here/{name}/{VERSION}/{dst}"
echo "installed $here/{name}/{VERSION}/{dst}"
"""


def _write_install_script(manifest: Manifest, layout: Any, repository: Path, name: str) -> None:
    built, dst = layout.deferred
    path = repository / f"install_plan_{name}.sh"
    tmp = repository / f".{path.name}.partial"
    tmp.write_text(install_script(manifest.folder.resolve(), name, built, dst), encoding="utf-8")
    tmp.chmod(0o777 & ~_umask())
    os.replace(tmp, path)


def write_ovms(bundle: Path, root: Path, *, name: str | None = None, force: bool = False) -> Path:
    """Write ``root/<name>/1/`` with the bundle's IR files for OpenVINO Model Server and add the model to
    ``root/config.json`` (OVMS's multi-model config; base_path relative to it). Returns the model folder."""
    manifest = verify(Path(bundle))
    _layout(manifest, "OpenVINO Model Server", wants="ovms")
    chosen = model_name(manifest, name)
    root = Path(root)
    config = _ovms_config(root, chosen)
    model = Path(manifest.model_file)
    sources = [
        f.path for f in manifest.files if Path(f.path).parent == model.parent and Path(f.path).stem == model.stem
    ]
    with _model_folder(root, chosen, force) as tmp:
        version = tmp / VERSION
        version.mkdir()
        for rel in sources:
            shutil.copyfile(manifest.folder / rel, version / Path(rel).name)
    tmp_config = root / f".{OVMS_CONFIG}.partial"
    tmp_config.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_config, root / OVMS_CONFIG)
    return root / chosen


def _ovms_config(root: Path, name: str) -> dict[str, Any]:
    """root/config.json with ``name`` added (or replaced); a config.json that is not OVMS's is refused."""
    path = root / OVMS_CONFIG
    doc: dict[str, Any] = {"model_config_list": []}
    if path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            doc = {}
        if not isinstance(doc, dict) or not isinstance(doc.get("model_config_list"), list):
            raise D2VError(
                f"'{path}' is not an OpenVINO Model Server config (no model_config_list); choose another folder"
            )
    entries = [
        e for e in doc["model_config_list"] if not (isinstance(e, dict) and (e.get("config") or {}).get("name") == name)
    ]
    entries.append({"config": {"name": name, "base_path": name}})
    return doc | {"model_config_list": entries}


def deploy(
    bundle: Path, *, triton: Path | None = None, ovms: Path | None = None, name: str | None = None, force: bool = False
) -> list[Path]:
    """Write the layouts asked for (``d2v-export deploy``); every check runs before anything is written, so a
    refused layout leaves no other one half done. Returns the model folders written."""
    if triton is None and ovms is None:
        raise D2VError(
            "give --triton REPOSITORY and/or --ovms FOLDER: where to write the server layout", ExitCode.USAGE
        )
    manifest = verify(Path(bundle))
    chosen = model_name(manifest, name)
    for root, server, wants in ((triton, "Triton Inference Server", "triton"), (ovms, "OpenVINO Model Server", "ovms")):
        if root is not None:
            _layout(manifest, server, wants=wants)
            _refuse_existing(Path(root) / chosen, force)
    written = [write_triton(bundle, triton, name=chosen, force=force)] if triton is not None else []
    return written + ([write_ovms(bundle, ovms, name=chosen, force=force)] if ovms is not None else [])
