"""The command lines (`python -m conversion.convert`, ...), built on the tfbit library.

Their exceptions derive from `tfbit.errors.TfbitError`, which their modules import before
parsing the arguments, when importing the `tfbit` package would import Keras and TensorFlow
(conversion/environment.py explains why that comes later). `tfbit/errors.py` imports nothing,
so it is loaded here on its own as `tfbit.errors`; the `tfbit` package imported later takes
that same module, so the classes are the same objects either way.
"""

import importlib.machinery
import importlib.util
import sys


def _load_tfbit_errors():
    if "tfbit" in sys.modules or "tfbit.errors" in sys.modules:
        return  # `from tfbit.errors import ...` finds it
    package = importlib.util.find_spec("tfbit")  # finds, imports nothing
    spec = importlib.machinery.PathFinder.find_spec("tfbit.errors", package.submodule_search_locations)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tfbit.errors"] = module
    spec.loader.exec_module(module)


_load_tfbit_errors()
