"""The preprocessing spec: how a backbone wants its pixels. It travels with the weights, into the ONNX
metadata of every artifact, and is checked when read back (files may lie).

Resize policy "shorter-center/v1": scale so the shorter side equals `resize_size` (INTER_AREA when
shrinking, INTER_CUBIC when enlarging), then take the centre `input_size` crop.
"""

from __future__ import annotations

import dataclasses
import json

POLICY = "shorter-center/v1"


@dataclasses.dataclass(frozen=True)
class Spec:
    """How a backbone wants its pixels. Normalisation (mean/std) happens inside the ONNX graph."""

    input_size: tuple[int, int]  # (height, width) fed to the graph
    resize_size: int  # shorter side before the centre crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    policy: str = POLICY

    @classmethod
    def from_crop_pct(cls, input_size, crop_pct, mean, std) -> "Spec":
        h, w = input_size
        return cls((int(h), int(w)), int(round(min(h, w) / crop_pct)), tuple(map(float, mean)),
                   tuple(map(float, std)))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        """Parse and check a spec (it comes from files, which may lie); ValueError saying what is wrong."""
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("the preprocessing spec is not an object")
        size, resize = d.get("input_size"), d.get("resize_size")
        if (not isinstance(size, list) or len(size) != 2 or not all(_is_int(v) for v in size)
                or not all(MIN_SIDE <= v <= MAX_SIDE for v in size)):
            raise ValueError(f"input_size {str(size)[:40]} is not two whole numbers in {MIN_SIDE}..{MAX_SIDE}")
        if not _is_int(resize) or not min(size) <= resize <= 4 * max(size):
            raise ValueError(f"resize_size {str(resize)[:40]} does not fit input_size {size}")
        for key in ("mean", "std"):
            v = d.get(key)
            if (not isinstance(v, list) or len(v) != 3
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) < 1e3 for x in v)):
                raise ValueError(f"{key} is not three numbers")
        if not all(x > 0 for x in d["std"]):
            raise ValueError("std must be positive")
        if d.get("policy", POLICY) != POLICY:
            raise ValueError(f"unknown resize policy {str(d.get('policy'))[:40]!r}")
        return cls((size[0], size[1]), resize, tuple(map(float, d["mean"])), tuple(map(float, d["std"])), POLICY)


MIN_SIDE, MAX_SIDE = 8, 4096  # input sizes a spec may state


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
