"""What a DICOM header says about an upload before any pixel is looked at.

The pixel gate (`core.ood`) learns "brain MRI" from images and misses some real scans of other
kinds (a bone scan, an abdominal MR, echo frames: docs/generalisation.md). A DICOM file states
its modality and often its body part; when it states something this model was never built for,
that is a stronger signal than any image score, and it is the check a radiology system makes
first. Only what the header *positively* says counts: a missing or unknown value is left to the
pixel gate, because headers are often incomplete, localised ("KOPF", "CRANE") or generic ("OT").
"""
from __future__ import annotations

import re

PREFIX = "The DICOM header says"   # every reason starts so: how a verdict names its check
# Modalities under which a brain MRI slice can arrive: MR itself, and the generic ones that say
# nothing about the scanner (OT "other", SC, empty: exports, secondary captures, anonymised files).
MRI_MODALITIES = frozenset({"MR", "OT", "SC", ""})
MODALITY_NAMES = {
    "CT": "a CT", "US": "an ultrasound", "NM": "a nuclear-medicine (scintigraphy)",
    "PT": "a PET", "CR": "an X-ray", "DX": "an X-ray", "DR": "an X-ray", "RG": "an X-ray",
    "MG": "a mammography", "XA": "an angiography", "RF": "a fluoroscopy", "IO": "a dental X-ray",
    "PX": "a dental X-ray", "OP": "an ophthalmic", "OPT": "an eye OCT", "SM": "a microscopy",
    "XC": "a photographic", "GM": "a photographic", "ES": "an endoscopy", "ECG": "an ECG",
}
# Body Part Examined terms (DICOM PS3.16 CID 4031 and common variants) that are not the head
# (the neck and what is in it, the face and the jaw are left to the pixels: imaged with the head),
# compared after upper-casing and dropping spaces, '_', '-' and '^'.
NON_HEAD_PARTS = frozenset({
    "ABDOMEN", "ABDOMENPELVIS", "CHESTABDOMEN", "CHESTABDPELVIS", "CHESTABDOMENPELVIS", "PELVIS",
    "CHEST", "THORAX", "NECKCHEST", "NECKCHESTABDOMEN", "NECKCHESTABDPELV", "MEDIASTINUM",
    "BREAST", "HEART", "CORONARYARTERY", "LUNG", "TRACHEA", "BRONCHUS", "ESOPHAGUS", "THYMUS",
    "LIVER", "GALLBLADDER", "BILEDUCT", "PANCREAS", "SPLEEN", "STOMACH", "DUODENUM",
    "JEJUNUM", "ILEUM", "COLON", "CECUM", "APPENDIX", "RECTUM", "ADRENAL", "KIDNEY", "URETER",
    "BLADDER", "URETHRA", "PROSTATE", "TESTIS", "SCROTUM", "PENIS", "UTERUS", "CERVIX", "OVARY",
    "VAGINA", "VULVA", "PERINEUM", "SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "CTSPINE",
    "TLSPINE", "LSSPINE", "COCCYX", "SACRUM", "SIJOINT", "ILIUM", "WHOLEBODY", "ENTIREBODY",
    "EXTREMITY", "UPPEREXTREMITY", "LOWEREXTREMITY", "ARM", "LEG", "HAND", "FOOT", "FINGER", "THUMB",
    "TOE", "WRIST", "ELBOW", "SHOULDER", "AXILLA", "CLAVICLE", "HIP", "BUTTOCK", "KNEE", "PATELLA",
    "ANKLE", "CALCANEUS", "HEEL", "FEMUR", "TIBIA", "FIBULA", "TIBIAFIBULA", "CALF", "HUMERUS",
    "RADIUS", "ULNA", "RADIUSULNA", "FOREARM", "THIGH", "RIB", "STERNUM", "SCAPULA", "BACK", "AORTA",
})


# Words that make a Body Part Examined not the head wherever they stand in it ("LUMBAR SPINE",
# "CHEST_TO_PELVIS", "LOWER LEG"), unless a head word stands there too ("HEAD^NECK").
NON_HEAD_WORDS = NON_HEAD_PARTS | {"CARDIAC", "ABDOMINAL", "PELVIC", "LUMBAR", "THORACIC", "SPINAL",
                                   "SACRAL", "BREASTS", "LEGS", "ARMS", "HANDS", "FEET", "KNEES"}
HEAD_WORDS = frozenset({"HEAD", "BRAIN", "SKULL", "CRANIUM", "CRANIO", "CEREBRUM", "NEURO", "KOPF", "SCHADEL", "CRANE",
                        "CERVEAU", "CRANEO", "CEREBRO", "ORBIT", "SELLA", "IAC", "HEADNECK"})


# Modality and Body Part Examined are typed by hand and reach every output (the JSON's info, the
# PDF's source line, a refusal): only words this module recognises may, each other word masked
# ("MR WIGGUM" printed a name in the PDF; a privacy review, session 50). The masks keep every verdict
# as it was: an unrecognised modality word is still "a stated non-MR modality".
UNRECOGNISED = "UNRECOGNISED"
# DICOM's defined terms for Modality (PS3.3 C.7.3.1.1.1, with retired ones) and MR's usual spellings
DICOM_MODALITIES = frozenset({
    "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CD", "CF", "CP", "CR", "CS", "CT", "DD", "DF", "DG", "DM", "DOC",
    "DR", "DS", "DX", "EC", "ECG", "EPS", "ES", "FA", "FID", "FS", "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS",
    "KER", "KO", "LEN", "LP", "LS", "M3D", "MA", "MG", "MR", "MS", "NM", "OAM", "OCT", "OP", "OPM", "OPR", "OPT",
    "OPTBSV", "OPTENF", "OPV", "OSS", "OT", "PLAN", "POS", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE",
    "RTIMAGE", "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN", "RTSTRUCT", "RWV", "SC", "SEG", "SM", "SMR",
    "SR", "SRF", "ST", "STAIN", "TG", "US", "VA", "VF", "XA", "XC", "MRI", "MRT", "MRA"})
# words a Body Part Examined may keep besides the head and non-head terms above: sides and extents
# (not WHOLE, ENTIRE or BODY: kept alone from "WHOLE BODY SCAN" they would make the term WHOLEBODY)
PART_MODIFIERS = frozenset({"LEFT", "RIGHT", "BILATERAL", "BOTH", "LOWER", "UPPER", "NECK", "CERVICAL", "FACE",
                            "JAW", "SINUS", "SINUSES", "EAR", "NOSE", "THROAT", "AND", "TO", "OF"})
_PART_TERMS = HEAD_WORDS | NON_HEAD_WORDS        # the words a body-part verdict is read from
_KEPT_PART_WORDS = _PART_TERMS | PART_MODIFIERS


def recognised_modality(code: str) -> str:
    """A Modality code string (`reader._code_string`) with each word not a DICOM modality masked:
    an MR spelling as MR, anything else as UNRECOGNISED."""
    words = [w if w in DICOM_MODALITIES else "MR" if w.startswith("MR") else UNRECOGNISED for w in code.split()]
    return " ".join(dict.fromkeys(words))   # "MR UNRECOGNISED", not the mask once per name


def recognised_body_part(code: str) -> str:
    """A Body Part Examined code string with only what this module reads kept: a whole standard
    term as written ("L-SPINE", "SI JOINT"), else its head, non-head and side words ("HEAD GUMBLE
    BARNEY" -> "HEAD")."""
    if _part_key(code) in NON_HEAD_PARTS:
        return code
    kept = " ".join(w for w in _words(code) if w in _KEPT_PART_WORDS)
    if _not_head(kept) != _not_head(code):   # the words left must not make a term the value did not hold
        return " ".join(w for w in _words(code) if w in _PART_TERMS)
    return kept


def _part_key(text: str) -> str:
    return re.sub(r"[\s_\-^]+", "", text.upper())


def _words(part: str) -> list[str]:
    """The words of a Body Part Examined, upper-cased, in order ("LOWER_LEG" -> LOWER, LEG)."""
    return [w for w in re.split(r"[\s_\-^/,.&+]+", part.upper()) if w]


def _not_head(part: str) -> bool:
    """Whether a Body Part Examined names a part that is not the head: the whole term (spaces
    and separators dropped, "C-SPINE" = "CSPINE") or any word of it, unless a word names the head."""
    words = set(_words(part))
    if words & HEAD_WORDS:
        return False
    return _part_key(part) in NON_HEAD_PARTS or bool(words & NON_HEAD_WORDS)


def _named_part(part: str) -> str:
    """The non-head term recognised in a Body Part Examined ("LOWER LEG" -> "LEG"): the only text of
    that free-text field a reason repeats."""
    if _part_key(part) in NON_HEAD_PARTS:   # a whole term ("L-SPINE"): as written, its letters only
        # '_' as a space: the app shows reasons as markdown, where "_ABDOMEN_" is italics
        return re.sub(r"[^A-Z0-9 \-^]", "", part.upper().replace("_", " "))
    words = [w for w in _words(part) if w in NON_HEAD_WORDS]
    return " ".join(words) if words else _part_key(part)


def header_reason(info: dict) -> str | None:
    """One plain sentence when the file's header says it is not a brain MRI, else None.

    ``info`` is a `ScanImage.info`: only DICOM files carry ``modality`` and ``body_part``.
    """
    modality = str(info.get("modality", "")).strip().upper()
    # Modality holds one value; a file with several ("MR\\CT", read as "MR CT") is judged by every
    # one of them, so their order cannot decide. "MRI", "MR " and the like are non-standard
    # spellings of MR, not another kind of scan; hand-typed words beside MR are not modalities.
    words = modality.split()
    others = [m for m in words if m not in MRI_MODALITIES and not m.startswith("MR")]
    if any(m.startswith("MR") for m in words):
        # beside MR only a named other modality counts ("MR CT"); "MR BRAIN", "MR T1" are MR
        others = [m for m in others if m in MODALITY_NAMES]
    if others:
        named = [m for m in others if m in MODALITY_NAMES]   # "WIGGUM CT": a CT, whatever stands first
        kind = MODALITY_NAMES.get(named[0]) if named else None
        said = (f"this is {kind} image (Modality {modality}), not an MRI" if kind
                else "its modality is not MR (a value this app does not recognise)" if UNRECOGNISED in words
                else f"this image's modality is {modality}, not MR")
        return f"{PREFIX} {said}; the model reads brain MRI only."
    part = str(info.get("body_part", "")).strip()
    if part and _not_head(part):
        what = ("the anatomy it states for this frame" if info.get("body_part_of_frame")
                else "the body part examined")
        return f"{PREFIX} {what} is {_named_part(part)}, not the head; the model reads brain MRI only."
    return None
