"""Device profiles: a target device described as data (the top-level `targets/NAME.toml`).

    profile = load_profile("xeon-vnni")          # or a path to any .toml file
    profile.targets, profile.precision, profile.device, profile.threads
    shapes = profile.shape_request(ShapeRequest(batch=None, ...))   # fills what the user left out
    verdict = profile.latency_verdict(Modality.TEXT, variant.latency)

A profile file holds (see docs/bundles.md):

    name, description, notes                     text
    backend     = a --target name               (d2v-export doctor lists them)
    precision   = "fp32" | "fp16" | "bf16" | "int8"   (one the backend builds: Backend.precisions)
    quantize    = "static" | "dynamic"          int8 only; default static; one the backend builds
    device      = "CPU" | "GPU" | "cuda:0" ...  (one the backend takes: Backend.devices; default its own)
    threads     = 0                             0: every core available
    requires_cpu_flags = ["avx512_vnni"]        checked by `doctor` and reported, never enforced
    latency_percentile = "p90"                  p50 | p90 | p99
    [shapes]            batch, sequence, choices = [MIN, OPT, MAX] (ints); audio_seconds = [MIN, OPT, MAX]
    [latency_budget_ms] vision, text, audio = milliseconds at the opt shape

The wheel ships `targets/` as `d2v_export/targets_data` (pyproject force-include); a source checkout
reads `targets/` directly.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from . import backends
from .spec import D2VError, LatencyStats, Modality, Precision

_TOP_KEYS = {
    "name",
    "description",
    "backend",
    "precision",
    "quantize",
    "device",
    "threads",
    "requires_cpu_flags",
    "notes",
    "latency_percentile",
    "shapes",
    "latency_budget_ms",
}
_SHAPE_KEYS = {"batch": int, "sequence": int, "choices": int, "audio_seconds": float}
_PERCENTILES = ("p50", "p90", "p99")

Range = tuple[float, float, float]


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    backend: str  # the --target it selects
    precision: Precision
    device: str
    threads: int  # 0: every core available
    quantize: str | None = None  # "static" | "dynamic" for int8, else None
    batch: tuple[int, int, int] | None = None
    sequence: tuple[int, int, int] | None = None
    choices: tuple[int, int, int] | None = None
    audio_seconds: Range | None = None
    latency_budget_ms: Mapping[str, float] = field(default_factory=dict)  # modality -> ms
    latency_percentile: str = "p90"
    requires_cpu_flags: tuple[str, ...] = ()
    description: str = ""
    notes: str = ""
    path: Path | None = None  # where it was read from (None inside a zipped install)

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.backend,)

    @property
    def int8(self) -> bool:
        return self.precision is Precision.INT8

    def shape_request(self, given: Any | None = None) -> Any:
        """A pipeline.ShapeRequest: the profile's shapes where ``given`` (the user's options) has None."""
        from .options import ShapeRequest

        given = given if given is not None else ShapeRequest()
        mine = {
            "batch": self.batch,
            "sequence": self.sequence,
            "choices": self.choices,
            "audio_seconds": self.audio_seconds,
        }
        values = {k: getattr(given, k) if getattr(given, k) is not None else v for k, v in mine.items()}
        return ShapeRequest(image_size=given.image_size, **values)

    def latency_budget(self, modality: Modality | str) -> float | None:
        return self.latency_budget_ms.get(Modality(modality).value)

    def latency_verdict(
        self, modality: Modality | str, latency: LatencyStats | Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """{"profile", "budget_ms", "percentile", "measured_ms", "passed", "detail"} for report.json.

        ``latency`` is a LatencyStats or report.json's ``latency_ms`` dict; ``passed`` is None when
        the profile has no budget for the modality or no latency was measured.
        """
        budget = self.latency_budget(modality)
        measured = None
        if latency is not None:
            measured = (
                getattr(latency, self.latency_percentile, None)
                if isinstance(latency, LatencyStats)
                else latency.get(self.latency_percentile)
            )
        out: dict[str, Any] = {
            "profile": self.name,
            "budget_ms": budget,
            "percentile": self.latency_percentile,
            "measured_ms": measured,
        }
        if budget is None:
            return out | {
                "passed": None,
                "detail": f"profile {self.name} sets no latency budget for {Modality(modality).value}",
            }
        if measured is None:
            return out | {"passed": None, "detail": "latency was not measured"}
        passed = float(measured) <= budget
        word = "within" if passed else "over"
        detail = f"{self.latency_percentile} {float(measured):.2f} ms {word} the {budget:g} ms budget of {self.name}"
        return out | {"passed": passed, "detail": detail}


# --------------------------------------------------------------------------------------- finding


def _roots() -> list[Any]:
    """Folders that hold profiles: the wheel's targets_data, then a source checkout's targets/."""
    roots: list[Any] = []
    try:
        ref = resources.files("d2v_export") / "targets_data"
        if ref.is_dir():
            roots.append(ref)
    except (ModuleNotFoundError, OSError):
        pass
    checkout = Path(__file__).resolve().parents[1] / "targets"
    if checkout.is_dir():
        roots.append(checkout)
    return roots


def _catalog() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for root in _roots():
        for entry in sorted(root.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".toml") and entry.is_file() and not entry.name.startswith("."):
                found.setdefault(entry.name[: -len(".toml")], entry)
    return found


def list_profiles() -> tuple[str, ...]:
    """Names of the bundled profiles, sorted."""
    return tuple(sorted(_catalog()))


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A bundled profile by name (``xeon-vnni``) or any TOML file by path. One-line D2VError when wrong."""
    text_name = str(name_or_path)
    path = Path(text_name).expanduser()
    if text_name.endswith(".toml") or "/" in text_name or "\\" in text_name or (path.is_file() and path.suffix):
        if not path.is_file():
            raise D2VError(
                f"device profile '{text_name}' does not exist; pass a .toml file or one of: {', '.join(list_profiles())}"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise D2VError(
                f"device profile '{path}' cannot be read ({exc.__class__.__name__}); pass a UTF-8 .toml file"
            ) from None
        return parse_profile(text, default_name=path.stem, where=str(path), path=path.resolve())
    catalog = _catalog()
    entry = catalog.get(text_name)
    if entry is None:
        raise D2VError(
            f"unknown device profile '{text_name}'; choose one of: {', '.join(sorted(catalog)) or 'none installed'}, or pass a .toml file"
        )
    where = str(entry) if isinstance(entry, Path) else f"targets/{entry.name}"
    profile = parse_profile(
        entry.read_text(encoding="utf-8"),
        default_name=text_name,
        where=where,
        path=entry if isinstance(entry, Path) else None,
    )
    if profile.name != text_name:
        raise D2VError(
            f"device profile {where} says name = '{profile.name}', its file name says '{text_name}'; make them agree"
        )
    return profile


# --------------------------------------------------------------------------------------- parsing


def parse_profile(text: str, *, default_name: str, where: str, path: Path | None = None) -> DeviceProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise D2VError(f"device profile {where} is not valid TOML ({exc}); fix the file") from None

    def bad(what: str) -> D2VError:
        return D2VError(f"device profile {where}: {what}")

    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise bad(f"unknown field '{unknown[0]}'; fields are: {', '.join(sorted(_TOP_KEYS))}")
    name = _string(data, "name", default_name, bad)
    backend, precision, quantize, device = _what_builds(data, bad)
    threads = data.get("threads", 0)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise bad(f"threads must be a whole number >= 0 (0: every core), got {threads!r}")
    percentile = _string(data, "latency_percentile", "p90", bad)
    if percentile not in _PERCENTILES:
        raise bad(f"latency_percentile '{percentile}' is unknown; choose one of: {', '.join(_PERCENTILES)}")
    flags = data.get("requires_cpu_flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) and f for f in flags):
        raise bad('requires_cpu_flags must be a list of /proc/cpuinfo flag names, e.g. ["avx512_vnni"]')

    shapes = data.get("shapes", {})
    if not isinstance(shapes, dict):
        raise bad("[shapes] must be a table")
    unknown = sorted(set(shapes) - set(_SHAPE_KEYS))
    if unknown:
        raise bad(f"unknown shape '{unknown[0]}' in [shapes]; use: {', '.join(_SHAPE_KEYS)}")
    ranges = {key: _range(shapes[key], key, kind, bad) for key, kind in _SHAPE_KEYS.items() if key in shapes}
    if "audio_seconds" in ranges and ranges["audio_seconds"][0] < 0.05:
        raise bad("[shapes] audio_seconds: the minimum must be at least 0.05 s (the convolutional front end)")

    budget = data.get("latency_budget_ms", {})
    if not isinstance(budget, dict):
        raise bad("[latency_budget_ms] must be a table of modality = milliseconds")
    modalities = [m.value for m in Modality]
    clean: dict[str, float] = {}
    for key, value in budget.items():
        if key not in modalities:
            raise bad(f"unknown modality '{key}' in [latency_budget_ms]; use: {', '.join(modalities)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise bad(f"[latency_budget_ms] {key} must be a positive number of milliseconds, got {value!r}")
        clean[key] = float(value)
    return DeviceProfile(
        name=name,
        backend=backend,
        precision=precision,
        device=device,
        threads=int(threads),
        quantize=quantize,
        batch=ranges.get("batch"),  # type: ignore[arg-type]
        sequence=ranges.get("sequence"),  # type: ignore[arg-type]
        choices=ranges.get("choices"),  # type: ignore[arg-type]
        audio_seconds=ranges.get("audio_seconds"),
        latency_budget_ms=clean,
        latency_percentile=percentile,
        requires_cpu_flags=tuple(flags),
        description=_string(data, "description", "", bad),
        notes=_string(data, "notes", "", bad).strip(),
        path=path,
    )


def _what_builds(data: Mapping[str, Any], bad: Any) -> tuple[str, Precision, str | None, str]:
    """(backend, precision, quantize, device), each checked against what the backend declares it builds and takes."""
    backend = _string(data, "backend", None, bad)
    if backend not in backends.names():
        raise bad(f"backend '{backend}' is not a target; choose one of: {', '.join(backends.names())}")
    target = backends.get(backend)
    raw_precision = _string(data, "precision", "fp32", bad)
    try:
        precision = Precision(raw_precision)
    except ValueError:
        raise bad(
            f"precision '{raw_precision}' is unknown; choose one of: {', '.join(p.value for p in Precision)}"
        ) from None
    if precision not in target.precisions:
        raise bad(
            f"{backend} does not build {precision.value}; choose one of: {', '.join(p.value for p in target.precisions)}"
        )
    quantize = data.get("quantize")
    if precision is Precision.INT8:
        quantize = "static" if quantize is None else quantize
        if quantize not in ("static", "dynamic"):
            raise bad(f"quantize '{quantize}' is unknown; choose static or dynamic")
        if quantize not in target.int8_recipes:
            raise bad(f"{backend} has no {quantize} int8; choose {' or '.join(target.int8_recipes)}")
    elif quantize is not None:
        raise bad(
            f'quantize applies to precision = "int8" only; remove it or set the precision to int8 (it is {precision.value})'
        )
    device = _string(data, "device", target.devices.default, bad)
    if not target.devices.accepts(device):
        raise bad(f"device '{device}' does not fit backend {backend}; use {target.devices.choices}")
    return backend, precision, quantize, device


def _string(data: Mapping[str, Any], key: str, default: str | None, bad: Any) -> str:
    value = data.get(key, default)
    if value is None:
        raise bad(f"'{key}' is missing; add {key} = \"...\"")
    if not isinstance(value, str):
        raise bad(f"'{key}' must be a string, got {value!r}")
    return value


def _range(value: Any, key: str, kind: type, bad: Any) -> tuple[Any, Any, Any]:
    items = [value] * 3 if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    ok = (
        isinstance(items, list)
        and len(items) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items)
    )
    if ok and kind is int:
        ok = all(float(v).is_integer() for v in items)
    if not ok or not (0 < items[0] <= items[1] <= items[2]):
        unit = "whole numbers" if kind is int else "numbers"
        raise bad(
            f"[shapes] {key} must be [MIN, OPT, MAX] {unit} with 0 < MIN <= OPT <= MAX (or one number), got {value!r}"
        )
    return tuple(kind(v) for v in items)  # type: ignore[return-value]


def missing_cpu_flags(profile: DeviceProfile) -> tuple[str, ...]:
    """The profile's required CPU flags this machine lacks (empty off Linux: unknown, not missing)."""
    from .doctor import cpu_flags

    have = cpu_flags()
    if not have:
        return ()
    return tuple(f for f in profile.requires_cpu_flags if f not in have)
