"""Train/validation splits by content, and how a model records the split it was trained with.

Identical bytes always land on the same side: a split is made over groups of byte-identical photos
(their cache keys), stratified by class. When the folder brings its own train/ and val/, a
validation photo byte-identical to a training photo is leakage: it is left out of the validation
score and counted. A model records the content keys of its training and validation photos
(`record`), so `edgetl evaluate` can score exactly the photos the model never saw. Torch-free.
"""

from __future__ import annotations

import base64
import dataclasses
import random

KEY_PREFIX = 8  # bytes of each photo's SHA-256 recorded in a model: identity, not security
SMALL_VAL_PER_CLASS = 5  # fewer validation photos than this in some class: the number carries a caveat


@dataclasses.dataclass
class Split:
    train: list[int]  # indices into dataset items
    val: list[int]
    note: str  # how the split was made
    saved: bool  # made here (and saved to split.json), not read from the folder layout
    notes: list[str] = dataclasses.field(default_factory=list)  # one line each, for the user and the card
    leaked: int = 0  # validation photos left out because training holds the same bytes


def make_split(ds, keys: list[bytes | None], usable: list[int], val_fraction: float, seed: int) -> Split:
    """The dataset's own train/val split when it has one, else a stratified split by content with `seed`.

    `keys[i]` is the content key (SHA-256 of the bytes) of item i; `usable` the readable items.
    """
    notes: list[str] = []
    if ds.layout == "split":
        train = [i for i in usable if ds.items[i].split == "train"]
        val = [i for i in usable if ds.items[i].split == "val"]
        if ds.items and any(it.split == "test" for it in ds.items):
            notes.append("the test/ folder was not used (evaluate on it with `edgetl evaluate MODEL DATA --split test`)")
        if val:
            seen = {keys[i] for i in train}
            kept = [i for i in val if keys[i] not in seen]
            leaked = len(val) - len(kept)
            if leaked:
                notes.append(f"{leaked} validation photo{' is' if leaked == 1 else 's are'} byte-identical to training "
                             "photos (leakage): left out of the validation score")
            return Split(train, kept, "the dataset's own train/ and val/ split", False, notes, leaked)
        usable = train
    return _stratified(ds, keys, usable, val_fraction, seed, notes)


def stratified(ds, keys: list[bytes | None], usable: list[int], val_fraction: float, seed: int) -> Split:
    """A stratified split by content of the items `usable` (as for a folder without val/)."""
    return _stratified(ds, keys, usable, val_fraction, seed, [])


def folds(ds, keys: list[bytes | None], usable: list[int], k: int, seed: int) -> list[Split]:
    """k-fold cross-validation over the items `usable`, by content and stratified: every group of
    byte-identical photos is validated in exactly one fold (a class with a single group is always trained
    on). Folds without validation photos are left out."""
    by_class = class_groups(usable, keys.__getitem__, lambda i: ds.items[i].label, ds.classes)
    val = deal(by_class, k, random.Random(seed).shuffle, ds.classes, skip_single=True)
    every = set(usable)
    return [Split(sorted(every - set(v)), sorted(v), f"fold {f + 1} of {k}, seed {seed}", False)
            for f, v in enumerate(val) if v]


def class_groups(items, key_of, label_of, classes) -> dict:
    """The one grouping of every split: `items` in groups of identical content (`key_of`), input order
    kept, each group filed under the class of its first member (`label_of`); {class: [[item, …], …]}."""
    groups: dict = {}
    for i in items:
        groups.setdefault(key_of(i), []).append(i)
    by_class: dict = {c: [] for c in classes}
    for members in groups.values():
        by_class[label_of(members[0])].append(members)
    return by_class


def deal(by_class: dict, k: int, shuffle, order, skip_single: bool = False) -> list[list]:
    """Whole groups dealt round-robin into k folds, class after class in `order` (each class shuffled by
    `shuffle` first; the count goes on across classes, so small classes spread over different folds).
    skip_single: a class with one group is in no fold (always trained on)."""
    out: list[list] = [[] for _ in range(k)]
    start = 0
    for c in order:
        gs = by_class[c]
        shuffle(gs)
        if skip_single and len(gs) < 2:
            continue
        for j, g in enumerate(gs):
            out[(start + j) % k] += g
        start += len(gs)
    return out


def _stratified(ds, keys, usable, val_fraction, seed, notes) -> Split:
    by_class = class_groups(usable, keys.__getitem__, lambda i: ds.items[i].label, ds.classes)
    groups = [g for gs in by_class.values() for g in gs]
    conflicts = sum(len({ds.items[i].label for i in g}) > 1 for g in groups)
    rng = random.Random(seed)
    train, val, single = [], [], []
    for c in ds.classes:
        gs = by_class[c]
        rng.shuffle(gs)
        n_val = min(max(int(round(val_fraction * len(gs))), 1), len(gs) - 1) if len(gs) >= 2 else 0
        if len(gs) == 1:
            single.append(c)
        for g in gs[:n_val]:
            val += g
        for g in gs[n_val:]:
            train += g
    dups = len(usable) - len(groups)
    if dups:
        notes.append(f"{dups} photo{' is a byte-identical copy' if dups == 1 else 's are byte-identical copies'} of "
                     "others: each set of copies stays on one side of the split")
    if conflicts:
        notes.append(f"{conflicts} photo{' appears' if conflicts == 1 else 's appear'} byte-identical under two or more "
                     "classes")
    if single:
        names = ", ".join(repr(c) for c in single[:3]) + (f" and {len(single) - 3} more" if len(single) > 3 else "")
        notes.append(f"class {names} has a single photo: trained on, not validated" if len(single) == 1 else
                     f"classes {names} have a single photo each: trained on, not validated")
    return Split(sorted(train), sorted(val), f"stratified {val_fraction:.0%} validation split by content, seed {seed}",
                 True, notes)


def encode_keys(keys) -> str:
    """Content keys → a compact string for model metadata (sorted unique prefixes, base64)."""
    prefixes = sorted({bytes(k[:KEY_PREFIX]) for k in keys if k is not None})
    return base64.b64encode(b"".join(prefixes)).decode("ascii")


def decode_keys(text: str) -> set[bytes]:
    """The inverse of `encode_keys`; ValueError when the text is not such a list."""
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if len(raw) % KEY_PREFIX:
        raise ValueError("recorded split keys have a wrong length")
    return {raw[i:i + KEY_PREFIX] for i in range(0, len(raw), KEY_PREFIX)}


def short(key: bytes) -> bytes:
    return bytes(key[:KEY_PREFIX])


def record(split: Split, keys: list[bytes | None]) -> dict:
    """What a model stores about its split (metadata key contract.KEY_SPLIT)."""
    return {"note": split.note, "n_train": len(split.train), "n_val": len(split.val),
            "train": encode_keys(keys[i] for i in split.train), "val": encode_keys(keys[i] for i in split.val)}
