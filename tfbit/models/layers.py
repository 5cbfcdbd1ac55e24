"""Keras layers BiT is made of, NHWC, each registered for `.keras` serialization."""

import keras
from keras import ops

from tfbit.errors import ModelError
from tfbit.private_api import conv_kernel, in_stateless_scope, watch_assignments

_register = keras.saving.register_keras_serializable(package="tfbit")


def conv_padding(global_padding, kernel_size, stride=1, dilation=1):
    """Padding of a BiT conv as HF computes it: "same", "valid" or a symmetric int.

    HF's dynamic SAME padding (any stride, any input size) puts the odd pixel at the end, which
    is exactly TF's "SAME"; its default (None) is symmetric, which differs from TF's "SAME" as
    soon as the stride is 2, so it is applied explicitly.
    """
    if global_padding == "VALID":
        return "valid"
    if global_padding == "SAME":
        return "same"
    pad = ((stride - 1) + dilation * (kernel_size - 1)) // 2
    if stride == 1 and 2 * pad == dilation * (kernel_size - 1):
        return "same"
    return pad


class _WatchedKernel(keras.Variable):
    """A WSConv2D kernel that marks its layer's standardized copy stale whenever it is assigned
    (`set_weights`, `load_weights`, `.keras` loading, checkpoint loading, `kernel.assign`).
    Optimizer updates in TensorFlow write the underlying tf.Variable directly: training calls
    mark the copy stale themselves (`WSConv2D.call`)."""

    standardized_cache = None

    def assign(self, value):
        value = super().assign(value)
        if self.standardized_cache is not None and not in_stateless_scope():
            self.standardized_cache.invalidate()
        return value


class _StandardizedKernelCache:
    """The standardized kernel of one WSConv2D, recomputed at the first inference call after its
    kernel changed, as graph state: a float32 copy and a stale flag, both variables, so compiled
    functions (`predict`, tf.function, XLA) see every change without retracing.

    A plain object, so Keras does not track its variables as layer weights: they are not saved,
    not listed by `get_weights`, and not trained. Keras' SavedModel export collects the
    variables its functions capture. Assignments use `only_first_replica` so that replicas of a
    `tf.distribute` strategy may update them (they all compute the same value).
    """

    def __init__(self, layer):
        self.layer = layer
        kernel = conv_kernel(layer)
        # float32 under any policy, as `standardized_kernel` computes it (no autocast on read)
        self.kernel = keras.Variable(
            initializer="zeros",
            shape=kernel.shape,
            dtype="float32",
            trainable=False,
            autocast=False,
            aggregation="only_first_replica",
            name="standardized_kernel",
        )
        self.stale = keras.Variable(
            initializer=True,
            shape=(),
            dtype="bool",
            trainable=False,
            aggregation="only_first_replica",
            name="standardized_kernel_stale",
        )
        watch_assignments(kernel, _WatchedKernel).standardized_cache = self

    def invalidate(self):
        self.stale.assign(True)

    def read(self):
        def refresh():
            kernel = self.layer.standardized_kernel()
            self.kernel.assign(kernel)
            self.stale.assign(False)
            return kernel

        # An op's result, not the variable: TensorFlow's cond tests a variable predicate by hashing it.
        stale = ops.logical_and(self.stale, True)
        return ops.cond(stale, refresh, lambda: ops.convert_to_tensor(self.kernel))


def _in_strategy_replica():
    """Whether this runs in a `tf.distribute` strategy's replica function (Keras `evaluate` under
    a strategy), where the cache's assignments would synchronize replicas inside a `cond`,
    which TensorFlow refuses (a `merge_call` in a control-flow branch)."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()


@_register
class WSConv2D(keras.layers.Conv2D):
    """Conv2D with weight standardization (per output filter, biased variance), no bias.

    `padding` may be "same", "valid" or an int of symmetric zero padding. The standardization
    is always computed in float32 from the stored kernel, so a mixed-precision policy cannot
    underflow the tiny eps. `standardize=False` is the inference form whose kernel already holds
    standardized weights (see `tfbit.fold_weight_standardization`).

    Inference calls (`training=False`: `predict`, `predict_on_batch`, `evaluate`,
    `model(x, training=False)`) reuse the standardized kernel computed at the first such call
    after the kernel last changed, so they run as fast as the folded form (benchmarks/RESULTS.md).
    Other calls standardize afresh (gradients reach the kernel) and mark the copy stale, as does
    any assignment to the kernel. Under a stateless call (JAX's compiled functions,
    `stateless_call`) the kernel values are arguments, not the variable's, so those standardize
    afresh too, as do calls inside a `tf.distribute` strategy's replicas (validation during a
    distributed `fit`). The copy costs one float32 kernel of memory per layer.
    """

    def __init__(
        self, filters, kernel_size, strides=1, padding="valid", dilation_rate=1, eps=1e-8, standardize=True, **kwargs
    ):
        kwargs.pop("use_bias", None)
        self.explicit_padding = padding if isinstance(padding, int) else 0
        super().__init__(
            filters,
            kernel_size,
            strides=strides,
            dilation_rate=dilation_rate,
            padding="valid" if isinstance(padding, int) else padding,
            use_bias=False,
            **kwargs,
        )
        self.eps = eps
        self.standardize = standardize
        self._standardized_cache = None

    def build(self, input_shape):
        super().build(input_shape)
        if self.standardize and type(conv_kernel(self)) is keras.Variable:
            self._standardized_cache = _StandardizedKernelCache(self)

    def standardized_kernel(self):
        kernel = ops.cast(self.kernel, "float32")
        mean, var = ops.moments(kernel, axes=(0, 1, 2), keepdims=True)
        return (kernel - mean) * ops.rsqrt(var + self.eps)

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        # A private TensorFlow hook (tfbit.private_api): `tf.saved_model.save` must reach the
        # cache's variables, which the functions capture but Keras does not track as weights.
        children = super()._trackable_children(save_type, **kwargs)
        if save_type == "savedmodel" and self._standardized_cache is not None:
            cache = self._standardized_cache
            children.update(standardized_kernel=cache.kernel.value, standardized_kernel_stale=cache.stale.value)
        return children

    def _kernel_for(self, training):
        if not self.standardize:
            return self.kernel
        cache = self._standardized_cache
        if cache is None or in_stateless_scope() or _in_strategy_replica():
            return self.standardized_kernel()
        if training is False:
            return cache.read()
        cache.invalidate()  # a training step may update the kernel after this call
        return self.standardized_kernel()

    def call(self, inputs, training=None):
        if self.explicit_padding:
            p = self.explicit_padding
            inputs = ops.pad(inputs, ((0, 0), (p, p), (p, p), (0, 0)))
        return self.convolution_op(inputs, ops.cast(self._kernel_for(training), self.compute_dtype))

    def compute_output_shape(self, input_shape):
        p = 2 * self.explicit_padding
        n, h, w, c = input_shape
        return super().compute_output_shape((n, None if h is None else h + p, None if w is None else w + p, c))

    def get_config(self):
        config = super().get_config()
        config.pop("use_bias", None)
        config.update(padding=self.explicit_padding or self.padding, eps=self.eps, standardize=self.standardize)
        return config


def _squared(d):
    # d * d, not square(d) or moments(): TFLite turns those into SQUARED_DIFFERENCE, whose int8
    # kernel aborts the whole process (a multiplier >= 1 in its Prepare) when the squares span a
    # much smaller range than their inputs, as the spread of channel means often does.
    return d * d


@_register
class GroupNormActivation(keras.layers.Layer):
    """GroupNorm (biased variance, eps inside the rsqrt) followed by an optional activation.

    Statistics are taken in float32; normalization is then folded into one per-channel scale
    and offset, so the large tensor is read once for the statistics and once for a single
    multiply-add (+ activation). Chosen by measurement: benchmarks/RESULTS.md.
    """

    def __init__(self, groups=32, epsilon=1e-5, activation="relu", **kwargs):
        super().__init__(**kwargs)
        self.groups = groups
        self.epsilon = epsilon
        self.activation = keras.activations.get(activation)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None or channels % self.groups:
            raise ModelError(f"{self.name}: {channels} channels cannot be split into {self.groups} groups")
        self.gamma = self.add_weight(name="gamma", shape=(channels,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(channels,), initializer="zeros")
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: channels})

    def call(self, inputs):
        # Statistics per channel first, then per group by the law of total variance: mean of
        # channel variances + variance of channel means. Each step is two-pass, so this is as
        # accurate as reducing the group directly. Channel sums run over the width, then the
        # height: a float32 sum over all H*W pixels at once (3136 at stage 1 of a 224 px
        # image) lost 10x the accuracy in TF and 40x in TFLite, whose MEAN sums sequentially
        # (measured against float64 on R50x1's stem output); sums of one row (56 pixels there)
        # stay near float32's own rounding, and a whole R50x1 in TFLite as exact as PyTorch's
        # float32. The batch size is never read (reshape -1): a graph that read it (SHAPE)
        # would put a float op into full-int8 TFLite, whose spatial size is fixed.
        channels = self.gamma.shape[0]
        per_group = channels // self.groups
        x = ops.cast(inputs, "float32")
        channel_mean = ops.mean(ops.mean(x, axis=2, keepdims=True), axis=1, keepdims=True)  # (N, 1, 1, C)
        channel_var = ops.mean(ops.mean(_squared(x - channel_mean), axis=2), axis=1)  # (N, C)
        channel_mean = ops.reshape(channel_mean, (-1, self.groups, per_group))
        mean = ops.mean(channel_mean, axis=-1, keepdims=True)  # (N, G, 1)
        var = ops.mean(ops.reshape(channel_var, (-1, self.groups, per_group)), axis=-1, keepdims=True) + ops.mean(
            _squared(channel_mean - mean), axis=-1, keepdims=True
        )
        gamma = ops.reshape(ops.cast(self.gamma, "float32"), (self.groups, per_group))
        scale = gamma * ops.rsqrt(var + self.epsilon)
        offset = ops.reshape(ops.cast(self.beta, "float32"), (self.groups, per_group)) - mean * scale
        scale = ops.cast(ops.reshape(scale, (-1, 1, 1, channels)), self.compute_dtype)
        offset = ops.cast(ops.reshape(offset, (-1, 1, 1, channels)), self.compute_dtype)
        return self.activation(inputs * scale + offset)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(groups=self.groups, epsilon=self.epsilon, activation=keras.activations.serialize(self.activation))
        return config


@_register
class StemMaxPool(keras.layers.Layer):
    """3x3/2 max-pool of the BiT stem.

    With `dynamic_padding` the input is zero-padded TF-SAME style before a VALID pool, as HF
    does: zero (not -inf) padding matters when the stem output can be negative (the
    preactivation stem has no ReLU before the pool).
    """

    def __init__(self, dynamic_padding=False, pool_size=3, strides=2, **kwargs):
        super().__init__(**kwargs)
        self.dynamic_padding = dynamic_padding
        self.pool_size = pool_size
        self.strides = strides

    def _same_pad(self, size):
        k, s = self.pool_size, self.strides
        total = (-(-size // s) - 1) * s + k - size
        # Python ints for static sizes (always under JAX, whose jit needs concrete pad widths);
        # a tensor only for a size unknown until run time in a TF graph.
        total = max(total, 0) if isinstance(total, int) else ops.maximum(total, 0)
        return total // 2, total - total // 2

    def call(self, inputs):
        if self.dynamic_padding:
            shape = ops.shape(inputs)
            inputs = ops.pad(inputs, ((0, 0), self._same_pad(shape[1]), self._same_pad(shape[2]), (0, 0)))
        return ops.max_pool(inputs, self.pool_size, self.strides, padding="valid")

    def compute_output_shape(self, input_shape):
        def out(size):
            if size is None:
                return None
            if self.dynamic_padding:
                return -(-size // self.strides)
            return (size - self.pool_size) // self.strides + 1

        n, h, w, c = input_shape
        return (n, out(h), out(w), c)

    def get_config(self):
        config = super().get_config()
        config.update(dynamic_padding=self.dynamic_padding, pool_size=self.pool_size, strides=self.strides)
        return config


@_register
class DropPath(keras.layers.Layer):
    """Stochastic depth: drops the whole residual branch per example, only in training."""

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        keep = 1.0 - self.rate
        shape = (ops.shape(inputs)[0], 1, 1, 1)
        mask = ops.floor(keep + keras.random.uniform(shape, seed=self.seed_generator, dtype=inputs.dtype))
        return inputs / keep * mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed)
        return config
