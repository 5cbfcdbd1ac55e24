"""How tfbit's packages expose their public names: imported with the package (which registers
every layer with Keras, as loading a `.keras` file needs), except in a process started as one
of this distribution's command lines (`python -m tfbit.finetune`, `python -m conversion.<cli>`).

Those must set TensorFlow's environment (C++ log level, oneDNN) before TensorFlow is imported,
since TensorFlow reads it once, and answer `--help` without the 5-10 s that importing it takes;
but Python imports a `-m` module's parent packages first. There the names are imported at
first use, and `tfbit.environment.configure` imports all of them once TensorFlow is set up.
"""

import importlib
import sys

COMMAND_LINE_PACKAGES = ("tfbit", "conversion")


def launched_module():
    """The module of `python -m MODULE`, or None for any other start (script, -c, console)."""
    argv = iter(list(getattr(sys, "orig_argv", ()))[1:])
    for arg in argv:
        if arg in ("-X", "-W", "--check-hash-based-pycs"):
            next(argv, None)  # the option's value
        elif arg == "-m":
            return next(argv, None)
        elif arg.startswith("-m"):
            return arg[2:]
        elif arg in ("-c", "-") or not arg.startswith("-"):
            return None  # a command, stdin or a script: the interpreter's own options end here
    return None


def deferred():
    """True in a process started as one of the distribution's command lines (see above)."""
    module = launched_module()
    return module is not None and module.split(".")[0] in COMMAND_LINE_PACKAGES


def expose(namespace, names):
    """Gives the package whose globals are `namespace` its public `names` ({name: module}):
    resolved at first use through the module `__getattr__` (PEP 562). Returns the function that
    imports them all; the package calls it at once unless `deferred()`."""

    def import_all():
        for name, module in names.items():
            namespace[name] = getattr(importlib.import_module(module), name)

    def __getattr__(name):
        if name not in names:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        import_all()
        return namespace[name]

    namespace["__getattr__"] = __getattr__
    namespace["__all__"] = list(names)
    return import_all
