"""Load a shipped model (safetensors + card.json) and predict one scan with every flag attached."""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from .data import REPO_ROOT, read_card, sha256_of
from .header import header_reason
from .labels import has_tumour_decision, is_tumour_call
from .metrics import decide, tumour_probability
from .models import create_model, feature_channels
from .preprocess import preprocess
from .reader import MAX_SLICES, ScanError, ScanImage, file_fault_error, is_empty_slice, panel_divider, read_scan
from .referral import ReferralRule

ROOT = REPO_ROOT
WEIGHTS_ROOT = ROOT / "weights"


def default_weights() -> Path:
    """The shipped default model: $BT_WEIGHTS, else the directory named in weights/DEFAULT. A
    relative $BT_WEIGHTS is looked up as ``--weights`` is (`resolve_weights`)."""
    if os.environ.get("BT_WEIGHTS"):
        return resolve_weights(os.environ["BT_WEIGHTS"])
    return shipped_default()


def shipped_default() -> Path:
    """The directory named in weights/DEFAULT (whatever $BT_WEIGHTS says)."""
    return WEIGHTS_ROOT / (WEIGHTS_ROOT / "DEFAULT").read_text().strip()


def resolve_weights(weights_dir: str | Path | None) -> Path:
    """A model directory as given; a relative one missing here is looked up in the repository, so
    that ``--weights weights/NAME`` works from any folder. None: the shipped default."""
    if not weights_dir:
        return default_weights()
    p = Path(weights_dir)
    in_repo = WEIGHTS_ROOT.parent / p
    return in_repo if not p.exists() and not p.is_absolute() and in_repo.exists() else p


def shipped_models() -> list[Path]:
    return sorted(p.parent for p in WEIGHTS_ROOT.glob("*/card.json"))


def training_sources(card: dict) -> list[str]:
    """The sources a model learnt from (sampling weight above 0); held-out ones are only evaluated."""
    return [s.get("name", "?") for s in card.get("sources", []) if s.get("weight", 1.0) > 0]


def load_card(weights_dir: str | Path) -> dict:
    """The card, checked for what serving needs: a hand-edited card fails in one sentence."""
    path, card = Path(weights_dir) / "card.json", read_card(weights_dir)
    missing = [k for k, kind in (("classes", list), ("arch", str), ("preprocessing", dict))
               if not isinstance(card.get(k), kind)]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it is not a card written by train.py")
    if len(card["classes"]) < 2:
        raise ValueError(f"{path} names fewer than two classes")
    if (problem := _served_blocks_problem(card)):
        raise ValueError(f"{path}: {problem}")
    return shown_card(card)


# Blocks the pages only show (serving never reads them), by the type they must have: a hand edit
# to another type was a traceback on the Training or Model card page, not a reason to refuse the model.
SHOWN_BLOCKS = {"training": dict, "split": dict, "metrics": dict, "sources": list, "benchmark": (dict, "number"),
                "saliency": dict, "parameters": "number", "weights_file_bytes": "number"}
SHOWN_TRAINING_NUMBERS = ("train_time_s", "best_epoch", "epochs", "epochs_run", "batch_size", "label_smoothing",
                          "weight_ema")


def shown_card(card: dict) -> dict:
    """The card with its shown blocks of the wrong type left out (null ones too), each named in
    ``unreadable_fields``; unchanged when all are fine."""
    clean, bad = dict(card), []
    for key, kind in SHOWN_BLOCKS.items():
        v = clean.get(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if key in clean and (v is None or not any(finite_number(v) if k == "number" else isinstance(v, k) for k in kinds)):
            bad += [key] if v is not None else []
            del clean[key]
    if "sources" in clean:
        srcs = [s for s in clean["sources"] if isinstance(s, dict)]
        bad += ["sources"] if len(srcs) < len(clean["sources"]) else []
        bad += [f"sources.{k}" for s in srcs for k in ("label_map", "images") if s.get(k) is not None
                and not isinstance(s[k], dict)]
        clean["sources"] = [{k: v for k, v in s.items() if k not in ("label_map", "images") or isinstance(v, dict)}
                            for s in srcs]
    if "training" in clean:
        tr = clean["training"]
        wrong = [k for k in SHOWN_TRAINING_NUMBERS if tr.get(k) is not None and not finite_number(tr[k])]
        bad += [f"training.{k}" for k in wrong]
        clean["training"] = {k: v for k, v in tr.items() if k not in wrong}
    if bad:
        clean["unreadable_fields"] = sorted(set(bad))
    return clean if clean != card else card   # unchanged: the very card, as read


def finite_number(v) -> bool:
    """A real int or float (not a bool), finite: what a card or eval.json field must hold."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v) -> bool:
    return finite_number(v) and v > 0


# The operating point's fields that are rates: a hand edit to text or NaN must not reach a page.
OPERATING_POINT_RATES = ("threshold", "target_sensitivity", "val_sensitivity", "val_specificity", "min_specificity")


def _served_blocks_problem(card: dict) -> str | None:
    """What is wrong with the blocks every served probability goes through (calibration, the
    mirror pass), if anything: a null temperature crashed, a mirror rule without its selection
    temperature failed every file with a KeyError."""
    if "calibration" in card:
        cal = card["calibration"]
        if not isinstance(cal, dict) or not _positive(cal.get("temperature", 1.0)):
            return "its calibration block has no usable temperature (a positive number)"
    tta = card.get("tta")
    if tta is not None and not (isinstance(tta, dict)
                                and all(_positive(tta.get(k)) for k in ("below_confidence", "selection_temperature"))):
        return "its tta block needs below_confidence and selection_temperature (positive numbers)"
    ood = card.get("ood")   # a list or a string here was an AttributeError in every predict
    if ood is not None and not (isinstance(ood, dict) and (not ood or finite_number(ood.get("threshold")))):
        return ("its ood block must be an object with the gate's threshold (a number): fit the gate again "
                "with `python -m core fit-ood`")
    spec = card["preprocessing"]  # what `core.preprocess` reads for every served image
    if not (isinstance(spec.get("size"), int) and _positive(spec["size"]) and finite_number(spec.get("mean"))
            and _positive(spec.get("std"))):
        return "its preprocessing block needs size (a positive whole number), mean and std (numbers, std above 0)"
    if spec.get("crop", "head") not in ("head", "none"):  # a typo would silently turn the head crop off
        return f"its preprocessing crop is {spec['crop']!r}: 'head' or 'none'"
    return _operating_point_problem(card.get("operating_point")) or _uncertainty_problem(card.get("uncertainty"))


def _not_rates(block: dict, keys: tuple[str, ...]) -> list[str]:
    """The keys of ``block`` that are present but not a finite number in [0, 1]."""
    return [k for k in keys if block.get(k) is not None and not (finite_number(block[k]) and 0 <= block[k] <= 1)]


def _uncertainty_problem(u) -> str | None:
    """What is wrong with a card's referral block: a list was a traceback, text a bare float()
    error, and a band with lo above hi silently referred nothing."""
    if u is None:
        return None
    if not isinstance(u, dict):
        return "its uncertainty block is not a block of named values (lo, hi, min_confidence, ...)"
    if (bad := _not_rates(u, ("lo", "hi", "min_confidence", "min_type_confidence"))):
        return f"its uncertainty block's {' and '.join(bad)} must be numbers between 0 and 1"
    if u.get("lo") is not None and u.get("hi") is not None and u["lo"] > u["hi"]:
        return f"its uncertainty band runs backwards (lo {u['lo']} above hi {u['hi']})"
    return None


def _operating_point_problem(op) -> str | None:
    """What is wrong with a card's operating point (absent is fine: 0.5, see `card_threshold`);
    a threshold of 'high' crashed every page, NaN or 1.5 silently called every scan 'notumor'."""
    if op is None:
        return None
    if not isinstance(op, dict):
        return "its operating_point is not a block of named values (threshold, target_sensitivity, ...)"
    if (bad := _not_rates(op, OPERATING_POINT_RATES)):
        return (f"its operating_point's {' and '.join(bad)} must be "
                f"{'a number' if len(bad) == 1 else 'numbers'} between 0 and 1")
    return None


def temperature(card: dict) -> float | None:
    """The card's calibration temperature; None when the card has no calibration at all."""
    cal = card.get("calibration")
    return float(cal.get("temperature", 1.0)) if isinstance(cal, dict) else None


def card_threshold(card: dict) -> float | None:
    """The card's operating point, or None for a model without tumour/no-tumour classes
    (decided by the top class). A tumour model's card without one gets 0.5, everywhere."""
    if not has_tumour_decision(card.get("classes", [])):
        return None
    t = (card.get("operating_point") or {}).get("threshold")
    return 0.5 if t is None else float(t)


def gate_file_problem(weights_dir: str | Path, card: dict) -> str | None:
    """A sentence when the card and the folder disagree on the out-of-distribution gate: a card
    listing a gate whose file is not beside it (a folder copied without its gate would serve every
    image, noise too, as in distribution), or a gate file the card does not describe (fit-ood
    stopped between the two writes, or a hand edit: the gate was ignored without a word, and the
    app recommended this very model as one with a gate). train.py moves a stale gate aside."""
    f = Path(weights_dir) / "ood.safetensors"
    if card.get("ood") and not f.is_file():
        return (f"the card lists an out-of-distribution gate but {f} is missing: copy it with the model, "
                "or fit it again with `python -m core fit-ood`")
    if f.is_file() and not card.get("ood"):
        return (f"{f} is an out-of-distribution gate its card does not describe: fit it again with "
                "`python -m core fit-ood`, or remove the file to serve the model without a gate")
    return None


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weights_mismatch(card: dict, sha256: str, where: str | Path) -> str | None:
    """A sentence when the card names other weights than the file holds (a run killed between
    writing its weights and its card, or files copied from two runs); None when they agree or
    the card predates the field."""
    if card.get("weights_sha256") in (None, sha256):
        return None
    return (f"the weights in {where} are not the ones its card describes (model.safetensors from "
            "another run?): retrain, or restore the folder's files together")


PIXEL_OOD_REASON = ("The image does not look like the brain MRI slices the model was trained on "
                    "(out-of-distribution gate).")
# A model without a gate still refuses colour: MRI is grey (the 11,314 shared training scans reach
# at most 0.0185 of chroma, a Br35H JPEG); the fitted gates' colour limit is this same floor.
NO_GATE_COLOUR_LIMIT = 0.03
# The gate's verdict in words, by the part that flags (`OODGate.margins`): the colour rule, the
# 64 px network (the image's look) or, alone, the feature head (the classifier's own features).
GATE_COLOUR_OOD_REASON = "The image is in colour, and an MRI slice is grey (out-of-distribution gate)."
FEATURE_OOD_REASON = ("The image passed the check of its overall appearance, but the tumour model's internal "
                      "reading of it is unlike its reading of the brain MRI slices it was trained on "
                      "(out-of-distribution gate). It may not be a brain MRI slice, or it may be one prepared "
                      "differently from the training scans (skull-stripped, for example).")
COLOUR_OOD_REASON = ("The image is in colour, and an MRI slice is grey (this model has no "
                     "out-of-distribution gate: only colour, blank and nearly empty images, marks drawn in colour "
                     "and several slices in one image are refused).")
# A reader's marks (a measured line, an outline, an arrow, a label) make the model see lesions: drawn
# in white they cost the benchmark 16 points (docs/generalisation.md, "Screen captures"). Drawn in
# colour, as most viewers draw them, the reader finds them (`info["colour_marks"]`, the share of the
# head's core in strong colour): the 11,314 shared scans reach at most 0.00005, thin marks 0.001 and
# more. Colour all over the image is the colour rule's to refuse, with its own reason.
MARKS_SHARE_LIMIT = 2e-4
MARKS_OOD_REASON = ("The slice has marks drawn on it in colour (a measured line, an outline, an arrow, a "
                    "label or an overlay), and the model reads marks as lesions: upload the slice as "
                    "exported, without annotations.")


# A viewer's 2 x 2 layout shrinks each slice to a quarter and missed 75 of 614 benchmark tumours
# (docs/generalisation.md, "Screen captures"): several images in one file are not one slice.
PANELS_OOD_REASON = ("The image holds several images side by side, split by a plain band (a viewer's layout "
                     "or a montage), and the model reads one slice at a time: upload one slice, as exported.")


def panels_reason(scan: ScanImage) -> str | None:
    """PANELS_OOD_REASON when a plain band splits the scan into lit parts (`reader.panel_divider`)."""
    if panel_divider(scan.pixels) is not None and not is_empty_slice(scan.pixels):   # the rare one second
        return PANELS_OOD_REASON
    return None


def marks_reason(scan: ScanImage, colour_limit: float = NO_GATE_COLOUR_LIMIT) -> str | None:
    """MARKS_OOD_REASON for a mostly grey scan (colourfulness within ``colour_limit``, the colour
    rule that runs: a gate's own, else the gateless one) whose head holds coloured marks, else None."""
    if scan.info.get("colour_marks", 0.0) > MARKS_SHARE_LIMIT and scan.colourfulness <= colour_limit:
        return MARKS_OOD_REASON
    return None


# The reader keeps blank images readable (training sources hold all-black slices); served, one
# value everywhere holds no anatomy, so every model refuses it, with or without a gate.
BLANK_OOD_REASON = "The image is blank (one value everywhere): there is nothing to classify."
# Without a gate, a nearly empty slice (a volume's end, a padding frame, one bright voxel) got
# confident tumour calls (simple_cnn_4class: glioma 0.92). A gate flags those; a gateless model
# refuses what `is_empty_slice` calls empty, the rule --best-slice already skips such slices by.
EMPTY_OOD_REASON = ("The image is nearly empty (almost no signal): there is nothing to classify "
                    "(this model has no out-of-distribution gate that judges pixels).")


@dataclass
class Prediction:
    pred: str
    probs: dict[str, float]
    tumour_probability: float | None
    threshold: float | None
    confidence: float
    uncertain: bool                 # tumour call not confident (or top class, old cards): refer
    in_distribution: bool
    ood_score: float | None
    type_uncertain: bool = False    # called tumour, type not confident (coarse-label scans)
    uncertain_reason: str | None = None
    ood_reason: str | None = None   # why it is out of distribution: the DICOM header, or the pixels
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def gate_reason(margins: dict[str, float]) -> str:
    """Why the pixel gate flags a scan, by the part that does (`OODGate.verdict`'s margins)."""
    from .ood import flagging  # core.ood is imported only where a gate is loaded
    parts = flagging(margins)
    if "colour" in parts:
        return GATE_COLOUR_OOD_REASON
    if "cnn" in margins and "cnn" not in parts and parts:  # the network passed it: say so
        return FEATURE_OOD_REASON
    return PIXEL_OOD_REASON


def native_bf16_cpu() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX). Elsewhere bf16 is
    emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def serving_precision(device: torch.device) -> str:
    """``BT_PRECISION`` (fp32 or bf16) if set. Otherwise bf16 on a CPU with native bf16, else fp32.

    On such a CPU, bf16 roughly halves ResNet18's single-thread forward (bench/README.md). On
    resnet18_176's 1,640 test images it changed no prediction and no calibrated probability by
    more than 0.012; on the default's records nearest a decision edge it flips a type call and a
    referral flag now and then (docs/results.md, the latency paragraph).
    """
    env = os.environ.get("BT_PRECISION", "auto")
    if env in ("fp32", "bf16"):
        return env
    return "bf16" if device.type == "cpu" and native_bf16_cpu() else "fp32"


MIRROR_ALWAYS = {"kind": "mirror", "below_confidence": 2.0, "selection_temperature": 1.0}


def tta_rows(logits: torch.Tensor, rule: dict) -> torch.Tensor:
    """Which rows a ``tta`` rule sends to the second pass: plain confidence, at the rule's selection
    temperature, below ``below_confidence``."""
    return torch.softmax(logits.float() / rule["selection_temperature"], 1).amax(1) < rule["below_confidence"]


def apply_tta(model: torch.nn.Module, x: torch.Tensor, logits: torch.Tensor, rule: dict | None) -> torch.Tensor:
    """The served logits under a card's ``tta`` rule: each row whose plain confidence (softmax at
    the rule's selection temperature) is below ``below_confidence`` becomes the mean with the
    mirror image's logits, times the rule's ``scale``. Only the unsure few pay for the second pass;
    the confident rows, which a mirror pass would hardly change, are left as they are. The scale
    exists because a mean of two passes is flatter than one pass: it lets the card's single
    temperature calibrate both kinds of row. Run it inside the caller's autocast."""
    if not rule:
        return logits
    rows = tta_rows(logits, rule)
    if not bool(rows.any()):
        return logits
    out = logits.float().clone()
    out[rows] = (out[rows] + model(torch.flip(x[rows], dims=[3])).float()) / 2 * rule.get("scale", 1.0)
    return out


def calibration_text(card: dict) -> str:
    """How a served probability is made, in words (the report and the Model card page)."""
    t = temperature(card)
    text = ("none: the card has no calibration, so probabilities are the model's raw softmax" if t is None
            else f"temperature scaling, T = {t:.3g}")
    if note := (card.get("calibration") or {}).get("note"):
        text += f" (not fitted: {note})"
    rule = card.get("tta")
    if rule:
        text += (f"; a second, mirror-image pass averaged in when the plain confidence is below "
                 f"{rule['below_confidence']:g} ({100 * rule.get('val_share', float('nan')):.0f} % of "
                 f"validation scans)")
    return text


class Predictor:
    """A loaded model with its card, shared by every app session.

    Every pass of the model holds ``lock``: saliency hooks, and the features the gate reads
    after a pass, would otherwise see another session's scan.
    """

    def __init__(self, weights_dir: str | Path | None = None, device: str = "cpu"):
        from safetensors.torch import load_file
        self.dir = resolve_weights(weights_dir)
        if not (self.dir / "card.json").exists():
            raise FileNotFoundError(f"no model card at {self.dir / 'card.json'}")
        self.card = load_card(self.dir)
        self.classes: list[str] = self.card["classes"]
        self.spec: dict = self.card["preprocessing"]
        self.temperature = temperature(self.card) or 1.0   # no calibration block: raw softmax, said so
        self.threshold = card_threshold(self.card)
        self.referral = ReferralRule.from_card(self.card)
        self.tta: dict | None = self.card.get("tta")  # selective mirror pass (`apply_tta`)
        self.device = torch.device(device)
        self.model = create_model(self.card["arch"], len(self.classes))
        if not (self.dir / "model.safetensors").is_file():
            raise ValueError(f"{self.dir} has a card but no model.safetensors: the weights are missing")
        try:
            state = load_file(self.dir / "model.safetensors")
            self.model.load_state_dict({k: v.float() for k, v in state.items()})
        except Exception as e:  # truncated, foreign or missing weights: a usage error, not a crash
            raise ValueError(f"the weights in {self.dir} could not be loaded ({type(e).__name__}): "
                             "the file is damaged or does not match the card") from e
        self.model.eval().to(self.device)
        self.precision = serving_precision(self.device)
        # channels_last in fp32 too: ResNet18's one-thread forward on an AMD EPYC without bf16 fell
        # from 46 to 36 ms (bench/latency.py); training and evaluate() run the model so already
        self.model.to(memory_format=torch.channels_last)
        # Inference only: no parameter ever needs a gradient. Saliency differentiates with
        # respect to the input instead, which spares a model-sized set of weight gradients.
        self.model.requires_grad_(False)
        self.weights_sha256 = file_sha256(self.dir / "model.safetensors")
        if (why := weights_mismatch(self.card, self.weights_sha256, self.dir)):
            raise ValueError(why)
        # What a cached result depends on besides the pixels: the folder, the weights, the card
        # (classes, calibration, threshold, referral) and the gate, which fit-ood adds later.
        gate_file = self.dir / "ood.safetensors"
        gate_sha256 = file_sha256(gate_file) if gate_file.is_file() else None
        self.card_sha256 = file_sha256(self.dir / "card.json")
        self.identity = (str(self.dir.resolve()), self.weights_sha256, self.card_sha256, gate_sha256)
        self.lock = threading.RLock()  # re-entered: predict_scan holds it around probabilities
        self.gate = None
        if (why := gate_file_problem(self.dir, self.card)):
            raise ValueError(why)
        if gate_file.is_file():
            from .ood import OODGate
            self.gate = OODGate.load(self.dir)
            if (why := self.gate.mismatch(self.card, self.weights_sha256, feature_channels(self.model))):
                raise ValueError(f"{self.dir}: {why}")
            if self.gate.uses_classifier:
                # Hook the feature tap now, so that the first served pass already leaves its (bf16)
                # features for the gate, and no thread attaches hooks while another runs the model.
                self.gate.tap.attach(self.model)
        self.gate_sha256 = gate_sha256   # of the gate that judges this model's scans (audit lines, reports)
        from .evaluation import seen_digests
        self.seen = seen_digests(self.dir)   # the files it trained on, by content (None: not known)

    def seen_in_training(self, sha256: str | None) -> bool:
        """Whether a file of this SHA-256 (hex) is one the model trained or was validated on, or a
        test file whose copy it trained on (`core.evaluation.SEEN_FILE`): its result then shows
        what the model learnt, not how it reads a new patient's scan."""
        from .data import CONTENT_DIGITS
        return bool(self.seen and sha256 and sha256[:CONTENT_DIGITS] in self.seen)

    @property
    def name(self) -> str:
        return self.card.get("name", self.dir.name)

    @property
    def is_tumour_model(self) -> bool:
        return has_tumour_decision(self.classes)

    def input_tensor(self, scan: ScanImage) -> torch.Tensor:
        return preprocess(scan.pixels, self.spec, scan.head_box)[None].to(self.device)

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> np.ndarray:
        """Calibrated class probabilities for a batch of model inputs."""
        tap = self.gate.tap if self.gate is not None and self.gate.uses_classifier else None
        with self.lock, torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits = self.model(x).float()
            with tap.paused() if tap else contextlib.nullcontext():  # the gate reads the plain pass
                logits = apply_tta(self.model, x, logits, self.tta)
        return torch.softmax(logits.float() / self.temperature, dim=1).cpu().numpy()

    def predict_scan(self, scan: ScanImage) -> Prediction:
        x = self.input_tensor(scan)
        with self.lock:  # the gate reads the features this pass leaves behind
            p = self.probabilities(x)
            in_dist, score, reason = self.distribution_check(scan, x)
        if not np.isfinite(p).all():  # NaN compares false: it would read as a plain "no tumour"
            raise ScanError("The model gave no usable probabilities for this scan (not finite numbers): "
                            "its weights or card may be damaged, so nothing is shown as a diagnosis.")
        k = int(decide(p, self.classes, self.threshold)[0])
        t_prob = float(tumour_probability(p, self.classes)[0]) if self.is_tumour_model else None
        conf = float(p[0, k])  # of the class called, which a threshold can make other than the top one
        unc, typ = self.referral.flags(p, np.array([k]), self.threshold)
        return Prediction(pred=self.classes[k],
                          probs={c: float(v) for c, v in zip(self.classes, p[0])},
                          tumour_probability=t_prob, threshold=self.threshold, confidence=conf,
                          uncertain=bool(unc[0]), in_distribution=bool(in_dist), ood_score=score,
                          type_uncertain=bool(typ[0]), uncertain_reason=self.referral.reason(p[0], k, self.threshold),
                          ood_reason=reason, info=dict(scan.info))

    def distribution_check(self, scan: ScanImage, x: torch.Tensor | None) -> tuple[bool, float | None, str | None]:
        """(in_distribution, ood_score, reason): a blank image, the DICOM header, the pixel gate
        (without one: colour, a nearly empty slice), then, on what those passed, marks drawn in
        colour and several slices in one image.

        Call after ``probabilities(x)``: a gate on the classifier's features reads that pass.
        ``ood_score`` is always the pixel gate's (None without one), so that thresholds and
        dashboards stay on one scale; a header verdict flags whatever the score.
        """
        reason = BLANK_OOD_REASON if scan.info.get("blank") else header_reason(scan.info)
        ok, score = True, None
        if self.gate is not None:
            ok, score, margins = self.gate.verdict(scan, x, self.model)
            if not math.isfinite(score):   # a NaN part flags (`ood.flagging`); as a score it is no number,
                score = None               # and NaN is no JSON: none, the scan flagged (NaN <= 0 is False)
            if not self.gate.components:   # the colour rule alone: the pixels were not checked, and
                score = None               # a score would hide that ('image not checked' keys on None)
        if reason is None and not ok:
            reason = gate_reason(margins)   # a chart the gate refuses is told so, not of marks
        if reason is None and self.gate is None and scan.colourfulness > NO_GATE_COLOUR_LIMIT:
            reason = COLOUR_OOD_REASON
        if reason is None and (self.gate is None or not self.gate.components) and is_empty_slice(scan.pixels):
            reason = EMPTY_OOD_REASON   # no gate, or one that judges colour alone
        if reason is None:              # what the checks above passed: a screen capture's tells
            colour_limit = getattr(self.gate, "colour_limit", None) or NO_GATE_COLOUR_LIMIT
            reason = marks_reason(scan, colour_limit) or panels_reason(scan)
        return reason is None, score, reason

    def gate_margins(self, scan: ScanImage) -> dict[str, float]:
        """Each part of the pixel gate on this scan, over its threshold (`OODGate.margins`: > 0
        flags), from a repeat of the served pass; empty without a gate. For reports: which part
        withholds a kind of scan."""
        if self.gate is None:
            return {}
        x = self.input_tensor(scan)
        with self.lock:
            if self.gate.uses_classifier:
                self.probabilities(x)  # the served pass (its precision) whose features the gate reads
            return self.gate.margins(scan, x, self.model)

    def predict_file(self, src: str | Path | bytes, name: str | None = None, **read_kw) -> Prediction:
        return self.predict_scan(read_scan(src, name, **read_kw))


def predict_many(predictor: Predictor, items: list[tuple[str, bytes | str]], best_slice: bool = False,
                 **read_kw) -> list[dict]:
    """One result per input, in order: a failing file never stops the others. ``best_slice``:
    a volume's most tumour-like slice the out-of-distribution check accepts, not its middle one."""
    return list(iter_predictions(predictor, items, best_slice, **read_kw))


def iter_predictions(predictor: Predictor, items: list[tuple[str, bytes | str]], best_slice: bool = False,
                     **read_kw) -> Iterator[dict]:
    """`predict_many` one result at a time, as each is ready: `predict` prints each line at once
    (a long batch stopped half-way keeps what it printed)."""
    for name, src in items:
        try:
            pr = _predict_one(predictor, src, name, best_slice, **read_kw)
            check = (VolumeCheck([], None) if best_slice else
                     volume_check(predictor, src, name, pr.info, pr.threshold, pr.in_distribution))
            if check.head_share is not None and "head_share" not in pr.info:
                pr = replace(pr, info={**pr.info, "head_share": check.head_share})
            row = {"file": name, "ok": True, **pr.to_json()}
            if check.hot:
                row["hot_slices"] = check.hot   # as the app and the report flag it
            fell_back = best_slice and str(pr.info.get("slice_choice", "")).startswith(DEFAULT_SLICE)
            if check.unchecked or (fell_back and getattr(predictor, "is_tumour_model", False)):
                row["other_slices_unchecked"] = True   # no hot_slices is then no finding
            if getattr(predictor, "seen", None) and predictor.seen_in_training(sha256_of(src)):
                row["seen_in_training"] = True   # as the app and the report flag it
            yield row
        except ScanError as e:
            yield {"file": name, "ok": False, "error": str(e)}
        except BaseException as e:  # a bug must not take down the rest of a batch
            yield {"file": name, "ok": False, "error": file_fault_error(e)}


# Slices scored per forward pass: a batch of 64 at 192 px took 288 MB at its peak (16: 72 MB), and a
# volume upload must fit beside the app's ~1 GB on Community Cloud (review of 2026-12-07). 8: scoring a
# 256 x 256 x 176 volume peaked 76 MB over the process's RSS against 111-117 MB at 16, in the same
# 1.5 s (session 47, 2 cores; 4: 55-62 MB, 3 % slower)
SLICE_BATCH = 8


class VolumeCheck(NamedTuple):
    """What the whole volume says of the slice shown (`volume_check`)."""
    hot: list[int]               # `hot_slices`: other slices at the operating point
    head_share: float | None     # the slice's head_share as the volume's read gives it
    unchecked: bool = False      # the volume could not be read whole: no other slice was scored


def volume_check(predictor: Predictor, src, name: str, info: dict, threshold: float | None,
                 in_distribution: bool = True) -> VolumeCheck:
    """`hot_slices` of the volume slice whose reader ``info`` is given, every slice scored here
    (`predict`, the report), and that slice's head_share: a DICOM frame or stack page read alone
    has none, so a tumour call on an end frame went unmarked where --best-slice marked it.
    ([], None) for a single image, a model without a tumour decision, or an empty volume; with
    ``unchecked`` for a volume that cannot be read whole (`whole_read_failed`)."""
    shown = shown_slice(info)
    if shown is None or not getattr(predictor, "is_tumour_model", False):
        return VolumeCheck([], None)
    try:
        scans, _, scores = slice_scores(predictor, src, name)
        share = scans[shown].info.get("head_share") if 0 <= shown < len(scans) else None
        return VolumeCheck(checked_hot_slices(predictor, src, name, scores, threshold, shown, in_distribution,
                                              scans), share)
    except Exception as e:  # an empty volume, say: the slice shown stands alone
        return VolumeCheck([], None, whole_read_failed(e))


def whole_read_failed(e: BaseException) -> bool:
    """Whether scoring a volume's slices failed because it cannot be read whole (too many slices
    or pages, a page too small, a stack over MAX_VOXELS): its other slices went unchecked, where
    an empty volume has none to check."""
    return isinstance(e, ScanError) and not isinstance(e, EmptyVolume)


def checked_hot_slices(predictor: Predictor, src, name: str, scores: dict[int, float], threshold: float | None,
                       shown: int, shown_in_distribution: bool = True,
                       scans: list[ScanImage] | None = None) -> list[int]:
    """`hot_slices`, and when the slice shown is refused, only if the out-of-distribution check
    accepts one of them (tried most tumour-like first, every one if need be: stopping after a few
    erred on the silent side): a volume that is no brain MRI is refused throughout, and its raw
    scores are no reason to send anyone to its slices. ``scans``: the volume's slices when the
    caller has read them (`slice_scores`), else read here."""
    hot = hot_slices(scores, threshold, shown, shown_in_distribution)
    if hot and not shown_in_distribution:
        scans = scans if scans is not None else indexed_slices(src, name)[0]
        accepted = any(predictor.predict_scan(scans[k]).in_distribution for k in sorted(hot, key=scores.get, reverse=True))
        return hot if accepted else []
    return hot


class EmptyVolume(ScanError):
    """Every slice of a volume is empty: no slice to choose."""


def indexed_slices(src: str | Path | bytes, name: str | None = None, **read_kw) -> tuple[list[ScanImage], str]:
    """(every slice of a volume as a ScanImage carrying its index and the slice count, kind)."""
    from .reader import read_volume_scans
    scans, kind, _ = read_volume_scans(src, name, **read_kw)
    index_key = "slice_index" if kind == "nifti" else "frame"
    return [replace(s, info={**s.info, index_key: k, "n_slices": len(scans)})
            for k, s in enumerate(scans)], kind


def slice_scores(predictor: Predictor, src: str | Path | bytes, name: str | None = None,
                 batch_size: int = SLICE_BATCH, **read_kw) -> tuple[list[ScanImage], str, dict[int, float]]:
    """(slices, kind, {slice index: score}) of a volume (NIfTI slices, DICOM frames, TIFF/GIF pages).

    Each slice is the ScanImage `read_scan` would give for it (its index, colour and blank flag
    included). Every non-empty slice is scored in batches: its tumour probability (the top
    class's probability for a model without a no-tumour class), before the out-of-distribution check.
    """
    scans, kind = indexed_slices(src, name, **read_kw)
    keep = [i for i, s in enumerate(scans) if not is_empty_slice(s.pixels)]
    if not keep:
        raise EmptyVolume("Every slice of the volume is empty.")
    scores = []
    for start in range(0, len(keep), batch_size):  # batches bound memory on large volumes
        x = torch.cat([predictor.input_tensor(scans[i]) for i in keep[start:start + batch_size]])
        p = predictor.probabilities(x)
        scores.append(tumour_probability(p, predictor.classes) if predictor.is_tumour_model else p.max(1))
    return scans, kind, dict(zip(keep, np.concatenate(scores).astype(float).tolist()))


def hot_slices(scores: dict[int, float], threshold: float | None, shown: int | None,
               shown_in_distribution: bool = True) -> list[int]:
    """The other slices of a volume that reach the operating point when the slice shown does not
    (a tumour on slice 12 must not hide behind a clean middle slice); [] otherwise. A slice shown
    out of distribution gets no call, so it reaches nothing, whatever its raw score: without
    this, a refused slice scoring high hid a tumour called on the next one."""
    if threshold is None or shown is None or (shown_in_distribution and scores.get(shown, 0.0) >= threshold):
        return []
    return sorted(k for k, v in scores.items() if v >= threshold and k != shown)


def listed_slices(hot: list[int], most: int = 12) -> str:
    """'3, 4, 5 and 9 more': the slice numbers a warning names, at most ``most`` of them."""
    return ", ".join(map(str, hot[:most])) + (f" and {len(hot) - most} more" if len(hot) > most else "")


def shown_slice(info: dict) -> int | None:
    """The index of the slice a volume's ScanImage holds (NIfTI slice, DICOM/TIFF frame), or None
    for a single image."""
    if max(int(info.get("n_slices") or 1), int(info.get("n_frames") or 1)) <= 1:
        return None
    return info.get("slice_index", info.get("frame"))


# Why a volume's call stands alone (row key "other_slices_unchecked"): the app's note, the report's flag text
UNCHECKED_TEXT = (f"This volume could not be read whole (more than {MAX_SLICES} slices, or slices that cannot "
                  "be read together), so its other slices were not scored: only the slice shown was read. Look "
                  "at the other slices before calling the volume clear.")


def _predict_one(predictor: Predictor, src, name: str, best_slice: bool, **read_kw) -> Prediction:
    if best_slice:
        try:
            return most_tumour_like_slice(predictor, src, name, **read_kw)[1]
        except EmptyVolume:
            pass
        except ScanError as e:
            # The whole volume cannot be read (a stack with one thumbnail-sized page, one too many
            # pages): the slice read by default is still a result, as the app shows it, and says why.
            pred = predictor.predict_file(src, name, **read_kw)
            if shown_slice(pred.info) is None and pred.info.get("frame") is None:   # a large GIF counts no pages
                raise
            return replace(pred, info={**pred.info, "slice_choice": f"{DEFAULT_SLICE}: {e}"})
    # an empty volume: its middle slice as read_scan gives it (refused as blank only when it is
    # one value everywhere; a nearly empty slice goes to the gate like any other)
    return predictor.predict_file(src, name, **read_kw)


BEST_SLICE = "most tumour-like"   # info["slice_choice"] of a slice picked by `most_tumour_like_slice`
# ... and of the slice read by default when --best-slice cannot read every slice (why follows)
DEFAULT_SLICE = "the default slice, as not every slice could be read"

# A volume's slices tried, most tumour-like first, for one the gate accepts: past these the
# search stops (a volume the gate refuses throughout would cost one pass per slice).
GATE_TRIES = 8
# A volume slice whose lit area is under this share of the volume's widest (info "head_share", set
# by the reader) lies near an end of the head: the vertex, the skull base or a pole. On such T1
# slices of two healthy volumes the model called glioma at 0.995 (docs/generalisation.md, "Real
# images from two Debian packages"); the share is a round number chosen after seeing those calls
# (the unreferred ones at 0.25-0.42), so they do not test it. A tumour call there is said to
# be less reliable, not changed: on LGG, whose training volumes hold such slices, edge slices
# raised no false alarm.
END_SLICE_SHARE = 0.5
SEEN_TEXT = ("This exact file is one the model trained or was validated on (or a copy of one it trained "
             "on): the result shows what it learnt, not how it reads a new patient's scan.")
# Why such a call is marked: the app's note (`end_slice_note`) and the report's flag text.
END_SLICE_CAVEAT = ("On two healthy T1 heads the model called such slices glioma with confidence: a tumour "
                    "call here is less reliable than one on a middle slice. Read this slice itself.")
END_SLICE_NOTE = ("The slice lies near an end of the head (its cross-section is {share:.1%} of the volume's "
                  "widest). " + END_SLICE_CAVEAT)


def end_slice_note(info: dict, pred: str, classes: list[str]) -> str | None:
    """`END_SLICE_NOTE` for a tumour call on a volume's slice near an end of the head, else None."""
    share = info.get("head_share")
    if share is None or share >= END_SLICE_SHARE or not is_tumour_call(pred, classes):
        return None
    return END_SLICE_NOTE.format(share=share)


def most_tumour_like_slice(predictor: Predictor, src: str | Path | bytes, name: str | None = None,
                           batch_size: int = SLICE_BATCH, scores: dict[int, float] | None = None,
                           **read_kw) -> tuple[int, Prediction]:
    """The slice (NIfTI axial slice, DICOM frame, TIFF/GIF page) the model finds most tumour-like, predicted.

    The highest score of `slice_scores` (or of ``scores``, computed before) among the slices the
    out-of-distribution check accepts wins: a refused slice's output is no diagnosis, so it must
    not hide an accepted tumour slice. When none of the `GATE_TRIES` highest passes, the highest
    is returned (refused). The returned Prediction is the ordinary one for that slice, flags
    included, with slice_index / n_slices and the reader's head_share in its info (see
    `end_slice_note`). A 2D image has one slice: (0, its prediction).
    """
    if scores is None:
        scans, _, scores = slice_scores(predictor, src, name, batch_size, **read_kw)
    else:  # the slices again (reading is cheap beside scoring)
        scans = indexed_slices(src, name, **read_kw)[0]
    first = None
    for k in sorted(scores, key=scores.get, reverse=True)[:GATE_TRIES]:
        scan = scans[k]  # this call's own slice: its info is ours to extend, its head box stays found
        scan.info.update({"slices_scored": len(scores), "slice_choice": BEST_SLICE})
        pred = predictor.predict_scan(scan)
        if pred.in_distribution:
            return k, pred
        first = first or (k, pred)
    return first
