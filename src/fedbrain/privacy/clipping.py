"""Per-example squared gradient norms of our layers, in TF-Privacy's layer-registry format.

TF-Privacy 0.9.0's fast gradient clipping registers Dense and Embedding only, and its fallback
for every other layer is the vectorizer, which computes a conv layer's filter gradient one
example at a time. This adds what our DP models need (Conv2D, Conv2DTranspose for the U-Net,
GroupNormalization) and reuses TF-Privacy's Dense norms.

A registry function is ``fn(layer, input_args, input_kwargs, tape, num_microbatches) ->
(base_vars, outputs, sqr_norm_fn)``: ``base_vars`` is the layer's pre-activation output, watched
on ``tape``; ``sqr_norm_fn(dL/d base_vars)`` is each example's squared gradient norm over the
layer's weights, [B], computed without a per-example backward pass. Ours return a SqrNormFn,
which also gives the clipped gradient sum (so fedbrain.privacy.dp_sgd needs no second backward
pass); TF-Privacy's DPModel can use this registry too, as it only calls it for norms.

Convolutions ("mixed ghost clipping", Bu et al. 2022): with ``patches`` [B, T, k*k*Cin] (one row
per output position) and the output gradient ``g`` [B, T, Cout], an example's filter gradient is
``patches^T g``. Its squared norm is either
- ghost:        sum_{t,t'} (patches_t . patches_t') (g_t . g_t'), ~T^2 (p + d) flops: cheap for
                late layers with few positions;
- per_example:  ||patches^T g||^2 with the gradient materialised, ~T p d flops (the cost of the
                ordinary weight gradient): cheap for early layers with many positions.
``make_layer_registry("auto")`` picks the cheaper per layer from its static shapes.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow_privacy.privacy.fast_gradient_clipping.layer_registry import LayerRegistry
from tensorflow_privacy.privacy.fast_gradient_clipping.registry_functions.dense import dense_layer_computation

from fedbrain.errors import InputError

CONV_METHODS = ("auto", "ghost", "per_example")


class SqrNormFn:
    """A registry function's ``sqr_norm_fn`` that can also give the clipped gradient sum.

    TF-Privacy only asks a registry function for norms, then backpropagates the clip-weighted
    loss through the whole network a second time. ``clipped_sum(output_grads, clip_weights)``
    instead gives each weight's sum over the batch of clip_weight * per-example gradient from
    what the norm has already computed ("book-keeping", Bu et al. 2023), as (variable, gradient)
    pairs. Call it with the same ``output_grads`` the norms were computed from.
    """

    def __init__(self, sqr_norms, clipped_sum):
        self._sqr_norms, self.clipped_sum = sqr_norms, clipped_sum

    def __call__(self, grads):
        return self._sqr_norms(grads)


def choose_conv_method(method: str, positions, p, d) -> str:
    """auto: per example, two T x T Gram matrices (ghost) vs one p x d gradient (per_example)."""
    if method not in CONV_METHODS:
        raise ValueError(f"unknown conv method {method!r}; expected one of {', '.join(CONV_METHODS)}")
    if method != "auto":
        return method
    known = None not in (positions, p, d)
    return "ghost" if known and positions * (p + d) < p * d else "per_example"


def _positions(tensor: tf.Tensor) -> tf.Tensor:
    """[B, H, W, C] -> [B, H*W, C]."""
    return tf.reshape(tensor, [tf.shape(tensor)[0], -1, tensor.shape[-1]])


def _patches(images: tf.Tensor, layer) -> tf.Tensor:
    """[B, H', W', C*kh*kw]: the window each output position of ``layer``'s geometry reads.

    A depthwise conv with one-hot filters copies each window exactly (x*1 plus zeros) with the
    conv's own SAME/VALID arithmetic, 3-9x faster here than tf.image.extract_patches. Each
    window is laid out (C, kh, kw); _kernel_layout turns gradient rows back into kernel order.
    """
    kh, kw = layer.kernel_size
    one_hot = tf.reshape(tf.eye(kh * kw, dtype=images.dtype), [kh, kw, 1, kh * kw])
    return tf.nn.depthwise_conv2d(images, tf.tile(one_hot, [1, 1, images.shape[-1], 1]),
                                  strides=[1, *layer.strides, 1], padding=layer.padding.upper(),
                                  dilations=layer.dilation_rate)


def _kernel_layout(rows: tf.Tensor, layer) -> tf.Tensor:
    """[C*kh*kw, d] gradient rows in window order -> the kernel's [kh, kw, C, d]."""
    kh, kw = layer.kernel_size
    return tf.transpose(tf.reshape(rows, [-1, kh, kw, rows.shape[-1]]), [1, 2, 0, 3])


def _per_example(clip_weights, tensor):
    return tensor * tf.reshape(clip_weights, [-1] + [1] * (tensor.shape.rank - 1))


def _position_sums(grads: tf.Tensor) -> tf.Tensor:
    """[B, ..., C] -> [B, C]: a bias's (or beta's) per-example gradient."""
    return tf.reduce_sum(grads, axis=list(range(1, grads.shape.rank - 1)))


def _single_input(layer, input_args, input_kwargs, num_microbatches):
    if num_microbatches is not None:
        raise NotImplementedError(f"{layer.name}: microbatches are not supported; clip per example")
    if input_kwargs or len(input_args) != 1:
        raise ValueError(f"{layer.name}: expected one input tensor and no keyword arguments")
    return input_args[0]


def _pre_activation(layer, inputs, tape):
    """(pre-activation output watched on tape, layer output): the norm needs the gradient before the activation."""
    activation = layer.activation
    layer.activation = None
    try:
        base_vars = layer(inputs)
    finally:
        layer.activation = activation
    tape.watch(base_vars)
    return base_vars, activation(base_vars) if activation is not None else base_vars


def _window_gradient(layer, windows_of, partner_of, method: str) -> SqrNormFn:
    """Norms and clipped sum of a kernel whose per-example gradient is windows^T partner.

    ``windows_of(grads)`` [B, T', T'', p] and ``partner_of(grads)`` [B, T', T'', d], where
    ``grads`` is the gradient of the layer's pre-activation output.
    """
    parts = {}

    def computed(grads):
        if not parts:  # once per step: the norm and the clipped sum share them
            windows, partner = _positions(windows_of(grads)), _positions(partner_of(grads))
            chosen = choose_conv_method(method, windows.shape[1], windows.shape[2], partner.shape[2])
            parts.update(windows=windows, partner=partner, method=chosen,
                         bias=_position_sums(grads) if layer.use_bias else None)
            if chosen == "per_example":
                parts["per_example"] = tf.matmul(windows, partner, transpose_a=True)  # [B, p, d]
        return parts

    def sqr_norms(grads):
        c = computed(grads)
        if c["method"] == "ghost":
            gram = (tf.matmul(c["windows"], c["windows"], transpose_b=True)
                    * tf.matmul(c["partner"], c["partner"], transpose_b=True))
            total = tf.reduce_sum(gram, axis=[1, 2])
        else:
            total = tf.reduce_sum(tf.square(c["per_example"]), axis=[1, 2])
        return total + tf.reduce_sum(tf.square(c["bias"]), axis=1) if layer.use_bias else total

    def clipped_sum(grads, clip_weights):
        c = computed(grads)
        if c["method"] == "ghost":
            windows, partner = c["windows"], _per_example(clip_weights, c["partner"])
            rows = tf.matmul(tf.reshape(windows, [-1, windows.shape[-1]]),
                             tf.reshape(partner, [-1, partner.shape[-1]]), transpose_a=True)
        else:
            rows = tf.einsum("b,bpd->pd", clip_weights, c["per_example"])
        pairs = [(layer.kernel, _kernel_layout(rows, layer))]
        if layer.use_bias:
            pairs.append((layer.bias, tf.einsum("b,bd->d", clip_weights, c["bias"])))
        return pairs

    return SqrNormFn(sqr_norms, clipped_sum)


def _conv2d(method: str):
    def conv2d_computation(layer, input_args, input_kwargs, tape, num_microbatches=None):
        images = _single_input(layer, input_args, input_kwargs, num_microbatches)
        base_vars, outputs = _pre_activation(layer, images, tape)
        return base_vars, outputs, _window_gradient(layer, lambda grads: _patches(images, layer),
                                                    lambda grads: grads, method)

    return conv2d_computation


def _conv2d_transpose(method: str):
    # A transposed conv's filter gradient is an ordinary conv's with the roles swapped: the
    # windows come from the output gradient (one per input position) and pair with the input.
    # Kernel [kh, kw, Cout, Cin] is the window layout (Cout, kh, kw) against Cin.
    def conv2d_transpose_computation(layer, input_args, input_kwargs, tape, num_microbatches=None):
        images = _single_input(layer, input_args, input_kwargs, num_microbatches)
        base_vars, outputs = _pre_activation(layer, images, tape)

        def windows_of(grads):
            windows = _patches(grads, layer)
            if windows.shape[1:3] != images.shape[1:3]:
                raise ValueError(f"{layer.name}: output-gradient windows {windows.shape} do not align with "
                                 f"the input {images.shape}")
            return windows

        return base_vars, outputs, _window_gradient(layer, windows_of, lambda grads: images, method)

    return conv2d_transpose_computation


def dense_computation(layer, input_args, input_kwargs, tape, num_microbatches=None):
    """TF-Privacy's Dense function (its norms), with the clipped sum added."""
    base_vars, outputs, sqr_norms = dense_layer_computation(layer, input_args, input_kwargs, tape, num_microbatches)
    inputs = input_args[0]

    def clipped_sum(grads, clip_weights):
        weighted = tf.reshape(_per_example(clip_weights, grads), [-1, grads.shape[-1]])
        pairs = [(layer.kernel, tf.matmul(tf.reshape(inputs, [-1, inputs.shape[-1]]), weighted, transpose_a=True))]
        if layer.use_bias:
            pairs.append((layer.bias, tf.reduce_sum(weighted, axis=0)))
        return pairs

    return base_vars, outputs, SqrNormFn(sqr_norms, clipped_sum)


def _group_standardised(layer, inputs: tf.Tensor) -> tf.Tensor:
    """GroupNormalization's output before gamma and beta (Keras' own arithmetic, channels last)."""
    channels = inputs.shape[-1]
    grouped = tf.reshape(inputs, tf.concat([tf.shape(inputs)[:-1], [layer.groups, channels // layer.groups]], 0))
    rank = inputs.shape.rank + 1
    mean, variance = tf.nn.moments(grouped, axes=list(range(1, rank - 2)) + [rank - 1], keepdims=True)
    return tf.reshape((grouped - mean) * tf.math.rsqrt(variance + layer.epsilon), tf.shape(inputs))


def group_norm_computation(layer, input_args, input_kwargs, tape, num_microbatches=None):
    # gamma and beta have one value per channel, so the per-example gradients ([B, C] each) are
    # cheaper to materialise than any trick.
    inputs = _single_input(layer, input_args, input_kwargs, num_microbatches)
    base_vars = layer(inputs)
    tape.watch(base_vars)
    per_example = {}

    def computed(grads):
        if not per_example:
            if layer.scale:
                per_example[layer.gamma.ref()] = _position_sums(grads * _group_standardised(layer, inputs))
            if layer.center:
                per_example[layer.beta.ref()] = _position_sums(grads)
        return per_example

    def sqr_norms(grads):
        return tf.add_n([tf.reduce_sum(tf.square(g), axis=1) for g in computed(grads).values()])

    def clipped_sum(grads, clip_weights):
        return [(ref.deref(), tf.einsum("b,bc->c", clip_weights, g)) for ref, g in computed(grads).items()]

    return base_vars, base_vars, SqrNormFn(sqr_norms, clipped_sum)


def make_layer_registry(conv_method: str = "auto") -> LayerRegistry:
    """A TF-Privacy LayerRegistry for our layers; ``conv_method`` (auto | ghost | per_example) forces a branch."""
    choose_conv_method(conv_method, None, None, None)  # validates the name
    registry = LayerRegistry()
    registry.insert(tf.keras.layers.Dense, dense_computation)
    registry.insert(tf.keras.layers.Conv2D, _conv2d(conv_method))
    registry.insert(tf.keras.layers.Conv2DTranspose, _conv2d_transpose(conv_method))
    registry.insert(tf.keras.layers.GroupNormalization, group_norm_computation)
    return registry


LAYER_REGISTRY = make_layer_registry()


def check_clippable(layer) -> None:
    """InputError for a registered layer class in a configuration the functions above do not cover."""
    where = f"layer {layer.name!r} ({type(layer).__name__})"
    if isinstance(layer, tf.keras.layers.Conv2D):  # Conv2DTranspose too
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            raise InputError(f"{where}: DP-SGD clipping supports channels_last convolutions only")
        if getattr(layer, "groups", 1) != 1:
            raise InputError(f"{where}: DP-SGD clipping does not support grouped convolutions (groups={layer.groups})")
        if isinstance(layer, tf.keras.layers.Conv2DTranspose) and (
                layer.output_padding is not None or tuple(layer.dilation_rate) != (1, 1)):
            raise InputError(f"{where}: DP-SGD clipping supports transposed convolutions without "
                             f"output_padding or dilation only")
    if isinstance(layer, tf.keras.layers.GroupNormalization):
        ndim = layer.input_spec.ndim if layer.input_spec is not None else None
        if ndim is None or layer.axis % ndim != ndim - 1:
            raise InputError(f"{where}: DP-SGD clipping supports GroupNormalization over the last axis only")
