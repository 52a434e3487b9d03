"""The TensorRT target's own command line: ``d2v-export build-engine`` (added to the CLI through the registry).

The command raises ``D2VError`` like every library call; the CLI wraps it with its error handling (one line,
the documented exit code)."""

from __future__ import annotations

from pathlib import Path

import click

EXAMPLES = """\b
Examples:
  d2v-export vision --target tensorrt --int8 --defer-build --output out/vision   # on any machine
  d2v-export build-engine out/vision/tensorrt-int8-static                        # on the GPU device (e.g. a Jetson)
  d2v-export build-engine out/vision --timing-cache ~/.cache/trt-timing.cache     # every TensorRT bundle in a run
"""


@click.command("build-engine", epilog=EXAMPLES)
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--workspace-gb",
    type=click.FloatRange(min=0.1),
    default=4.0,
    show_default=True,
    help="Builder workspace memory limit.",
)
@click.option(
    "--timing-cache",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Persistent timing cache (default: in the bundle).",
)
@click.option(
    "--iterations", type=click.IntRange(min=1), default=200, show_default=True, help="Timed engine runs after warm-up."
)
@click.option("--device", default="cuda:0", show_default=True, help="CUDA device to build on (cuda:N).")
@click.option(
    "--no-verify", is_flag=True, help="Build a bundle that has no manifest.json (its files are then unchecked)."
)
def build_engine(
    bundle: Path, workspace_gb: float, timing_cache: Path | None, iterations: int, device: str, no_verify: bool
) -> None:
    """Build and benchmark the TensorRT engine of a deferred bundle on this device (needs TensorRT and an NVIDIA GPU)."""
    from .engine import build_engines

    plans = build_engines(
        bundle,
        workspace_gb=workspace_gb,
        timing_cache=timing_cache,
        iterations=iterations,
        device=device,
        verify=not no_verify,
        progress=lambda msg: click.echo(f"[d2v-export] {msg}", err=True),
    )
    for plan in plans:
        click.echo(f"built {plan}")
