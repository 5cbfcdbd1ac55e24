"""The command lines (`python -m conversion.convert`, ...), built on the tfbit library.

Their exceptions derive from `tfbit.errors.TfbitError`, which their modules import before
parsing the arguments, and they name a source file of another kind (`tfbit.filetypes`) before
loading anything, when importing the `tfbit` package would import Keras and TensorFlow
(conversion/environment.py explains why that comes later). Those two modules import neither, so
they are loaded here on their own as `tfbit.errors` and `tfbit.filetypes`; the `tfbit` package
imported later takes those same modules, so the classes are the same objects either way.
"""

import importlib.machinery
import importlib.util
import sys


def _load_alone(name):
    if "tfbit" in sys.modules or name in sys.modules:
        return  # `from tfbit.<module> import ...` finds it
    package = importlib.util.find_spec("tfbit")  # finds, imports nothing
    spec = importlib.machinery.PathFinder.find_spec(name, package.submodule_search_locations)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_load_alone("tfbit.errors")
_load_alone("tfbit.filetypes")  # imports tfbit.errors
