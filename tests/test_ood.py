"""The out-of-distribution gate: generators, fitting on tiny synthetic data, persistence, Predictor."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import outliers as O
from core.inference import FEATURE_OOD_REASON, GATE_COLOUR_OOD_REASON, PIXEL_OOD_REASON
from core.ood import GATE_SPEC, ImageSet, OODGate, from_scans
from core.reader import ScanImage, read_scan


def _heads(n: int, seed: int) -> list[ScanImage]:
    rng = np.random.default_rng(seed)
    return [ScanImage(O.head_like(rng, int(rng.integers(96, 160)))) for _ in range(n)]


def _colour_photo() -> ScanImage:
    """A colour natural photo shipped with scikit-image, read like an upload."""
    buf = io.BytesIO()
    Image.open(O._skimage_dir() / "astronaut.png").convert("RGB").save(buf, "PNG")
    return read_scan(buf.getvalue())


def _noise(seed: int) -> ScanImage:
    return ScanImage(np.random.default_rng(seed).random((200, 180)).astype(np.float32))


@pytest.mark.parametrize("category", sorted(O.CATEGORIES))
def test_generators_give_grey_images_via_the_reader(category):
    mri = [s.pixels for s in _heads(3, 0)]
    scans = O.make_scans(category, 2, seed=1, mri=mri)
    assert len(scans) == 2
    for s in scans:
        assert s.pixels.ndim == 2 and s.pixels.dtype == np.float32
        assert min(s.pixels.shape) >= 16
        assert 0.0 <= s.pixels.min() and s.pixels.max() <= 1.0
        assert s.colourfulness >= 0


def test_generators_are_seeded_and_categories_disjoint():
    a = O.make_images("shapes", 2, seed=3)
    b = O.make_images("shapes", 2, seed=3)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not set(O.SEEN) & set(O.UNSEEN)
    assert not set(O.TEST_ONLY) & (set(O.SEEN) | set(O.UNSEEN))   # real images never train a gate
    assert set(O.ALTERED_MRI) <= set(O.MRI_DERIVED)
    assert not set(O.PHOTOS_TRAIN) & set(O.PHOTOS_TEST)
    with pytest.raises(ValueError):
        O.make_images("mri_patch", 1, seed=0)   # MRI-derived kinds need slices


def test_category_folds_partition_and_held_out_estimate_reads_the_right_fold():
    from core.ood import category_folds, held_out_estimate
    cats = list(O.SEEN) + list(O.UNSEEN)
    folds = category_folds(cats, 4)
    assert sorted(c for f in folds for c in f) == sorted(cats) and all(folds)
    # No fold holds out two categories of one kind (their neighbours stay in training), unless
    # the kind has more than 4 members.
    sizes = {k: sum(O.KIND[c] == k for c in cats) for k in set(O.KIND.values())}
    for f in folds:
        kinds = [O.KIND[c] for c in f if sizes[O.KIND[c]] <= 4]
        assert len(kinds) == len(set(kinds)), f
    assert set(O.KIND) == set(O.CATEGORIES)
    # The pinned folds are the shipped gate's (its ood_eval.json records them), and a new category
    # moves no other: it joins the smallest fold without one of its kind. (The real head CT, where
    # its package is installed, is such a category.)
    pinned = {c for f in O.PINNED_FOLDS for c in f}
    assert [[c for c in f if c in pinned] for f in folds] == [list(f) for f in O.PINNED_FOLDS]
    cats = [c for c in cats if c in pinned]
    folds = category_folds(cats, 4)
    assert folds == [list(f) for f in O.PINNED_FOLDS]
    O.KIND["new_body_scan"] = "body_medical"
    try:
        grown = category_folds(cats[:5] + ["new_body_scan"] + cats[5:], 4)
    finally:
        del O.KIND["new_body_scan"]
    assert grown[3] == folds[3] + ["new_body_scan"] and grown[:3] == folds[:3]
    assert category_folds(cats + ["own_kind"], 4)[1] == folds[1] + ["own_kind"]  # first smallest fold
    assert sorted(c for f in category_folds(cats, 3) for c in f) == sorted(cats)  # other k: dealt
    assert all(category_folds(["blank", "pattern", "noise", "text"], 4))        # no empty fold
    rows = {f"g [fold {i + 1}]": {"outliers_flagged_pct": {c: (10.0 * (i + 1) if c in f else 100.0)
                                                            for c in cats + ["real_medical"]}}
            for i, f in enumerate(folds)}
    rows["g [all]"] = {"outliers_flagged_pct": {c: 100.0 for c in cats} | {"real_medical": 55.0}}
    est = held_out_estimate(rows, "g", folds, ["real_medical"])
    for i, f in enumerate(folds):
        assert all(est["per_category"][c] == 10.0 * (i + 1) for c in f)
    assert est["per_category"]["real_medical"] == 55.0
    assert est["min_pct"] == 10.0
    non_brain = [v for c, v in est["per_category"].items() if c not in O.ALTERED_MRI]
    assert est["non_brain_min_pct"] == min(non_brain)
    # A test-only category whose patient's other slices trained: from the fold that held those out
    sib = [f + ["ct_low"] if i == 2 else f for i, f in enumerate(folds)]
    for i, f in enumerate(sib):
        rows[f"g [fold {i + 1}]"]["outliers_flagged_pct"] |= {"ct_low": 100.0, "ct_top": 30.0 + i}
    rows["g [all]"]["outliers_flagged_pct"] |= {"ct_low": 100.0, "ct_top": 99.0}
    O.TRAINED_SIBLING["ct_top"] = "ct_low"
    try:
        est = held_out_estimate(rows, "g", sib, ["real_medical", "ct_top"])
    finally:
        del O.TRAINED_SIBLING["ct_top"]
    assert est["per_category"]["ct_top"] == 32.0 and est["per_category"]["real_medical"] == 55.0


@pytest.fixture(scope="module")
def synthetic_gate():
    """A gate network trained in seconds on head-like ellipses vs noise, text, shapes, blanks."""
    pos = from_scans(_heads(240, 0), groups=["heads"] * 240)
    negs = [from_scans(O.make_scans(c, 60, seed=0), groups=[c] * 60)
            for c in ("noise", "text", "shapes", "blank")]
    val = {"synthetic": from_scans(_heads(100, 1))}
    gate = OODGate.fit(pos, ImageSet.concat(negs), val, "cnn+colour", epochs=4, seed=0, log=lambda *a: None)
    return gate


def test_synthetic_gate_flags_noise_colour_text_and_passes_heads(synthetic_gate):
    g = synthetic_gate
    heads = [g.check(s, None, None)[0] for s in _heads(60, 2)]
    assert np.mean(heads) >= 0.9
    assert not g.check(_noise(5), None, None)[0]
    ok, score = g.check(_colour_photo(), None, None)
    assert not ok and score > 0
    texts = [g.check(s, None, None)[0] for s in O.make_scans("text", 20, seed=9)]
    assert np.mean(texts) <= 0.1


def test_check_matches_batch_scores_and_threshold_sets_val_rate(synthetic_gate):
    scans = _heads(10, 3) + O.make_scans("noise", 5, seed=4)
    batch = synthetic_gate.scores(from_scans(scans))
    single = [synthetic_gate.check(s, None, None)[1] for s in scans]
    assert np.allclose(batch, single, atol=1e-4)
    val = synthetic_gate.scores(from_scans(_heads(100, 1)))
    assert np.mean(val > 0) <= 0.02 + 1e-9


def test_margins_name_the_part_that_flags_and_their_maximum_is_the_score(synthetic_gate):
    """Noise is flagged by the network, a colour photo (at least) by the colour rule; for every
    scan the gate's score is the largest margin, the colour one counting only when it flags."""
    g = synthetic_gate
    noise, photo = _noise(6), _colour_photo()
    assert g.margins(noise, None, None)["cnn"] > 0 and g.margins(photo, None, None)["colour"] > 0
    # a head in colour: the network passes it, so the colour rule alone decides its score
    head = _heads(1, 5)[0]
    tinted = ScanImage(head.pixels, colourfulness=0.5)
    m = g.margins(tinted, None, None)
    assert m["colour"] == pytest.approx((0.5 - g.colour_limit) / g.colour_limit)
    if m["cnn"] <= 0:
        assert g.check(tinted, None, None)[1] == pytest.approx(m["colour"])
    for scan in _heads(5, 5) + [noise, photo]:
        m = g.margins(scan, None, None)
        assert set(m) == {"cnn", "colour"}
        ok, score = g.check(scan, None, None)
        assert score == pytest.approx(max([m["cnn"]] + [m["colour"]] * (m["colour"] > 0)), abs=1e-6)
        assert ok == (m["cnn"] <= 0 and m["colour"] <= 0)


def test_save_load_round_trip(synthetic_gate, tmp_path):
    synthetic_gate.save(tmp_path)
    assert (tmp_path / "ood.safetensors").stat().st_size < 1_000_000
    g2 = OODGate.load(tmp_path)
    data = from_scans(_heads(5, 4) + [_noise(1), _colour_photo()])
    assert np.allclose(synthetic_gate.scores(data), g2.scores(data), atol=1e-5)
    assert g2.method == "cnn+colour" and g2.colour_limit == synthetic_gate.colour_limit


@pytest.fixture()
def tiny_weights(tmp_path):
    """A small classifier's weights folder (random weights: the gate, not the classifier, is tested)."""
    from conftest import make_weights
    return make_weights(tmp_path / "tiny", arch="simple_cnn", size=64)


def test_predictor_reports_out_of_distribution(synthetic_gate, tiny_weights):
    from core.inference import Predictor
    synthetic_gate.save(tiny_weights)
    card = json.loads((tiny_weights / "card.json").read_text())
    assert card["ood"]["method"] == "cnn+colour" and "threshold" in card["ood"]
    p = Predictor(tiny_weights)
    assert p.gate is not None
    for scan in (_colour_photo(), _noise(7)):
        pr = p.predict_scan(scan)
        assert pr.in_distribution is False and pr.ood_score > 0
    assert p.predict_scan(_heads(1, 11)[0]).in_distribution is True


def test_a_served_scan_is_cropped_once_for_the_model_and_the_gate(synthetic_gate, tiny_weights, monkeypatch):
    # The head search was a third of the check's time when the gate redid it (bench/latency.py).
    import core.preprocess as P
    from core.inference import Predictor
    synthetic_gate.save(tiny_weights)
    p = Predictor(tiny_weights)
    calls = []
    real = P.head_bbox
    monkeypatch.setattr(P, "head_bbox", lambda g, *a, **k: calls.append(1) or real(g, *a, **k))
    scan = _heads(1, 12)[0]
    pr = p.predict_scan(scan)
    assert len(calls) == 1 and pr.ood_score is not None
    assert pr.ood_score == pytest.approx(synthetic_gate.scores(from_scans([_heads(1, 12)[0]]))[0], abs=1e-4)


def test_feature_gate_with_the_classifier(synthetic_gate, tiny_weights):
    """Mahalanobis on the classifier's pooled features, combined with the network; the
    features come from the Predictor's own forward pass (no second pass)."""
    from core.inference import Predictor
    p = Predictor(tiny_weights)
    spec = p.card["preprocessing"]
    pos = from_scans(_heads(120, 0), spec, ["heads/a"] * 60 + ["heads/b"] * 60)
    val = {"synthetic": from_scans(_heads(60, 1), spec)}
    g = OODGate.fit(pos, None, val, "cnn+mahalanobis+colour", p.model, spec, net=synthetic_gate.net)
    g.save(tiny_weights)
    p = Predictor(tiny_weights)
    assert p.gate.density is not None
    photo = p.predict_scan(_colour_photo())
    assert photo.in_distribution is False and photo.ood_reason == GATE_COLOUR_OOD_REASON
    scan = _noise(3)
    x = p.input_tensor(scan)
    p.probabilities(x)                          # the model's pass that the gate reuses
    calls = []
    h = p.model.register_forward_hook(lambda *a: calls.append(1))
    ok, score = p.gate.check(scan, x, p.model)
    h.remove()
    assert calls == [] and not ok
    # the served verdict and the parts' margins agree, the feature density scored among them,
    # from one repeat of the served pass
    h = p.model.register_forward_hook(lambda *a: calls.append(1))
    p.gate_margins(scan)
    h.remove()
    assert calls == [1]
    for s in _heads(3, 7) + [scan, _colour_photo()]:
        m, pr = p.gate_margins(s), p.predict_scan(s)
        assert set(m) == {"cnn", "mahalanobis", "colour"}
        assert pr.ood_score == pytest.approx(max([m["cnn"], m["mahalanobis"]] + [m["colour"]] * (m["colour"] > 0)), abs=1e-4)


def test_a_flagged_scan_is_told_which_part_flagged_it(synthetic_gate, tiny_weights, monkeypatch):
    """The served reason follows the part over its threshold: colour first, then the network
    (the image's look), and the feature density alone gets its own sentence; passing scans none."""
    from core.inference import Predictor
    p = Predictor(tiny_weights)
    spec = p.card["preprocessing"]
    pos = from_scans(_heads(60, 0), spec, ["heads/a"] * 30 + ["heads/b"] * 30)
    g = OODGate.fit(pos, None, {"synthetic": from_scans(_heads(40, 1), spec)}, "cnn+mahalanobis+colour",
                    p.model, spec, net=synthetic_gate.net)
    g.save(tiny_weights)
    p = Predictor(tiny_weights)
    nan = float("nan")
    cases = [({"cnn": -1.0, "mahalanobis": 2.0, "colour": -0.5}, FEATURE_OOD_REASON),
             ({"cnn": -1.0, "head": 0.3, "colour": -0.5}, FEATURE_OOD_REASON),     # the shipped gates' part
             ({"cnn": -1.0, "head": nan, "colour": -0.5}, FEATURE_OOD_REASON),     # a NaN flags
             ({"cnn": nan, "head": 2.0, "colour": -0.5}, PIXEL_OOD_REASON),        # the network said nothing usable
             ({"head": 2.0, "colour": -0.5}, PIXEL_OOD_REASON),                    # no network: nothing passed the look
             ({"cnn": 0.5, "mahalanobis": 2.0, "colour": -0.5}, PIXEL_OOD_REASON),
             ({"cnn": 0.5, "mahalanobis": -1.0, "colour": -0.5}, PIXEL_OOD_REASON),
             ({"cnn": -1.0, "mahalanobis": -1.0, "colour": 0.4}, GATE_COLOUR_OOD_REASON),
             ({"colour": 0.4}, GATE_COLOUR_OOD_REASON),                            # a colour-only gate
             ({"cnn": 3.0, "mahalanobis": 3.0, "colour": 0.4}, GATE_COLOUR_OOD_REASON)]
    scan = _heads(1, 9)[0]
    for margins, reason in cases:
        monkeypatch.setattr(p.gate, "verdict", lambda *a, m=margins: (False, max(m.values()), m))
        assert p.predict_scan(scan).ood_reason == reason
    monkeypatch.setattr(p.gate, "verdict", lambda *a: (True, -1.0, {"cnn": -1.0}))
    assert p.predict_scan(scan).ood_reason is None
    # unpatched: a real flag, its reason from the served pass's features (no second model pass)
    monkeypatch.undo()
    noise = _noise(4)
    calls = []
    h = p.model.register_forward_hook(lambda *a: calls.append(1))
    pr = p.predict_scan(noise)
    h.remove()
    assert not pr.in_distribution and pr.ood_reason in (PIXEL_OOD_REASON, FEATURE_OOD_REASON) and calls == [1]
    m = p.gate_margins(noise)
    assert pr.ood_reason == (PIXEL_OOD_REASON if m["cnn"] > 0 else FEATURE_OOD_REASON)


def test_feature_head_gate_trains_on_outlier_features_and_round_trips(synthetic_gate, tiny_weights):
    """The feature head: an MLP on the classifier's pooled features, heads vs generated outliers;
    fitted, saved, loaded and used by the Predictor with the same scores."""
    from core.inference import Predictor
    from core.ood import FeatureHead, features_and_logits
    p = Predictor(tiny_weights)
    spec = p.card["preprocessing"]
    pos = from_scans(_heads(120, 0), spec, ["heads"] * 120)
    neg = ImageSet.concat([from_scans(O.make_scans(c, 40, seed=0), spec, [c] * 40) for c in ("noise", "text")])
    neg_f, _ = features_and_logits(p.model, neg.main, spec)
    val = {"synthetic": from_scans(_heads(60, 1), spec)}
    with pytest.raises(ValueError, match="outliers"):
        OODGate.fit(pos, None, val, "head+colour", p.model, spec)
    g = OODGate.fit(pos, None, val, "cnn+head+colour", p.model, spec, net=synthetic_gate.net,
                    neg_feats=(neg_f, neg.groups))
    assert isinstance(g.density, FeatureHead) and {c.name for c in g.components} == {"cnn", "head"}
    g.save(tiny_weights)
    p = Predictor(tiny_weights)
    assert isinstance(p.gate.density, FeatureHead)
    data = from_scans(_heads(5, 4) + O.make_scans("noise", 3, seed=8), spec)
    assert np.allclose(g.scores(data, p.model, spec), p.gate.scores(data, p.model, spec), atol=1e-4)
    assert np.mean(p.gate.scores(from_scans(_heads(60, 1), spec), p.model, spec) > 0) <= 0.02 + 1e-9
    assert p.predict_scan(_noise(3)).in_distribution is False


def test_feature_head_separates_without_groups_and_refuses_two_feature_scorers():
    from core.ood import FeatureHead
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0, 1, (300, 16)), rng.normal(3, 1, (200, 16))
    head = FeatureHead.fit(pos, [], neg, [], steps=200)   # no groups: one group per side
    assert np.mean(head.score(pos) < 0) > 0.95 and np.mean(head.score(neg) > 0) > 0.95
    val = {"s": from_scans(_heads(10, 1))}
    with pytest.raises(ValueError, match="more than one feature scorer"):
        OODGate.fit(from_scans(_heads(10, 0)), None, val, "mahalanobis+head", caches={})


def test_cached_gate_net_reuses_the_same_training_and_only_it(tmp_path, monkeypatch):
    import core.data
    from core.ood import cached_gate_net, net_scores
    monkeypatch.setattr(core.data, "HASH_CACHE", tmp_path / "phash.json")
    pos = from_scans(_heads(40, 0), groups=["heads"] * 40)
    neg = from_scans(O.make_scans("noise", 20, seed=0), groups=["noise"] * 20)
    logs: list[str] = []
    a = cached_gate_net(pos, neg, epochs=1, log=logs.append)
    b = cached_gate_net(pos, neg, epochs=1, log=logs.append)
    assert sum("reused" in m for m in logs) == 1 and len(list(tmp_path.glob("gate-net-*.pt"))) == 1
    assert np.allclose(net_scores(a, pos.small), net_scores(b, pos.small))
    cached_gate_net(pos, neg, epochs=1, seed=1, log=logs.append)   # another seed: trained anew
    assert sum("reused" in m for m in logs) == 1 and len(list(tmp_path.glob("gate-net-*.pt"))) == 2
    import core.engine                     # an edit anywhere in engine.py (its augmentation helpers): trained anew
    edited = tmp_path / "engine.py"
    edited.write_text(Path(core.engine.__file__).read_text().replace("0.08", "0.30"))
    monkeypatch.setattr(core.engine, "__file__", str(edited))
    cached_gate_net(pos, neg, epochs=1, log=logs.append)
    assert sum("reused" in m for m in logs) == 1 and len(list(tmp_path.glob("gate-net-*.pt"))) == 3
    monkeypatch.undo()
    monkeypatch.setattr(core.data, "HASH_CACHE", tmp_path / "phash.json")
    turned = {"rotate": 45.0, "shear": 0.25, "turn_p": 0.25}      # a classifier trained with turns
    cached_gate_net(pos, neg, epochs=1, log=logs.append, geometry=turned)
    assert sum("reused" in m for m in logs) == 1 and len(list(tmp_path.glob("gate-net-*.pt"))) == 4


def test_gate_geometry_follows_only_a_widened_classifier_augmentation():
    from core.ood import gate_geometry
    plain = {"training": {"augmentation": {"strength": 1.0, "rotate": 15.0, "shear": 0.1, "turn_p": 0.0}}}
    assert gate_geometry(plain) is None and gate_geometry({}) is None and gate_geometry(None) is None
    assert gate_geometry({"training": {"augmentation": {"strength": 1.0}}}) is None  # older cards
    wide = {"training": {"augmentation": {"rotate": 45.0, "shear": 0.25, "turn_p": 0.25, "blur_p": 0.3}}}
    assert gate_geometry(wide) == {"rotate": 45.0, "shear": 0.25, "turn_p": 0.25}


def test_ood_table_lists_held_out_and_shipped_rates():
    from core.dashboard import ood_table
    card = {"ood": {"measured": {"outliers_flagged_pct": {"noise": 100.0, "real_medical": 90.0}},
                    "held_out_estimate": {"per_category": {"noise": 97.0, "real_medical": 90.0}},
                    "trained_on": {"negative_categories": ["noise"]}}}
    t = ood_table(card).set_index("category")
    assert t.loc["noise", "% flagged, held out"] == 97.0 and bool(t.loc["noise", "trained on"])
    assert t.loc["real non-brain DICOM images", "% flagged, shipped gate"] == 90.0
    assert not bool(t.loc["real non-brain DICOM images", "trained on"])
    assert ood_table({}).empty
    # older cards (weights/resnet18) name the list negatives_seen_categories: still read
    older = {"ood": {**card["ood"], "trained_on": {"negatives_seen_categories": ["noise"]}}}
    assert bool(ood_table(older).set_index("category").loc["noise", "trained on"])


def test_feature_tap_keeps_the_plain_pass_through_a_paused_tta_pass():
    from core.inference import MIRROR_ALWAYS, apply_tta
    from core.models import create_model
    from core.ood import FeatureTap
    model = create_model("simple_cnn", 4).eval()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    tap = FeatureTap()
    tap.attach(model)
    x = torch.rand(1, 1, 64, 64)
    x[..., :32] += 1.0  # not mirror-symmetric, so the mirrored pass has other features
    with torch.no_grad():
        plain = model(x)
        with tap.paused():
            apply_tta(model, x, plain, MIRROR_ALWAYS)
        assert len(calls) == 2  # the plain pass and the mirror pass
        kept = tap.get(model, x)
    assert len(calls) == 2  # the gate reused the plain pass instead of running a third
    assert np.allclose(kept["logits"], plain.numpy())
    with torch.no_grad():
        apply_tta(model, x, plain, MIRROR_ALWAYS)  # not paused: the mirror pass replaces it
        tap.get(model, x)
    assert len(calls) == 4
    with tap.paused():  # nested pauses end with the outer one; a pass the gate needs is kept
        with tap.paused():
            pass
        assert tap.local.paused
        y = torch.rand(1, 1, 64, 64)
        assert np.allclose(tap.get(model, y)["logits"], model(y).detach().numpy(), atol=1e-5)
    assert not tap.local.paused


def test_the_threshold_leaves_room_on_both_sides_of_the_boundary_scores():
    """A validation score on the threshold would flip with rounding noise between fit and serve."""
    from core.ood import per_source_threshold
    a = np.arange(100, dtype=np.float64)          # the 98 % quantile ('higher') is 98: only 99 flagged
    b = np.array([0.5, 10.0, 96.4])
    t = per_source_threshold({"a": a, "b": b}, 0.02)
    assert t == pytest.approx(98.5)               # halfway to the next score, not on 98
    for s in (a, b):
        assert (s > t).mean() <= 0.02 and not np.any(np.abs(s - t) < 0.5)
    assert per_source_threshold({"a": np.array([1.0, 2.0])}, 0.0) == pytest.approx(3.0)


def test_prepared_gate_inputs_are_redone_when_the_reading_code_changes(tmp_path, monkeypatch):
    import core.data
    import core.ood as O
    monkeypatch.setattr(core.data, "HASH_CACHE", tmp_path / "phash.json")
    f = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(f)
    spec = {"size": 32, "crop": "none", "mean": 0.2, "std": 0.25}
    O._prepare_files([str(f)], spec, "t", 1)
    assert len(list(tmp_path.glob("ood-*.npz"))) == 1
    O._prepare_files([str(f)], spec, "t", 1)                 # same code: the cache serves it
    assert len(list(tmp_path.glob("ood-*.npz"))) == 1
    monkeypatch.setattr(O, "_code_key", lambda: "a reader fix")
    O._prepare_files([str(f)], spec, "t", 1)
    assert len(list(tmp_path.glob("ood-*.npz"))) == 2


def test_rethreshold_moves_a_threshold_off_a_validation_score(synthetic_gate, tmp_path, monkeypatch, private_cache):
    """A gate fitted by the old rule sat exactly on one validation scan's score (flagged once served
    alone, by rounding); rethreshold-ood puts it halfway to the next score and measures again."""
    from conftest import make_weights
    from core import ood
    w = make_weights(tmp_path / "w")
    rels = sorted(str(p.relative_to(w / "data" / "synth")) for p in (w / "data" / "synth").rglob("*.png"))
    split = {"train": rels[0::3], "val": rels[1::3] + rels[2::3][:2], "test": rels[2::3][2:]}
    (w / "split.json").write_text(json.dumps({"files": {"synth": split}}))
    seen = O.SEEN   # two cheap categories stand in for the 22
    monkeypatch.setattr(O, "SEEN", {"noise": seen["noise"]})
    monkeypatch.setattr(O, "UNSEEN", {"text": seen["text"]})
    monkeypatch.setattr(O, "TEST_ONLY", {})
    synthetic_gate.save(tmp_path / "copy")
    gate = OODGate.load(tmp_path / "copy")   # a copy: the module's fixture stays as fitted
    val = from_scans([read_scan(w / "data" / "synth" / r) for r in split["val"]])
    comb = gate.combine(gate.raw_scores(val), val.colour) + gate.threshold
    gate.threshold = float(np.quantile(comb, 0.8, method="higher"))   # the old rule: on a score
    gate.info = {"trained_on": {"seed": 0, "counts": {"test_outliers_per_category": 3},
                                "negative_categories": ["noise"]}}
    gate.save(w)
    rep = ood.rethreshold_gate(w, tmp_path / "none.toml", fpr=0.2, log=lambda *a: None)
    above = np.sort(comb[comb > rep["from"]])
    assert rep["from"] == gate.threshold and rep["to"] == pytest.approx((rep["from"] + above[0]) / 2)
    saved = OODGate.load(w)
    assert saved.threshold == rep["to"] and saved.info["rethresholded"]["from"] == rep["from"]
    assert set(saved.info["measured"]["outliers_flagged_pct"]) == {"noise", "text"}
    card = json.loads((w / "card.json").read_text())
    assert card["ood"]["threshold"] == rep["to"]
    assert rep["after"]["val_mri_flagged_pct"]["synth"] <= rep["before"]["val_mri_flagged_pct"]["synth"]


def test_rethreshold_updates_a_gate_that_held_its_categories_out_itself(synthetic_gate, tmp_path, monkeypatch,
                                                                        private_cache):
    """A gate shipped as measured (final="seen", no fold gates): its held-out estimate is its own
    rates on the categories it never trained on, so all of them move with the threshold."""
    from conftest import make_weights
    from core import ood
    w = make_weights(tmp_path / "w")
    rels = sorted(str(p.relative_to(w / "data" / "synth")) for p in (w / "data" / "synth").rglob("*.png"))
    (w / "split.json").write_text(json.dumps({"files": {"synth": {
        "train": rels[0::3], "val": rels[1::3] + rels[2::3][:2], "test": rels[2::3][2:]}}}))
    seen = O.SEEN
    monkeypatch.setattr(O, "SEEN", {"noise": seen["noise"]})
    monkeypatch.setattr(O, "UNSEEN", {"text": seen["text"]})
    monkeypatch.setattr(O, "TEST_ONLY", {})
    synthetic_gate.save(tmp_path / "copy")
    gate = OODGate.load(tmp_path / "copy")
    gate.info = {"trained_on": {"seed": 0, "counts": {"test_outliers_per_category": 20},
                                "negative_categories": ["noise"], "held_out_categories": ["text"]},
                 "held_out_estimate": {"per_category": {"text": 12.34}, "mean_pct": 12.34, "min_pct": 12.34}}
    gate.save(w)
    ood.rethreshold_gate(w, tmp_path / "none.toml", fpr=0.2, log=lambda *a: None)
    info = OODGate.load(w).info
    text = info["measured"]["outliers_flagged_pct"]["text"]
    assert info["held_out_estimate"]["per_category"]["text"] == text != 12.34
    assert info["held_out_estimate"]["mean_pct"] == info["held_out_estimate"]["min_pct"] == text


def test_a_rethresholded_gates_fit_report_says_it_is_superseded(tmp_path):
    """ood_eval.json kept the gate as fitted (BRISC test 0.66 %, real views 88.5 %) while the card
    held the rethresholded gate's 0.0 % and 88.0 %."""
    import json
    from core.ood import mark_superseded
    (tmp_path / "card.json").write_text(json.dumps({"ood": {"threshold": 1.3, "measured": {"x": 1},
                                                            "rethresholded": {"from": 1.2, "to": 1.3}}}))
    (tmp_path / "ood_eval.json").write_text(json.dumps({"shipped": "cnn [all]"}))
    mark_superseded(tmp_path)
    report = json.loads((tmp_path / "ood_eval.json").read_text())
    assert report["shipped"] == "cnn [all]" and report["superseded"]["threshold"] == 1.3
    assert report["superseded"]["rethresholded"] == {"from": 1.2, "to": 1.3}


def test_a_resaved_gate_keeps_the_card_fields_it_does_not_write(tmp_path):
    """rethreshold-ood re-saved resnet18's version-1 gate section and dropped fitted_by, compared
    and note, and its measurements (another format) without a trace."""
    import json
    from core.ood import _keep_card_fields
    before = {"threshold": 1.0, "fitted_by": "python -m core fit-ood ...", "note": "n",
              "measured": {"max_test_mri_flagged_pct": 1.0}}
    (tmp_path / "card.json").write_text(json.dumps({"ood": {"threshold": 1.1, "measured": {"val_mri_flagged_pct": {}}}}))
    _keep_card_fields(tmp_path, before)
    ood = json.loads((tmp_path / "card.json").read_text())["ood"]
    assert ood["threshold"] == 1.1 and ood["fitted_by"] == before["fitted_by"] and ood["note"] == "n"
    assert ood["measured"] == {"val_mri_flagged_pct": {}} and ood["measured_at_fit"] == before["measured"]


def _fake_inv3(path, volume: np.ndarray) -> None:
    """An InVesalius project as Debian ships one: a gzipped tar of main.plist and the raw matrix."""
    import plistlib
    import tarfile
    plist = plistlib.dumps({"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": list(volume.shape)},
                            "modality": "CT"})
    with tarfile.open(path, "w:gz") as t:
        for name, data in (("tmpx/main.plist", plist), ("tmpx/matrix.dat", volume.astype("<i2").tobytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_real_head_ct_is_read_from_its_project_file_and_its_halves_stay_apart(tmp_path, monkeypatch):
    # Bright squares on air: small ones below the split, large ones above it, and a top slice of
    # air only. The trained category must draw only small squares, the test-only one only large.
    vol = np.full((8, 64, 64), -5000, np.int16)
    vol[:4, 28:36, 28:36] = 10000
    vol[4:7, 12:52, 12:52] = 10000
    _fake_inv3(tmp_path / "Cranium.inv3", vol)
    monkeypatch.setattr(O, "HEAD_CT_FILE", tmp_path / "Cranium.inv3")
    monkeypatch.setattr(O, "HEAD_CT_SPLIT", 4)
    monkeypatch.setattr(O, "HEAD_CT_TEST_FROM", 4)
    O.head_ct_volume.cache_clear()
    O._tissue.cache_clear()
    try:
        assert np.array_equal(O.head_ct_volume(), vol)
        assert O.ct_slices(0, 4) == (0, 1, 2, 3) and O.ct_slices(4, 10**6) == (4, 5, 6)   # no air slice
        white = [float((np.asarray(f(np.random.default_rng(s)).convert("L")) > 127).mean())
                 for f in (O.real_head_ct, O.real_head_ct_top) for s in range(12)]
        assert max(white[:12]) < 0.08 < min(white[12:]), white
        monkeypatch.setattr(O, "HEAD_CT_FILE", tmp_path / "missing.inv3")
        O.head_ct_volume.cache_clear()
        with pytest.raises(FileNotFoundError, match="invesalius-examples"):
            O.head_ct_volume()
    finally:
        O.head_ct_volume.cache_clear()
        O._tissue.cache_clear()


def test_a_file_replaced_under_its_name_is_prepared_again(tmp_path, private_cache):
    from core.ood import load_files
    p = tmp_path / "scan.png"
    yy, xx = np.mgrid[0:128, 0:128]
    head = ((((xx - 64) / 40) ** 2 + ((yy - 64) / 50) ** 2) < 1) * 180
    Image.fromarray(head.astype(np.uint8)).save(p)
    a = load_files([str(p)], None, workers=1).small
    Image.fromarray((255 - head).astype(np.uint8)).save(p)
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))  # a coarse clock may not tick
    b = load_files([str(p)], None, workers=1).small
    assert not torch.equal(a, b)


def test_a_damaged_or_foreign_gate_is_refused_in_one_sentence(synthetic_gate, tmp_path):
    synthetic_gate.save(tmp_path)
    (tmp_path / "ood.safetensors").write_bytes((tmp_path / "ood.safetensors").read_bytes()[:300])
    with pytest.raises(ValueError, match="could not be loaded .* damaged"):
        OODGate.load(tmp_path)
    card = {"ood": synthetic_gate.config()}
    assert synthetic_gate.mismatch(card, "abc", None) is None
    assert "not the one its card lists" in synthetic_gate.mismatch({"ood": {**card["ood"], "threshold": 9.0}}, "abc", None)
    assert "not the one its card lists" in synthetic_gate.mismatch({}, "abc", None)
    fitted = OODGate(synthetic_gate.method, synthetic_gate.components, synthetic_gate.threshold,
                     synthetic_gate.colour_limit, synthetic_gate.net, None, {"weights_sha256": "abc"})
    assert fitted.mismatch(card, "abc", None) is None
    assert "fitted for other weights" in fitted.mismatch(card, "def", None)


def test_rethreshold_takes_a_same_patient_test_category_from_the_fold_without_its_sibling(tmp_path, monkeypatch):
    from core.ood import _sibling_rates
    monkeypatch.setitem(O.TRAINED_SIBLING, "ct_top", "ct_low")
    report = {"chosen": "g", "methods": {"g [fold 1]": {"outliers_flagged_pct": {"ct_top": 11.0}},
                                         "g [fold 2]": {"outliers_flagged_pct": {"ct_top": 42.0}},
                                         "g [all]": {"outliers_flagged_pct": {"ct_top": 99.0}}}}
    (tmp_path / "ood_eval.json").write_text(json.dumps(report))
    held = {"folds": [["blank"], ["ct_low", "noise"]], "per_category": {"ct_top": 99.0, "blank": 80.0}}
    _sibling_rates(held, tmp_path / "ood_eval.json")
    assert held["per_category"] == {"ct_top": 42.0, "blank": 80.0}


# ----------------------------------------------------------------------------- the sources' own head CTs
KNOWN_CT = "brisc2025_train_02545_no_ax_t1.jpg"   # the first line of core/not_mri.txt


def test_head_cts_a_source_files_as_mri_leave_the_gates_mri_and_split_by_split():
    from core.data import not_mri
    from core.ood import mri_only
    assert not_mri(f"/any/root/no_tumor/{KNOWN_CT}") == "CT" and not_mri("no_tumor/other.jpg") is None
    files = {"brisc": {sp: ([f"/r/no_tumor/{sp}.jpg", f"/r/no_tumor/{KNOWN_CT}"], ["brisc/notumor"] * 2)
                       for sp in ("train", "val", "test")},
             "lgg": {"train": (["/l/glioma/a.jpg"], ["lgg/glioma"])}}
    kept, odd = mri_only(files)
    assert kept["brisc"] == {sp: ([f"/r/no_tumor/{sp}.jpg"], ["brisc/notumor"]) for sp in ("train", "val", "test")}
    assert kept["lgg"] == files["lgg"]
    # validation CTs train the gate too (its threshold is set on validation MRI only); test CTs only test
    assert odd == {"train": [f"/r/no_tumor/{KNOWN_CT}"] * 2, "test": [f"/r/no_tumor/{KNOWN_CT}"]}


def test_not_mri_list_names_each_file_once_and_they_exist_in_the_shared_sources():
    from core.data import NOT_MRI_FILE, _not_mri
    names = [ln.split()[0] for ln in NOT_MRI_FILE.read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(names) == len(set(names)) == len(_not_mri()) == 108
    assert set(_not_mri().values()) == {"CT"}
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    bench = data / "brain-tumor-mri" / "Training"
    folders = (data / "brisc" / "no_tumor", bench / "notumor", bench / "meningioma", data / "br35h" / "yes")
    if not all(f.is_dir() for f in folders):
        pytest.skip("../shared/data not present")
    found = [n for n in names if sum((f / n).is_file() for f in folders) == 1]
    assert found == names   # each names one scan of BRISC, the benchmark or Br35H


def test_scan_ct_categories_draw_their_own_files_and_go_away_without_them(tmp_path):
    # dark files train, bright files test: each category must draw only its own
    def save(name, value):
        Image.fromarray(np.full((48, 40), value, np.uint8)).save(tmp_path / name)
        return str(tmp_path / name)
    train, test = [save("a.png", 20), save("b.png", 30)], [save("c.png", 230)]
    try:
        O.use_scan_ct(train, test)
        assert "scan_ct" in O.SEEN and "scan_ct_test" in O.TEST_ONLY and "scan_ct" not in O.TEST_ONLY
        assert O.TRAINED_SIBLING["scan_ct_test"] == "scan_ct" and O.KIND["scan_ct"] == "head_not_mri"
        dark = [np.asarray(im.convert("L")).mean() for im in O.make_images("scan_ct", 6, 0)]
        bright = [np.asarray(im.convert("L")).mean() for im in O.make_images("scan_ct_test", 6, 0)]
        assert max(dark) < 60 and min(bright) > 180, (dark, bright)
        O.use_scan_ct(train, [])
        assert "scan_ct" in O.CATEGORIES and "scan_ct_test" not in O.CATEGORIES
    finally:
        O.use_scan_ct([], [])
    assert "scan_ct" not in O.SEEN and "scan_ct" not in O.CATEGORIES and not O.SCAN_CT_FILES
    # nothing left behind: a fit-ood on data without CTs (tests/test_fit_ood_e2e.py) left their
    # kinds in KIND, and a later test found KIND naming categories that did not exist
    assert set(O.KIND) == set(O.CATEGORIES) and "scan_ct_test" not in O.TRAINED_SIBLING


def test_evaluation_counts_flagged_head_cts_apart_from_flagged_mri():
    from core.evaluation import evaluate_records
    classes = ["glioma", "meningioma", "pituitary", "notumor"]
    def rec(f, ok):
        return {"file": f, "label": "notumor", "pred": "notumor", "in_distribution": ok, "uncertain": False,
                "probs": {"glioma": 0.05, "meningioma": 0.05, "pituitary": 0.05, "notumor": 0.85}}
    records = [rec(f"no_tumor/{KNOWN_CT}", False), rec("no_tumor/mri1.jpg", False), rec("no_tumor/mri2.jpg", True)]
    m = evaluate_records(records, classes, 0.5)
    assert (m["flagged_ood"], m["not_mri"], m["not_mri_flagged"]) == (2, 1, 1)
    assert "not_mri" not in evaluate_records(records[1:], classes, 0.5)


def test_strip_to_brain_removes_the_rim_keeps_the_centre_and_is_seeded():
    from core.ood import strip_to_brain
    rng = np.random.default_rng(3)
    a = O.head_like(rng, 128)
    yy, xx = np.mgrid[0:128, 0:128] / 128
    outs = []
    for seed in range(5):
        s = strip_to_brain(a, np.random.default_rng(seed))
        outs.append(s)
        r = ((xx - 0.5) / 0.3) ** 2 + ((yy - 0.5) / 0.36) ** 2   # inside the smallest head head_like draws
        assert s.dtype == np.float32 and s.shape == a.shape
        assert not s[a < 0.01].any()                              # nothing appears outside the head
        outer = a > 0.8                                           # the skull ring (and no brain pixel: those stay < 0.8)
        assert (s[outer] == 0).mean() > 0.5                       # most of the skull is gone
        assert np.array_equal(s[r < 0.3], a[r < 0.3])             # the middle of the brain is kept as it was
    assert len({o.astype(bool).sum() for o in outs}) > 1   # the depth is drawn: seeds strip differently
    blank = np.zeros((64, 64), np.float32)
    assert strip_to_brain(blank, np.random.default_rng(0)) is blank
    edge = np.zeros((64, 64), np.float32)
    edge[0, :] = 1.0                                       # bright only along the border: no head once closed
    assert strip_to_brain(edge, np.random.default_rng(0)) is edge


def test_the_gate_learns_skull_stripped_copies_as_brain_mri(tmp_path, monkeypatch):
    """fit-ood's positives gain N stripped training slices, as one group, for the network and the
    feature densities alike; validation (the threshold) and test stay the sources' own scans."""
    import core.data
    import core.ood as OO
    monkeypatch.setattr(core.data, "HASH_CACHE", tmp_path / "cache" / "phash.json")
    rng = np.random.default_rng(0)
    rel = {"train": [], "val": [], "test": []}
    for i in range(12):
        sp = "train" if i < 8 else "val" if i < 10 else "test"
        f = tmp_path / "data" / "notumor" / f"h{i}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((O.head_like(rng, 96) * 255).astype(np.uint8)).save(f)
        rel[sp].append(f"notumor/{f.name}")
    (tmp_path / "split.json").write_text(json.dumps({"files": {"src": rel}}))
    card = {"sources": [{"name": "src", "path": str(tmp_path / "data")}]}
    spec = {"size": 48, "crop": "head", "mean": 0.2, "std": 0.25}
    args = (card, None, tmp_path / "split.json", spec, 100, 0, lambda *a: None)
    plain, stripped = OO._load_mri(*args), OO._load_mri(*args, n_stripped=5)
    assert plain["pos"].groups == ["src/notumor"] * 8 and len(plain["feat_train"]) == 8
    assert stripped["pos"].groups == ["src/notumor"] * 8 + [OO.STRIPPED_GROUP] * 5
    assert stripped["feat_train"].groups.count(OO.STRIPPED_GROUP) == 5
    assert stripped["feat_train"].main.shape[1:] == (1, 48, 48)
    assert torch.equal(stripped["pos"].small[:8], plain["pos"].small)
    assert not any(torch.equal(c, o) for c in stripped["pos"].small[8:] for o in plain["pos"].small)  # stripped pixels
    assert {s: len(x) for s, x in stripped["val"].items()} == {"src": 2}
    assert len(stripped["feat_train"].main) == len(stripped["feat_train"].small)


def test_a_score_above_zero_flags_and_zero_or_below_passes(synthetic_gate, monkeypatch):
    """The gate's rule is 'flagged when ood_score > 0': a verdict at 0.5 let 8 of the default's 29
    flagged test scans through unnoticed by any test."""
    g = synthetic_gate
    head = _heads(1, 7)[0]
    for score, passes in ((0.3, False), (1e-6, False), (0.0, True), (-0.2, True)):
        monkeypatch.setattr(g, "combine", lambda raw, colour, s=score: np.array([s]))
        ok, got = g.check(head, None, None)
        assert (ok, got) == (passes, pytest.approx(score)), score


def test_a_card_describing_other_gate_inputs_is_refused(synthetic_gate):
    """The gate network is fed GATE_SPEC whatever the card says: a card describing other inputs
    (another size or normalisation) belongs to a gate this code would feed wrongly."""
    card = {"ood": synthetic_gate.config()}
    assert card["ood"]["input"]["size"] == GATE_SPEC["size"]
    assert synthetic_gate.mismatch(card, "abc", None) is None
    for key, value in (("size", 96), ("mean", 0.5)):
        other = {"ood": {**card["ood"], "input": {**card["ood"]["input"], key: value}}}
        assert f"'{key}': {value}" in synthetic_gate.mismatch(other, "abc", None)


# What the shipped gate must refuse: images that are no brain MRI at all, of kinds `fit-ood` drew
# with other seeds (the MRI-derived kinds are reported apart; real head CTs need the shared data).
NOT_BRAIN_MRI = ("blank", "noise", "gradient", "shapes", "text", "pattern", "photo_unseen", "chart", "screenshot",
                 "scanned_document", "medical_photo", "chest_xray", "abdominal_ct", "ultrasound", "shepp_logan",
                 "elevation_map", "real_medical")


def test_the_shipped_gate_refuses_what_is_no_brain_mri():
    """Every other gate test trains its own gate on synthetic images, and the shipped model's tests
    only check that brain scans pass: a shipped gate that accepted everything passed the suite.
    Its card reports 99-100 % of each kind flagged (93.5 % of the real DICOM views); 102 of these
    102, drawn with a seed no fit used, were flagged on 2026-12-07."""
    from core.inference import Predictor, shipped_default
    pred = Predictor(shipped_default())
    assert pred.gate is not None, "the shipped default has no out-of-distribution gate"
    scans = [(f"{kind} #{i}", scan) for kind in NOT_BRAIN_MRI
             for i, scan in enumerate(O.make_scans(kind, 6, seed=20261207))]
    missed = [name for name, scan in scans if pred.predict_scan(scan).in_distribution]
    assert len(scans) == 102 and len(missed) <= 2, f"the shipped gate accepted {len(missed)} of {len(scans)}: {missed}"
