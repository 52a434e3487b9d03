"""What a run is asked to do, and the library's decisions about it: the options dataclasses, their
validation, and how a device profile merges into them ("explicit wins").

    from d2v_export.options import QuantOptions, RunOptions, ShapeRequest, apply_profile
    options, shapes = apply_profile(RunOptions(output=Path("out")), ShapeRequest(), load_profile("xeon-vnni"))

The command line only turns its flags into these objects; every rule lives here, so ``pipeline.run``,
``matrix.run_matrix`` and the CLI decide alike. A bad value is a one-line ``D2VError`` (exit 2, a bad
option) raised when the object is made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping

from . import backends
from .measure.bench import BenchSettings
from .spec import CALIBRATION_METHODS, QUANT_MODES, D2VError, ExitCode, Precision, QuantConfig

Range = tuple[float, float, float]


def _bad(message: str) -> D2VError:
    return D2VError(message, ExitCode.USAGE)


@dataclass(frozen=True)
class ShapeRequest:
    """Shape options as the user gave them; None means the default for the model."""

    batch: Range | None = None
    sequence: Range | None = None  # tokens (text)
    choices: Range | None = None  # answers per question (multiple choice)
    audio_seconds: Range | None = None
    image_size: int | None = None


@dataclass(frozen=True)
class QuantOptions:
    """INT8 as the user asked for it: the neutral config (``config``: mode, method), the samples it is calibrated and judged
    on, the drift budget, and each target's own settings (``target_options``). Each target plans its recipes from it
    (``Backend.plan``)."""

    mode: str = "static"  # "static" (calibrated activations) | "dynamic" (what each target does without calibration)
    method: str = "minmax"  # static calibration: minmax | entropy | percentile
    calibration: Path | None = None  # None: the bundled real samples
    samples: int = 32  # calibration samples
    evaluation: Path | None = None  # held-out samples; None: the bundled evaluation split
    eval_samples: int = 16
    # {role: column} for metadata files and datasets (calibration.hf)
    columns: Mapping[str, str] = field(default_factory=dict)
    budget: Mapping[str, float] = field(default_factory=dict)  # overrides of metrics.DEFAULT_BUDGETS
    # metric -> confidence it must be over budget with to fail
    confidence: Mapping[str, float] = field(default_factory=dict)
    fallback: bool = False  # return the most sensitive nodes to float until the budget holds
    seed: int = 0
    # a target's own INT8 settings by name (Backend.int8_options)
    target_options: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from .measure.metrics import METRICS

        for name, value, allowed in (("mode", self.mode, QUANT_MODES), ("method", self.method, CALIBRATION_METHODS)):
            if value not in allowed:
                raise _bad(f"INT8 {name} '{value}': choose one of {', '.join(allowed)}")
        declared = backends.int8_options()
        for name, value in self.target_options.items():
            if name not in declared:
                raise _bad(f"INT8 setting '{name}' is no target's; known: {', '.join(sorted(declared)) or 'none'}")
            declared[name].check(value)  # the target's own choices (exit 2)
        for name, count in (("samples", self.samples), ("eval_samples", self.eval_samples)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise _bad(f"INT8 {name} {count!r}: give a whole number of at least 1")
        unknown = sorted((set(self.budget) | set(self.confidence)) - set(METRICS))
        if unknown:
            raise _bad(
                f"drift budget for unknown metric(s) {', '.join(unknown)}; choose from: {', '.join(sorted(METRICS))}"
            )

    @property
    def config(self) -> QuantConfig:
        """The neutral INT8 config of this run (``samples``: the calibration samples asked for)."""
        return QuantConfig(mode=self.mode, method=self.method, samples=self.samples)

    def int8_only_settings(self) -> tuple[str, ...]:
        """The settings given here that only an INT8 build uses (the CLI names them as its flags)."""
        return tuple(
            name
            for name, given in (
                ("calibration", self.calibration is not None),
                ("evaluation", self.evaluation is not None),
                ("columns", bool(self.columns)),
                ("budget", bool(self.budget)),
                ("fallback", self.fallback),
            )
            if given
        )


@dataclass(frozen=True)
class RunOptions:
    output: Path
    targets: tuple[str, ...] = (backends.DEFAULT,)
    force: bool = False
    threads: int = 0  # 0: every core this process may use
    bench: BenchSettings = field(default_factory=BenchSettings)
    int8: QuantOptions | None = None  # None: float variants only (``pick`` implies QuantOptions())
    baseline: Path | None = None  # a report.json (or its folder) to compare against
    latency_tolerance: float = 0.10
    drift_tolerance: float = 0.005
    relative_to_reference: bool = False
    device: str | None = None  # every target's --device; None: each target's own default (Backend.devices.default)
    # target -> its device (--device TARGET=DEVICE), over ``device``
    devices: Mapping[str, str] = field(default_factory=dict)
    profile: Any = None  # a profiles.DeviceProfile whose latency budget becomes a verdict (see apply_profile)
    half: tuple[Precision, ...] = ()  # extra float precisions (fp16, bf16) for the targets that support them
    # targets that can defer (Backend.can_defer) write their portable half, without their runtime here
    defer_build: bool = False
    rewrite: bool = True  # the exact graph clean-up (d2v_export.int8.rewrite) for the targets that ask for it
    # build every target's candidate recipes, ship the fastest within the drift budget (d2v_export.int8.pick)
    pick: bool = False

    def __post_init__(self) -> None:
        targets = tuple(dict.fromkeys(self.targets))  # a target named twice is built once
        if not targets:
            raise _bad(f"no target: name at least one (e.g. {backends.DEFAULT})")
        object.__setattr__(self, "targets", targets)
        half = tuple(dict.fromkeys(Precision(p) for p in self.half))
        if any(p not in (Precision.FP16, Precision.BF16) for p in half):
            raise _bad(f"half precisions are fp16 and bf16, got {', '.join(p.value for p in half)}")
        object.__setattr__(self, "half", half)
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise _bad(f"threads {self.threads!r}: give 0 (every core) or a positive number")
        if self.pick and self.int8 is None:
            object.__setattr__(self, "int8", QuantOptions())  # the candidates are INT8 recipes (fp32 competes too)
        _check_devices(self)

    def device_for(self, target: str) -> str:
        """The device ``target`` builds for and is measured on: its own --device, else the plain one, else its default."""
        return self.devices.get(target) or self.device or backends.get(target).devices.default


def _check_devices(options: RunOptions) -> None:
    """Every device names a target of the run and is one that target takes (``Backend.devices``): else exit 2.

    Whether the device is present here is the backend's question (``Backend.resolve_device``), asked
    by ``pipeline.run`` before any work."""
    stray = sorted(set(options.devices) - set(options.targets))
    if stray:
        raise _bad(
            f"--device {stray[0]}=...: {stray[0]} is not a target of this run ({', '.join(options.targets)}); "
            f"add --target {stray[0]} or drop that --device"
        )
    for target in options.targets:
        if target in backends.names():
            backend = backends.get(target)
            device = options.device_for(target)
            if not backend.devices.accepts(device.strip()):
                raise backend.devices.refuse(target, device)


def parse_devices(values: Collection[str]) -> tuple[str | None, dict[str, str]]:
    """``--device`` values -> (the plain device for every target, {target: device}).

    ``["CPU", "TARGET=GPU"]``: at most one plain value, one per target; a target name must be a known
    target (``backends.names()``). Which device a target takes is checked by ``RunOptions``."""
    plain: list[str] = []
    per_target: dict[str, str] = {}
    for raw in values:
        name, sep, device = (s.strip() for s in str(raw).partition("="))
        if not sep:
            plain.append(name)
            continue
        if name not in backends.names():
            raise _bad(
                f"--device '{raw}': '{name}' is not a target; use TARGET=DEVICE with TARGET one of: {', '.join(backends.names())}"
            )
        if not device or per_target.get(name, device) != device:
            raise _bad(
                f"--device '{raw}': give {name} one device, e.g. --device {name}={backends.get(name).devices.default}"
            )
        per_target[name] = device
    if len(set(plain)) > 1 or "" in plain:
        raise _bad(
            f"--device: one plain device for every target ({', '.join(plain) or 'empty'} given); name the others per target, TARGET=DEVICE"
        )
    return (plain[0] if plain else None), per_target


def require_int8(int8: QuantOptions | None, settings: QuantOptions, *, enable: str = "--int8") -> None:
    """INT8-only settings (calibration, evaluation, columns, budgets, fallback) when no INT8 is built: a mistake, said early."""
    if int8 is None and settings.int8_only_settings():
        raise D2VError(f"--calibration, --eval, --columns, --max-drift and --fallback apply to INT8; add {enable}")


def apply_profile(
    options: RunOptions,
    shapes: ShapeRequest,
    profile: Any,
    *,
    explicit: Collection[str] | None = None,
    int8: QuantOptions | None = None,
) -> tuple[RunOptions, ShapeRequest]:
    """A device profile's targets, threads, device, shapes, INT8 and half precision wherever the caller was silent.

    Explicit wins. A setting counts as given when ``explicit`` names it ("targets", "device", "int8",
    "int8.mode"), or, with ``explicit=None``, when it differs from ``RunOptions``' default (``int8.mode``:
    from "static"); threads are given when not 0. Shapes the caller left None take the profile's. When the profile builds INT8
    and INT8 was not asked for explicitly (``--pick`` alone implies it, not asks for it), INT8 is turned on
    with ``options.int8`` or ``int8`` (default ``QuantOptions()``) and the profile's ``quantize`` mode
    unless "int8.mode" was given. The result carries the profile, whose
    latency budget ``pipeline.run`` turns into a verdict (``Report.exit_code`` 8 when over it).
    """
    defaults = RunOptions(output=options.output)

    def given(name: str) -> bool:
        if explicit is not None:
            return name in explicit
        if name == "int8.mode":
            return (options.int8 or int8 or QuantOptions()).mode != QuantOptions().mode
        return bool(getattr(options, name) != getattr(defaults, name))

    changes: dict[str, Any] = {"profile": profile}
    if not given("targets"):
        changes["targets"] = tuple(profile.targets)
    changes["threads"] = options.threads or profile.threads
    targets = changes.get("targets", options.targets)
    if not given("device") and profile.device and profile.backend in targets:  # the profile's device is its backend's
        changes["devices"] = {profile.backend: profile.device, **options.devices}
    if profile.int8 and (options.int8 is None or not given("int8")):
        quant = options.int8 or int8 or QuantOptions()
        if profile.quantize and not given("int8.mode"):
            quant = dataclasses.replace(quant, mode=profile.quantize)
        changes["int8"] = quant
    if profile.precision in (Precision.FP16, Precision.BF16) and profile.precision not in options.half:
        changes["half"] = (*options.half, profile.precision)
    return dataclasses.replace(options, **changes), profile.shape_request(shapes)
