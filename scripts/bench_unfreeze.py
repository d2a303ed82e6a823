"""Benchmark of --unfreeze 2 training (issue: fewer frozen layers, from cached activations).

    python scripts/bench_unfreeze.py DATA [--device cpu|cuda] [--rounds 3]

One training epoch over DATA's training images (EfficientNet-Lite0, last 2 blocks + linear head,
batch 32): (a) from the activation cache (float16 maps, as edgetl trains) vs (b) recomputing the
frozen trunk in PyTorch at every step (images already decoded, so decoding counts for neither).
Rounds interleaved; medians and the ratio are printed. Target >= 3x.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgetl import backbones
from edgetl.data.embed import embed_folder
from edgetl.data.preprocess import load_image
from edgetl.data.scan import scan
from edgetl.export.stages import verified_stages
from edgetl.train.cut import cut_index, export_trunk, top_and_head, trunk_module


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = ap.parse_args()
    dev = a.device
    work = Path(tempfile.mkdtemp(prefix="edgetl-bench-"))
    bb = backbones.get()
    st = verified_stages(bb)
    k = cut_index(st, 2, bb.name)
    trunk, shape = export_trunk(bb, st, k)
    (work / "trunk.onnx").write_bytes(trunk.SerializeToString())
    ds = scan(a.data)
    train = [i for i, it in enumerate(ds.items) if it.split in (None, "train")]
    r = embed_folder(a.data, work / "trunk.onnx", work / "cache", only=train, device=dev)
    _, acts = r.namespace.load([r.keys[i] for i in train])
    acts = acts.reshape(-1, *shape).astype(np.float16)
    classes = sorted({ds.items[i].label for i in train})
    y = torch.tensor([classes.index(ds.items[i].label) for i in train]).to(dev)
    images = np.stack([load_image(ds.items[i].path, bb.spec) for i in train])
    frozen = trunk_module(bb, st, k).to(dev, memory_format=torch.channels_last)  # as fast as it gets, for both
    acts_dev = torch.from_numpy(acts).to(dev)  # edgetl moves the activations to the device once
    images_dev = torch.from_numpy(images).to(dev)
    print(f"{len(train)} training images; cut before block {k} of {len(st.blocks)}; activation {shape} "
          f"({acts.nbytes / 1e6:.0f} MB as float16)")

    def epoch(from_cache: bool) -> float:
        torch.manual_seed(0)
        top = top_and_head(st, k, torch.nn.Linear(bb.dim, len(classes)))
        for p in top.parameters():
            p.requires_grad_(True)
        top.to(dev, memory_format=torch.channels_last)  # edgetl trains in channels-last (finetune.fit)
        opt = torch.optim.AdamW(top.parameters(), lr=1e-4)
        top.train()
        t = time.perf_counter()
        for i in range(0, len(train), 32):
            if from_cache:
                x = acts_dev[i:i + 32].float()
            else:
                with torch.no_grad():
                    x = frozen(images_dev[i:i + 32])
            loss = F.cross_entropy(top(x.contiguous(memory_format=torch.channels_last)), y[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    cached, recomputed = [], []
    for r_ in range(a.rounds):
        cached.append(epoch(True))
        recomputed.append(epoch(False))
        print(f"  round {r_ + 1}: from cache {cached[-1]:.2f} s, recomputing the trunk {recomputed[-1]:.2f} s")
    mc, mr = statistics.median(cached), statistics.median(recomputed)
    print(f"one --unfreeze 2 epoch: from the activation cache {mc:.2f} s, recomputing the trunk {mr:.2f} s; "
          f"speed-up {mr / mc:.1f}x (target >= 3x)")


if __name__ == "__main__":
    main()
