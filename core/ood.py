"""Out-of-distribution gate: is this upload a brain MRI slice like the ones the model learned from?

Standard post-hoc scores on the classifier alone flag only a fraction of non-brain images
(docs: reference-runs.md), so the gate combines up to three *components*, each turned into a
standardised score where larger means "less like brain MRI":

- ``colour``: a hard rule on the colourfulness of the original file (MRI is grey);
- ``cnn``: a dedicated 1-channel 64 px "is this a brain MRI slice?" network trained with
  outlier exposure (MRI of every source vs generated non-MRI images, `core.outliers`);
- ``head``: outlier exposure on the main model's own pooled features (`FeatureHead`), which
  fails on other kinds of image than ``cnn`` (the default model ships ``cnn+head+colour``);
- ``mahalanobis`` / ``knn`` / ``energy`` / ``maxprob``: densities or confidences of the main
  model (pooled features from `core.models.pooled_features`, or its logits).

The gate's ``ood_score`` is the largest standardised component score minus one threshold set so
that at most ``fpr`` (2 %) of the validation slices of *every* source are flagged; it is > 0
exactly when the image is flagged. `fit_gate_for_weights` (the ``fit-ood`` command) fits, measures
every method on test MRI and on held-out outlier categories, and writes ``ood.safetensors``,
the card's ``"ood"`` section and ``ood_eval.json``; it ends with ``annotate-ood``
(`core.evaluation.annotate_ood`), which puts the gate's flags into ``eval.json``.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import nn

from .data import read_card, save_whole
from .evaluation import write_json
from .inference import finite_number
from .preprocess import brain_mask, normalise, prepare
from .reader import ScanImage

Logger = Callable[..., None]   # print, or a quiet stand-in: where progress lines go
GATE_SPEC = {"size": 64, "crop": "head", "mean": 0.20, "std": 0.25}
FEATURE_METHODS = ("mahalanobis", "knn", "head")
LOGIT_METHODS = ("energy", "maxprob")
MODEL_METHODS = FEATURE_METHODS + LOGIT_METHODS
VERSION = 2   # 2: the feature head ("density": "FeatureHead")


# ----------------------------------------------------------------------------- image sets
@dataclass
class ImageSet:
    """Prepared images of one group (a source's split, or an outlier category).

    ``small`` is the gate network's input (uint8, N x 1 x 64 x 64); ``main`` the classifier's
    input (uint8, N x 1 x S x S) or None when no model is involved.
    """
    small: torch.Tensor
    colour: np.ndarray
    main: torch.Tensor | None = None
    groups: list[str] = field(default_factory=list)   # e.g. "benchmark/glioma", for densities

    def __len__(self) -> int:
        return len(self.colour)

    @staticmethod
    def concat(sets: list["ImageSet"]) -> "ImageSet":
        main = None if any(s.main is None for s in sets) else torch.cat([s.main for s in sets])
        return ImageSet(torch.cat([s.small for s in sets]), np.concatenate([s.colour for s in sets]),
                        main, sum((s.groups or [""] * len(s) for s in sets), []))


def _to_u8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0, 1) * 255).round().astype(np.uint8)


def prepare_small(grey: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The gate network's input for one grey image, quantised like the training cache."""
    return _to_u8(prepare(grey, GATE_SPEC, box))


def from_scans(scans: list[ScanImage], main_spec: dict | None = None, groups: list[str] | None = None) -> ImageSet:
    small = np.stack([prepare_small(s.pixels, s.head_box) for s in scans])[:, None]
    main = None
    if main_spec is not None:
        main = torch.from_numpy(np.stack([_to_u8(prepare(s.pixels, main_spec, s.head_box)) for s in scans])[:, None])
    return ImageSet(torch.from_numpy(small), np.array([s.colourfulness for s in scans], np.float32),
                    main, groups or [])


def strip_to_brain(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A skull-stripped look of one whole slice, before the head crop (`core.preprocess.brain_mask`).

    Skull-stripped collections (the BraTS kind) are brain MRI, but a gate trained only on scans
    with a skull flags many of them (`bench/shift_eval.py`'s strip: a fifth to two fifths). This
    strips first, and the crop follows the brain, as with a stripped upload (the classifier's
    batched twin on head crops is `core.engine.strip_and_crop`).
    """
    if float(a.max()) <= float(a.min()) or (mask := brain_mask(a, rng)) is None:
        return a
    return (a * mask).astype(np.float32)


def _read_one(args) -> tuple[np.ndarray, float]:
    path, spec, stripped = args
    from .reader import read_scan
    scan = read_scan(path)
    pixels = scan.pixels
    if stripped:  # seeded by the file, so the gate's two views of one slice strip it alike
        pixels = strip_to_brain(pixels, np.random.default_rng(int(hashlib.sha1(path.encode(errors="surrogateescape")).hexdigest()[:8], 16)))
    return _to_u8(prepare(pixels, spec)), scan.colourfulness


def _prepare_files(paths: list[str], spec: dict, tag: str, workers: int,
                   stripped: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N x 1 x S x S, colourfulness) for files at one spec, cached on disk by path list;
    ``stripped``: each slice through `strip_to_brain` first."""
    from .data import HASH_CACHE
    if stripped:
        tag += "stripped" + hashlib.sha1((inspect.getsource(strip_to_brain) + inspect.getsource(brain_mask))
                                         .encode()).hexdigest()[:10]
    key = hashlib.sha1(("|".join(paths) + tag + repr(sorted(spec.items())) + _code_key()
                        + _stamps(paths)).encode(errors="surrogateescape")).hexdigest()[:16]
    cache = HASH_CACHE.parent / f"ood-{key}.npz"
    if cache.exists():
        z = np.load(cache)
        return z["main" if "main" in z else "small"], z["colour"]
    from .engine import map_in_processes
    out = map_in_processes(_read_one, [(p, spec, stripped) for p in paths], workers, min_jobs=100, chunksize=32)
    imgs, colour = np.stack([o[0] for o in out])[:, None], np.array([o[1] for o in out], np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    _save_npz(cache, small=imgs, colour=colour)
    return imgs, colour


def _stamps(paths: list[str]) -> str:
    """Size and modification time of each file: one replaced under its old name is read again
    (as `engine.cache_path` does), not served to the gate as its old pixels."""
    h = hashlib.sha1()
    for p in paths:
        st = os.stat(p)
        h.update(f"{st.st_size}:{st.st_mtime_ns}|".encode())
    return h.hexdigest()


def _save_npz(path: Path, **arrays) -> None:
    """Atomic: several fit-ood runs may fill the same cache at once."""
    save_whole(path, lambda tmp: np.savez(tmp, **arrays))


def load_files(paths: list[str], main_spec: dict | None, groups: list[str] | None = None,
               workers: int = 2, known: "TrainingCache | None" = None) -> ImageSet:
    """Read and prepare files for the gate network and, with ``main_spec``, for the classifier
    (taken from the classifier's own training cache when ``known`` holds every file)."""
    small, colour = _prepare_files(paths, GATE_SPEC, "-", workers)
    main = None
    if main_spec:
        main = known.take(paths) if known is not None else None
        if main is None:
            main = torch.from_numpy(_prepare_files(paths, main_spec, "main", workers)[0])
    return ImageSet(torch.from_numpy(small), colour, main, groups or [])


STRIPPED_GROUP = "mri_stripped"


def load_stripped(paths: list[str], main_spec: dict | None, workers: int = 2) -> ImageSet:
    """Training slices through `strip_to_brain`, prepared like uploads (the head crop finds the
    brain), as one positive group: it gets one group's share of the network's draws."""
    small, colour = _prepare_files(paths, GATE_SPEC, "-", workers, stripped=True)
    main = torch.from_numpy(_prepare_files(paths, main_spec, "main", workers, stripped=True)[0]) if main_spec else None
    return ImageSet(torch.from_numpy(small), colour, main, [STRIPPED_GROUP] * len(paths))


class TrainingCache:
    """The classifier's training image cache (`engine.cache_images`), when it is still on disk.

    train.py prepares every image of its sources once; reading those instead of decoding the
    files again saves most of fit-ood's time on a busy CPU, and they are exactly what the
    classifier was trained and validated on.
    """

    def __init__(self, array: np.ndarray, index: dict[str, int]):
        self.array, self.index = array, index

    @classmethod
    def find(cls, sources: list[dict], spec: dict) -> "TrainingCache | None":
        from . import data as D
        samples = []
        try:
            for e in sources:
                samples += D.discover(D.resolve_root(e["path"]), e["name"]).samples
        except (OSError, ValueError):
            return None
        from .engine import cache_path
        path = cache_path("images", samples, spec, ".npy")  # engine.cache_images' own file
        if not path.exists():
            return None
        arr = np.load(path, mmap_mode="r")
        if len(arr) != len(samples) or arr.shape[-1] != spec["size"]:
            return None
        return cls(arr, {s.path: i for i, s in enumerate(samples)})

    def take(self, paths: list[str]) -> torch.Tensor | None:
        idx = [self.index.get(str(Path(p).resolve())) for p in paths]
        if any(i is None for i in idx):
            return None
        return torch.from_numpy(np.ascontiguousarray(self.array[np.array(idx)]))


# ----------------------------------------------------------------------------- the gate network
class GateNet(nn.Module):
    """A ~100k-parameter CNN for 64 x 64 grey inputs; one logit, > 0 means "not brain MRI".

    It ends in a 4 x 4 spatial map that is flattened, not pooled: where things are (a head in
    the middle, black corners) is part of what makes an MRI slice.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        w = width

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.features = nn.Sequential(block(1, w), block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 4 * w))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * w * 16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))[:, 0]


def _balanced_weights(groups: list[str]) -> torch.Tensor:
    """Sampling weights giving every group (source or outlier category) an equal share."""
    names, inv = np.unique(np.array(groups), return_inverse=True)
    counts = np.bincount(inv)
    return torch.from_numpy(1.0 / counts[inv]).float()


def train_gate_net(pos: ImageSet, neg: ImageSet, epochs: int = 8, seed: int = 0,
                   batch_size: int = 128, lr: float = 3e-3, width: int = 16, log: Logger = print,
                   geometry: dict | None = None) -> GateNet:
    """Outlier exposure: brain MRI (label 0) vs generated non-MRI images (label 1), balanced.

    Each half of an epoch's draws comes from one side; within a side every source or category
    counts equally, so that the small sources (BRISC, Br35H) are not an afterthought.
    ``geometry`` (rotate, shear, turn_p: `gate_geometry`) widens the augmentation as the
    classifier's was, so that a brain scan the classifier reads when turned is not flagged for it.
    """
    from .engine import augment
    torch.manual_seed(seed)
    net = GateNet(width)
    x = torch.cat([pos.small, neg.small])
    y = torch.cat([torch.zeros(len(pos)), torch.ones(len(neg))])
    wp = _balanced_weights(pos.groups or ["mri"] * len(pos))
    wn = _balanced_weights(neg.groups or ["other"] * len(neg))
    w = torch.cat([wp / wp.sum(), wn / wn.sum()])
    n_draw = len(x)
    steps = epochs * math.ceil(n_draw / batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        t0, tot, correct, loss_sum = time.time(), 0, 0, 0.0
        net.train()
        order = torch.multinomial(w, n_draw, replacement=True, generator=gen)
        for idx in order.split(batch_size):
            xb = augment(x[idx].float().div_(255), 1.0, 0.2, options=geometry)
            logit = net(normalise(xb, GATE_SPEC))
            loss = nnf.binary_cross_entropy_with_logits(logit, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step(); sched.step()
            tot += len(idx); loss_sum += loss.item() * len(idx)
            correct += ((logit > 0).float() == y[idx]).sum().item()
        log(f"gate net epoch {ep + 1}/{epochs}: loss {loss_sum / tot:.4f} acc {correct / tot:.4f} "
            f"({time.time() - t0:.0f} s)")
    return net.eval()


def gate_geometry(card: dict | None) -> dict | None:
    """The classifier's widened geometric augmentation (train.py --rotate/--shear/--turn-p), or None
    when it used the defaults: the gate network then trains exactly as before."""
    from .engine import GEOMETRY_DEFAULTS
    aug = ((card or {}).get("training") or {}).get("augmentation") or {}
    geo = {k: aug[k] for k in GEOMETRY_DEFAULTS if k in aug}
    return geo if geo and geo != GEOMETRY_DEFAULTS else None


def cached_gate_net(pos: ImageSet, neg: ImageSet, epochs: int = 8, seed: int = 0, log: Logger = print,
                    geometry: dict | None = None) -> GateNet:
    """`train_gate_net`, kept on disk by the exact training data, groups, epochs and seed.

    fit-ood trains six networks (~5 min each on 2 cores); a re-fit that only changes how the
    gate combines them (another method, the feature head) then reuses them.
    """
    from .data import HASH_CACHE
    # the training code too: a change to it must not be answered by a network the old code trained
    from . import engine, preprocess  # the augmentation lives in helpers all over engine.py
    code = "".join(inspect.getsource(f) for f in (GateNet, train_gate_net)) + hashlib.sha1(
        b"".join(Path(m.__file__).read_bytes() for m in (engine, preprocess))).hexdigest()
    key = (epochs, seed, VERSION, GATE_SPEC, pos.groups, neg.groups, code) + ((geometry,) if geometry else ())
    h = hashlib.sha1(repr(key).encode())
    for t in (pos.small, neg.small):
        h.update(t.contiguous().numpy().tobytes())
    path = HASH_CACHE.parent / f"gate-net-{h.hexdigest()[:16]}.pt"
    if path.exists():
        net = GateNet()
        net.load_state_dict(torch.load(path, weights_only=True))
        log(f"gate net: reused {path.name}")
        return net.eval()
    net = train_gate_net(pos, neg, epochs=epochs, seed=seed, log=log, geometry=geometry)
    save_whole(path, lambda tmp: torch.save(net.state_dict(), tmp))
    return net


@torch.no_grad()
def net_scores(net: GateNet, small: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    out = [net(normalise(c.float().div(255), GATE_SPEC)) for c in small.split(batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


# ----------------------------------------------------------------------------- main-model scores
@torch.no_grad()
def features_and_logits(model: nn.Module, main: torch.Tensor, spec: dict,
                        batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Pooled penultimate features and logits of the classifier, in one forward pass per batch."""
    from .models import pooled_features
    model.eval()
    feats, logits = [], []
    for c in main.split(batch_size):
        f, z = pooled_features(model, normalise(c.float().div(255), spec))
        feats.append(f.float())
        logits.append(z.float())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


class Mahalanobis:
    """Minimum Mahalanobis distance to the class (source/label) means with one shared covariance.

    Stores the Cholesky factor of the (shrunk) precision matrix, so a score is one matmul.
    """

    def __init__(self, means: np.ndarray, chol: np.ndarray):
        self.means, self.chol = means.astype(np.float32), chol.astype(np.float32)

    @classmethod
    def fit(cls, feats: np.ndarray, groups: list[str], shrink: float = 0.05, min_group: int = 20) -> "Mahalanobis":
        g = np.array(groups)
        names = [n for n in np.unique(g) if (g == n).sum() >= min_group] or [None]
        means, resid = [], []
        for n in names:
            f = feats if n is None else feats[g == n]
            means.append(f.mean(0)); resid.append(f - f.mean(0))
        r = np.concatenate(resid).astype(np.float64)
        cov = r.T @ r / len(r)
        cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
        prec = np.linalg.inv(cov)
        return cls(np.stack(means), np.linalg.cholesky((prec + prec.T) / 2))

    def score(self, feats: np.ndarray) -> np.ndarray:
        f = torch.from_numpy(np.asarray(feats, np.float32))
        m, L = torch.from_numpy(self.means), torch.from_numpy(self.chol)
        d = ((f[:, None, :] - m[None]) @ L).pow(2).sum(-1)   # (N, C) squared distances
        return d.min(1).values.sqrt().numpy()

    @property
    def features(self) -> int:
        return self.means.shape[-1]

    def shape_problem(self) -> str | None:
        d = self.features
        return None if self.means.ndim == 2 and self.chol.shape == (d, d) else "its Mahalanobis means and factor disagree"

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.means": torch.from_numpy(self.means).half(),
                f"{prefix}.chol": torch.from_numpy(self.chol).half()}


class KNN:
    """Distance to the k-th nearest training feature after L2 normalisation (Sun et al. 2022)."""

    def __init__(self, bank: np.ndarray, k: int = 10):
        self.bank, self.k = bank.astype(np.float32), k

    @classmethod
    def fit(cls, feats: np.ndarray, k: int = 10, max_bank: int = 1000, seed: int = 0) -> "KNN":
        rng = np.random.default_rng(seed)
        idx = rng.permutation(len(feats))[:max_bank]
        return cls(_l2(feats[idx]), k)

    def score(self, feats: np.ndarray) -> np.ndarray:
        sims = torch.from_numpy(_l2(feats)) @ torch.from_numpy(self.bank).T
        k = min(self.k, sims.shape[1])
        return (1 - sims.topk(k, dim=1).values[:, -1]).numpy()

    @property
    def features(self) -> int:
        return self.bank.shape[-1]

    def shape_problem(self) -> str | None:
        ok = self.bank.ndim == 2 and len(self.bank) and isinstance(self.k, int) and self.k >= 1
        return None if ok else "its nearest-neighbour bank or k is unusable"

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.bank": torch.from_numpy(self.bank).half()}


class FeatureHead:
    """Outlier exposure on the classifier's own pooled features: a one-hidden-layer MLP, trained
    like the gate network (brain MRI vs generated outliers, every source and category counting
    equally), whose logit is the score (> 0 leans "not brain MRI").

    The 64 px gate network and the classifier see different things: the network a small whole
    view, the features what the tumour classifier (176-192 px) learned. They miss different kinds of
    image (held out, the network misses abdominal CT, the head misses head CT), so the gate can
    take the larger of the two standardised scores.
    """

    def __init__(self, mu: np.ndarray, sd: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray):
        self.mu, self.sd = mu.astype(np.float32), sd.astype(np.float32)
        self.w1, self.b1, self.w2, self.b2 = (a.astype(np.float32) for a in (w1, b1, w2, b2))

    @classmethod
    def fit(cls, pos: np.ndarray, pos_groups: list[str], neg: np.ndarray, neg_groups: list[str],
            hidden: int = 64, steps: int = 400, batch_size: int = 512, seed: int = 0) -> "FeatureHead":
        torch.manual_seed(seed)
        pos_groups, neg_groups = pos_groups or ["mri"] * len(pos), neg_groups or ["other"] * len(neg)
        mu, sd = pos.mean(0), pos.std(0) + 1e-3
        x = torch.from_numpy((np.concatenate([pos, neg]) - mu) / sd).float()
        y = torch.cat([torch.zeros(len(pos)), torch.ones(len(neg))])
        w = torch.cat([_balanced_weights(pos_groups) / len(set(pos_groups)),
                       _balanced_weights(neg_groups) / len(set(neg_groups))])
        assert len(w) == len(x), "one group per feature row"
        net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 1))
        opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.multinomial(w, batch_size, replacement=True, generator=gen)
            xb = x[idx] + 0.1 * torch.randn(len(idx), x.shape[1], generator=gen)   # feature noise
            loss = nnf.binary_cross_entropy_with_logits(net(xb)[:, 0], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        l1, l2 = net[0], net[3]
        return cls(mu, sd, *(t.detach().numpy() for t in (l1.weight, l1.bias, l2.weight, l2.bias)))

    def score(self, feats: np.ndarray) -> np.ndarray:
        h = np.maximum(((np.asarray(feats, np.float32) - self.mu) / self.sd) @ self.w1.T + self.b1, 0)
        return (h @ self.w2.T + self.b2)[:, 0]

    @property
    def features(self) -> int:
        return len(self.mu)

    def shape_problem(self) -> str | None:
        d, h = self.features, len(self.b1)
        ok = (self.mu.shape == self.sd.shape == (d,) and self.w1.shape == (h, d) and self.w2.shape == (1, h)
              and self.b2.shape == (1,) and bool(np.all(self.sd > 0)))
        return None if ok else "its feature head's layers do not fit together"

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        names = ("mu", "sd", "w1", "b1", "w2", "b2")
        return {f"{prefix}.{n}": torch.from_numpy(getattr(self, n)).contiguous() for n in names}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str) -> "FeatureHead":
        return cls(*(t[f"{prefix}.{n}"].float().numpy() for n in ("mu", "sd", "w1", "b1", "w2", "b2")))


SCORER_NAME = {Mahalanobis: "mahalanobis", KNN: "knn", FeatureHead: "head"}


def _l2(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-8)


def energy_score(logits: np.ndarray) -> np.ndarray:
    """Negative free energy, sign flipped so that larger means more unusual."""
    return -torch.logsumexp(torch.from_numpy(logits), 1).numpy()


def maxprob_score(logits: np.ndarray) -> np.ndarray:
    return 1 - torch.softmax(torch.from_numpy(logits), 1).max(1).values.numpy()


class FeatureTap:
    """Keeps the pooled features of the classifier's last forward pass, per thread.

    `Predictor` runs ``model(x)`` just before ``gate.check(scan, x, model)``; re-running the
    model for its features would double the cost, so a forward hook keeps them and ``check``
    reuses them when the input is the very same tensor (otherwise it runs the model once more).
    """

    def __init__(self):
        self.local = threading.local()
        self.models: set[int] = set()
        self.lock = threading.Lock()

    def attach(self, model: nn.Module) -> None:
        from .models import saliency_layer
        with self.lock:
            if id(model) in self.models:
                return
            saliency_layer(model).register_forward_hook(self._keep_features)
            model.register_forward_hook(self._keep_output)
            self.models.add(id(model))

    def paused(self):
        """Passes run inside keep nothing: the plain pass stays the one the gate reads (a
        test-time-augmentation pass on a mirrored input would otherwise replace it)."""
        return self._paused_as(True)

    @contextmanager
    def _paused_as(self, value: bool):
        before = getattr(self.local, "paused", False)
        self.local.paused = value
        try:
            yield
        finally:
            self.local.paused = before

    def _keep_features(self, m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        if not getattr(self.local, "paused", False):
            self.local.f = out.detach().mean(dim=(2, 3))

    def _keep_output(self, m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        if getattr(self.local, "paused", False):
            return
        self.local.x = inputs[0] if inputs else None
        self.local.logits = out.detach() if torch.is_tensor(out) else None

    def get(self, model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
        """{"feats", "logits"} of ``model`` on ``x``: kept from the last pass, or one new pass."""
        if getattr(self.local, "x", None) is not x or getattr(self.local, "logits", None) is None:
            self.attach(model)
            with self._paused_as(False), torch.no_grad():  # the gate's own pass: kept even inside `paused`
                model(x)
        return {"feats": self.local.f.float().cpu().numpy(), "logits": self.local.logits.float().cpu().numpy()}


# ----------------------------------------------------------------------------- the gate
class GateError(ValueError):
    """A gate file that reads but cannot judge (its numbers or parts): one sentence saying why."""


@dataclass
class Component:
    """One score turned into standard units: (raw - center) / scale; the colour rule has its own."""
    name: str
    center: float
    scale: float

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        return (np.asarray(raw, np.float64) - self.center) / self.scale


def flagging(margins: dict[str, float]) -> list[str]:
    """The parts of `OODGate.verdict`'s margins that each alone flag the upload, sorted: over 0, a
    NaN counting as flagging as it does in the gate's maximum (the colour rule is never NaN)."""
    return sorted(k for k, v in margins.items() if not v <= 0)


def per_source_threshold(scores: dict[str, np.ndarray], fpr: float) -> float:
    """A threshold that flags at most ``fpr`` of every source's validation slices.

    Not on the highest score allowed to pass but halfway to the next one: a score lying on the
    threshold flips with rounding (single vs batched passes, bf16, fp16-stored densities), and
    the served gate would flag more than the stated share.
    """
    kept = [s for s in scores.values() if len(s)]
    t = float(max(np.quantile(s, 1 - fpr, method="higher") for s in kept))
    above = np.concatenate([np.asarray(s, np.float64) for s in kept])
    above = above[above > t]
    return (t + float(above.min())) / 2 if len(above) else t + 1.0


class OODGate:
    """``check(scan, x, model) -> (in_distribution, ood_score)``; ``ood_score > 0`` means flagged."""

    def __init__(self, method: str, components: list[Component], threshold: float, colour_limit: float | None,
                 net: GateNet | None = None, density: Mahalanobis | KNN | FeatureHead | None = None,
                 info: dict | None = None):
        self.method, self.components, self.threshold = method, components, threshold
        self.colour_limit, self.net, self.density = colour_limit, net, density
        self.info = info or {}
        self.tap = FeatureTap()

    @property
    def uses_classifier(self) -> bool:
        """Whether a component scores the classifier's features or logits (else the gate is
        the 64 px network and the colour rule alone, and never needs the model's pass)."""
        return any(c.name in MODEL_METHODS for c in self.components)

    # -- scoring
    def raw_scores(self, data: ImageSet, model: nn.Module | None = None, spec: dict | None = None,
                   cache: dict | None = None) -> dict[str, np.ndarray]:
        """Raw component scores for a batch (``cache`` may hold precomputed features/logits)."""
        out = {}
        names = {c.name for c in self.components}
        if "cnn" in names:
            out["cnn"] = cache["cnn"] if cache and "cnn" in cache else net_scores(self.net, data.small)
        if self.uses_classifier:
            if cache is None or "feats" not in cache:
                f, z = features_and_logits(model, data.main, spec)
                cache = {**(cache or {}), "feats": f, "logits": z}
            out.update(_model_scores(names, self.density, cache))
        return out

    def standardised(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        """The largest standardised component score per image: what the threshold is set on."""
        return np.max([c.standardise(raw[c.name]) for c in self.components], axis=0)

    def combine(self, raw: dict[str, np.ndarray], colour: np.ndarray) -> np.ndarray:
        """Standardised max over components, minus the threshold; the colour rule overrides."""
        if not self.components:  # the colour rule alone
            z = np.full(len(colour), -1.0)
        else:
            z = self.standardised(raw) - self.threshold
        if self.colour_limit is not None:
            zc = self.colour_margin(colour)
            z = np.where(zc > 0, np.maximum(z, zc), z)
        return z

    def colour_margin(self, colour) -> np.ndarray:
        """The colour rule's score over its limit (> 0 flags), in the components' units."""
        return (np.asarray(colour, np.float64) - self.colour_limit) / self.colour_limit

    def scores(self, data: ImageSet, model=None, spec=None, cache=None) -> np.ndarray:
        return self.combine(self.raw_scores(data, model, spec, cache), data.colour)

    @torch.no_grad()
    def _raw_one(self, scan: ScanImage, x: torch.Tensor, model: nn.Module) -> dict[str, np.ndarray]:
        """One upload's raw component scores: the gate network on its own 64 px view, features
        reused from the model's pass."""
        raw = {}
        names = {c.name for c in self.components}
        if "cnn" in names:
            small = torch.from_numpy(prepare_small(scan.pixels, scan.head_box))[None, None]
            raw["cnn"] = net_scores(self.net, small)
        if self.uses_classifier:
            raw.update(_model_scores(names, self.density, self.tap.get(model, x)))
        return raw

    def verdict(self, scan: ScanImage, x: torch.Tensor, model: nn.Module) -> tuple[bool, float, dict[str, float]]:
        """One upload: (in_distribution, ood_score, margins) from one scoring; ``ood_score > 0``
        means flagged. ``margins``: each part's own score over the threshold (> 0: that part alone
        flags the upload), and the colour rule's: which part withholds a scan, the gate network
        (the image's look) or the feature head (the classifier's features). ``ood_score`` is their
        maximum, the colour rule counting only when it flags (a gate of the colour rule alone
        scores -1 when it passes); `flagging` names the parts that flag."""
        raw = self._raw_one(scan, x, model)
        score = float(self.combine(raw, np.array([scan.colourfulness]))[0])
        margins = {c.name: float(c.standardise(raw[c.name])[0] - self.threshold) for c in self.components}
        if self.colour_limit is not None:
            margins["colour"] = float(self.colour_margin(scan.colourfulness))
        return score <= 0, score, margins

    def check(self, scan: ScanImage, x: torch.Tensor, model: nn.Module) -> tuple[bool, float]:
        """One upload: (in_distribution, ood_score); ``ood_score > 0`` means flagged."""
        return self.verdict(scan, x, model)[:2]

    def margins(self, scan: ScanImage, x: torch.Tensor, model: nn.Module) -> dict[str, float]:
        """``verdict``'s margins alone."""
        return self.verdict(scan, x, model)[2]

    # -- persistence
    def config(self) -> dict:
        return {"version": VERSION, "method": self.method, "threshold": self.threshold,
                "colour_limit": self.colour_limit,
                "components": [c.__dict__ for c in self.components],
                "density": type(self.density).__name__ if self.density else None,
                "knn_k": getattr(self.density, "k", None),
                "net_width": self.net.features[0][0].out_channels if self.net else None,
                "input": {**GATE_SPEC, "note": "gate network input: prepare(grey, spec), uint8-quantised"},
                **self.info}

    def save(self, out_dir: str | Path, card_section: dict | None = None) -> Path:
        """Write ``ood.safetensors`` (weights + config in its metadata) and merge ``card.json``."""
        from safetensors.torch import save_file
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        if self.net is not None:
            tensors.update({f"net.{k}": v.detach().float().contiguous() for k, v in self.net.state_dict().items()})
        if self.density is not None:
            tensors.update(self.density.tensors("density"))
        if not tensors:  # safetensors needs at least one tensor; the colour rule alone has none
            tensors["colour_limit"] = torch.tensor([self.colour_limit or 0.0])
        cfg = self.config()
        save_whole(out_dir / "ood.safetensors",   # swapped in whole, readable as any file the run writes
                   lambda tmp: save_file(tensors, str(tmp), metadata={"config": json.dumps(cfg)}))
        card = out_dir / "card.json"
        if card.exists():
            data = json.loads(card.read_text())
            data["ood"] = {**cfg, **(card_section or {})}
            write_json(card, data)
        return out_dir / "ood.safetensors"

    @classmethod
    def load(cls, weights_dir: str | Path) -> "OODGate":
        """The gate in ``weights_dir``; ValueError (one sentence) when its file is damaged."""
        path = Path(weights_dir) / "ood.safetensors"
        if not path.is_file():
            raise ValueError(f"{weights_dir} has no out-of-distribution gate ({path.name}): "
                             "fit one with `python -m core fit-ood`")
        try:
            return cls._load(path)
        except GateError:
            raise
        except Exception as e:  # safetensors' own error, a missing config key, a shape mismatch
            raise ValueError(f"the out-of-distribution gate {path} could not be loaded ({type(e).__name__}): "
                             "the file is damaged; fit it again with `python -m core fit-ood`") from e

    @classmethod
    def _load(cls, path: Path) -> "OODGate":
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(str(path), "pt") as f:
            cfg = json.loads(f.metadata()["config"])
        t = load_file(str(path))
        net = None
        if cfg.get("net_width"):
            net = GateNet(cfg["net_width"])
            net.load_state_dict({k[4:]: v.float() for k, v in t.items() if k.startswith("net.")})
            net.eval()
        density = None
        if cfg.get("density") == "Mahalanobis":
            density = Mahalanobis(t["density.means"].float().numpy(), t["density.chol"].float().numpy())
        elif cfg.get("density") == "KNN":
            density = KNN(t["density.bank"].float().numpy(), cfg.get("knn_k") or 10)
        elif cfg.get("density") == "FeatureHead":
            density = FeatureHead.from_tensors(t, "density")
        comps = [Component(**c) for c in cfg["components"]]
        info = {k: v for k, v in cfg.items() if k not in ("version", "method", "threshold", "colour_limit",
                                                          "components", "density", "knn_k", "net_width", "input")}
        gate = cls(cfg["method"], comps, cfg["threshold"], cfg.get("colour_limit"), net, density, info)
        if (why := gate.config_problem()):
            raise GateError(f"the out-of-distribution gate {path} cannot be used: {why}; fit it again with "
                            "`python -m core fit-ood`")
        return gate

    def config_problem(self) -> str | None:
        """What makes this gate's numbers or parts unusable, in words (None when they fit): a NaN
        threshold flagged every scan with a NaN score (invalid JSON) and passed the card check, a
        scale of 0 scored infinity, and a part without its scorer failed every file at scoring."""
        if not finite_number(self.threshold):
            return "its threshold is not a finite number"
        if self.colour_limit is not None and not (finite_number(self.colour_limit) and self.colour_limit > 0):
            return "its colour limit is not a positive number"
        names = [c.name for c in self.components]
        if unknown := sorted(set(names) - {"cnn", *MODEL_METHODS}):
            return f"it names parts no code scores ({', '.join(unknown)})"
        if bad := [c.name for c in self.components if not (finite_number(c.center) and finite_number(c.scale) and c.scale > 0)]:
            return f"the centre or scale of {', '.join(bad)} is not a finite number (a scale above 0)"
        if ("cnn" in names) != (self.net is not None):
            return "its gate network and its list of parts disagree"
        scorers = [n for n in names if n in FEATURE_METHODS]
        if len(scorers) > 1 or (scorers and SCORER_NAME.get(type(self.density)) != scorers[0]):
            return f"its feature scorer does not match its parts ({', '.join(scorers)})"
        if self.density is not None and (why := self.density.shape_problem()):
            return why
        if not self.components and self.colour_limit is None:
            return "it holds no part that judges an image"
        return None

    def mismatch(self, card: dict, weights_sha256: str, feature_channels: int | None) -> str | None:
        """Why this gate cannot judge for this card's model (None when it can): a gate file the
        card does not describe (copied from another folder, or written without its card), or one
        fitted on another network's features, would flag scans by another model's measure."""
        listed = (card.get("ood") or {}).get("threshold") if isinstance(card.get("ood"), dict) else None
        if not finite_number(listed) or not abs(float(listed) - self.threshold) <= 1e-9:   # NaN: never equal
            return (f"the out-of-distribution gate's threshold ({self.threshold:.6g}) is not the one its card "
                    f"lists ({listed}): the gate file comes from another fit; fit it again with "
                    "`python -m core fit-ood`")
        described = (card.get("ood") or {}).get("input") or {}
        if self.net is not None and (other := {k: described[k] for k in GATE_SPEC
                                               if k in described and described[k] != GATE_SPEC[k]}):
            # the gate network is fed GATE_SPEC, whatever a card says: a card that says otherwise
            # describes a gate fitted on other inputs, which this code would feed wrongly
            return (f"the card's out-of-distribution gate reads its input as {other}, this code feeds it "
                    f"{ {k: GATE_SPEC[k] for k in other} }: fit it again with `python -m core fit-ood`")
        if (fitted := self.info.get("weights_sha256")) and fitted != weights_sha256:
            return "the out-of-distribution gate was fitted for other weights; fit it again with `python -m core fit-ood`"
        if self.uses_classifier and self.density is not None and feature_channels and self.density.features != feature_channels:
            return (f"the out-of-distribution gate reads {self.density.features} features, this network makes "
                    f"{feature_channels}: it was fitted for another network")
        return None

    # -- fitting
    @classmethod
    def fit(cls, pos: ImageSet, neg: ImageSet | None, val: dict[str, ImageSet], method: str = "cnn+colour",
            model: nn.Module | None = None, spec: dict | None = None, fpr: float = 0.02,
            epochs: int = 8, seed: int = 0, net: GateNet | None = None, caches: dict | None = None,
            feature_train: ImageSet | None = None, neg_feats: tuple[np.ndarray, list[str]] | None = None,
            log: Logger = print) -> "OODGate":
        """Fit the components named in ``method`` (e.g. "cnn+mahalanobis+colour") and the threshold.

        ``pos``: training MRI; ``neg``: training outliers (for the network); ``val``: validation
        MRI per source, which sets the standardisation and the threshold. ``caches`` may hold
        precomputed {"train"|source: {"feats", "logits"}} for the main model; ``feature_train``
        is the training MRI for feature scores when not ``pos`` itself; ``neg_feats`` (features,
        categories) the classifier's features of training outliers, for the feature head.
        """
        feature_train = feature_train or pos
        parts = method.split("+")
        check_method(method, model is not None or caches is not None)
        colour_limit = colour_limit_from(pos) if "colour" in parts else None
        if "cnn" in parts and net is None:
            net = train_gate_net(pos, neg, epochs=epochs, seed=seed, log=log)
        caches = dict(caches or {})

        def cached(key: str, data: ImageSet) -> dict:
            if "feats" not in caches.get(key, {}):
                f, z = features_and_logits(model, data.main, spec)
                caches[key] = {**caches.get(key, {}), "feats": f, "logits": z}
            return caches[key]
        density = None
        if "mahalanobis" in parts:
            density = Mahalanobis.fit(cached("train", feature_train)["feats"], feature_train.groups)
        elif "knn" in parts:
            density = KNN.fit(cached("train", feature_train)["feats"], seed=seed)
        elif "head" in parts:
            if neg_feats is None:
                raise ValueError("the feature head needs the classifier's features of training outliers")
            density = FeatureHead.fit(cached("train", feature_train)["feats"], feature_train.groups,
                                      neg_feats[0], neg_feats[1], seed=seed)
        gate = cls(method, [], 0.0, colour_limit, net if "cnn" in parts else None, density)
        names = [p for p in parts if p != "colour"]
        raw_val = {}
        for src, data in val.items():
            if "cnn" in names:
                r = {"cnn": caches[src]["cnn"] if "cnn" in caches.get(src, {}) else net_scores(net, data.small)}
            else:
                r = {}
            if set(names) & set(MODEL_METHODS):
                r.update(_model_scores(set(names), density, cached(src, data)))
            raw_val[src] = r
        for n in names:  # robust units: 0 at the pooled validation median, 1 at its 98th percentile
            pooled = np.concatenate([r[n] for r in raw_val.values()])
            med, hi = np.median(pooled), np.quantile(pooled, 1 - fpr)
            gate.components.append(Component(n, float(med), float(max(hi - med, 1e-6))))
        if names:
            comb = {s: gate.standardised(raw_val[s]) for s in val}
            gate.threshold = per_source_threshold(comb, fpr)
        return gate


def _model_scores(names: set[str], density, cache: dict) -> dict[str, np.ndarray]:
    out = {}
    if names & set(FEATURE_METHODS):
        if density is None:
            raise ValueError(f"gate components {sorted(names)} need a fitted feature scorer")
        out[SCORER_NAME[type(density)]] = density.score(cache["feats"])
    if "energy" in names:
        out["energy"] = energy_score(cache["logits"])
    if "maxprob" in names:
        out["maxprob"] = maxprob_score(cache["logits"])
    return out


def colour_limit_from(pos: ImageSet, floor: float = 0.03) -> float:
    """Grey MRI saved as JPEG picks up a little chroma; allow twice the most seen in training."""
    return float(max(floor, 2 * float(np.max(pos.colour, initial=0.0))))




# ----------------------------------------------------------------------------- data for fitting
def source_roots(card: dict | None, data_config: str | Path | None) -> dict[str, Path]:
    """Source name -> data root, from the model card and from the training config (TOML)."""
    from . import data as D
    entries = list((card or {}).get("sources", []))
    if data_config and Path(data_config).exists():
        import tomllib
        data = tomllib.loads(Path(data_config).read_text()).get("data", [])
        data = [data] if isinstance(data, (str, dict)) else data
        # named as train.py names them; a table without a path is no root (train.py refuses it)
        entries += D.parse_sources([e for e in data if not isinstance(e, dict) or "path" in e])
    roots = {}
    for e in entries:
        name, path = e.get("name"), e.get("path")
        if name and path and name not in roots:
            roots[name] = D.resolve_root(path)
    return roots


def read_split_file(split_file: str | Path) -> dict:
    """split.json's {source: {split: [files]}}; ValueError naming the file when it is not one."""
    try:
        record = json.loads(Path(split_file).read_text()).get("files")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        raise ValueError(f"{split_file} is not a split.json that train.py wrote (no 'files' by source)")
    return record


def split_files(split_file: str | Path, roots: dict[str, Path]) -> dict[str, dict[str, tuple[list[str], list[str]]]]:
    """{source: {split: (absolute paths, "source/label" groups)}} from a split.json, each file
    labelled as `core.data.samples_from_record` labels it (by its class folder, in any layout)."""
    from .data import samples_from_record
    record = read_split_file(split_file)
    for src in record:
        if src not in roots:
            raise ValueError(f"split.json names source {src!r} but no data root is known for it "
                             f"(known: {', '.join(roots) or 'none'}); pass --data-config")
    out: dict = {src: {sp: ([], []) for sp in splits} for src, splits in record.items()}
    for s in samples_from_record(record, roots):
        paths, groups = out[s.source][s.split]
        paths.append(s.path)
        groups.append(f"{s.source}/{s.label}")
    return out


def _code_key() -> str:
    """The code that makes the cached gate inputs: a fix to reading, preparing or drawing them
    must not leave fit-ood training and thresholding on the old pixels while serving uses new."""
    from . import outliers, preprocess, reader
    return hashlib.sha1(b"".join(Path(m.__file__).read_bytes()
                                 for m in (outliers, preprocess, reader))).hexdigest()[:10]


def outlier_set(category: str, n: int, seed: int, main_spec: dict | None, mri_paths: list[str]) -> ImageSet:
    """``n`` generated images of one category, prepared like uploads; cached on disk."""
    from . import outliers as O
    from .data import HASH_CACHE
    from .reader import read_scan
    derived = category in O.MRI_DERIVED
    # what the draw reads besides the code: the MRI slices it transforms, the real head CT's file
    source = (mri_paths, _stamps(mri_paths)) if derived else None
    if category.startswith("real_head_ct"):
        source = (str(O.HEAD_CT_FILE), _stamps([str(O.HEAD_CT_FILE)]))
    if category in O.SCAN_CT_FILES:
        source = (O.SCAN_CT_FILES[category], _stamps(list(O.SCAN_CT_FILES[category])))
    key = hashlib.sha1(repr((category, n, seed, main_spec and sorted(main_spec.items()), _code_key(),
                             source, GATE_SPEC)).encode()).hexdigest()[:16]
    cache = HASH_CACHE.parent / f"ood-out-{key}.npz"
    if cache.exists():
        z = np.load(cache)
        return ImageSet(torch.from_numpy(z["small"]), z["colour"],
                        torch.from_numpy(z["main"]) if "main" in z else None, [category] * n)
    mri = [read_scan(p).pixels for p in mri_paths] if derived else None
    data = from_scans(O.make_scans(category, n, seed, mri), main_spec, [category] * n)
    arrays = {"small": data.small.numpy(), "colour": data.colour}
    if data.main is not None:
        arrays["main"] = data.main.numpy()
    cache.parent.mkdir(parents=True, exist_ok=True)
    _save_npz(cache, **arrays)
    return data


# ----------------------------------------------------------------------------- evaluation
def _pct(flags: np.ndarray) -> float:
    return round(100.0 * float(np.mean(flags)), 2) if len(flags) else float("nan")


def evaluate_gate(gate: OODGate, val: dict[str, ImageSet], test: dict[str, ImageSet],
                  outliers: dict[str, ImageSet], caches: dict, seen: list[str]) -> dict:
    """% flagged of each source's validation and test MRI and of each outlier category."""
    def flags(key: str, data: ImageSet) -> np.ndarray:
        return gate.scores(data, cache=caches.get(key)) > 0
    out_flags = {c: flags(f"out/{c}", d) for c, d in outliers.items()}
    row = {"val_mri_flagged_pct": {s: _pct(flags(s, d)) for s, d in val.items()},
           "test_mri_flagged_pct": {s: _pct(flags(f"test/{s}", d)) for s, d in test.items()},
           "outliers_flagged_pct": {c: _pct(f) for c, f in out_flags.items()}}
    o = row["outliers_flagged_pct"]
    unseen = [c for c in o if c not in seen]
    row["seen_mean_pct"] = round(float(np.mean([o[c] for c in o if c in seen])), 2) if seen else None
    row["unseen_mean_pct"] = round(float(np.mean([o[c] for c in unseen])), 2) if unseen else None
    row["unseen_min_pct"] = min(o[c] for c in unseen) if unseen else None
    row["all_outliers_pct"] = _pct(np.concatenate(list(out_flags.values())))
    row["max_test_mri_flagged_pct"] = max(row["test_mri_flagged_pct"].values())
    return row


def time_check(gate: OODGate, scans: list[ScanImage], model: nn.Module | None, spec: dict | None) -> float:
    """Median milliseconds of ``check`` after the classifier's own pass, as `Predictor` runs it."""
    from .preprocess import preprocess
    times = []
    for s in scans:
        x = preprocess(s.pixels, spec)[None] if spec else torch.zeros(1, 1, 8, 8)
        if model is not None:
            with torch.no_grad():
                model(x)
        t0 = time.perf_counter()
        gate.check(s, x, model)
        times.append(time.perf_counter() - t0)
    return round(1000 * float(np.median(times)), 2)


def markdown_table(rows: dict[str, dict], sources: list[str], seen: list[str], unseen: list[str]) -> str:
    """Methods as columns, sources and categories as rows: what the report shows."""
    names = list(rows)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def line(label: str, get) -> None:
        lines.append(f"| {label} | " + " | ".join(f"{get(rows[n])}" for n in names) + " |")
    for s in sources:
        line(f"val MRI {s} (% flagged)", lambda r, s=s: r["val_mri_flagged_pct"][s])
    for s in sources:
        line(f"**test MRI {s}** (% flagged)", lambda r, s=s: r["test_mri_flagged_pct"][s])
    for c in seen:
        line(f"seen: {c}", lambda r, c=c: r["outliers_flagged_pct"][c])
    for c in unseen:
        line(f"UNSEEN: {c}", lambda r, c=c: r["outliers_flagged_pct"][c])
    line("mean seen categories", lambda r: r["seen_mean_pct"])
    line("**mean unseen categories**", lambda r: r["unseen_mean_pct"])
    line("worst unseen category", lambda r: r["unseen_min_pct"])
    line("check() ms", lambda r: r.get("check_ms", "-"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- fit-ood
def check_method(method: str, with_classifier: bool) -> None:
    """Raise ValueError for a gate ``method`` that cannot be fitted: fit-ood checks it before its
    46 minutes of work, not at the end."""
    parts = method.split("+")
    unknown = set(parts) - {"cnn", "colour", *MODEL_METHODS}
    if unknown:
        raise ValueError(f"unknown OOD method part(s): {', '.join(sorted(unknown))} (parts: cnn, colour, "
                         f"{', '.join(MODEL_METHODS)}, joined by '+', e.g. cnn+head+colour)")
    if len(set(parts) & set(FEATURE_METHODS)) > 1:
        raise ValueError(f"method {method!r} names more than one feature scorer ({', '.join(FEATURE_METHODS)})")
    if set(parts) & set(MODEL_METHODS) and not with_classifier:
        raise ValueError(f"method {method!r} reads the classifier's features or logits, and this folder has "
                         "no trained classifier (model.safetensors)")


COMPARED = ("colour", "maxprob", "energy", "mahalanobis", "knn", "mahalanobis+colour", "head+colour",
            "cnn", "cnn+colour", "cnn+mahalanobis+colour", "cnn+knn+colour", "cnn+head+colour")
HEAD_OUTLIERS = 400   # training outliers per category for the feature head (classifier-sized)


@dataclass
class GateFit:
    """What every gate of one ``fit-ood`` run is fitted and measured with: the classifier, its MRI
    sets (`_load_mri`), the outlier draws and the classifier's outputs on them, cached once."""
    model: nn.Module | None
    spec: dict | None
    d: dict                                  # `_load_mri`'s sets
    test_out: dict[str, ImageSet]            # outliers to measure on, per category
    head_neg: dict[str, np.ndarray]          # the feature head's outlier features, per category
    caches: dict                             # the classifier's outputs on `keyed`
    keyed: list[tuple[str, ImageSet]]        # every set measured on, by key
    timing_scans: list[ScanImage]
    geometry: dict | None
    epochs: int
    seed: int
    log: Logger

    def net(self, negatives: ImageSet) -> GateNet:
        """The gate network trained on the MRI against these outliers (cached by its inputs)."""
        return cached_gate_net(self.d["pos"], negatives, epochs=self.epochs, seed=self.seed, log=self.log,
                               geometry=self.geometry)

    def fit_eval(self, m: str, net: GateNet, caches: dict, trained: list[str]) -> tuple[OODGate, dict]:
        """Method ``m`` fitted on the outlier categories ``trained`` (the feature head's part) with
        this network, and measured (`evaluate_gate`, with its check time)."""
        neg_feats = None
        if self.head_neg:
            neg_feats = (np.concatenate([self.head_neg[k] for k in trained]),
                         [k for k in trained for _ in range(len(self.head_neg[k]))])
        g = OODGate.fit(self.d["pos"], None, self.d["val"], m, self.model, self.spec, net=net, caches=caches,
                        seed=self.seed, feature_train=self.d["feat_train"], neg_feats=neg_feats, log=self.log)
        row = evaluate_gate(g, self.d["val"], self.d["test"], self.test_out, caches, trained)
        row["check_ms"] = time_check(g, self.timing_scans, self.model, self.spec)
        return g, row


def fit_gate_for_weights(weights: str | Path, data_config: str | Path | None = None, method: str = "auto",
                         out: str | Path | None = None, split: str | Path | None = None, epochs: int = 8,
                         n_train: int = 700, n_test: int = 200, seed: int = 0,
                         max_feature_train: int = 3000, final: str = "seen", n_folds: int = 4,
                         n_stripped: int = 0, log: Logger = print) -> dict:
    """Fit every compared method for one model, measure them, ship one: the ``fit-ood`` command.

    ``final="seen"`` ships the gate exactly as measured (trained on the SEEN categories only);
    ``final="all"`` ships the chosen method retrained on every category, and measures how each
    category is caught when held out: ``n_folds`` more gates, each trained without one fold of the
    categories (`category_folds`). ``TEST_ONLY`` categories (real images) are never trained on.
    """
    from . import outliers as O
    weights = Path(weights)
    out = Path(out) if out else weights
    card = read_card(weights) if (weights / "card.json").exists() else None
    model, spec = _load_classifier(weights, card)
    d = _load_mri(card, data_config, split or weights / "split.json", spec, max_feature_train, seed, log,
                  n_stripped)
    fit, neg_by = _gate_fit(model, spec, d, card, n_train, n_test, epochs, seed, log)
    seen, unseen, test_only = list(O.SEEN), list(O.UNSEEN), list(O.TEST_ONLY)   # after use_scan_ct (_gate_fit) adds the CTs
    t0 = time.time()
    net = fit.net(ImageSet.concat(list(neg_by.values())))
    net_time = time.time() - t0
    methods = [m for m in COMPARED if model is not None or not set(m.split("+")) & set(MODEL_METHODS)]
    if method not in ("auto", *methods):
        methods.append(method)
    gates, rows = {}, {}
    caches_a = _with_cnn(fit.caches, net, fit.keyed)
    for m in methods:
        gates[m], rows[m] = fit.fit_eval(m, net, caches_a, seen)
    chosen = pick_method(rows, [m for m in methods if m.startswith("cnn") and m.endswith("colour")]) \
        if method == "auto" else method
    # only the network and the feature head learn from outliers: a gate of scores alone has seen none
    learns = bool({"cnn", "head"} & set(chosen.split("+")))
    gate, trained_on, held_out, alternatives = gates[chosen], (seen if learns else []), None, {}
    if final == "all" and "cnn" not in chosen.split("+"):
        log(f"--final all: {chosen} has no gate network to retrain on every category, so it ships as "
            f"measured" + (", trained on the seen categories only" if learns else "") + ", with its own "
            "rates on the categories it never trained on as the held-out estimate")
    if final == "all" and "cnn" in chosen.split("+"):
        gate, held_out, alternatives = retrain_on_every_category(fit, chosen, methods, neg_by, rows, n_train, n_folds)
        trained_on = seen + unseen
    shipped = f"{chosen} [all]" if held_out else chosen
    counts = {"train_mri": {s: len(x) for s, x in d["sets"]["train"].items()},
              "val_mri": {s: len(x) for s, x in d["val"].items()},
              "test_mri": {s: len(x) for s, x in d["test"].items()},
              "train_outliers_per_category": n_train, "test_outliers_per_category": n_test}
    if n_stripped:  # without copies the card and report stay exactly as before the option existed
        counts["train_mri_skull_stripped_copies"] = d["pos"].groups.count(STRIPPED_GROUP)
    gate.info = _card_info(rows[shipped], trained_on, [c for c in seen + unseen + test_only if c not in trained_on],
                           counts, epochs, seed, net_time, held_out)
    if model is not None:   # a gate fitted before the classifier (no model.safetensors) reads no features
        from .inference import file_sha256
        gate.info["weights_sha256"] = file_sha256(Path(weights) / "model.safetensors")  # the features it read
    path = gate.save(out)
    table = markdown_table(rows, list(d["val"]), seen, unseen + test_only) + _held_out_text(held_out, alternatives)
    report = {"weights": str(weights), "chosen": chosen, "shipped": shipped, "methods": rows,
              "seen_categories": seen, "unseen_categories": unseen, "test_only_categories": test_only,
              "held_out_estimate": held_out, "held_out_estimate_alternatives": alternatives,
              "counts": counts, "table_markdown": table, "gate_file_bytes": path.stat().st_size,
              "note": FIT_REPORT_NOTE}
    write_json(out / "ood_eval.json", report)
    log(table)
    log(f"shipped: {shipped} -> {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return report


FIT_REPORT_NOTE = (
    "'seen'/'UNSEEN' refer to the comparison fold (A): its gates trained on the seen "
    "categories only and are tested on fresh draws of them (photo: new crops of the "
    "training photos; MRI-derived: test-split slices) and on unseen categories never "
    "shown to them ('photo_unseen' are different photos). '[fold K]' gates trained on every "
    "category but one fold (held_out_estimate.folds), whose rates are held out; '[all]' "
    "on every category (its rates are not held out, except real_medical, which no gate "
    "trains on; real_head_ct_top is the upper slices of the CT whose lower ones it trains on). Mean/worst 'seen' lines of a fold row are over its own trained "
    "categories. Test MRI is never trained on.")


def _gate_fit(model: nn.Module | None, spec: dict | None, d: dict, card: dict | None, n_train: int, n_test: int,
              epochs: int, seed: int, log: Logger) -> tuple[GateFit, dict[str, ImageSet]]:
    """The outliers drawn (to train on: the SEEN categories, returned by category; to measure
    on: every category) and the classifier's outputs on every set measured, for `GateFit`."""
    from . import outliers as O
    O.use_scan_ct(d["not_mri"]["train"], d["not_mri"]["test"])
    log(f"CTs among the sources' scans (core/not_mri.txt): {len(d['not_mri']['train'])} train "
        f"as outliers (scan_ct), {len(d['not_mri']['test'])} test only (scan_ct_test)")
    seen, unseen, test_only = list(O.SEEN), list(O.UNSEEN), list(O.TEST_ONLY)
    log(f"real head CT ({O.HEAD_CT_FILE}): " + ("trained on its lower slices, tested on its upper ones"
        if O.has_head_ct() else "not installed, so the gate trains without it (apt-get install invesalius-examples)"))
    t0 = time.time()
    neg_by = {c: outlier_set(c, n_train, seed, None, d["train_mri"]) for c in seen}
    test_out = {c: outlier_set(c, n_test, seed + 1000, spec, d["test_mri"]) for c in seen + unseen + test_only}
    log(f"outliers: {sum(map(len, neg_by.values()))} for training ({len(seen)} categories), "
        f"{sum(map(len, test_out.values()))} for testing ({time.time() - t0:.0f} s)")
    keyed = [*d["val"].items(), *[(f"test/{s}", x) for s, x in d["test"].items()],
             *[(f"out/{c}", x) for c, x in test_out.items()]]
    caches = _classifier_caches(model, spec, [("train", d["feat_train"]), *keyed], log)
    head_neg: dict[str, np.ndarray] = {}
    if model is not None:   # the feature head's outliers: drawn like the network's, classifier-sized
        hs = [(c, outlier_set(c, min(n_train, HEAD_OUTLIERS), seed, spec, d["train_mri"])) for c in seen + unseen]
        hc = _classifier_caches(model, spec, hs, log)
        head_neg = {c: hc[c]["feats"] for c, _ in hs}
    timing_scans = O.make_scans("photo_unseen", 5, seed + 7) + [_read(p) for p in d["test_mri"][:15]]
    return GateFit(model, spec, d, test_out, head_neg, caches, keyed, timing_scans, gate_geometry(card), epochs,
                   seed, log), neg_by


def retrain_on_every_category(fit: GateFit, chosen: str, methods: list[str], neg_by: dict[str, ImageSet],
                              rows: dict[str, dict], n_train: int, n_folds: int) -> tuple[OODGate, dict, dict]:
    """``--final all``: the chosen gate retrained on every trainable category (SEEN and UNSEEN), and
    how each category is caught when held out, from ``n_folds`` gates each trained without one fold
    of them. The same fold networks also score the other network-based gates, so that their
    held-out rates are measured too (at no extra training); only ``chosen`` ships. Adds the fold and
    '[all]' rows to ``rows``; returns (the gate to ship, its held-out estimate, the others')."""
    from . import outliers as O
    trainable = list(O.SEEN) + list(O.UNSEEN)
    neg_all = neg_by | {c: outlier_set(c, n_train, fit.seed, None, fit.d["train_mri"]) for c in O.UNSEEN}
    folds = category_folds(trainable, n_folds)
    variants = [chosen] + [m for m in methods if m != chosen and m.startswith("cnn+") and m.endswith("colour")]
    for i, held in enumerate(folds):  # each category's rate when a gate never saw it
        kept = [c for c in trainable if c not in held]
        net_i = fit.net(ImageSet.concat([neg_all[c] for c in kept]))
        for m in variants:
            _, rows[f"{m} [fold {i + 1}]"] = fit.fit_eval(m, net_i, _with_cnn(fit.caches, net_i, fit.keyed), kept)
    net_all = fit.net(ImageSet.concat(list(neg_all.values())))
    gate, alternatives = None, {}
    for m in variants:
        g, rows[f"{m} [all]"] = fit.fit_eval(m, net_all, _with_cnn(fit.caches, net_all, fit.keyed), trainable)
        gate = g if m == chosen else gate
        alternatives[m] = held_out_estimate(rows, m, folds, list(O.TEST_ONLY))
    return gate, alternatives.pop(chosen), alternatives


def _held_out_text(held_out: dict | None, alternatives: dict) -> str:
    """The report table's lines on the held-out estimate of the shipped gate and of the others."""
    if not held_out:
        return ""
    from . import outliers as O
    text = ("\n\nHeld-out estimate of the shipped gate (each category from the fold that never saw it; "
            "real_medical is never trained on; real_head_ct_top and scan_ct_test from the fold without "
            "real_head_ct and scan_ct):\n"
            + " | ".join(f"{c} {v}" for c, v in held_out["per_category"].items())
            + f"\nnot brain MRI: mean {held_out['non_brain_mean_pct']}, worst {held_out['non_brain_min_pct']}"
            + f"; altered brain MRI ({', '.join(O.ALTERED_MRI)}): mean {held_out['altered_mri_mean_pct']}")
    for m, est in alternatives.items():
        text += (f"\nNot shipped, {m} on the same fold networks: not brain MRI mean "
                 f"{est['non_brain_mean_pct']}, worst {est['non_brain_min_pct']}; real_medical "
                 f"{est['per_category'].get('real_medical')}")
    return text


def rethreshold_gate(weights: str | Path, data_config: str | Path | None = None, fpr: float = 0.02,
                     log: Logger = print) -> dict:
    """Set a shipped gate's threshold again by the current rule (`per_source_threshold`), on its
    own networks and feature head, and measure it again on the fit's validation, test and outlier
    sets (the same seeded draws): the ``rethreshold-ood`` command.

    A gate fitted before the rule changed sat exactly on one validation scan's score, which
    flipped with rounding once served alone (BRISC validation 2.65 % flagged against the 2 %
    rule). Nothing is retrained, so this takes minutes, not the 1.5 h of fit-ood. The held-out
    estimate keeps its fold gates' figures, except the real images', which this gate scores.
    """
    from . import outliers as O
    from .inference import file_sha256
    weights = Path(weights)
    card = read_card(weights)
    gate = OODGate.load(weights)
    if not gate.components:
        raise ValueError(f"{weights}: the gate is the colour rule alone; it has no threshold to set")
    model, spec = _load_classifier(weights, card)
    fit = gate.info.get("trained_on", {})
    seed = int(fit.get("seed", 0))
    n_test = int(fit.get("counts", {}).get("test_outliers_per_category", 200))
    d = _load_mri(card, data_config, weights / "split.json", spec, 1, seed, log)
    O.use_scan_ct(d["not_mri"]["train"], d["not_mri"]["test"])   # as fit-ood drew them, from this split
    cats = list(O.SEEN) + list(O.UNSEEN) + list(O.TEST_ONLY)
    test_out = {c: outlier_set(c, n_test, seed + 1000, spec, d["test_mri"]) for c in cats}
    keyed = [*d["val"].items(), *[(f"test/{s}", x) for s, x in d["test"].items()],
             *[(f"out/{c}", x) for c, x in test_out.items()]]
    caches = _classifier_caches(model, spec, keyed, log)
    caches = _with_cnn(caches, gate.net, keyed) if gate.net is not None else caches
    trained = fit.get("negative_categories", list(O.SEEN))
    before = evaluate_gate(gate, d["val"], d["test"], test_out, caches, trained)
    comb = {src: gate.standardised(gate.raw_scores(data, model, spec, caches[src])) for src, data in d["val"].items()}
    old, gate.threshold = gate.threshold, per_source_threshold(comb, fpr)
    row = evaluate_gate(gate, d["val"], d["test"], test_out, caches, trained)
    timing_scans = O.make_scans("photo_unseen", 5, seed + 7) + [_read(p) for p in d["test_mri"][:15]]
    row["check_ms"] = time_check(gate, timing_scans, model, spec)
    measured = {k: row[k] for k in ("val_mri_flagged_pct", "test_mri_flagged_pct", "outliers_flagged_pct", "check_ms")}
    held = gate.info.get("held_out_estimate")
    if held and "per_category" in held:
        # fold gates (final="all") measured the held-out categories, this gate only the real
        # images; a gate shipped as measured (final="seen", no folds) held all of them out itself
        mine = held["per_category"] if not held.get("folds") else [
            c for c in O.TEST_ONLY if c in held["per_category"] and c not in O.TRAINED_SIBLING]  # those: a fold's
        for c in list(mine):
            held["per_category"][c] = row["outliers_flagged_pct"][c]
        _sibling_rates(held, weights / "ood_eval.json")
        # the figures this estimate already states, from its new rates (a seen gate's has fewer)
        held.update({k: v for k, v in _estimate_stats(held["per_category"]).items() if k in held})
    gate.info["measured"] = measured
    gate.info.setdefault("weights_sha256", file_sha256(weights / "model.safetensors"))  # fits before it was kept
    gate.info["rethresholded"] = {
        "from": old, "to": gate.threshold, "date": time.strftime("%Y-%m-%d"),
        "rule": "halfway between the highest validation score allowed to pass and the next one",
        "measured_before": {k: before[k] for k in ("val_mri_flagged_pct", "test_mri_flagged_pct",
                                                   "outliers_flagged_pct")}}
    kept = card.get("ood") or {}   # as read above: nothing since has written the card
    gate.save(weights)
    _keep_card_fields(weights, kept)
    log(f"threshold {old:.6f} -> {gate.threshold:.6f}")
    for k in ("val_mri_flagged_pct", "test_mri_flagged_pct"):
        log(f"{k}: before {before[k]} after {row[k]}")
    changed = {c: (before["outliers_flagged_pct"][c], v) for c, v in row["outliers_flagged_pct"].items()
               if v != before["outliers_flagged_pct"][c]}
    log(f"outlier categories whose rate moved (before, after): {changed or 'none'}")
    mark_superseded(weights)
    return {"from": old, "to": gate.threshold, "before": before, "after": row}


def _keep_card_fields(weights: Path, before: dict) -> None:
    """Put back the card's gate fields that a re-save does not write (an older card's
    ``fitted_by``, ``compared``, ``note``: how the gate was made); an older format's measurements
    are kept as ``measured_at_fit``."""
    path = weights / "card.json"
    card = json.loads(path.read_text())
    section = card.get("ood") or {}
    section.update({k: v for k, v in before.items() if k not in section})
    if before.get("measured") and set(before["measured"]) != set(section.get("measured") or {}):
        section.setdefault("measured_at_fit", before["measured"])
    card["ood"] = section
    write_json(path, card)


def mark_superseded(weights: str | Path) -> None:
    """ood_eval.json is fit-ood's report of the gates as fitted; after rethreshold-ood its shipped
    row no longer describes the shipped gate. Say so in it, with the gate's current figures."""
    weights = Path(weights)
    path, card_path = weights / "ood_eval.json", weights / "card.json"
    if not path.is_file() or not card_path.is_file():
        return
    gate = read_card(weights).get("ood") or {}
    report = json.loads(path.read_text())
    report["superseded"] = {
        "by": "python -m core rethreshold-ood", "threshold": gate.get("threshold"),
        "rethresholded": gate.get("rethresholded"), "measured": gate.get("measured"),
        "held_out_estimate": gate.get("held_out_estimate"),
        "note": "the rows above are the gates as fitted; the shipped gate was measured again since ("
                + ("its threshold moved" if (gate.get("rethresholded") or {}).get("from") != gate.get("threshold")
                   else "its threshold did not move; the rule or the test draws did")
                + "), and its current figures are these (also card.json's ood section)"}
    write_json(path, report)


def _load_mri(card: dict | None, data_config, split_file, spec: dict | None, max_feature_train: int,
              seed: int, log, n_stripped: int = 0) -> dict:
    """Train/val/test MRI per source (64 px for the network, the classifier's size for val/test),
    a training subset at the classifier's size for densities, and slices to derive outliers from.
    ``n_stripped`` training slices are added again, skull-stripped (`load_stripped`), to the
    positives of the network and of the feature densities (not to validation: the threshold is
    set on the sources' own scans)."""
    files, not_mri = mri_only(split_files(split_file, source_roots(card, data_config)))
    t0 = time.time()
    known = TrainingCache.find((card or {}).get("sources", []), spec) if spec else None
    log(f"classifier's training image cache: {'found' if known else 'not found, reading the files'}")
    sets = {sp: {src: load_files(files[src][sp][0], spec if sp != "train" else None, files[src][sp][1],
                                 known=known)
                 for src in files if files[src].get(sp, ([], []))[0]} for sp in ("train", "val", "test")}
    pos = ImageSet.concat(list(sets["train"].values()))
    feat_train = None
    train_paths = [p for s in sets["train"] for p in files[s]["train"][0]]   # in pos's order
    if spec is not None:  # feature densities need no more than a few thousand training slices
        feat_train = _main_subset(pos, train_paths, spec, max_feature_train, seed, known)
    if n_stripped:  # brain MRI with its skull removed is still brain MRI, for both components
        strip_pick = sorted(np.random.default_rng(seed + 1).choice(train_paths, min(n_stripped, len(train_paths)),
                                                             replace=False).tolist())
        stripped = load_stripped(strip_pick, spec)
        pos = ImageSet.concat([pos, ImageSet(stripped.small, stripped.colour, None, stripped.groups)])
        if feat_train is not None:
            feat_train = ImageSet.concat([feat_train, stripped])
    log(f"MRI: train {len(pos)} ({n_stripped and len(strip_pick)} of them skull-stripped copies), "
        f"val {sum(map(len, sets['val'].values()))}, test {sum(map(len, sets['test'].values()))} "
        f"({time.time() - t0:.0f} s)")
    rng = np.random.default_rng(seed)
    pick = {}
    for sp in ("train", "test"):
        paths = [p for s in files for p in files[s].get(sp, ([], []))[0]]
        pick[sp] = sorted(rng.choice(paths, min(400, len(paths)), replace=False).tolist())
    return {"sets": sets, "val": sets["val"], "test": sets["test"], "pos": pos, "feat_train": feat_train,
            "train_mri": pick["train"], "test_mri": pick["test"], "not_mri": not_mri}


def mri_only(files: dict[str, dict[str, tuple[list[str], list[str]]]]) -> tuple[dict, dict[str, list[str]]]:
    """`split_files` without the scans `core.data.not_mri` knows are no MRI, and those scans by
    split: {"train": training and validation files, "test": test files}. The gate must not learn a
    head CT as MRI, nor set its threshold on CTs or count one it flags as MRI flagged."""
    from .data import not_mri
    kept: dict = {}
    odd: dict[str, list[str]] = {"train": [], "test": []}
    for src, splits in files.items():
        kept[src] = {}
        for sp, (paths, groups) in splits.items():
            mri = [not not_mri(p) for p in paths]
            kept[src][sp] = ([p for p, m in zip(paths, mri) if m], [g for g, m in zip(groups, mri) if m])
            odd["test" if sp == "test" else "train"] += [p for p, m in zip(paths, mri) if not m]
    return kept, odd


def _classifier_caches(model, spec, keyed: list[tuple[str, ImageSet]], log) -> dict:
    """Features and logits of the classifier for every set, computed once for all methods."""
    if model is None:
        return {}
    t0 = time.time()
    caches = {}
    for key, data in keyed:
        f, z = features_and_logits(model, data.main, spec)
        caches[key] = {"feats": f, "logits": z}
    log(f"classifier features for {sum(len(c['feats']) for c in caches.values())} images "
        f"({time.time() - t0:.0f} s)")
    return caches


def _with_cnn(caches: dict, net: GateNet, keyed: list[tuple[str, ImageSet]]) -> dict:
    """A copy of ``caches`` with this network's scores for every set."""
    out = {k: dict(v) for k, v in caches.items()}
    for key, data in keyed:
        out.setdefault(key, {})["cnn"] = net_scores(net, data.small)
    return out


def category_folds(categories: list[str], k: int) -> list[list[str]]:
    """``k`` folds in which no two categories of one kind (`outliers.KIND`) are held out together,
    where the kind has no more categories than folds (five synthetic patterns in four pinned folds:
    `blank` and `pattern` share one).

    With ``k`` = len(`outliers.PINNED_FOLDS`) the pinned folds are kept (add shipped categories
    there), and a category they do not name goes to the smallest fold without one of its kind:
    adding a category then moves no other (dealing all of them round-robin did, which changed the
    held-out estimate by itself).
    Other ``k``: categories sorted by kind, then dealt round-robin."""
    from . import outliers as O
    folds = [[c for c in pinned if c in categories] for pinned in O.PINNED_FOLDS]
    if k == len(O.PINNED_FOLDS) and all(folds):   # (a subset that empties a fold is dealt instead)
        for c, fold in O.PINNED_WHERE_PRESENT.items():
            if c in categories:
                folds[fold].append(c)
        for c in (c for c in categories if not any(c in f for f in folds)):
            free = [f for f in folds if O.KIND.get(c, c) not in {O.KIND.get(x, x) for x in f}] or folds
            min(free, key=len).append(c)
        return folds
    kinds = list(dict.fromkeys(O.KIND.get(c, c) for c in categories))
    ordered = sorted(categories, key=lambda c: kinds.index(O.KIND.get(c, c)))
    return [ordered[i::k] for i in range(k)]


def held_out_estimate(rows: dict[str, dict], chosen: str, folds: list[list[str]], test_only: list[str]) -> dict:
    """Each category's rate from the fold gate that never trained on it; real (test-only) images
    from the shipped gate, which never trained on them either, except those whose patient's other
    slices it trained on (`outliers.TRAINED_SIBLING`): from the fold gate that held those out."""
    from . import outliers as O
    per = {c: rows[_fold_row(chosen, folds, c)]["outliers_flagged_pct"][c] for held in folds for c in held}
    for c in test_only:
        gate = _fold_row(chosen, folds, O.TRAINED_SIBLING.get(c)) or f"{chosen} [all]"
        per[c] = rows[gate]["outliers_flagged_pct"][c]
    return {"per_category": per, "folds": folds, **_estimate_stats(per)}


def _fold_row(chosen: str, folds: list[list[str]], category: str | None) -> str | None:
    """The row of the fold gate that held ``category`` out (None when no fold holds it)."""
    k = next((i for i, held in enumerate(folds) if category in held), None)
    return None if k is None else f"{chosen} [fold {k + 1}]"


def _sibling_rates(held: dict, report_path: Path) -> None:
    """Give each test-only category drawn from a trained one's patient (`outliers.TRAINED_SIBLING`)
    the rate of the fold gate that held that category out, from fit-ood's stored fold rows (a gate
    fitted before the rule took it from the shipped gate, which trained on the patient's other slices)."""
    from . import outliers as O
    folds = held.get("folds") or []
    if not report_path.is_file() or not folds:
        return
    report = json.loads(report_path.read_text())
    for c, sibling in O.TRAINED_SIBLING.items():
        row = report.get("methods", {}).get(_fold_row(report.get("chosen"), folds, sibling))
        if c in held["per_category"] and row and c in row.get("outliers_flagged_pct", {}):
            held["per_category"][c] = row["outliers_flagged_pct"][c]


def _estimate_stats(per: dict[str, float]) -> dict:
    """Mean and worst flag rate over the non-brain categories, over the altered MRI ones, and
    over all of them, from {category: % flagged}."""
    from . import outliers as O
    non_brain = [v for c, v in per.items() if c not in O.ALTERED_MRI]
    altered = [v for c, v in per.items() if c in O.ALTERED_MRI]
    return {**({"non_brain_mean_pct": round(float(np.mean(non_brain)), 2), "non_brain_min_pct": min(non_brain)}
               if non_brain else {}),
            "altered_mri_mean_pct": round(float(np.mean(altered)), 2) if altered else None,
            "mean_pct": round(float(np.mean(list(per.values()))), 2), "min_pct": min(per.values())}


def _card_info(row: dict, trained_on: list[str], held_out_cats: list[str], counts: dict, epochs: int,
               seed: int, net_time: float, held_out: dict | None) -> dict:
    from . import outliers as O
    return {
        "trained_on": {"positives": "train-split MRI of every source in split.json, without the scans "
                                    "core/not_mri.txt knows are no MRI (CTs of BRISC, the benchmark and Br35H: negatives, scan_ct)"
                                    + ("; and skull-stripped copies of some of them (strip_to_brain, before the head crop)"
                                       if counts.get("train_mri_skull_stripped_copies") else ""),
                       "negative_categories": trained_on, "held_out_categories": held_out_cats,
                       "photos_train": list(O.PHOTOS_TRAIN), "photos_test": list(O.PHOTOS_TEST),
                       "counts": counts, "epochs": epochs, "seed": seed,
                       "net_train_time_s": round(net_time, 1)},
        "threshold_rule": "ood_score = max standardised component score - threshold; the threshold "
                          "flags at most 2% of each source's validation MRI; colour above colour_limit "
                          "is always flagged; ood_score > 0 means out of distribution",
        "measured": {k: row[k] for k in ("val_mri_flagged_pct", "test_mri_flagged_pct",
                                         "outliers_flagged_pct", "check_ms")},
        "held_out_estimate": held_out or _measured_estimate(row, held_out_cats, trained_on),
    }


def _measured_estimate(row: dict, held_out_cats: list[str], trained_on: list[str]) -> dict:
    """The shipped gate's own rates on the categories it never trained on (``--final seen``), split
    as `held_out_estimate` splits them: altered brain MRI is not 'not brain MRI' (the app's line
    read a worst 2.5 % that was solarised MRI), and a category drawn from a trained one's patient
    (`outliers.TRAINED_SIBLING`) is not held out."""
    from . import outliers as O
    per = {c: row["outliers_flagged_pct"][c] for c in held_out_cats if O.TRAINED_SIBLING.get(c) not in trained_on}
    return {"per_category": per, **_estimate_stats(per)} if per else {"per_category": {}}


def _main_subset(pos: ImageSet, paths: list[str], spec: dict, n: int, seed: int,
                 known: TrainingCache | None = None) -> ImageSet:
    """Training MRI for the classifier's feature density: a seeded random subset of ``n`` slices
    (every source in proportion), prepared at the classifier's size."""
    idx = np.sort(np.random.default_rng(seed).permutation(len(pos))[:n])
    sub = [paths[i] for i in idx]
    main = known.take(sub) if known is not None else None
    if main is None:
        main = torch.from_numpy(_prepare_files(sub, spec, "main", 2)[0])
    return ImageSet(pos.small[idx], pos.colour[idx], main, [pos.groups[i] for i in idx])


def pick_method(rows: dict[str, dict], candidates: list[str], max_mri_pct: float = 3.0) -> str:
    """Best mean over the *seen* categories' fresh test draws with test MRI within the limit;
    near ties (0.5 points) go to the simpler gate. Unseen categories never take part."""
    ok = [m for m in candidates if rows[m]["max_test_mri_flagged_pct"] <= max_mri_pct] or candidates
    best = max(rows[m]["seen_mean_pct"] for m in ok)
    return min((m for m in ok if rows[m]["seen_mean_pct"] >= best - 0.5), key=lambda m: m.count("+"))


def _read(path: str) -> ScanImage:
    from .reader import read_scan
    return read_scan(path)


def _load_classifier(weights: Path, card: dict | None) -> tuple[nn.Module | None, dict | None]:
    """The classifier and its preprocessing, or (None, None) when it is not trained yet."""
    from safetensors.torch import load_file
    from .models import create_model
    if card is None or not (weights / "model.safetensors").exists():
        return None, None
    model = create_model(card["arch"], len(card["classes"]))
    model.load_state_dict({k: v.float() for k, v in load_file(weights / "model.safetensors").items()})
    return model.eval(), card["preprocessing"]


def require_model_folder(weights: str | Path, *needed: str) -> None:
    """A clear sentence, not an errno line, for a --weights folder that is not a trained model's."""
    d = Path(weights)
    if not d.is_dir():
        raise FileNotFoundError(f"--weights {d}: no such folder")
    for name in ("card.json", *needed):
        if not (d / name).is_file():
            raise FileNotFoundError(f"--weights {d}: it has no {name}, so it is not a folder "
                                    "train.py wrote" + ("" if name == "card.json" else " (or not all of one)"))


def _same_model(weights: Path, out: Path) -> None:
    """--out must hold the same model as --weights: the gate is merged into its card.json and reads
    that model's features, so a folder without a card got no card (the gate unusable), and another
    model's folder got a gate fitted for other weights."""
    from .inference import file_sha256
    if out.resolve() == weights.resolve():
        return
    model = "model.safetensors"
    if not ((out / "card.json").is_file() and (out / model).is_file() and (weights / model).is_file()
            and file_sha256(out / model) == file_sha256(weights / model)):
        raise ValueError(f"--out {out}: it must be a copy of --weights {weights} (its card.json and the same "
                         "model.safetensors), which the gate is written into; copy the folder there first")


def cmd_fit_ood(args) -> int:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), args.threads)))
    require_model_folder(args.weights, *(() if args.split else ("split.json",)))
    if args.method != "auto":
        check_method(args.method, (Path(args.weights) / "model.safetensors").is_file())
    if args.out:
        _same_model(Path(args.weights), Path(args.out))
    if args.split:
        read_split_file(args.split)   # a file that is no split.json, said before the work
    rep = fit_gate_for_weights(args.weights, args.data_config, args.method, args.out, args.split,
                               args.epochs, args.n_train, args.n_test, args.seed, final=args.final,
                               n_folds=args.folds, n_stripped=args.stripped)
    print(f"wrote ood.safetensors, card.json['ood'] and ood_eval.json (shipped: {rep['shipped']})")
    target = Path(args.out or args.weights)
    if (target / "eval.json").exists() and (target / "model.safetensors").exists():
        from .evaluation import annotate_ood  # eval.json predates the gate: give it the gate's flags
        annotate_ood(target, data_config=args.data_config)
    return 0


def cmd_rethreshold_ood(args) -> int:
    torch.set_num_threads(max(1, min(torch.get_num_threads(), args.threads)))
    require_model_folder(args.weights)
    rethreshold_gate(args.weights, args.data_config)
    if (Path(args.weights) / "eval.json").exists():
        from .evaluation import annotate_ood  # the test records' flags follow the new threshold
        annotate_ood(args.weights, data_config=args.data_config)
    return 0


def cmd_annotate_ood(args) -> int:
    from .evaluation import annotate_ood
    torch.set_num_threads(max(1, min(torch.get_num_threads(), args.threads)))
    require_model_folder(args.weights, "eval.json")
    annotate_ood(args.weights, data_config=args.data_config)
    return 0


def add_cli(sub) -> None:
    f = sub.add_parser("fit-ood", help="fit and measure the out-of-distribution gate for a model")
    f.add_argument("--weights", required=True, help="weights directory with card.json and split.json")
    f.add_argument("--data-config", default="experiments/default.toml",
                   help="TOML whose [[data]] entries name the source roots (besides the card's)")
    f.add_argument("--method", default="auto",
                   help="auto (by the seen categories), or e.g. cnn+head+colour (the default model's), cnn+colour, mahalanobis (see COMPARED)")
    f.add_argument("--out", help="write here instead of --weights")
    f.add_argument("--split", help="a split.json other than the one in --weights")
    from .cli import integer_at_least
    positive = integer_at_least(1)
    f.add_argument("--epochs", type=positive, default=8)
    f.add_argument("--n-train", type=positive, default=700, help="training outliers per seen category")
    f.add_argument("--n-test", type=positive, default=200, help="test outliers per category")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=positive, default=2)
    # one fold would hold every category, and its gate network no outlier to train on
    f.add_argument("--folds", type=integer_at_least(2), default=4,
                   help="category folds for the held-out estimate (--final all; at least 2)")
    f.add_argument("--stripped", type=integer_at_least(0), default=0, metavar="N",
                   help="N training slices added again, skull-stripped, as brain MRI (default 0: none, as "
                        "the shipped gate; 1500 was measured in session 30, docs/generalisation.md)")
    f.add_argument("--final", choices=("seen", "all"), default="seen",
                   help="ship the gate as measured (trained on the seen categories only), or retrained "
                        "on every category, with --folds more gates estimating each category held out")
    f.set_defaults(fn=cmd_fit_ood)
    for name, fn, text, needs in (
            ("rethreshold-ood", cmd_rethreshold_ood, "set a fitted gate's threshold again by the current "
             "rule and measure it again (no retraining; then annotate-ood)", "ood.safetensors and split.json"),
            ("annotate-ood", cmd_annotate_ood, "add the OOD gate's flags to a model's eval.json (test files "
             "re-read; summary recomputed)", "eval.json and ood.safetensors")):
        a = sub.add_parser(name, help=text)
        a.add_argument("--weights", required=True, help=f"weights directory with {needs}")
        a.add_argument("--data-config", default="experiments/default.toml",
                       help="TOML whose [[data]] entries name the source roots (besides the card's)")
        a.add_argument("--threads", type=int, default=2)
        a.set_defaults(fn=fn)
