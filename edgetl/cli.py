"""The edgetl command line: parse → one library call → one-line result + the next command."""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import EdgetlError

DEFAULT_BACKBONE_ONNX = "exports/backbone.onnx"
DEFAULT_CACHE = "exports/cache"
DEVICE = click.Choice(["auto", "cpu", "cuda"])


class Group(click.Group):
    """Turns library errors into one line and exit 1; Ctrl-C into one line and exit 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgetlError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written was left behind", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgetl")
def main():
    """Transfer learning to the edge: export-backbone → train-head → run."""


@main.command()
@click.argument("pattern", default="*")
def backbones(pattern):
    """List the backbones (optionally matching PATTERN, e.g. 'efficientnet*' or 'timm:resnet*')."""
    from .backbones import describe

    rows = describe(pattern)
    if not rows:
        raise EdgetlError(f"no backbone matches {pattern!r}")
    click.echo(f"{'name':<28} {'dim':>5} {'input':>8} {'params':>10}  offline  note")
    for r in rows:
        params = f"{r['params'] / 1e6:.2f}M" if r["params"] != "" else ""
        click.echo(f"{r['name']:<28} {r['dim']!s:>5} {r['input']:>8} {params:>10}  "
                   f"{'yes' if r['offline'] else 'no':<7}  {r['note']}")


@main.command("export-backbone")
@click.option("--backbone", "name", default="efficientnet_lite0", show_default=True,
              help="Registered name, torchvision:NAME or timm:NAME (see `edgetl backbones`).")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local checkpoint (loaded weights-only).")
@click.option("-o", "--output", default=DEFAULT_BACKBONE_ONNX, show_default=True, type=click.Path(dir_okay=False))
@click.option("--check-images", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Photos for the parity check (default: sample photos shipped with matplotlib).")
def export_backbone_cmd(name, weights, output, check_images):
    """Export a frozen backbone to ONNX: uint8 image[N,H,W,3] → embedding[N,D], parity-checked."""
    from . import backbones, export
    from .files import writable_dir
    from pathlib import Path

    writable_dir(Path(output).parent)
    r = export.export_backbone(backbones.get(name, weights), output, list(check_images) or None)
    h, w = r.spec.input_size
    click.echo(f"wrote {r.path} ({r.name}, {h}x{w} → {r.dim}, {r.bytes / 1e6:.1f} MB); "
               f"onnxruntime vs PyTorch max abs diff {r.max_abs_diff:.1e} at batch 1 and 3")
    click.echo(f"next: edgetl train-head DATA --backbone {r.path}")


@main.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--backbone", default=DEFAULT_BACKBONE_ONNX, show_default=True, type=click.Path(dir_okay=False),
              help="An exported backbone.onnx.")
@click.option("--cache", default=DEFAULT_CACHE, show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True, type=DEVICE)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096))
def embed(data, backbone, cache, device, batch_size):
    """Compute and cache the embedding of every image under DATA (incremental, resumable)."""
    from .embed import embed_folder

    r = embed_folder(data, backbone, cache, device=device, batch_size=batch_size)
    report_embed(r)
    click.echo(f"next: edgetl train-head {data} --backbone {backbone} --cache {cache}")


def report_embed(r) -> None:
    ds = r.dataset
    what = f"{len(ds.items)} images" + (f", {len(ds.classes)} classes" if ds.classes else ", unlabelled")
    click.echo(f"embedded {what}: {r.summary()}")
    if r.skipped:
        click.echo(f"skipped {len(r.skipped)} unreadable images:", err=True)
        for line in r.skipped_lines():
            click.echo(line, err=True)


if __name__ == "__main__":
    main()
