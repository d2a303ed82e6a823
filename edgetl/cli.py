"""The edgetl command line: parse → one library call → one-line result + the next command."""

from __future__ import annotations

import sys

import click

from edgetl import __version__
from edgetl.errors import EdgetlError

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
            _exit(130)


def _exit(code: int) -> None:
    """Exit now with `code`. (sys.exit is not enough after Ctrl-C: if the signal landed inside an
    extension's import, the interpreter would re-raise it at shutdown and die by SIGINT.)"""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgetl")
def main():
    """Transfer learning to the edge: export-backbone → train-head → run."""


@main.command()
@click.argument("pattern", default="*")
def backbones(pattern):
    """List the backbones (optionally matching PATTERN, e.g. 'efficientnet*' or 'timm:resnet*')."""
    from edgetl.backbones import describe

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
    from pathlib import Path

    from edgetl import backbones
    from edgetl.export import torch_onnx as export
    from edgetl.files import writable_dir

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
    from edgetl.data.embed import embed_folder

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


@main.command("train-head")
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--backbone", default=DEFAULT_BACKBONE_ONNX, show_default=True, type=click.Path(dir_okay=False))
@click.option("--cache", default=DEFAULT_CACHE, show_default=True, type=click.Path(file_okay=False))
@click.option("--head", "kind", default="linear", show_default=True, type=click.Choice(["linear", "mlp"]))
@click.option("--hidden", default="512", show_default=True, help="Hidden layer sizes for --head mlp, e.g. 512,256.")
@click.option("--dropout", default=0.2, show_default=True, type=click.FloatRange(0, 0.95))
@click.option("--epochs", default=300, show_default=True, type=click.IntRange(1), help="At most; early stopping ends sooner.")
@click.option("--patience", default=20, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--weight-decay", default=1e-4, show_default=True, type=click.FloatRange(0))
@click.option("--label-smoothing", default=0.1, show_default=True, type=click.FloatRange(0, 0.5))
@click.option("--class-weights/--no-class-weights", default=True, show_default=True)
@click.option("--val-fraction", default=0.2, show_default=True, type=click.FloatRange(0.05, 0.5),
              help="Used when DATA has no val/ split.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, type=DEVICE)
@click.option("--unfreeze", default="0", show_default=True,
              help="Final backbone blocks to train: 0 (head only), N, all (full fine-tuning) or auto.")
@click.option("--augment", default=0, show_default=True, type=click.IntRange(0, 32),
              help="Cache K augmented views of each training image (with --unfreeze all: augment online).")
@click.option("--train-bn", is_flag=True, help="Also update BatchNorm statistics of the trained blocks.")
@click.option("--weights", type=click.Path(dir_okay=False), help="The --weights FILE the backbone was exported with.")
@click.option("-o", "--output", type=click.Path(file_okay=False), help="Output folder [default: exports/<DATA name>].")
def train_head_cmd(data, backbone, cache, kind, hidden, dropout, epochs, patience, lr, weight_decay,
                   label_smoothing, class_weights, val_fraction, seed, device, unfreeze, augment, train_bn, weights,
                   output):
    """Train a new softmax (or MLP) on cached embeddings and fuse it into one verified model.onnx."""
    from edgetl.train.heads import HeadConfig
    from edgetl.train.orchestrate import default_out, train_head

    try:
        sizes = tuple(int(h) for h in hidden.split(",") if h.strip())
    except ValueError:
        raise click.BadParameter(f"{hidden!r} is not a comma list of sizes", param_hint="--hidden") from None
    cfg = HeadConfig(kind=kind, hidden=sizes, dropout=dropout, lr=lr, weight_decay=weight_decay,
                     label_smoothing=label_smoothing, class_weights=class_weights, max_epochs=epochs,
                     patience=patience, seed=seed)
    if unfreeze not in ("all", "auto") and not unfreeze.isdigit():
        raise click.BadParameter(f"{unfreeze!r}: use 0, a number of blocks, all or auto", param_hint="--unfreeze")
    s = train_head(data, backbone, cache, output or default_out(data), cfg, device=device, val_fraction=val_fraction,
                   unfreeze=unfreeze, augment=augment, train_bn=train_bn, weights=weights,
                   log=lambda line: click.echo(line, err=True))
    m = s["metrics"]
    click.echo(f"wrote {s['out'] / 'model.onnx'} ({s['regime']}): {len(m['classes'])} classes, "
               f"val accuracy {m['accuracy']:.4f} "
               f"({m['correct']}/{m['n']}); fused vs chained max abs diff {s['fuse_max_abs_diff']:.1e}")
    click.echo(f"next: edgetl run --model {s['out'] / 'model.onnx'} --camera 0")


@main.command("fuse")
@click.argument("backbone", type=click.Path(exists=True, dir_okay=False))
@click.argument("head", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--check-images", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Photos for the parity check (default: sample photos shipped with matplotlib).")
def fuse_cmd(backbone, head, output, check_images):
    """Fuse BACKBONE.onnx and HEAD.onnx into one model.onnx, verified against the chained pair."""
    from edgetl.export.fuse import fuse_files

    worst, n = fuse_files(backbone, head, output, list(check_images) or None)
    click.echo(f"wrote {output}; fused vs chained max abs diff {worst:.1e} on {n} images")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--split", default="auto", show_default=True, type=click.Choice(["auto", "all", "train", "val"]),
              help="auto: val/ when DATA has it, else every image.")
@click.option("--device", default="auto", show_default=True, type=DEVICE)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate(model, data, split, device, as_json):
    """Accuracy, per-class metrics and confusion matrix of MODEL on DATA (model.onnx alone, no torch)."""
    from edgetl.deploy import runtime
    from edgetl.quality import report

    m, skipped, _ = runtime.evaluate(runtime.load_model(model, device), data, split)
    click.echo(report.dumps(m) if as_json else report.text(m))
    if skipped:
        click.echo(f"skipped {len(skipped)} unreadable images, e.g. {skipped[0][1]}", err=True)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("paths", nargs=-1, required=True)
@click.option("--top-k", default=1, show_default=True, type=click.IntRange(1))
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "json", "csv"]))
@click.option("--device", default="auto", show_default=True, type=DEVICE)
def predict(model, paths, top_k, fmt, device):
    """Classify images (files, folders or globs) with MODEL."""
    import csv
    import json

    from edgetl.deploy import runtime

    m = runtime.load_model(model, device)
    files = runtime.expand_paths(paths)
    if not files:
        raise EdgetlError("no images to predict")
    writer = csv.writer(sys.stdout) if fmt == "csv" else None
    if writer:
        writer.writerow(["path"] + [f"{x}{i}" for i in range(1, top_k + 1) for x in ("class", "prob")] + ["error"])
    failed = 0
    for path, top, err in runtime.predict(m, files, top_k):
        failed += err is not None
        if fmt == "json":
            click.echo(json.dumps({"path": str(path), "top": [{"class": c, "prob": round(p, 6)} for c, p in top or []],
                                   **({"error": err} if err else {})}, ensure_ascii=False))
        elif writer:
            writer.writerow([str(path)] + [v for c, p in (top or []) for v in (c, f"{p:.6f}")] + [err or ""])
        else:
            click.echo(f"{path}\t" + ("  ".join(f"{c} {p:.3f}" for c, p in top) if top else f"error: {err}"))
    if failed:
        click.echo(f"{failed} of {len(files)} images could not be read", err=True)


@main.command()
@click.option("--model", default=None, type=click.Path(dir_okay=False),
              help="A fused model.onnx [default: the newest exports/*/model.onnx].")
@click.option("--camera", type=int, help="Camera index (0 is the first camera).")
@click.option("--source", help="A video file, a stream URL, a folder of images or a glob.")
@click.option("--headless", is_flag=True, help="No window: one JSON line per frame on stdout.")
@click.option("--save", type=click.Path(dir_okay=False), help="Write the annotated video (e.g. out.mp4).")
@click.option("--threshold", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Below this top probability the frame is labelled 'unknown'.")
@click.option("--smooth", default=1, show_default=True, type=click.IntRange(1), help="Average over the last N frames.")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(1))
@click.option("--max-frames", type=click.IntRange(1), help="Stop after this many frames.")
@click.option("--device", default="auto", show_default=True, type=DEVICE)
def run(model, camera, source, headless, save, threshold, smooth, top_k, max_frames, device):
    """Classify live frames from a camera, a video, a stream or a folder (onnxruntime, no torch)."""
    from edgetl.deploy import live, runtime

    if (camera is None) == (source is None):
        raise click.UsageError("give exactly one of --camera INDEX or --source FILE|URL|FOLDER|GLOB")
    m = runtime.load_model(model or _newest_model(), device, spin=False)  # the capture thread needs the CPU too
    s = live.run(m, camera=camera, source=source, headless=headless, save=save, threshold=threshold,
                 smooth=smooth, top_k=top_k, max_frames=max_frames)
    click.echo(s.line(), err=True)
    if s.ended == "interrupted":
        _exit(130)


def _newest_model() -> str:
    from pathlib import Path

    found = sorted(Path("exports").glob("*/model.onnx"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise EdgetlError("no exports/*/model.onnx here; train one with `edgetl train-head DATA` or pass --model")
    return str(found[-1])


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="The labelled photos MODEL was trained on: int8 calibrates on their training split, "
                   "the gate checks on their validation split.")
@click.option("--precision", default="int8", show_default=True, type=click.Choice(["int8", "fp16"]),
              help="int8 for CPUs (static QDQ, per-channel weights); fp16 for GPUs.")
@click.option("--max-drop", default=0.01, show_default=True, type=click.FloatRange(0, 1),
              help="Largest validation accuracy drop accepted vs float32 (0.01 = 1 point).")
@click.option("--calib-images", default=200, show_default=True, type=click.IntRange(1),
              help="Training photos used to calibrate int8 activation ranges.")
@click.option("--calibration", default="minmax", show_default=True,
              type=click.Choice(["minmax", "percentile", "entropy"]), help="How int8 activation ranges are chosen.")
@click.option("--reduce-range", default="auto", show_default=True, type=click.Choice(["auto", "on", "off"]),
              help="7-bit int8 weights; auto: on for x86 CPUs without VNNI (onnxruntime's advice).")
@click.option("--device", default=None, type=DEVICE,
              help="Where the gate measures accuracy and latency [default: cpu for int8, auto for fp16].")
@click.option("--force", is_flag=True, help="Write it even when it is not faster (never when it is worse).")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output file [default: beside MODEL, model.int8.onnx or model.fp16.onnx].")
def quantize(model, data, precision, max_drop, calib_images, calibration, reduce_range, device, force, output):
    """An int8 or fp16 copy of MODEL, written only when measured no worse and faster than float32."""
    from edgetl.export.quantize import quantize_file

    r, out = quantize_file(model, data, output, precision=precision, max_drop=max_drop, calib_images=calib_images,
                           calibration=calibration, reduce_range={"auto": None, "on": True, "off": False}[reduce_range],
                           device=device, force=force, log=lambda line: click.echo(line, err=True))
    s = r.summary
    forced = " (--force: not faster)" if s["forced"] else ""
    click.echo(f"wrote {out} ({r.precision}, {s['bytes'] / 1e6:.1f} MB vs {s['float32_bytes'] / 1e6:.1f} MB){forced}: "
               f"{r.line()}")
    click.echo(f"next: edgetl bench {model} {out}")


@main.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "openvino"]),
              help="onnxruntime CPU or CUDA, or OpenVINO's CPU plugin (pip install openvino); an error, never a "
                   "fallback, when it cannot run the models.")
@click.option("--batch", default="1,8,32", show_default=True, help="Batch sizes, a comma list.")
@click.option("--threads", default=None, help="onnxruntime intra-op threads, a comma list [default: onnxruntime's choice].")
@click.option("--images", type=click.Path(exists=True),
              help="Photos (folder, file or glob): batches are made of them, and one photo's time is split into "
                   "read, decode, resize and inference.")
@click.option("--rounds", default=50, show_default=True, type=click.IntRange(1),
              help="Timed runs per model and setting, at most (models interleaved).")
@click.option("--spin/--no-spin", default=True, show_default=True,
              help="Idle onnxruntime threads busy-wait between runs (its default); --no-spin frees the CPU.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_cmd(models, device, batch, threads, images, rounds, spin, as_json):
    """Latency p50/p90/p99, throughput, size and memory of MODELS, timed interleaved on this machine."""
    import json

    from edgetl.deploy import bench

    def ints(text, name):
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise click.BadParameter(f"{text!r} is not a comma list of positive numbers", param_hint=name)
        return values

    r = bench.bench(list(models), device=device, batches=ints(batch, "--batch"),
                    threads=ints(threads, "--threads") if threads else [None], images=images, rounds=rounds,
                    spin=spin)
    click.echo(json.dumps(r, indent=1) if as_json else bench.table(r))


if __name__ == "__main__":
    main()
