"""The private Keras/TensorFlow names tfbit relies on still exist in the installed releases
(tfbit/private_api.py lists each with its reason), and no other module reaches for private
names."""

import inspect
import os
import re

import keras
import pytest

from tfbit import private_api

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("owner", sorted(private_api.OVERRIDDEN))
def test_overridden_private_hooks_exist_with_their_parameters(owner):
    name, parameters = private_api.OVERRIDDEN[owner]
    cls = eval(owner, {"keras": keras})
    assert hasattr(cls, name), (
        f"{owner}.{name} is gone in Keras {keras.__version__} (checked on "
        f"{private_api.CHECKED_ON}): tfbit's override of it no longer runs"
    )
    signature = inspect.signature(getattr(cls, name))
    missing = [p for p in parameters if p not in signature.parameters]
    assert not missing, f"{owner}.{name}{signature} lost {missing}: update tfbit's override"


def test_conv_kernel_is_the_stored_variable():
    layer = keras.layers.Conv2D(4, 3)
    layer.build((None, 8, 8, 2))
    kernel = private_api.conv_kernel(layer)
    assert type(kernel) is keras.Variable and any(kernel is w for w in layer.weights)


def test_watch_assignments_keeps_the_variables_state():
    class Watched(keras.Variable):
        assigned = 0

        def assign(self, value):
            type(self).assigned += 1
            return super().assign(value)

    variable = keras.Variable([1.0, 2.0])
    assert private_api.watch_assignments(variable, Watched) is variable
    variable.assign([3.0, 4.0])
    assert Watched.assigned == 1 and variable.numpy().tolist() == [3.0, 4.0]
    with pytest.raises(TypeError, match="is a Watched, not a keras.Variable"):
        private_api.watch_assignments(variable, Watched)


def test_stateless_scope_is_seen():
    from keras import StatelessScope

    assert not private_api.in_stateless_scope()
    with StatelessScope():
        assert private_api.in_stateless_scope()


def test_tflite_schema_reads_and_writes_a_model():
    import tensorflow as tf

    schema, utils = private_api.tflite_schema(), private_api.tflite_flatbuffer_utils()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [tf.function(lambda x: x * 2.0).get_concrete_function(tf.TensorSpec([1, 3], tf.float32))]
    )
    model = utils.read_model_from_bytearray(bytearray(converter.convert()))
    assert isinstance(model, schema.ModelT) and model.subgraphs[0].tensors[0].type == schema.TensorType.FLOAT32
    assert schema.Model.GetRootAs(bytes(utils.convert_object_to_bytearray(model)), 0).SubgraphsLength() == 1


def test_no_other_module_uses_private_keras_or_tensorflow_modules():
    pattern = re.compile(r"\b(keras\.src|tensorflow\.python|tf\.python|tensorflow\.lite\.(python|tools))\b|\._kernel\b")
    found = []
    for package in ("tfbit", "conversion", "benchmarks", "tools"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for file in files:
                path = os.path.join(folder, file)
                if not file.endswith(".py") or path.endswith(os.path.join("tfbit", "private_api.py")):
                    continue
                for number, line in enumerate(open(path, encoding="utf-8"), 1):
                    if pattern.search(line.split("#")[0]):
                        found.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not found, "private API outside tfbit/private_api.py:\n" + "\n".join(found)
