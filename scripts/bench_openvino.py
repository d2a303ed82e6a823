"""Is OpenVINO worth a backend? onnxruntime CPU vs OpenVINO CPU on edgetl models (needs `pip install openvino`).

    python scripts/bench_openvino.py MODEL... [--data DATA] [--threads 1,2] [--rounds 40]

Each model.onnx (float32 or int8) is loaded unchanged by both; OpenVINO runs float32 models with its
f32 and its CPU-default bf16 precision hints. Batch 1 and batch 32 medians, all variants
interleaved in one process, per thread count; with --data, accuracy on the validation split and
top-1 agreement with onnxruntime. edgetl keeps OpenVINO only if it is faster than onnxruntime here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from edgetl import contract as C
from edgetl.deploy.bench import time_interleaved
from edgetl.deploy.runtime import load_model, select_split
from edgetl.ort import session
from edgetl.export.calibrate import Images as _Images


def openvino_runner(path: str, threads: int, precision: str):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                 "INFERENCE_PRECISION_HINT": precision,
                                                                 "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()

    def run(x):
        req.infer({0: x})
        return req.get_output_tensor(0).data.copy()

    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", type=Path, help="labelled photos: accuracy on the validation split")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=40)
    a = ap.parse_args()
    import openvino as ov

    print(f"openvino {ov.__version__}")
    rng = np.random.default_rng(0)
    for t in [int(v) for v in a.threads.split(",")]:
        runners = {}
        for path in a.models:
            name = Path(path).name
            s = session(path, "cpu", t)
            runners[f"{name} onnxruntime"] = lambda x, s=s: s.run([C.PROBABILITIES], {C.IMAGE: x})[0]
            precisions = ("f32", "bf16") if "int8" not in name else ("f32",)
            for p in precisions:
                runners[f"{name} openvino {p}"] = openvino_runner(path, t, p)
        m = load_model(a.models[0], "cpu")
        if a.data and t == 1:
            images = _Images(select_split(m, a.data, "val").items, m.spec, m.classes)
            ref = None
            for label, run in runners.items():
                pred = np.concatenate([run(b).argmax(1) for b, _ in images.batches()])
                y = np.concatenate([lab for _, lab in images.batches()])
                ref = pred if ref is None else ref
                print(f"{label}: val accuracy {np.mean(pred == y):.4f}, top-1 agreement with the first "
                      f"{100 * np.mean(pred == ref):.1f} %")
        h, w = m.spec.input_size
        x32 = rng.integers(0, 256, (32, h, w, 3), dtype=np.uint8)
        for b, rounds in ((1, a.rounds), (32, max(3, a.rounds // 8))):
            x = x32[:b]
            st = time_interleaved({k: (lambda r=r, x=x: r(x)) for k, r in runners.items()}, rounds=rounds, warmup=2)
            base = next(iter(st.values()))["p50_ms"]
            print(f"threads {t}, batch {b}: " + "; ".join(f"{k} {v['p50_ms']:.2f} ms ({base / v['p50_ms']:.2f}x)"
                                                        for k, v in st.items()), flush=True)


if __name__ == "__main__":
    main()
