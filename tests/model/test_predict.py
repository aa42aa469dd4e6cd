"""predict: probabilities and masks for image files; bad files fail with their name."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fedbrain.cli import main
from fedbrain.errors import InputError
from fedbrain.models import build_model
from fedbrain.predict import run as predict
from fedbrain.train import save_model

PARAMS = {"preprocess": {"size": 32, "equalize": False, "bias_field": False}}


@pytest.fixture
def classifier(tmp_path):
    path = tmp_path / "classifier.keras"
    save_model(build_model("cnn", (32, 32, 1), 3), path, {"task": "classification", "classes": ["a", "b", "c"]})
    return path


def _jpeg(path, size=(40, 50)):
    pixels = np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_classifier_probabilities(classifier, tmp_path, capsys):
    results = predict(PARAMS, classifier, [str(_jpeg(tmp_path / "x.jpg")), str(_jpeg(tmp_path / "y.png"))])
    assert [r["image"].rsplit("/", 1)[-1] for r in results] == ["x.jpg", "y.png"]
    probs = results[0]["probabilities"]
    assert set(probs) == {"a", "b", "c"} and sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert results[0]["prediction"] == max(probs, key=probs.get)
    assert json.loads(capsys.readouterr().out) == results


def test_segmenter_writes_a_mask_at_the_original_size(tmp_path):
    model = tmp_path / "segmenter.keras"
    save_model(build_model("unet", (32, 32, 3), 2), model, {"task": "segmentation"})
    image = tmp_path / "slice_7.tif"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    [result] = predict(PARAMS, model, [str(image)], out=tmp_path / "out")
    mask = np.asarray(Image.open(result["mask"]))
    assert mask.shape == (48, 64) and set(np.unique(mask)) <= {0, 255}


def test_segmenter_with_test_time_flips_scores_the_mirrored_slice_too_and_a_bad_flip_names_the_key(tmp_path):
    model = tmp_path / "segmenter.keras"
    save_model(build_model("unet", (32, 32, 3), 2), model, {"task": "segmentation"})
    image = tmp_path / "slice_7.tif"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    flips = {**PARAMS, "evaluate": {"threshold": 0.5, "test_time_flips": ["horizontal"]}}
    [result] = predict(flips, model, [str(image)], out=tmp_path / "out")
    assert np.asarray(Image.open(result["mask"])).shape == (48, 64)
    bad = {**PARAMS, "evaluate": {"test_time_flips": ["sideways"]}}
    with pytest.raises(InputError, match=r"evaluate\.test_time_flips"):
        predict(bad, model, [str(image)], out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_classifier_batches_by_evaluate_batch_size_with_the_same_probabilities(classifier, tmp_path):
    images = [str(_jpeg(tmp_path / f"{k}.jpg")) for k in range(3)]
    whole = predict(PARAMS, classifier, images)
    small = predict({**PARAMS, "evaluate": {"batch_size": 2}}, classifier, images)
    for a, b in zip(whole, small):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    with pytest.raises(InputError, match=r"evaluate\.batch_size"):
        predict({**PARAMS, "evaluate": {"batch_size": "big"}}, classifier, images)


def test_corrupt_file_is_named_and_nothing_is_written(classifier, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(InputError, match="broken.jpg"):
        predict(PARAMS, classifier, [str(_jpeg(tmp_path / "ok.jpg")), str(bad)])
    result = CliRunner().invoke(main, ["predict", "--params", str(_params_file(tmp_path)), "--model", str(classifier),
                                       str(bad)])
    assert result.exit_code == 1
    assert "broken.jpg" in result.output and "Traceback" not in result.output
    with pytest.raises(InputError, match="missing.png: file not found"):
        predict(PARAMS, classifier, [str(tmp_path / "missing.png")])


def test_a_file_that_is_not_a_model_is_an_input_error(tmp_path):
    fake = tmp_path / "model.keras"
    fake.write_text("nope")
    with pytest.raises(InputError, match="cannot load model"):
        predict(PARAMS, fake, [str(_jpeg(tmp_path / "x.jpg"))])


def _params_file(tmp_path):
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(PARAMS))
    return path


def test_nifti_volume_uses_the_middle_or_the_given_slice(classifier, tmp_path):
    import nibabel as nib

    volume = np.zeros((40, 40, 5), np.float32)
    volume[..., 2] = np.random.default_rng(2).uniform(size=(40, 40))  # only the middle slice has signal
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    middle, = predict(PARAMS, classifier, [str(path)])
    given, = predict(PARAMS, classifier, [str(path)], slice_index=2)
    empty, = predict(PARAMS, classifier, [str(path)], slice_index=0)
    assert middle["probabilities"] == given["probabilities"] != empty["probabilities"]
    with pytest.raises(InputError, match="out of range"):
        predict(PARAMS, classifier, [str(path)], slice_index=9)


def test_a_classifier_without_its_card_stops_and_names_the_card(classifier, tmp_path):
    image = str(_jpeg(tmp_path / "x.jpg"))
    copied = tmp_path / "elsewhere" / "classifier.keras"
    copied.parent.mkdir()
    copied.write_bytes(classifier.read_bytes())  # the .keras file alone, as a user might copy it
    with pytest.raises(InputError, match=r"elsewhere/classifier\.json: model card not found.*copy it beside"):
        predict(PARAMS, copied, [image])
    result = CliRunner().invoke(main, ["predict", "--params", str(_params_file(tmp_path)), "--model", str(copied),
                                       image])
    assert result.exit_code == 1 and "classifier.json: model card not found" in result.output
    assert "Traceback" not in result.output and '"probabilities"' not in result.output
    # A card that does not fit the model (another model's) is refused too, not read as numbers.
    copied.with_suffix(".json").write_text(json.dumps({"task": "classification", "classes": ["a", "b"]}))
    with pytest.raises(InputError, match="has 2 classes, classifier.keras has 3 outputs"):
        predict(PARAMS, copied, [image])


def test_a_segmenter_needs_no_card(tmp_path):
    model = tmp_path / "segmenter.keras"
    build_model("unet", (32, 32, 3), 2).save(model)  # no card: a mask needs no class names
    image = _jpeg(tmp_path / "x.png")
    [result] = predict(PARAMS, model, [str(image)], out=tmp_path / "out")
    assert (tmp_path / "out" / "x_mask.png").is_file() and 0.0 <= result["tumour_fraction"] <= 1.0


def test_explain_writes_a_gradcam_overlay_per_image_with_calibrated_probabilities(tmp_path):
    from fedbrain.reliability import scale

    network, classes = build_model("cnn", (32, 32, 1), 3), ["a", "b", "c"]
    save_model(network, tmp_path / "plain.keras", {"task": "classification", "classes": classes})
    save_model(network, tmp_path / "calibrated.keras",
               {"task": "classification", "classes": classes, "temperature": 2.0})
    images = [str(_jpeg(tmp_path / "x.jpg")), str(_jpeg(tmp_path / "y.png", size=(64, 64)))]
    raw = predict(PARAMS, tmp_path / "plain.keras", images, out=tmp_path / "plain")
    results = predict(PARAMS, tmp_path / "calibrated.keras", images, out=tmp_path / "out", explain=True)
    for before, after, stem in zip(raw, results, ("x", "y")):
        assert "temperature" not in before and after["temperature"] == 2.0
        expected = scale([list(before["probabilities"].values())], 2.0)[0]
        assert list(after["probabilities"].values()) == pytest.approx(expected, abs=1e-5)
        assert after["prediction"] == before["prediction"]
        assert after["explanation"] == str(tmp_path / "out" / f"{stem}_gradcam.png")
        assert (tmp_path / "out" / f"{stem}_gradcam.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x_gradcam.png", "y_gradcam.png"]
    assert not (tmp_path / "plain").exists()  # no --explain: nothing written for a classifier


def test_explain_on_a_segmenter_says_why_and_still_writes_masks(tmp_path, capsys):
    model = tmp_path / "segmenter.keras"
    save_model(build_model("unet", (32, 32, 3), 2), model, {"task": "segmentation"})
    [result] = predict(PARAMS, model, [str(_jpeg(tmp_path / "x.png"))], out=tmp_path / "out", explain=True)
    err = capsys.readouterr().err
    assert f"{model}: no Grad-CAM explanation" in err and "segmenter" in err and "class score" in err
    assert "masks are written as usual" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x_mask.png"] and "explanation" not in result


def test_explain_with_an_unreadable_image_names_it_and_writes_no_png(classifier, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="broken.jpg"):
        predict(PARAMS, classifier, [str(_jpeg(tmp_path / "ok.jpg")), str(bad)], out=out, explain=True)
    result = CliRunner().invoke(main, ["predict", "--params", str(_params_file(tmp_path)), "--model", str(classifier),
                                       "--out", str(out), "--explain", str(_jpeg(tmp_path / "ok.jpg")), str(bad)])
    assert result.exit_code == 1 and "broken.jpg" in result.output and "Traceback" not in result.output
    assert not out.exists() or not list(out.rglob("*"))
