"""The Ray engine against the local one: the same photos, the same machine, fresh caches, interleaved.

    python scripts/bench_ray.py DATA [--n 2000] [--backbone efficientnet_lite0|FILE] [--rounds 3]
                                [--workers N] [--device cpu|cuda] [--json OUT]

DATA is a photo folder; with --n, a folder of N distinct photos is made from it first (as
scripts/make_folder.py does). One local Ray is started for the whole run (its start-up is reported
apart: an existing cluster is already up); each round embeds into fresh caches, local then Ray.
Reported: the medians of the wall times and their ratio (Ray / local; goal ≤ 1.3), Ray's time to its
first result (worker start-up) and its steady throughput after it (the per-node figure), and the
driver's own time per image (reading results, writing shards: what bounds one driver). The closing
note scales the per-node figure to N nodes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--n", type=int, help="Make a folder of this many distinct photos from DATA first.")
    ap.add_argument("--backbone", default="efficientnet_lite0", help="A backbone name or an exported .onnx.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, help="Ray workers [default: one per CPU, or one per GPU].")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: the local engine on CUDA, each Ray worker with one GPU.")
    ap.add_argument("--json", type=Path, help="Also write the figures here.")
    args = ap.parse_args()

    import ray

    from edgetl import backbones
    from edgetl.data.embed import embed_folder
    from edgetl.data.engines import Engine
    from edgetl.data.scan import scan

    backbone = str(backbones.exported(args.backbone, None, log=print))
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        data = args.data
        if args.n:
            sys.path.insert(0, str(Path(__file__).parent))
            from make_folder import make

            data = make(args.data, Path(tmp) / "photos", args.n)
        n = len(scan(data).items)
        # PYTHONPATH for the workers: they must import this edgetl
        os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                    os.environ.get("PYTHONPATH", "")])
        t = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR)
        cluster_start = time.perf_counter() - t
        engine = Engine("ray", workers=args.workers, gpus_per_worker=1.0 if args.device == "cuda" else 0.0)
        local_s, ray_s, first_s, driver_s, steady_s, workers = [], [], [], [], [], 0
        try:
            for r in range(args.rounds):
                a = embed_folder(data, backbone, Path(tmp) / f"local{r}", device=args.device)
                b = embed_folder(data, backbone, Path(tmp) / f"ray{r}", device=args.device, engine=engine)
                assert a.new == b.new == n - len(a.skipped), (a.summary(), b.summary())
                local_s.append(a.seconds)
                ray_s.append(b.seconds)
                first_s.append(b.stages.get("first result", 0.0))
                driver_s.append(b.stages.get("driver", 0.0))
                steady_s.append(b.stages.get("steady img/s", 0.0))
                workers = int(b.provider.split("Ray, ")[1].split()[0])
                print(f"round {r + 1}: local {a.seconds:.2f} s ({a.new / a.seconds:.0f} img/s), "
                      f"ray {b.seconds:.2f} s ({b.new / b.seconds:.0f} img/s; first result after "
                      f"{first_s[-1]:.2f} s, then {steady_s[-1]:.0f} img/s; driver busy {driver_s[-1]:.2f} s)", flush=True)
        finally:
            ray.shutdown()
    med = statistics.median
    local, remote, first, driver = med(local_s), med(ray_s), med(first_s), med(driver_s)
    steady = med(steady_s)  # the rate once the first result is in (workers up)
    per_image_driver = driver / n
    driver_cap = 1 / per_image_driver if per_image_driver else float("inf")
    out = {
        "images": n, "cpus": os.cpu_count(), "device": args.device, "workers": workers, "rounds": args.rounds,
        "ray_cluster_start_s": round(cluster_start, 2), "local_s": round(local, 2), "ray_s": round(remote, 2),
        "ratio": round(remote / local, 3), "local_img_s": round(n / local, 1), "ray_img_s": round(n / remote, 1),
        "ray_first_result_s": round(first, 2), "ray_steady_img_s": round(steady, 1),
        "driver_ms_per_image": round(per_image_driver * 1e3, 4), "driver_cap_img_s": round(driver_cap),
    }
    print(json.dumps(out, indent=1))
    print(f"\nRay / local on one machine ({n} photos, {os.cpu_count()} CPUs, {workers} workers): "
          f"{remote:.2f} s / {local:.2f} s = {remote / local:.2f}x (goal <= 1.3x); a cluster start adds "
          f"{cluster_start:.1f} s once.")
    print(f"Per node: {steady:.0f} img/s once the workers are up ({first:.1f} s to the first result). The driver "
          f"spends {per_image_driver * 1e3:.3f} ms per image, so one driver takes up to ~{driver_cap:,.0f} img/s.")
    print("Scaling estimate (N nodes like this one, photos in S3 read in parallel by every node): "
          + ", ".join(f"{k} node{'s' if k > 1 else ''} ~{min(k * steady, driver_cap):,.0f} img/s" for k in (1, 4, 16, 64))
          + f"; the driver's ceiling is reached near {driver_cap / steady:.0f} nodes.")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
