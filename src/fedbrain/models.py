"""The networks: a compact CNN (default), VGG16 and EfficientNet-B0 backbones, a wavelet-feature
classifier (`scatter`, fedbrain.scattering: the DP variants'), and a U-Net.

Every builder takes the input shape of the preprocessed arrays (size, size, channels) with
intensities in [0, 1] and returns an uncompiled ``tf.keras.Model``; ``fedbrain.train.compile_model``
adds the loss, so the same model object can be compiled with a DP optimizer by the federated
hospitals. All layers are stock Keras layers but `scatter`'s front end (fedbrain.scattering.Scattering,
registered with Keras): load saved models with ``load`` below, which imports it.
"""

from __future__ import annotations

import math
from pathlib import Path

import tensorflow as tf

from fedbrain.errors import InputError

layers = tf.keras.layers

CLASSIFIERS = ("cnn", "vgg16", "efficientnet_b0", "scatter")
SEGMENTERS = ("unet",)
MODELS = CLASSIFIERS + SEGMENTERS

# ImageNet statistics in the [0, 255] range, the inputs Keras' VGG16 weights were trained on.
_CAFFE_MEAN = (103.939, 116.779, 123.68)


def task_of(name: str) -> str:
    """'classification' or 'segmentation' for a model name."""
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return "segmentation" if name in SEGMENTERS else "classification"


NORMALIZATIONS = ("batch", "group")
# The models that have a GroupNormalization form (for DP-SGD, which cannot train BatchNorm).
GROUP_NORM_MODELS = ("cnn", "unet")
# Models without learned normalisation whatever `normalization` says (scatter standardises each image).
WITHOUT_BATCH_NORM = ("scatter",)


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int,
                weights: str = "none", normalization: str = "batch", width: int | None = None) -> tf.keras.Model:
    """A model by name. ``weights`` (none | imagenet | <file>) applies to vgg16/efficientnet_b0.
    ``width``: the cnn's first-stage channels (None: 32); the stages widen 2x, 4x, 8x from it.

    ``normalization``: batch (BatchNormalization) | group (GroupNormalization, cnn and unet only).
    BatchNorm mixes the examples of a batch, so one example's gradient depends on the others and
    per-example clipping (DP-SGD) bounds nothing; GroupNorm normalises each example on its own.
    """
    task_of(name)
    if normalization not in NORMALIZATIONS:
        raise InputError(f"unknown normalization {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")
    if normalization == "group" and name not in GROUP_NORM_MODELS + WITHOUT_BATCH_NORM:
        raise InputError(f"model {name!r} has no GroupNorm form: only {' and '.join(GROUP_NORM_MODELS)} do; "
                         f"set normalization: batch or model: cnn")
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != 3:
        raise InputError(f"input_shape {input_shape} must be (size, size, channels)")
    if weights not in ("none", None) and name not in ("vgg16", "efficientnet_b0"):
        raise InputError(f"model {name!r} has no pretrained weights; set weights: none")
    if width is not None and name != "cnn":
        raise InputError(f"model {name!r} has no width setting (cnn only); remove width or set model: cnn")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise InputError(f"cnn width must be a positive whole number of channels, got {width!r}")
    if name == "cnn":
        return compact_cnn(input_shape, num_classes, normalization=normalization, width=width or 32)
    if name == "unet":
        return unet(input_shape, normalization=normalization)
    if name == "scatter":
        from fedbrain.scattering import scatter_classifier

        return scatter_classifier(input_shape, num_classes)
    return keras_application(name, input_shape, num_classes, weights or "none")


# The classifier's BatchNormalization momentum. Keras' default (0.99) averages its moving
# statistics over ~100 steps; on the embedded sample (9 steps per epoch) or a small hospital
# they lag the weights for a dozen epochs, validation measured with them stays at chance, and
# early stopping keeps the first epoch's weights (seen on the sample: test accuracy 0.25).
# 0.9 (PyTorch's default) follows within ~10 steps.
CNN_BN_MOMENTUM = 0.9


# GroupNorm's group count. Wu & He (2018) use 32 groups on ImageNet ResNets, but our layers are
# narrow (16 channels in the U-Net's first level): 32 groups there would be one channel each
# (InstanceNorm, which removes each channel's contrast, the signal in MRI intensities). 8 groups
# keeps at least 2 channels per group; gcd with the width always divides it, as the layer needs.
GROUP_NORM_GROUPS = 8


def load(path) -> tf.keras.Model:
    """A saved model, uncompiled (every fedbrain model loads this way)."""
    import fedbrain.scattering  # noqa: F401  (registers the scatter classifier's front end with Keras)

    return tf.keras.models.load_model(path, compile=False)


def _norm(x, normalization: str, momentum: float):
    if normalization == "group":
        return layers.GroupNormalization(groups=math.gcd(int(x.shape[-1]), GROUP_NORM_GROUPS))(x)
    return layers.BatchNormalization(momentum=momentum)(x)


def _conv_bn(x, filters: int, kernel: int = 3, strides: int = 1, separable: bool = False,
             momentum: float = 0.99, normalization: str = "batch"):
    conv = layers.SeparableConv2D if separable else layers.Conv2D
    x = conv(filters, kernel, strides=strides, padding="same", use_bias=False)(x)
    x = _norm(x, normalization, momentum)
    return layers.Activation("relu")(x)


def _residual_block(x, filters: int, strides: int, momentum: float, normalization: str = "batch"):
    """Pre-downsampling residual block (ResNet 'basic' block, a norm layer after each conv)."""
    shortcut = x
    y = _conv_bn(x, filters, strides=strides, momentum=momentum, normalization=normalization)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = _norm(y, normalization, momentum)
    if strides != 1 or shortcut.shape[-1] != filters:
        # 1x1 projection so the shapes match; average pooling first keeps all pixels' information.
        if strides != 1:
            shortcut = layers.AveragePooling2D(strides, padding="same")(shortcut)
        shortcut = layers.Conv2D(filters, 1, use_bias=False)(shortcut)
        shortcut = _norm(shortcut, normalization, momentum)
    return layers.Activation("relu")(layers.Add()([y, shortcut]))


def compact_cnn(input_shape, num_classes: int, width: int = 32, normalization: str = "batch") -> tf.keras.Model:
    """A small residual network (ResNet-18 layout) designed for accuracy per CPU-second.

    On a CPU most of the time goes to the high-resolution layers, so the stem brings the image
    down 4x straight away (a strided 5x5 conv, then max pooling: 128 -> 32 pixels); a second conv
    at 64x64 would cost 3x the rest of the network. Four stages of two residual blocks then widen
    as they shrink (32, 64, 128, 256 channels at 32, 16, 8, 4 pixels), so each stage costs about
    the same: 2.8M parameters, ~200 images/s to train on 2 cores at 128x128.
    ``normalization``: batch | group (see build_model).
    """
    inputs = tf.keras.Input(input_shape, name="image")
    norm = {"momentum": CNN_BN_MOMENTUM, "normalization": normalization}
    x = _conv_bn(inputs, width, kernel=5, strides=2, **norm)
    x = layers.MaxPooling2D(2, padding="same")(x)
    for i, filters in enumerate((width, 2 * width, 4 * width, 8 * width)):
        x = _residual_block(x, filters, strides=1 if i == 0 else 2, **norm)
        x = _residual_block(x, filters, strides=1, **norm)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return tf.keras.Model(inputs, outputs, name="cnn")


def _to_three_channels(x, channels: int):
    """ImageNet backbones expect 3 channels: repeat a gray channel, or learn a 1x1 mix of C."""
    if channels == 3:
        return x
    if channels == 1:
        return layers.Concatenate(name="gray_to_rgb")([x, x, x])
    return layers.Conv2D(3, 1, name="channels_to_rgb")(x)


def keras_application(name: str, input_shape, num_classes: int, weights: str) -> tf.keras.Model:
    """VGG16 / EfficientNet-B0 backbone with the paper's head: GAP, BatchNorm, Dropout 0.5, softmax."""
    size, _, channels = input_shape
    if weights == "none":
        keras_weights = None
    elif weights == "imagenet":
        keras_weights = "imagenet"
    else:
        path = Path(weights)
        if not path.is_file():
            raise InputError(f"{path}: weights file not found for {name}; set weights: none | imagenet | <existing file>")
        keras_weights = str(path)
    if name == "vgg16" and size < 32:
        raise InputError(f"vgg16 needs images of at least 32x32 pixels; preprocess.size is {size}")

    inputs = tf.keras.Input(input_shape, name="image")
    # Our arrays are in [0, 1]; both applications were trained on [0, 255] inputs.
    x = layers.Rescaling(255.0)(_to_three_channels(inputs, channels))
    try:
        if name == "vgg16":
            # VGG16's 'caffe' preprocessing subtracts the ImageNet mean per channel.
            x = layers.Normalization(mean=_CAFFE_MEAN, variance=(1.0, 1.0, 1.0))(x)
            backbone = tf.keras.applications.VGG16(include_top=False, weights=keras_weights,
                                                   input_shape=(size, size, 3))
        else:
            # EfficientNet normalises internally (Rescaling + Normalization layers).
            backbone = tf.keras.applications.EfficientNetB0(include_top=False, weights=keras_weights,
                                                            input_shape=(size, size, 3))
    except Exception as exc:  # a failed download surfaces as several exception types
        if weights == "imagenet":
            raise InputError(f"could not fetch ImageNet weights for {name} ({type(exc).__name__}); "
                             f"this machine may have no internet: download the 'notop' weights file "
                             f"yourself and set train.weights to its path, or use weights: none") from exc
        if weights != "none":
            raise InputError(f"{weights}: not loadable as {name} 'notop' weights ({exc})") from exc
        raise
    x = backbone(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.BatchNormalization()(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return tf.keras.Model(inputs, outputs, name=name)


def unet(input_shape, filters: int = 16, depth: int = 4, normalization: str = "batch") -> tf.keras.Model:
    """U-Net (Ronneberger et al. 2015) with BatchNorm (or GroupNorm: normalization="group");
    sigmoid tumour probability per pixel."""
    size = input_shape[0]
    if size % (2 ** depth):
        raise InputError(f"unet needs an image size divisible by {2 ** depth}; preprocess.size is {size}")
    inputs = tf.keras.Input(input_shape, name="image")
    x, skips = inputs, []

    def double_conv(x, width):
        x = _conv_bn(x, width, normalization=normalization)
        return _conv_bn(x, width, normalization=normalization)

    for level in range(depth):
        x = double_conv(x, filters * 2 ** level)
        skips.append(x)
        x = layers.MaxPooling2D(2)(x)
    x = double_conv(x, filters * 2 ** depth)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(filters * 2 ** level, 2, strides=2, padding="same")(x)
        x = layers.Concatenate()([x, skips[level]])
        x = double_conv(x, filters * 2 ** level)
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="mask")(x)
    return tf.keras.Model(inputs, outputs, name="unet")
