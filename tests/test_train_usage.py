"""train.py refuses bad usage with one sentence and exit code 2, before it writes anything, and a
failed resume leaves the run it was pointed at as it was."""
import json
import os
import shlex
import sys
from pathlib import Path

import pytest

import train
from core import training as TR
from conftest import make_blob_dataset

pytestmark = pytest.mark.usefixtures("private_cache")  # conftest: a per-test hash cache

TINY = ["--arch", "simple_cnn", "--img", "32", "--batch-size", "8", "--workers", "1", "--no-progress"]


@pytest.fixture
def data(tmp_path) -> Path:
    make_blob_dataset(tmp_path / "data")
    return tmp_path / "data"


def refused(argv, capsys) -> str:
    """stderr of a run that must stop with a usage error."""
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return err


def test_bad_usage_is_one_sentence(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert "not a directory" in refused(["--data", tmp_path / "nope", "--out", out], capsys)
    assert "must be a number" in refused(["--data", f"{data}=abc", "--out", out], capsys)
    assert "--batch-size >= 2" in refused(["--data", data, "--out", out, "--batch-size", 0], capsys)
    assert "no checkpoint.pt" in refused(["--data", data, "--out", out, "--resume"], capsys)
    (tmp_path / "afile").write_text("x")
    assert "is a file" in refused(["--data", data, "--out", tmp_path / "afile"], capsys)
    other = tmp_path / "b" / "data"
    other.mkdir(parents=True)
    assert "share the name 'data'" in refused(["--data", data, "--data", other, "--out", out], capsys)
    assert "weight 0" in refused(["--data", f"{data}=0", "--out", out], capsys)
    assert not out.exists()  # nothing was written for a refused run


def test_config_keys_are_checked_and_the_command_line_data_wins(data, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = "{data}"\nepoch = 2\n')
    assert "unknown key(s) epoch" in refused(["--config", cfg], capsys)
    assert "missing.toml: no such file" in refused(["--config", tmp_path / "missing.toml"], capsys)
    assert "Errno" not in refused(["--config", tmp_path], capsys)   # a folder: said once, without the errno
    cfg.write_text(f'data = "{data}"\nepochs = "x"\n')   # argparse's own error named no config
    assert "c.toml: epochs = 'x' is not a valid value of --epochs" in refused(["--config", cfg], capsys)
    cfg.write_text(f'data = "{data}"\nepochs = 2\nreduced = "CPU budget"\n')  # a note for compare is fine
    assert train.parse_args(["--config", str(cfg)]).data == [str(data)]
    other = tmp_path / "other"
    make_blob_dataset(other)
    assert train.parse_args(["--config", str(cfg), "--data", str(other)]).data == [str(other)]


def test_unreadable_images_are_skipped_not_fatal(data, tmp_path, capsys):
    (data / "glioma" / "corrupt.jpg").write_text("not an image")
    (data / "notumor" / "empty.png").write_bytes(b"")
    assert train.main(["--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY]) == 0
    out = capsys.readouterr().out
    assert "; 2 skipped" in out and "skipped data/glioma/corrupt.jpg" in out
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    assert sum(card["split"]["sizes"].values()) == 40


def test_one_class_is_refused(tmp_path, capsys):
    make_blob_dataset(tmp_path / "all")
    one = tmp_path / "one"
    one.mkdir()
    (tmp_path / "all" / "glioma").rename(one / "glioma")
    assert train.main(["--data", str(one), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY]) == 2
    assert "one class only" in capsys.readouterr().err


def test_a_failed_resume_leaves_the_run_as_it_was(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data", str(data), "--out", str(out), "--epochs", "1", *TINY]) == 0
    split = (out / "split.json").read_bytes()
    argv = ["--data", str(data), "--out", str(out), "--epochs", "2", "--resume", *TINY]
    argv[argv.index("simple_cnn")] = "cnn_bn"   # another architecture than the checkpoint's
    with pytest.raises(SystemExit) as e:  # refused before any data work
        train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "these differ: --arch 'simple_cnn' -> 'cnn_bn'" in err and "Traceback" not in err
    assert (out / "split.json").read_bytes() == split


def test_card_split_sizes_count_what_was_trained(data, tmp_path):
    held = tmp_path / "held"
    make_blob_dataset(held, per_class=4)
    (held / "glioma" / "broken.png").write_bytes(b"x")
    out = tmp_path / "run"
    assert train.main(["--data", str(data), "--data", f"{held}=0", "--out", str(out), "--epochs", "1", *TINY]) == 0
    card = json.loads((out / "card.json").read_text())
    per_source = {s["name"]: s["images"] for s in card["sources"]}
    assert card["split"]["sizes"]["train"] == per_source["data"]["train"]   # the held-out source is not in it
    assert card["split"]["sizes"]["test"] == per_source["data"]["test"] + per_source["held"]["test"]
    assert [x.split(": ")[0] for x in card["data_notes"]["skipped"]] == ["held/glioma/broken.png"]


def test_a_config_label_map_renames_its_source_folders(tmp_path):
    data = tmp_path / "study"
    make_blob_dataset(data)
    for old, new in (("glioma", "lesion"), ("notumor", "controls")):
        (data / old).rename(data / new)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = [{{ path = "{data}", label_map = {{ lesion = "glioma", controls = "notumor" }} }}]\n')
    out = tmp_path / "run"
    assert train.main(["--config", str(cfg), "--out", str(out), "--epochs", "1", *TINY]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["classes"] == ["glioma", "meningioma", "pituitary", "notumor"]
    assert card["sources"][0]["label_map"]["lesion"] == "glioma"


def test_a_typed_tumour_beside_coarse_ones_trains_tumour_vs_none(tmp_path):
    """LGG-like glioma + Br35H-like yes: every coarse tumour would otherwise be taught as glioma."""
    data = tmp_path / "mix"
    make_blob_dataset(data)
    for c in ("meningioma", "pituitary"):
        (data / c).rename(data / ("yes" if c == "meningioma" else "extra"))
    for f in (data / "extra").iterdir():
        f.rename(data / "yes" / f"x_{f.name}")
    (data / "extra").rmdir()
    out = tmp_path / "run"
    assert train.main(["--data", str(data), "--out", str(out), "--epochs", "1", *TINY]) == 0
    assert json.loads((out / "card.json").read_text())["classes"] == ["tumor", "notumor"]
    ev = json.loads((out / "eval.json").read_text())
    assert {r["label"] for r in ev["predictions"]} <= {"tumor", "notumor"}


def test_a_run_resumed_from_the_epoch_that_stopped_it_stays_stopped(data, tmp_path):
    """The checkpoint of the stopping epoch already counts `patience` bad epochs: a resume
    (after a crash there, or to redo the finish) must not train on."""
    import torch
    from core.engine import load_checkpoint, save_checkpoint
    out = tmp_path / "run"
    assert train.main(["--data", str(data), "--out", str(out), "--epochs", "2", *TINY]) == 0
    ck = load_checkpoint(out / "checkpoint.pt")
    ck.update(epoch=0, bad=3, history=ck["history"][:1])   # as if epoch 1 had been the third bad one
    save_checkpoint(out / "checkpoint.pt", **ck)
    (out / "history.json").write_text(json.dumps(ck["history"]))   # written with it, each epoch
    card = json.loads((out / "card.json").read_text())
    card["training"]["epochs_run"] = 1   # and the finish after that epoch wrote the card
    (out / "card.json").write_text(json.dumps(card))
    assert train.main(["--data", str(data), "--out", str(out), "--epochs", "2", "--patience", "3",
                       "--resume", *TINY]) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and "time_s" in history[0]["val"]
    assert json.loads((out / "card.json").read_text())["training"]["epochs_run"] == 1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0


@pytest.mark.parametrize("extra, message", [
    (["--device", "mps"], "no Apple MPS device"), (["--device", "tpu"], "use auto, cpu, cuda"),
    (["--arch", "foo"], "unknown model"), (["--img", "0"], "--img must be between 8 and"),
    (["--img", "100000"], "--img must be between 8 and 2048"),
    (["--limit", "-1"], ">= 0"), (["--threads", "-1"], ">= 0"), (["--seed", "-1"], "--seed must be"),
    (["--lr", "nan"], "finite number"), (["--patience", "0"], "--patience must be >= 1"),
])
def test_nonsense_options_are_refused_before_any_work(data, tmp_path, capsys, extra, message):
    # each was a traceback, most of them after every image had been decoded
    assert message in refused(["--data", data, "--out", tmp_path / "run", *extra], capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("line, message", [("epochs = 1.5", "whole number"), ('resume = "no"', "true or false"),
                                           ('crop = "bogus"', "one of head, none"), ("keep = 3", "one of best, last")])
def test_config_values_get_the_checks_argparse_gives_the_command_line(data, tmp_path, capsys, line, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(line + "\n")
    assert message in refused(["--config", cfg, "--data", data, "--out", tmp_path / "run"], capsys)


def test_a_source_weight_must_be_finite_and_not_negative(data, tmp_path, capsys):
    other = tmp_path / "other"
    make_blob_dataset(other, per_class=3)  # was "every source has weight 0", which is not so
    assert "finite number >= 0" in refused(["--data", data, "--data", f"{other}=-1", "--out", tmp_path / "r"], capsys)
    assert "finite number >= 0" in refused(["--data", f"{data}=inf", "--out", tmp_path / "r"], capsys)


def test_resume_refuses_other_settings_and_a_damaged_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data", str(data), "--out", str(out), "--epochs", "1", *TINY]) == 0
    argv = ["--data", data, "--out", out, "--epochs", "2", "--resume", *TINY]
    argv[argv.index("8")] = "16"  # --batch-size: was a scheduler ValueError after all the data work
    assert "--batch-size 8 -> 16" in refused(argv, capsys)
    ok = ["--data", data, "--out", out, "--epochs", "2", "--resume", *TINY]
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:1000])
    err = refused(ok, capsys)  # was a RuntimeError traceback from torch.load
    assert "the checkpoint in" in err and "is damaged" in err


def test_a_fresh_run_clears_another_runs_checkpoint_and_best_weights(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data", str(data), "--out", str(out), "--epochs", "1", *TINY]) == 0
    (out / "best.pt").write_bytes(b"another run's best weights")
    (out / "card.4242.tmp.json").write_text("{")   # what a write killed half-way leaves (save_whole)
    (out / "notes.txt").write_text("the user's own file")  # not a run's: stays where it is
    one_class = tmp_path / "one"
    make_blob_dataset(one_class, per_class=6)
    for d in one_class.iterdir():
        if d.name != "glioma":
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
    # a fresh run refused on its data (one class) leaves the old run as it was, whole: nothing
    # of the new run was written (session 34: it had moved the model aside, then failed)
    assert train.main(["--data", str(one_class), "--out", str(out), "--epochs", "1", *TINY]) == 2
    assert (out / "best.pt").read_bytes() == b"another run's best weights" and not list(out.glob("previous-*"))
    # a fresh run that gets past its data must not leave the old run's state to be resumed, nor
    # lose it (a forgotten --resume): it is moved aside before the new split is written
    assert train.main(["--data", str(data), "--out", str(out), "--epochs", "1", *TINY]) == 0
    (prev,) = out.glob("previous-*")
    assert (prev / "best.pt").read_bytes() == b"another run's best weights"
    assert (prev / "card.4242.tmp.json").is_file() and not list(out.glob("*.tmp*"))
    assert (prev / "checkpoint.pt").stat().st_size > 0
    # nor its weights, card and gate beside this run's split (review, session 20: an interrupted
    # retrain left the old model.safetensors, card.json and ood.safetensors with a new split.json)
    assert {"model.safetensors", "card.json", "eval.json", "history.json"} <= {f.name for f in prev.iterdir()}
    assert (out / "notes.txt").read_text() == "the user's own file"
    # a later run never empties the folder that holds the earlier model (it did: previous/ was
    # cleared for the next run's leftovers); leftovers go to a folder of their own
    (out / "split.json").write_text("{}")   # what an interrupted retry leaves
    assert train.main(["--data", str(data), "--out", str(out), "--epochs", "1", *TINY]) == 0
    assert (prev / "model.safetensors").is_file() and len(list(out.glob("previous-*"))) == 2


def test_weights_another_run_swapped_in_are_refused(data, tmp_path, capsys):
    from core.inference import Predictor
    a, b = tmp_path / "a", tmp_path / "b"
    for out, seed in ((a, "0"), (b, "1")):
        assert train.main(["--data", str(data), "--out", str(out), "--epochs", "1", "--seed", seed, *TINY]) == 0
    card = json.loads((a / "card.json").read_text())
    assert card["weights_sha256"] and card["command_dir"]
    Predictor(a)
    (a / "ood.safetensors").write_bytes((b / "model.safetensors").read_bytes())  # a gate the card does not list
    with pytest.raises(ValueError, match="its card does not describe"):   # was served without it, unsaid
        Predictor(a)
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="not the ones its card describes"):
        Predictor(a)
    capsys.readouterr()
    assert train.main([str(x) for x in ["--data", data, "--init", a, "--out", tmp_path / "c", "--epochs", "1", *TINY]]) == 2
    assert "not the ones its card describes" in capsys.readouterr().err
    assert "name the same folder" in refused(["--data", data, "--init", b, "--out", b, *TINY], capsys)


@pytest.mark.parametrize("extra, message", [
    (["--target-sensitivity", "5"], "--target-sensitivity must be in (0, 1]"),
    (["--smoothing", "3"], "--smoothing in [0, 1)"),
    (["--min-specificity", "2"], "--min-specificity must be between 0 and 1"),
    (["--lesion-dim-p", "1.5", "--mask-loss", "0.2"], "--lesion-dim-p must be between 0 and 1"),
    (["--strip-crop-p", "-0.1"], "--strip-crop-p must be between 0 and 1"),
    (["--marks-p", "1.2"], "--marks-p must be between 0 and 1"),
    (["--lesion-dim-p", "0.3"], "--lesion-dim-p needs --mask-loss"),
    (["--arch", "vgg16", "--img", "16"], "vgg16 needs --img (and --small-img) of at least 32"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs CUDA"),
])
def test_out_of_range_options_are_refused_before_any_work(data, tmp_path, capsys, extra, message):
    assert message in refused(["--data", data, "--out", tmp_path / "r", *TINY, *extra], capsys)


def test_resume_accepts_the_same_run_named_another_way(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    assert train.main(["--data", "data", "--out", "run", "--epochs", "1", *TINY]) == 0
    child = ["--data", "data", "--init", "run", "--out", "child", "--epochs", "1", *TINY]
    monkeypatch.setattr(sys, "argv", ["train.py", *child])
    assert train.main(child) == 0
    monkeypatch.chdir(out)  # another folder, absolute paths, --init left out, --average-init added
    again = ["--data", str(data), "--out", str(tmp_path / "child"), "--epochs", "2", "--resume",
             "--average-init", *TINY]
    monkeypatch.setattr(sys, "argv", ["train.py", *again])
    assert train.main(again) == 0, capsys.readouterr().err  # each was refused as "other settings"
    card = json.loads((tmp_path / "child" / "card.json").read_text())
    assert card["training"]["init"] and card["command"] == shlex.join(["python", "train.py", *child])
    assert card["resumed_with"] == shlex.join(["python", "train.py", *again])


def test_resume_cannot_switch_the_mask_loss_on(tmp_path, capsys):
    data = tmp_path / "d"
    make_blob_dataset(data)
    out = tmp_path / "run"
    tiny = [*TINY]
    tiny[tiny.index("simple_cnn")] = "resnet18"
    assert train.main(["--data", str(data), "--out", str(out), "--epochs", "1", *tiny]) == 0
    err = refused(["--data", data, "--out", out, "--epochs", "2", "--resume", "--mask-loss", "0.5", *tiny], capsys)
    assert "--mask-loss 0.0 -> 0.5" in err


def test_coarse_labels_alone_teach_the_types_with_a_warning(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    src, coarse, typed = tmp_path / "src", tmp_path / "yn", tmp_path / "typed"
    make_blob_dataset(src, per_class=10)
    (coarse / "yes").mkdir(parents=True)
    for c in ("glioma", "meningioma", "pituitary"):
        for f in (src / c).iterdir():
            f.rename(coarse / "yes" / f.name)
    (src / "notumor").rename(coarse / "no")
    for ci, c in enumerate(["glioma", "meningioma", "pituitary", "notumor"]):  # other blobs, typed
        (typed / c).mkdir(parents=True)
        for k in range(4):
            rng = np.random.default_rng(7000 + 100 * ci + k)
            Image.fromarray((rng.random((6, 6)) * 200 + 40).astype(np.uint8)).resize(
                (64, 64), Image.BICUBIC).save(typed / c / f"{k}.png")
    # a yes/no source trained, a typed one held out (weight 0): the types exist only through 'yes'
    assert train.main(["--data", str(coarse), "--data", f"{typed}=0", "--out", str(tmp_path / "run"),
                       "--epochs", "1", *TINY]) == 0
    assert "learnt only through coarse labels" in capsys.readouterr().out


def test_a_cuda_index_past_the_machine_s_devices_is_refused(data, tmp_path, capsys, monkeypatch):
    # only availability was checked: cuda:3 on a one-GPU machine failed later with a CUDA traceback
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    err = refused(["--data", data, "--out", tmp_path / "run", "--device", "cuda:3"], capsys)
    assert "1 CUDA device(s)" in err and not (tmp_path / "run").exists()


def test_files_outside_a_recorded_split_are_not_this_run_s_data(data, tmp_path, capsys):
    """With --split-from, files the record does not name were left with split '' and still
    entered the data fingerprint and split.json (under a '' key)."""
    import shutil
    import numpy as np
    from PIL import Image
    first = tmp_path / "first"
    assert train.main(["--data", str(data), "--out", str(first), "--epochs", "1", *TINY]) == 0
    more = tmp_path / "more" / "data"
    shutil.copytree(data, more)
    for k in range(4):   # images the first run never saw
        Image.fromarray((np.random.default_rng(90 + k).random((64, 64)) * 255).astype(np.uint8)).save(
            more / "notumor" / f"new_{k}.png")
    second = tmp_path / "second"
    assert train.main(["--data", str(more), "--out", str(second), "--epochs", "1", "--split-from", str(first),
                       *TINY]) == 0
    assert "4 files are not in the recorded split: left out" in capsys.readouterr().out
    card1, card2 = (json.loads((d / "card.json").read_text()) for d in (first, second))
    assert card2["data_fingerprint"] == card1["data_fingerprint"]
    assert card2["data_notes"]["not_in_recorded_split"].startswith("4 files the recorded split does not name")
    assert "not_in_recorded_split" not in card1["data_notes"]   # no split was reused
    files = json.loads((second / "split.json").read_text())["files"]
    assert all("" not in splits for splits in files.values())


def test_calibration_describes_the_fp16_weights_that_ship(data, tmp_path):
    """The temperature was fitted on the fp32 model in memory, then fp16 weights were saved:
    finishing the same run again from its shipped weights gave another temperature."""
    out = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(out), "--epochs", "2", *TINY]
    assert train.main(argv) == 0
    first = json.loads((out / "card.json").read_text())["calibration"]["temperature"]
    assert train.main([*argv, "--resume"]) == 0   # a finished run: re-finished from what it shipped
    again = json.loads((out / "card.json").read_text())["calibration"]["temperature"]
    assert again == pytest.approx(first, abs=1e-6)


def test_the_card_stores_the_temperature_fitted_on_validation(data, tmp_path, monkeypatch):
    """The test above compares two temperatures of the same code path: a card that stored 1.0
    whatever was fitted passed it. The value fitted on the validation outputs is the card's."""
    import core.engine as E
    real, fitted = E.fit_temperature, []

    def spy(logits, masks):
        fitted.append((t := real(logits, masks), len(logits)))
        return t
    monkeypatch.setattr(E, "fit_temperature", spy)
    out = tmp_path / "run"
    assert train.main(["--data", str(data), "--out", str(out), "--epochs", "2", *TINY]) == 0
    card = json.loads((out / "card.json").read_text())
    t, n = fitted[-1]   # without --tta-below, the one fit is on the whole validation split
    assert n == card["split"]["sizes"]["val"] and t != 1.0
    assert card["calibration"]["temperature"] == pytest.approx(t, rel=1e-9)


def test_the_card_names_the_epoch_saved_as_best(data, tmp_path):
    """best_epoch was recomputed from history (the lowest validation loss after the warm-up), which
    named a low-resolution epoch of progressive resizing whose weights never shipped."""
    import torch
    out = tmp_path / "run"
    assert train.main(["--data", str(data), "--out", str(out), "--epochs", "4", "--small-img", "16",
                       "--small-img-epochs", "2", *TINY]) == 0
    card = json.loads((out / "card.json").read_text())
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert card["training"]["best_epoch"] == ck["best_epoch"] in (3, 4)   # full resolution restarts the choice


def test_a_resume_past_the_end_of_a_shorter_schedule_is_one_sentence(data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(out), *TINY]
    assert train.main([*argv, "--epochs", "3"]) == 0
    capsys.readouterr()
    # said before the images are read (it came after them, as a count of steps: a review)
    err = refused([*argv, "--epochs", "1", "--resume"], capsys)
    assert f"--resume --epochs 1: the run in {out} has trained 3 epochs already; give --epochs 3 or more" in err


def test_a_schedule_that_more_processes_shrink_is_checked_for_the_whole_rest():
    # 4 epochs of 10 steps on 1 process, stopped after epoch 1 (10 steps), resumed on 2 processes
    # (5 steps an epoch, 20 in all): 10 + 3 x 5 = 25 steps did not fit, and the scheduler raised
    # mid-run; only "taken >= steps" was checked
    assert not TR.schedule_fits(10, 3 * 5, 20)
    assert TR.schedule_fits(10, 3 * 10, 40)      # the same run resumed on 1 process
    assert not TR.schedule_fits(30, 0, 20)       # a finished run resumed with fewer --epochs


def test_simple_cnn_keeps_the_hooked_conv_output_on_cpu():
    """grad-cam stores the hooked layer's output as output.cpu().detach(): on a CPU the same
    memory, which an in-place ReLU after the conv overwrote (maps differed between CPU and GPU)."""
    import torch
    from core.models import create_model, saliency_layer
    model = create_model("simple_cnn", 4).eval()
    stored = []
    saliency_layer(model).register_forward_hook(lambda m, i, o: stored.append(o.cpu().detach()))
    with torch.no_grad():
        model(torch.randn(2, 1, 32, 32))
    assert float(stored[0].min()) < 0   # the conv's own output, not relu(conv)


def test_measurements_of_other_weights_are_moved_aside(data, tmp_path):
    from core.inference import file_sha256
    out = tmp_path / "run"
    assert train.main(["--data", str(data), "--out", str(out), "--epochs", "1", *TINY]) == 0
    (out / "ood.safetensors").write_bytes(b"a gate fitted on these weights' features")
    (out / "saliency_eval.json").write_text("{}")
    sha = file_sha256(out / "model.safetensors")
    assert TR.retire_measurements(out, sha, sha) == []  # same weights: kept
    assert TR.retire_measurements(out, "another run's sha", sha) == ["ood.safetensors", "saliency_eval.json"]
    assert not (out / "ood.safetensors").exists() and not (out / "saliency_eval.json").exists()
    (prev,) = out.glob("previous-*")
    assert (prev / "ood.safetensors").read_bytes().startswith(b"a gate")


CONFIGS = sorted((Path(train.__file__).parent / "experiments").glob("*.toml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_committed_config_passes_the_checks_a_run_starts_with(config, monkeypatch):
    """A config named in the docs must start: no misspelt key (e.g. `mask-los`), no wrong type, and
    its --init/--split-from name a run with a split. Read from the repository root, as the docs run them."""
    monkeypatch.chdir(config.parents[1])
    args = train.parse_args(["--config", str(config.relative_to(config.parents[1]))])
    assert args.data and args.epochs >= 1


def test_lesion_dimming_reaches_the_loop_and_survives_a_resume(data, tmp_path, monkeypatch):
    import core.engine as E
    calls = []
    real = E.dim_lesions
    monkeypatch.setattr(E, "dim_lesions", lambda x, lesion, p: calls.append(p) or real(x, lesion, p))
    small = ["--arch", "resnet18", "--img", "32", "--batch-size", "8", "--workers", "1", "--no-progress"]
    out = tmp_path / "dim"
    assert train.main(["--data", str(data), "--out", str(out), "--epochs", "1", "--mask-loss", "0.2",
                       "--lesion-dim-p", "0.3", *small]) == 0
    assert calls and set(calls) == {0.3}  # every training batch, at the run's probability
    calls.clear()
    # the usual resume names neither --mask-loss nor the run's other settings: the checkpoint's hold
    assert train.main(["--data", str(data), "--out", str(out), "--epochs", "2", "--resume",
                       "--lesion-dim-p", "0.3", *small]) == 0
    assert calls and set(calls) == {0.3}
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["augmentation"]["lesion_dim_p"] == 0.3


def test_every_augmentation_option_is_parsed_resumed_finished_and_named():
    """An option added to the engine must reach every list train.py keeps and the compare table's
    words; marks_p was added by hand to each, and a forgotten one fails only on a resume or a finish."""
    import core.engine as E
    from core.compare import _widened
    for option in E.AUG_OPTION_DEFAULTS:
        assert option in train.FLOAT_OPTIONS and option in train.RESUME_FIXED and option in TR.TRAINED_WITH, option
    assert len(_widened({k: 0.77 for k in E.AUG_OPTION_DEFAULTS}).split(", ")) == len(E.AUG_OPTION_DEFAULTS)


@pytest.mark.parametrize("option", ["lesion_dim_p", "strip_crop_p", "marks_p"])
def test_a_checkpoint_from_before_an_added_option_refuses_to_switch_it_on(option):
    saved = {k: 0 for k in train.RESUME_FIXED if k != option}  # an older run's recorded args
    now = {**saved, option: 0.0}
    assert train.resume_conflicts(saved, now) == []          # off, as that run trained
    now[option] = 0.3
    assert any(train._option(option) in c for c in train.resume_conflicts(saved, now))


def test_a_fresh_run_on_wrong_data_leaves_the_previous_model_in_place(data, tmp_path, capsys):
    """A typo in --data moved the model in --out aside, then failed: --out was left with no model.
    And a run that fails on its data makes no --out folder."""
    out = tmp_path / "run"
    assert train.main(["--data", str(data), "--out", str(out), "--epochs", "1", *TINY]) == 0
    before = sorted(p.name for p in out.iterdir())
    (tmp_path / "empty").mkdir()
    for bad in ([tmp_path / "empty"], [data / "glioma"]):   # no class folders; one class only
        code = train.main(["--data", str(bad[0]), "--out", str(out), "--epochs", "1", *TINY])
        assert code == 2 and sorted(p.name for p in out.iterdir()) == before
    assert train.main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "new"), *TINY]) == 2
    assert not (tmp_path / "new").exists()


def test_a_run_whose_validation_outputs_are_not_finite_ships_no_card(data, tmp_path, monkeypatch, capsys):
    """NaN weights (or half-precision overflow) make every validation output NaN, and no temperature
    calibrates them (`fit_temperature` then gives NaN, tested in test_metrics): no card is shipped."""
    import core.engine as E
    monkeypatch.setattr(E, "fit_temperature", lambda logits, masks: float("nan"))
    out = tmp_path / "run"
    assert train.main(["--data", str(data), "--out", str(out), "--epochs", "1", *TINY]) == 2
    assert "not finite" in capsys.readouterr().err
    assert not (out / "card.json").exists()


def test_the_card_notes_groups_whose_labels_disagree_only_for_its_own_grouping():
    import core.data as D
    grouped = [D.Sample("", str(i), lab, lab, group=g)
               for i, (lab, g) in enumerate([("glioma", "a"), ("notumor", "a"), ("glioma", "b"), ("tumor", "b")])]
    note = TR.mixed_groups_note(grouped)["groups_whose_labels_disagree"]
    assert (note["groups"], note["images"], note["largest"]) == (1, 2, {"glioma": 1, "notumor": 1})
    reused = [D.Sample("", str(i), lab, lab) for i, lab in enumerate(["glioma", "notumor"])]   # --split-from: no groups
    assert TR.mixed_groups_note(reused) == {}


def test_a_class_with_no_validation_or_test_image_is_named():
    """A class of two images all went to training: it trained silently, had no test figure and fell
    out of the macro F1 unannounced. A coarse 'tumor' scan in test stands for no one type."""
    import torch
    import core.data as D
    rows = [("glioma", "train"), ("glioma", "val"), ("glioma", "test"), ("notumor", "train"),
            ("notumor", "val"), ("notumor", "test"), ("pituitary", "train"), ("pituitary", "train"),
            ("tumor", "val"), ("tumor", "test")]
    C3 = ["glioma", "notumor", "pituitary"]

    def made(extra=(), **kw):   # samples (source a unless given) and the run's index of them
        smp = [D.Sample("", str(i), lab, lab, split=k, **kw) for i, (lab, k) in enumerate(rows)] + list(extra)
        return smp, {k: torch.tensor([i for i, s in enumerate(smp) if s.split == k]) for k in ("train", "val", "test")}
    samples, idx = made(source="a")
    note = TR.untested_classes_note(samples, idx, C3)
    assert note == ("pituitary: 2 images in this run, none in validation or test (the split gave it none); no test figure "
                    "(the macro F1 averages the classes tested) and the operating point and calibration never saw it.")
    assert TR.untested_classes_note(samples, idx, ["notumor", "tumor"]) is None   # a binary model: typed scans are tumours
    # grouped: each source's class is split apart, so two sources of two groups each are why
    more = [D.Sample("", f"b{k}", "pituitary", "pituitary", source="b", group=f"b{k % 2}", split="train") for k in range(4)]
    samples, idx = made(more, source="a")
    for k, smp in enumerate(samples[:len(rows)]):
        smp.group = f"a{k % 2}" if smp.label == "pituitary" else f"x{k}"
    note = TR.untested_classes_note(samples, idx, C3)
    assert ("(a has 2 near-duplicate groups of it, and a source's class needs 3 to be split; b has 2 "
            "near-duplicate groups of it") in note and note.startswith("pituitary: 6 images in this run")
    # a held-out source is never validated on
    held = [D.Sample("", "h0", "pituitary", "pituitary", source="h", split="test", group="h0")] + [
        D.Sample("", f"h{k}", "pituitary", "pituitary", source="h", split="train", group=f"h{k}") for k in (1, 2)]
    samples, idx = made(held, source="a")
    idx["train"] = idx["train"][:-2]   # a held-out source's training images are not the run's
    note = TR.untested_classes_note(samples, idx, C3, trained={"a"})
    assert note.startswith("pituitary: 3 images in this run, none in validation (h is held out, never validated on)")
    assert "h has" not in note   # never split for validation: its groups are no reason
    # a source shipping its own Testing/ folder without the class: validated, not tested
    samples, idx = made([D.Sample("", "v", "pituitary", "pituitary", source="s", split="val")], source="s")
    for smp in samples:
        smp.preset_split = "test" if smp.split == "test" else None
    assert TR.untested_classes_note(samples, idx, C3) == (
        "pituitary: 3 images in this run, none in test (the own Testing/ folder of s holds none); no test figure (the macro F1 "
        "averages the classes tested).")


def test_keep_is_fixed_on_resume_and_finish_and_older_runs_kept_the_best():
    saved = {k: 0 for k in train.RESUME_FIXED if k != "keep"}   # a checkpoint from before --keep
    now = {**saved, "keep": "best"}
    assert train.resume_conflicts(saved, now) == []
    now["keep"] = "last"
    assert any("--keep" in c for c in train.resume_conflicts(saved, now))
    # --finish-from compares TRAINED_WITH: a run's card then says which epoch it kept
    assert "keep" in TR.TRAINED_WITH and TR.with_added_options({})["keep"] == "best"


# ----------------------------------------------------------------------------- session 37 review
def test_odd_files_of_real_archives_train_and_are_said(data, tmp_path, capsys):
    """A name that is not UTF-8 (a Latin-1 archive) crashed hashing with a traceback; a class whose
    files are all unreadable vanished without a word; Kaggle LGG's X_mask beside X trained as scans."""
    import os
    import shutil
    shutil.copy(data / "glioma" / "glioma_1.png",
                os.fsencode(data / "glioma") + b"/T1_\xe9chantillon.png")   # not valid UTF-8
    shutil.copy(data / "glioma" / "glioma_2.png", data / "glioma" / "glioma_2_mask.png")
    (data / "astrocytoma").mkdir()
    (data / "astrocytoma" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert train.main(["--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY]) == 0
    out = capsys.readouterr().out
    assert "skipped data/glioma/glioma_2_mask.png: a tumour mask beside its scan" in out
    assert "warning: no image of astrocytoma is left" in out
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    assert sum(card["split"]["sizes"].values()) == 41 and "astrocytoma" not in card["classes"]
    assert card["task"] == "4-class"


def test_an_empty_or_overlapping_data_path_is_refused(data, tmp_path, capsys):
    assert "an empty path" in refused(["--data", "", "--out", tmp_path / "r"], capsys)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = [{{ path = "{data}", name = "one" }}, {{ path = "{data}/", name = "two" }}]\n')
    assert "overlap" in refused(["--config", cfg, "--out", tmp_path / "r"], capsys)


def test_a_label_map_naming_no_folder_and_a_class_only_in_testing_are_told_apart(tmp_path, capsys):
    make_blob_dataset(tmp_path / "d" / "Training")
    (tmp_path / "d" / "Testing" / "schwannoma").mkdir(parents=True)
    for k in range(3):
        shutil_copy = (tmp_path / "d" / "Training" / "glioma" / f"glioma_{k}.png").read_bytes()
        (tmp_path / "d" / "Testing" / "schwannoma" / f"s{k}.png").write_bytes(shutil_copy[:-1] + b"\x00")
    assert train.main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), "--epochs", "1", *TINY]) == 2
    assert "in the dataset's own Testing/" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = [{{ path = "{tmp_path / "d" / "Training"}", label_map = {{ Lesion = "glioma" }} }}]\n')
    assert train.main(["--config", str(cfg), "--out", str(tmp_path / "r2"), "--epochs", "1", *TINY]) == 2
    assert "label_map names 'Lesion', which no folder of it is called" in capsys.readouterr().err


def test_progressive_resizing_must_leave_an_epoch_at_full_size(data, tmp_path, capsys):
    """--small-img-epochs >= --epochs trained every epoch small: early stopping never counted and the
    model was calibrated and tested at a size it never trained on."""
    err = refused(["--data", data, "--out", tmp_path / "run", "--epochs", 2, "--small-img", 16,
                   "--small-img-epochs", 2], capsys)
    assert "--small-img-epochs 2 leaves no epoch at --img" in err


def test_out_may_not_be_a_data_folder_or_the_app_s_default_model(data, tmp_path, capsys, monkeypatch):
    """A first run with --out weights/<the default> moved the shipped model aside and the app served
    a 1-epoch model with no word; --out equal to --data left card.json among the class folders."""
    served = tmp_path / "weights" / "served"
    served.mkdir(parents=True)
    (served / "card.json").write_text("{}")
    monkeypatch.setattr(train, "shipped_default", lambda: served)
    assert "the app's default model" in refused(["--data", data, "--out", served, *TINY], capsys)
    assert (served / "card.json").read_text() == "{}" and len(list(served.iterdir())) == 1
    served_by_env = tmp_path / "weights" / "chosen"   # $BT_WEIGHTS: the folder the app serves instead
    served_by_env.mkdir()
    monkeypatch.setenv("BT_WEIGHTS", str(served_by_env))
    assert "the app's default model" in refused(["--data", data, "--out", served_by_env, *TINY], capsys)
    monkeypatch.delenv("BT_WEIGHTS")
    assert "is inside --data" in refused(["--data", data, "--out", data, *TINY], capsys)
    assert "is inside --data" in refused(["--data", data, "--out", data / "run", *TINY], capsys)
    assert not (data / "run").exists()


def test_a_shipped_model_is_not_retrained_in_place_without_replace(data, tmp_path, capsys, monkeypatch):
    """A run with --out weights/<a shipped model> replaced it with a 1-epoch toy, its files moved to
    a previous-*/ git ignores: a `git commit -a` then shipped the toy (a review)."""
    shipped = tmp_path / "weights" / "cnn"
    shipped.mkdir(parents=True)
    (shipped / "card.json").write_text("{}")
    monkeypatch.setattr(train, "SHIPPED", tmp_path / "weights")
    err = refused(["--data", data, "--out", shipped, *TINY], capsys)
    assert "holds a finished model under weights/" in err and "--replace" in err
    assert [f.name for f in shipped.iterdir()] == ["card.json"]
    ran = []
    monkeypatch.setattr(train, "run", lambda args: ran.append(args.out))
    assert train.main([str(a) for a in ["--data", data, "--out", shipped, "--replace", *TINY]]) in (0, None)
    assert ran == [str(shipped)]
    ran.clear()   # a new folder beside the shipped ones is no shipped model
    assert train.main([str(a) for a in ["--data", data, "--out", tmp_path / "weights" / "new", *TINY]]) in (0, None)
    assert len(ran) == 1


def test_a_source_of_only_unreadable_files_is_refused(data, tmp_path, capsys):
    """Every file unreadable: 'need at least one array to stack' (a traceback); beside a good source
    the run trained without it, its card saying 'weight 1.0' (a review)."""
    from PIL import Image
    for c in ("glioma", "notumor"):
        (tmp_path / "junk" / c).mkdir(parents=True)
        (tmp_path / "junk" / c / "a.jpg").write_text("<html>not an image</html>")
    def data_refused(argv) -> str:   # a DataError: exit 2 from main, after the data is read
        assert train.main([str(a) for a in [*argv, "--out", tmp_path / "r", *TINY]]) == 2
        return capsys.readouterr().err
    for argv in (["--data", tmp_path / "junk"], ["--data", data, "--data", tmp_path / "junk"]):
        assert f"source junk ({tmp_path / 'junk'}): no readable image; 2 file(s) skipped" in data_refused(argv)
    for c in ("glioma", "notumor"):   # readable, but every slice near-black: dropped later
        (tmp_path / "black" / c).mkdir(parents=True)
        for k in range(3):
            Image.new("L", (64, 64)).save(tmp_path / "black" / c / f"{k}.png")
    err = data_refused(["--data", tmp_path / "black"])
    assert "the data holds no image left" in err and "(none)" not in err


def test_a_loop_of_links_is_a_usage_error(data, tmp_path, capsys):
    """Python 3.11's resolve raised RuntimeError('Symlink loop') through train.py, evaluate and audit."""
    from core.cli import main as cli
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert "lead round in a loop" in refused(["--data", data, "--out", tmp_path / "a", *TINY], capsys)
    assert "lead round in a loop" in refused(["--data", tmp_path / "a", "--out", tmp_path / "r", *TINY], capsys)
    for argv in (["evaluate", str(tmp_path / "a")], ["audit", str(tmp_path / "a")]):
        assert cli(argv) == 2
        assert "lead round in a loop" in capsys.readouterr().err
    # inside a data folder: skipped, said as a loop (it read 'a link to this folder or one above it')
    from core import data as D
    (data / "x").symlink_to(data / "y")
    (data / "y").symlink_to(data / "x")
    (data / "up").symlink_to(data)
    skipped = dict(D.discover(data).skipped)
    assert skipped["x/"] == skipped["y/"] == "a loop of links, leading to no file: not followed"
    assert skipped["up/"] == "a link to this folder or one above it: not followed"


def test_small_image_epochs_without_a_small_image_is_refused(data, tmp_path, capsys):
    err = refused(["--data", data, "--out", tmp_path / "r", "--small-img-epochs", 3, *TINY], capsys)
    assert "--small-img-epochs needs --small-img" in err


def test_overlapping_sources_are_named_by_their_paths(tmp_path, capsys):
    make_blob_dataset(tmp_path / "L3" / "Training")
    err = refused(["--data", tmp_path / "L3" / "Training", "--data", tmp_path / "L3", "--out", tmp_path / "r"], capsys)
    assert f"{tmp_path / 'L3' / 'Training'} and {tmp_path / 'L3'} overlap" in err


@pytest.mark.parametrize("checkpoint", ["none", "an earlier run's", "this run's"])
def test_ctrl_c_is_one_sentence_on_what_can_be_resumed(data, tmp_path, capsys, monkeypatch, checkpoint):
    """Only this run's checkpoint can be resumed: a Ctrl-C while the images were read, in a folder
    holding a finished run (moved aside only later), pointed --resume at that run."""
    out = tmp_path / "r"
    out.mkdir()
    if checkpoint == "an earlier run's":
        (out / "checkpoint.pt").write_bytes(b"x")
        os.utime(out / "checkpoint.pt", (1, 1))

    def interrupted(args):
        if checkpoint == "this run's":
            (out / "checkpoint.pt").write_bytes(b"x")   # a new file: another inode than none, or an earlier one
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "run", interrupted)
    assert train.main([str(a) for a in ["--data", data, "--out", out, *TINY]]) == 130
    err = capsys.readouterr().err
    assert err.startswith("train.py: interrupted.") and "Traceback" not in err and len(err.splitlines()) == 1
    resumable = checkpoint == "this run's"
    assert ("--resume" in err) == resumable and ("nothing to resume" in err) == (not resumable)


@pytest.mark.parametrize("extra", [["--distill", 0.5], ["--distill-t", 2.0], ["--distill-online"]])
def test_a_distillation_option_without_a_teacher_is_refused_at_its_default_value_too(data, tmp_path, capsys, extra):
    """--distill 0.5 (its default) without --teacher trained with no teacher and no word."""
    err = refused(["--data", data, "--out", tmp_path / "r", *extra, *TINY], capsys)
    assert f"{extra[0]} needs --teacher" in err
