"""Every GPU benchmark in one call: the data path at the hardware's limit (and the CPU side on its cores).

    python scripts/bench_gpu.py --hymenoptera DIR --out DIR [--budget 420] [--photos 4000] [--device cuda]

Sections, each timed against one budget and written to OUT/bench_gpu.json as it finishes (a section
that fails records its error and the next one runs):
 1. bare onnxruntime on pre-decoded batches (batch 32 / 256): the provider's defaults, edgetl's options
    (NHWC, cuDNN search), IO binding from torch tensors; the fp16 model; PyTorch eager on the same
    network (fp32, bf16 autocast, channels-last): the ceiling and the bar;
 2. `embed_folder` on a folder of full-size photos: GPU decoding vs CPU decoding threads, vs the ceiling
    and vs PyTorch eager with torchvision ImageFolder + DataLoader (worker processes, batch 256);
    GPU-decoded pixels and embeddings against the CPU path's; an unchanged re-run;
 3. the run loop vs the bare fused model at batch 1 (FPS);
 4. training: `--unfreeze all --augment 1` images/s on the big folder and validation accuracy on
    hymenoptera; `--unfreeze 2` time and accuracy;
 5. fp16 model.onnx through the quantize gate on the GPU;
 6. the CPU side on this machine's cores: embed --device cpu vs bare onnxruntime CPU.
With --device cpu the same script runs on a machine without a GPU (sections that need one say so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_folder import make  # noqa: E402

RESULTS: dict = {}


def record(out: Path, name: str, value) -> None:
    RESULTS[name] = value
    (out / "bench_gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    print(f"== {name}: {json.dumps(value, default=str)[:2000]}", flush=True)


def timed(fn, warm: int = 2, reps: int = 5) -> float:
    """Median seconds of fn() after warm-up runs."""
    for _ in range(warm):
        fn()
    t = []
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        t.append(time.perf_counter() - s)
    return statistics.median(t)


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


CUDA_VARIANTS = {"defaults": {}, "heuristic search": {"cudnn_conv_algo_search": "HEURISTIC"},
                 "prefer_nhwc": {"prefer_nhwc": "1"},
                 "nhwc + heuristic": {"prefer_nhwc": "1", "cudnn_conv_algo_search": "HEURISTIC"}}


def section_bare(a, work, bb_path, arrays, dev):
    import onnxruntime as ort
    import torch

    from edgetl import backbones
    from edgetl.export.torch_onnx import image_module

    res = {}
    prov = "CUDAExecutionProvider" if dev == "cuda" else "CPUExecutionProvider"
    variants = CUDA_VARIANTS if dev == "cuda" else {"defaults": {}}
    x256 = np.stack([arrays[i % len(arrays)] for i in range(256)])
    for name, opts in variants.items():
        t = time.perf_counter()
        s = ort.InferenceSession(str(bb_path), providers=[(prov, opts)] if dev == "cuda" else [prov])
        s.run(None, {"image": x256})
        res[f"ort {name}: session + first b256 run s"] = round(time.perf_counter() - t, 2)
        for bs in (1, 32, 256):
            x = x256[:bs]
            res[f"ort {name} b{bs}"] = round(bs / timed(lambda s=s, x=x: s.run(None, {"image": x})))
    if dev == "cuda":
        from edgetl.data.gpu import BoundRunner

        s = ort.InferenceSession(str(bb_path), providers=[prov])
        run = BoundRunner(s)
        for bs in (32, 256):
            xt = torch.from_numpy(x256[:bs]).cuda()
            res[f"ort defaults + IO binding from torch b{bs}"] = round(bs / timed(lambda run=run, xt=xt: run(xt)))
        fp16 = work / "backbone.fp16.onnx"
        try:
            import onnx

            from edgetl.export.calibrate import to_fp16 as _fp16
            from edgetl.export.graph import prepare

            onnx.save(_fp16(prepare(onnx.load(str(bb_path))), []), str(fp16))
            s = ort.InferenceSession(str(fp16), providers=[prov])
            res["ort fp16 model b256"] = round(256 / timed(lambda: s.run(None, {"image": x256})))
            run16 = BoundRunner(s)
            xt = torch.from_numpy(x256).cuda()
            res["ort fp16 model + IO binding b256"] = round(256 / timed(lambda: run16(xt)))
        except Exception as e:  # noqa: BLE001
            res["ort fp16 model"] = f"failed: {e}"
        model = image_module(backbones.get()).cuda()
        xt = torch.from_numpy(x256).cuda()
        for name, cl, amp in (("fp32", False, False), ("fp32 channels-last", True, False),
                              ("bf16 autocast channels-last", True, True)):
            m = model.to(memory_format=torch.channels_last) if cl else model

            def step(m=m, amp=amp):
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    m(xt)
                sync()

            res[f"pytorch eager {name} b256"] = round(256 / timed(step))
        best_ort32 = max(v for k, v in res.items() if k.startswith("ort") and "fp16" not in k and k.endswith("b256"))
        best_pt32 = max(res["pytorch eager fp32 b256"], res["pytorch eager fp32 channels-last b256"])
        res["ort fp32 / pytorch fp32 (b256, best of each)"] = round(best_ort32 / best_pt32, 2)
        if isinstance(res.get("ort fp16 model + IO binding b256"), int):
            res["ort fp16 / pytorch bf16 (b256)"] = round(res["ort fp16 model + IO binding b256"]
                                                         / res["pytorch eager bf16 autocast channels-last b256"], 2)
    return res


def pytorch_loader_baseline(folder: Path, bb, dev: str, workers: int) -> float:
    import torch
    import torchvision
    from torchvision import transforms as T

    from edgetl.export.torch_onnx import image_module

    tf = T.Compose([T.Resize(bb.spec.resize_size), T.CenterCrop(bb.spec.input_size), T.PILToTensor()])
    ds = torchvision.datasets.ImageFolder(str(folder), tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=workers, pin_memory=dev == "cuda")
    model = image_module(bb).to(dev)
    t = time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader:
            model(x.permute(0, 2, 3, 1).contiguous().to(dev, non_blocking=True))
    sync()
    return len(ds) / (time.perf_counter() - t)


def section_embed(a, work, bb_path, big, dev, ceiling):
    from edgetl import backbones
    from edgetl.data.embed import embed_folder

    res = {}
    n = sum(1 for _ in big.rglob("*.jpg"))
    runs = ([("gpu", "heuristic search"), ("gpu", "nhwc + heuristic"), ("cpu", "nhwc + heuristic")]
            if dev == "cuda" else [("cpu", "defaults")])
    for k, (decode, opts) in enumerate(runs):
        os.environ["EDGETL_CUDA_OPTIONS"] = json.dumps(CUDA_VARIANTS[opts])
        cache = work / f"cache-{decode}-{k}"
        shutil.rmtree(cache, ignore_errors=True)
        r = embed_folder(big, bb_path, cache, device=dev, decode=decode, progress=False)
        res[f"embed decode={decode}, {opts} (run {k + 1}) img/s"] = round(n / r.seconds)
        res[f"  stages s (run {k + 1})"] = r.stages
        res[f"  skipped (run {k + 1})"] = len(r.skipped)
    os.environ.pop("EDGETL_CUDA_OPTIONS", None)
    best = max(v for k, v in res.items() if k.endswith("img/s"))
    res["embed best / ceiling"] = round(best / ceiling, 2) if ceiling else None
    t = time.perf_counter()
    r = embed_folder(big, bb_path, work / "cache-gpu-1" if dev == "cuda" else work / "cache-cpu-0", device=dev,
                     progress=False)
    res["unchanged re-run s"] = round(time.perf_counter() - t, 2)
    res["unchanged re-run reused"] = r.reused
    workers = min(16, os.cpu_count() or 1)
    key = f"pytorch ImageFolder+DataLoader ({workers} workers, b256) img/s"
    res[key] = round(pytorch_loader_baseline(big, backbones.get(), dev, workers))
    res["embed best / pytorch"] = round(best / res[key], 2)
    if dev == "cuda":
        from edgetl.data.gpu import compare_with_cpu

        files = sorted(big.rglob("*.jpg"))[:300]
        res["gpu vs cpu pixels"] = compare_with_cpu(files, backbones.get().spec, "cuda")
        g, c = (embed_folder(big, bb_path, work / f"cache-{d}-{k}", device=dev, decode=d, progress=False)
                for d, k in (("gpu", 1), ("cpu", 2)))
        keys = [k for k in g.keys[:300] if k is not None]
        eg, ec = g.namespace.load(keys)[1], c.namespace.load(keys)[1]
        cos = (eg * ec).sum(1) / (np.linalg.norm(eg, axis=1) * np.linalg.norm(ec, axis=1))
        res["gpu vs cpu embeddings: cosine min / median"] = [round(float(cos.min()), 5), round(float(np.median(cos)), 5)]
    return res


def section_run(a, work, model_path, dev):
    if dev != "cuda":
        return _run(a, work, model_path, dev)
    out = {}
    for name in ("defaults", "nhwc + heuristic"):
        os.environ["EDGETL_CUDA_OPTIONS"] = json.dumps(CUDA_VARIANTS[name])
        out[name] = _run(a, work, model_path, dev)
    os.environ.pop("EDGETL_CUDA_OPTIONS", None)
    return out


def _run(a, work, model_path, dev):
    import cv2
    import onnxruntime as ort

    from edgetl import contract as C
    from edgetl.data.preprocess import frame_to_input
    from edgetl.deploy import live, runtime

    video = work / "clip.avi"
    if not video.exists():
        files = sorted(Path(a.hymenoptera).rglob("*.jpg"))
        w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (640, 480))
        for i in range(600):
            w.write(cv2.resize(cv2.imread(str(files[i % len(files)])), (640, 480)))
        w.release()
    model = runtime.load_model(model_path, dev, spin=False)
    prov = "CUDAExecutionProvider" if dev == "cuda" else "CPUExecutionProvider"
    bare = ort.InferenceSession(str(model_path), providers=[(prov, runtime.cuda_options()) if dev == "cuda" else prov])
    cap, inputs = cv2.VideoCapture(str(video)), []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        inputs.append(frame_to_input(f, model.spec)[None])
    for x in inputs[:20]:
        bare.run(None, {C.IMAGE: x})
    runs, bares, infer = [], [], []
    with open(os.devnull, "w") as null:
        for _ in range(3):
            s = live.run(model, source=str(video), headless=True, out=null)
            runs.append(s.frames / s.seconds)
            infer.append(s.stages_ms["inference"])
            t = time.perf_counter()
            for x in inputs:
                bare.run([C.PROBABILITIES], {C.IMAGE: x})
            bares.append(len(inputs) / (time.perf_counter() - t))
    return {"run loop fps": round(statistics.median(runs)), "bare b1 fps": round(statistics.median(bares)),
            "run / bare": round(statistics.median(r / b for r, b in zip(runs, bares)), 2),
            "in-loop inference ms": round(statistics.median(infer), 3), "provider": model.provider}


def section_train(a, work, bb_path, big, dev):
    from edgetl.train.heads import HeadConfig
    from edgetl.train.orchestrate import train_head
    from edgetl.train.request import TrainRequest

    res = {}
    t = time.perf_counter()
    s = train_head(TrainRequest(big, bb_path, work / "cache-train", work / "ft-big", HeadConfig(max_epochs=3, patience=5),
                   device=dev, unfreeze="all", augment=1), log=print).summary
    rates = s["history"].get("epoch_images_per_s", [])
    res["unfreeze all --augment 1, big folder: train images/s per epoch"] = [round(r) for r in rates]
    res["... wall s"] = round(time.perf_counter() - t)
    for unfreeze, aug in (("2", 0), ("all", 1)):
        t = time.perf_counter()
        try:
            s = train_head(TrainRequest(a.hymenoptera, bb_path, work / "cache-train", work / f"ft-hym-{unfreeze}", HeadConfig(),
                           device=dev, unfreeze=unfreeze, augment=aug), log=print).summary
            res[f"hymenoptera --unfreeze {unfreeze} --augment {aug}"] = {
                "val accuracy": s["metrics"]["accuracy"], "balanced": s["metrics"]["balanced_accuracy"],
                "wall s": round(time.perf_counter() - t), "epochs": s["epochs_run"], "device": s["device"],
                "images/s per epoch": [round(r) for r in s["history"].get("epoch_images_per_s", [])]}
        except Exception as e:  # noqa: BLE001
            res[f"hymenoptera --unfreeze {unfreeze}"] = f"{type(e).__name__}: {e}"
    return res


def section_fp16(a, model_path, dev):
    from edgetl.errors import GateRefused
    from edgetl.export.quantize import gate_line, quantize_model

    try:
        q = quantize_model(model_path, a.hymenoptera, "fp16", device=dev, force=True)
        return {"line": gate_line(q.summary), "latency": q.summary.get("latency")}
    except GateRefused as e:
        return {"refused": str(e)}


def section_cpu(a, work, bb_path, big, arrays):
    import onnxruntime as ort

    from edgetl.data.embed import embed_folder

    n = sum(1 for _ in big.rglob("*.jpg"))
    s = ort.InferenceSession(str(bb_path), providers=["CPUExecutionProvider"])
    x = np.stack([arrays[i % len(arrays)] for i in range(32)])
    ceiling = 32 / timed(lambda: s.run(None, {"image": x}), warm=1, reps=3)
    shutil.rmtree(work / "cache-cpu-only", ignore_errors=True)
    r = embed_folder(big, bb_path, work / "cache-cpu-only", device="cpu", progress=False)
    return {"cores": os.cpu_count(), "embed --device cpu img/s": round(n / r.seconds),
            "bare onnxruntime CPU b32 img/s": round(ceiling), "ratio": round(n / r.seconds / ceiling, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hymenoptera", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=420)
    ap.add_argument("--photos", type=int, default=6000)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--only", default="bare,embed,run,train,fp16,cpu")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    t_end = time.perf_counter() + a.budget
    only = a.only.split(",")
    work = Path(tempfile.mkdtemp(prefix="edgetl-gpu-"))
    import onnxruntime as ort
    import torch

    from edgetl import backbones
    from edgetl.data.preprocess import load_image
    from edgetl.ort import cuda_usable
    from edgetl.export.torch_onnx import export_backbone

    record(a.out, "env", {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                          "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                          "ort cuda usable": cuda_usable(), "cores": os.cpu_count()})
    bb_path = work / "backbone.onnx"
    export_backbone(backbones.get(), bb_path)
    big = make(a.hymenoptera / "train", work / "big", a.photos)
    files = sorted(big.rglob("*.jpg"))[:256]
    spec = backbones.get().spec
    arrays = [load_image(f, spec) for f in files]
    dev = a.device
    ceiling = None
    model_path = None
    for name in only:
        if time.perf_counter() > t_end:
            record(a.out, name, "skipped: out of budget")
            continue
        t = time.perf_counter()
        try:
            if name == "bare":
                r = section_bare(a, work, bb_path, arrays, dev)
                ceiling = max(v for k, v in r.items() if k.startswith("ort") and "fp16" not in k and k.endswith("b256")
                              and isinstance(v, int))
            elif name == "embed":
                r = section_embed(a, work, bb_path, big, dev, ceiling)
            elif name in ("run", "fp16"):
                if model_path is None:
                    from edgetl.train.heads import HeadConfig
                    from edgetl.train.orchestrate import train_head
                    from edgetl.train.request import TrainRequest

                    train_head(TrainRequest(a.hymenoptera, bb_path, work / "cache-m", work / "m", HeadConfig(), device=dev))
                    model_path = work / "m" / "model.onnx"
                r = section_run(a, work, model_path, dev) if name == "run" else section_fp16(a, model_path, dev)
            elif name == "train":
                r = section_train(a, work, bb_path, big, dev)
            elif name == "cpu":
                r = section_cpu(a, work, bb_path, big, arrays)
            else:
                r = "unknown section"
        except Exception as e:  # noqa: BLE001 - the next section still runs
            r = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        if isinstance(r, dict):
            r["section s"] = round(time.perf_counter() - t, 1)
        record(a.out, name, r)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
