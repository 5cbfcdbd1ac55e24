"""`BitPreprocessing`: BitImageProcessor as a Keras layer, for functional models and `tf.data`.

The computation is `tfbit.preprocessing.tf_processor` (the serving graph's preprocessing), so a model with this
layer in front takes what the SavedModel's `serving_default` takes after decoding: images of any
size, uint8 or floats holding 0-255 values. On uint8 images it equals the Python processor (its
fixed-point resize); floats are resized with TF's antialiased resize. TensorFlow backend only.
"""

import keras

from tfbit.preprocessing import tf_processor
from tfbit.preprocessing.processor import BitImageProcessor


@keras.saving.register_keras_serializable(package="tfbit")
class BitPreprocessing(keras.layers.Layer):
    """Resize the shortest edge, center crop, rescale and normalize, as a BitImageProcessor
    configuration says.

    Args:
        processor: a `BitImageProcessor`, its `to_dict()` (e.g. a parsed
            `preprocessor_config.json`), or None for transformers' defaults.
        backend: which transformers implementation the arithmetic follows ("torchvision" or
            "pil"); default: the processor's own, "torchvision" for a dict.

    Input: (N, H, W, C) images of one size or (H, W, C) one image (as in a `tf.data` map),
    C in 1, 3, 4, uint8 or floats holding 0-255 values; a `tf.RaggedTensor` batch of different
    sizes works too. Output: float32 (N, h, w, 3) (or (h, w, 3)) whatever the dtype policy, as
    the processor's output is float32; the next layer casts it to its own compute dtype.
    """

    def __init__(self, processor=None, backend=None, **kwargs):
        # float32 always: 0-255 pixel values and the normalized output are what the processor
        # computes in float32; autocast would round floats to a mixed policy's float16 first.
        super().__init__(**{**kwargs, "dtype": "float32", "autocast": False})
        if isinstance(processor, BitImageProcessor):
            backend = backend or processor.backend
            processor = processor.to_dict()
        self.processor = BitImageProcessor.from_dict(processor or {}, backend=backend or "torchvision")

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """From `preprocessor_config.json` (or the folder holding it), like the processor."""
        return cls(BitImageProcessor.from_pretrained(path), **kwargs)

    def call(self, images):
        out = tf_processor.preprocess_images(images, self.processor)  # always a batch
        return out if len(images.shape) == 4 else out[0]

    def compute_output_shape(self, input_shape):
        height, width = self.processor.fixed_output_size or (None, None)
        channels = 3 if self.processor.do_convert_rgb else input_shape[-1]
        return (*input_shape[:-3], height, width, channels)

    def compute_output_spec(self, images):
        return keras.KerasTensor(self.compute_output_shape(images.shape), "float32")

    def get_config(self):
        config = super().get_config()
        config.pop("dtype", None)  # always float32 (see __init__)
        return {**config, "processor": self.processor.to_dict(), "backend": self.processor.backend}
