"""predict: a trained model + image files -> class probabilities (JSON on stdout), mask PNGs.

Images go through exactly what training saw: ``fedbrain.imaging.read_image`` (JPEG, PNG, TIFF,
NIfTI; ``a.nii.gz;b.nii.gz`` stacks co-registered modalities as channels) and
``fedbrain.preprocess.prepare_image`` with the ``preprocess`` settings of params.yaml, at the
model's input size. A classifier needs its card ``<name>.json`` beside it (the class names); without
it predict stops and names the missing file. Every file is read before anything is predicted or
written, so one bad file stops the command with its name and leaves no partial output.

The model is a .keras path or a Model Registry URI, e.g. ``models:/fedbrain-classifier@champion``
(fedbrain.registry: downloaded with its card to a temporary folder, loaded, the folder removed).

A classifier's probabilities are divided by the temperature its card holds (``temperature``,
fitted on the validation split; ``fedbrain.reliability``), which changes no predicted class.
``explain``: for each classified image, ``<out>/<stem>_gradcam.png``, the image with the Grad-CAM
heat map of the predicted class over it (``fedbrain.explain``). A model without one (a segmenter, a
network without a convolutional layer) is named with the reason, and predicted as usual.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from fedbrain import test_time
from fedbrain.config import get
from fedbrain.errors import InputError


def _load(model_path: Path):
    from fedbrain.models import load as load_model

    if not model_path.is_file():
        raise InputError(f"{model_path}: model file not found; train one first (fedbrain train-centralized)")
    try:
        return load_model(model_path)
    except Exception as exc:  # corrupt or foreign files fail in many ways
        raise InputError(f"{model_path}: cannot load model ({type(exc).__name__}); pass a .keras file written by fedbrain") from exc


def _match_channels(image: np.ndarray, channels: int, name: str) -> np.ndarray:
    """Gray models take the mean of colour channels; 3-channel models get gray repeated."""
    have = image.shape[-1]
    if have == channels:
        return image
    if channels == 1:
        return image.mean(axis=-1, keepdims=True)
    if have == 1:
        return np.repeat(image, channels, axis=-1)
    raise InputError(f"{name}: has {have} channels, the model expects {channels}; pass matching images")


def read_input(source: str, size: int, channels: int, preprocess: dict, slice_index: int | None) -> tuple[np.ndarray, tuple]:
    """One model-ready (size, size, channels) array and the original (H, W)."""
    from fedbrain import imaging
    from fedbrain.preprocess import prepare_image

    paths = source.split(imaging.MODALITY_SEPARATOR)
    for path in paths:
        if not Path(path).is_file():
            raise InputError(f"{path}: file not found")
    index = -1
    if imaging.is_nifti(paths[0]):
        depth = imaging.read_volume(paths[0]).shape[2]
        index = depth // 2 if slice_index is None else slice_index  # the middle axial slice by default
    pixels = imaging.read_image(source, index)
    image = prepare_image(pixels, size, get(preprocess, "equalize", bool, "preprocess", default=False),
                          get(preprocess, "bias_field", bool, "preprocess", default=False))
    return _match_channels(image, channels, source), pixels.shape[:2]


def _class_names(model_path: Path, card: dict, outputs: int) -> list[str]:
    """The classifier's class names, from its card ``<name>.json`` (the .keras file does not hold them).

    Without the card, or with one that does not fit the model, there is no honest name to give an
    output: stop rather than print class numbers.
    """
    card_path = model_path.with_suffix(".json")
    if not card:
        raise InputError(f"{card_path}: model card not found; it names the classes of {model_path.name}: "
                         f"copy it beside the model (fedbrain writes <name>.keras and <name>.json together)")
    classes = card.get("classes")
    if not isinstance(classes, list) or len(classes) != outputs:
        have = f"{len(classes)} classes" if isinstance(classes, list) else "no 'classes' list"
        raise InputError(f"{card_path}: has {have}, {model_path.name} has {outputs} outputs; "
                         "use the card written with this model")
    return [str(c) for c in classes]


def _stem(source: str) -> str:
    """``scan.nii.gz;flair.nii.gz`` -> ``scan``: the first file's name without its extensions."""
    return Path(str(source).split(";")[0]).name.split(".")[0]


def _write_mask(mask: np.ndarray, shape: tuple, path: Path) -> None:
    from PIL import Image

    image = Image.fromarray((mask * 255).astype(np.uint8)).resize((shape[1], shape[0]), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    image.save(tmp)
    os.replace(tmp, path)


def _explainer(network, model: str | Path, segmenter: bool):
    """Grad-CAM of this network, or None after saying why there is none."""
    from fedbrain.explain import GradCam, NotExplainable

    try:
        return GradCam(network)
    except NotExplainable as exc:
        still = "its masks are written as usual" if segmenter else "its probabilities are printed as usual"
        print(f"--explain: {model}: no Grad-CAM explanation: {exc}; {still}", file=sys.stderr)
        return None


def run(params: dict, model: str | Path, images: list[str], out: Path = Path("predictions"),
        slice_index: int | None = None, explain: bool = False) -> list[dict]:
    from fedbrain.train import load_card

    if not images:
        raise InputError("no image files given; pass one or more JPEG/PNG/TIFF/NIfTI paths")
    with tempfile.TemporaryDirectory(prefix="fedbrain-model-") as download:
        if str(model).startswith("models:/"):
            from fedbrain import registry

            model_path = registry.fetch(params, str(model), Path(download))
        else:
            model_path = Path(model)
        network = _load(model_path)  # held in memory: the download may go
        card = load_card(model_path)
    # A classifier's names are checked before any image is read: no output without them.
    names = _class_names(model_path, card, network.output_shape[-1]) if len(network.output_shape) == 2 else None
    explainer = _explainer(network, model, names is None) if explain else None
    _, size, _, channels = network.input_shape
    preprocess = params.get("preprocess") or {}
    inputs = [read_input(str(source), size, channels, preprocess, slice_index) for source in images]
    batch = np.stack([array for array, _ in inputs]).astype(np.float32)
    inference = test_time.inference_settings(params)  # evaluate's: what it scored is what you get
    threshold, batch_size = inference["threshold"], inference["batch_size"]
    if len(network.output_shape) == 4:  # a segmenter, with the flips evaluate scored it with
        outputs = test_time.segment(network, batch, batch_size, inference["test_time_flips"])
    else:
        outputs = network.predict(batch, batch_size=batch_size, verbose=0)
    results = []
    if outputs.ndim == 4:  # segmenter: a tumour probability per pixel
        for source, (_, shape), proba in zip(images, inputs, outputs):
            mask = (proba[..., 0] > threshold).astype(np.uint8)
            path = Path(out) / f"{_stem(source)}_mask.png"
            _write_mask(mask, shape, path)
            results.append({"image": str(source), "mask": str(path), "tumour_fraction": float(mask.mean())})
    else:
        temperature = card.get("temperature")
        if temperature is not None:
            from fedbrain.reliability import scale

            outputs = scale(outputs, temperature)
        maps = explainer(batch, outputs.argmax(axis=1))[0] if explainer is not None else [None] * len(images)
        for source, proba, image, heatmap in zip(images, outputs, batch, maps):
            predicted = int(np.argmax(proba))
            result = {"image": str(source), "prediction": names[predicted],
                      "probabilities": {n: round(float(p), 6) for n, p in zip(names, proba)}}
            if temperature is not None:
                result["temperature"] = float(temperature)
            if heatmap is not None:
                from fedbrain.explain import write_overlay

                path = Path(out) / f"{_stem(source)}_gradcam.png"
                write_overlay(image, heatmap, f"{names[predicted]} p={proba[predicted]:.2f}", path)
                result["explanation"] = str(path)
            results.append(result)
    print(json.dumps(results, indent=2))
    return results
