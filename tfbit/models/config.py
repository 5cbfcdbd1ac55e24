"""`BitConfig`: the architecture description, speaking Hugging Face's `config.json`."""

import copy
import json
import os

from tfbit.errors import ConfigError, MissingFileError

LAYER_TYPES = ("preactivation", "bottleneck")
PADDINGS = (None, "SAME", "VALID")
ACTIVATIONS = ("relu", "gelu", "silu", "swish", "tanh", "sigmoid", "elu", "selu", "linear")

# Fields in the order transformers writes them; values are the bit-50 defaults.
_DEFAULTS = {
    "num_channels": 3,
    "embedding_size": 64,
    "hidden_sizes": [256, 512, 1024, 2048],
    "depths": [3, 4, 6, 3],
    "layer_type": "preactivation",
    "hidden_act": "relu",
    "global_padding": None,
    "num_groups": 32,
    "drop_path_rate": 0.0,
    "embedding_dynamic_padding": False,
    "output_stride": 32,
    "width_factor": 1,
    # Not a transformers field (transformers ignores it): the eps of the source's weight
    # standardization, 1e-8 for transformers and timm, 1e-10 for the original BiT weights.
    "ws_eps": 1e-8,
}


def read_json(path):
    """The JSON object of a settings file (config.json, preprocessor_config.json); anything else
    is an error naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise MissingFileError(f"no settings file at {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, expected an object of settings")
    return data


def make_div(value, divisor=8):
    """Round a channel count to a multiple of `divisor` (never more than 10% down), as BiT does."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"BitConfig.{name} must be a positive integer, got {value!r}")
    return value


def _label_ids(label2id):
    """`label2id` as {label: class id}; a config.json written by hand may hold anything."""
    if not isinstance(label2id, dict):
        raise ConfigError(f"BitConfig.label2id must be a dict of label: class id, got a {type(label2id).__name__}")
    ids = {}
    for label, value in label2id.items():
        try:
            ids[str(label)] = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"BitConfig.label2id[{label!r}] must be an integer class id, got {value!r}") from None
    return ids


class BitConfig:
    """Configuration of a BiT (ResNetV2 + GroupNorm + Weight Standardization) model.

    Field names, defaults and validation follow `transformers.BitConfig`, so a `config.json`
    written by transformers loads here and the other way round. Keys this class does not know
    are kept (and written back) but otherwise ignored.
    """

    model_type = "bit"

    def __init__(self, out_features=None, out_indices=None, num_labels=None, id2label=None, label2id=None, **kwargs):
        fields = {name: kwargs.pop(name, copy.deepcopy(default)) for name, default in _DEFAULTS.items()}
        self.extra = kwargs  # unknown keys from a foreign config.json: kept, not fatal
        for name, value in fields.items():
            setattr(self, name, value)
        self._validate()
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]
        self.out_features, self.out_indices = self._align_outputs(out_features, out_indices)
        self._set_labels(num_labels, id2label, label2id)

    # -- validation ---------------------------------------------------------------------------
    def _validate(self):
        _positive_int("num_channels", self.num_channels)
        _positive_int("embedding_size", self.embedding_size)
        _positive_int("num_groups", self.num_groups)
        _positive_int("width_factor", self.width_factor)
        for name in ("hidden_sizes", "depths"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value:
                raise ConfigError(f"BitConfig.{name} must be a non-empty list, got {value!r}")
            for v in value:
                _positive_int(name, v)
            setattr(self, name, list(value))
        if len(self.hidden_sizes) != len(self.depths):
            raise ConfigError(
                f"BitConfig.hidden_sizes ({len(self.hidden_sizes)} stages) and BitConfig.depths "
                f"({len(self.depths)} stages) must have the same length"
            )
        if self.layer_type not in LAYER_TYPES:
            raise ConfigError(f"BitConfig.layer_type={self.layer_type!r} is not one of {', '.join(LAYER_TYPES)}")
        if self.global_padding is not None:
            if not isinstance(self.global_padding, str) or self.global_padding.upper() not in PADDINGS:
                raise ConfigError(
                    f"BitConfig.global_padding={self.global_padding!r} is not supported: use None, 'SAME' or 'VALID'"
                )
            self.global_padding = self.global_padding.upper()
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"BitConfig.hidden_act={self.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")
        if (
            isinstance(self.drop_path_rate, bool)
            or not isinstance(self.drop_path_rate, (int, float))
            or not 0.0 <= self.drop_path_rate < 1.0
        ):
            raise ConfigError(f"BitConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")
        if not isinstance(self.embedding_dynamic_padding, bool):
            raise ConfigError(
                f"BitConfig.embedding_dynamic_padding must be a bool, got {self.embedding_dynamic_padding!r}"
            )
        if isinstance(self.ws_eps, bool) or not isinstance(self.ws_eps, (int, float)) or not 0 < self.ws_eps < 1e-2:
            raise ConfigError(f"BitConfig.ws_eps must be a small positive number, got {self.ws_eps!r}")
        self.ws_eps = float(self.ws_eps)
        if self.output_stride not in (8, 16, 32):
            raise ConfigError(f"BitConfig.output_stride must be 8, 16 or 32, got {self.output_stride!r}")
        groups_of = {"embedding_size": self.embedding_size}
        groups_of.update({f"stage{i + 1} channels": c for i, c in enumerate(self.stage_channels)})
        groups_of.update({f"stage{i + 1} bottleneck channels": c for i, c in enumerate(self.mid_channels)})
        for what, channels in groups_of.items():
            if channels % self.num_groups:
                raise ConfigError(f"BitConfig.num_groups={self.num_groups} does not divide the {what} ({channels})")

    def _align_outputs(self, out_features, out_indices):
        """Same rules as transformers' BackboneConfigMixin: default to the last stage."""
        names = self.stage_names
        if out_features is not None:
            if not isinstance(out_features, (list, tuple)):
                raise ConfigError(f"BitConfig.out_features must be a list, got {type(out_features).__name__}")
            out_features = list(out_features)
            unknown = [f for f in out_features if f not in names]
            if unknown:
                raise ConfigError(f"BitConfig.out_features must be a subset of stage_names {names}, got {unknown}")
            if len(set(out_features)) != len(out_features):
                raise ConfigError(f"BitConfig.out_features must not contain duplicates, got {out_features}")
            if out_features != [f for f in names if f in out_features]:
                raise ConfigError(
                    f"BitConfig.out_features must be in the order of stage_names {names}, got {out_features}"
                )
        if out_indices is not None:
            if not isinstance(out_indices, (list, tuple)):
                raise ConfigError(f"BitConfig.out_indices must be a list, got {type(out_indices).__name__}")
            bad = [i for i in out_indices if not isinstance(i, int) or not -len(names) <= i < len(names)]
            if bad:
                raise ConfigError(f"BitConfig.out_indices must be valid indices for stage_names {names}, got {bad}")
            positive = [i % len(names) for i in out_indices]
            if len(set(positive)) != len(positive):
                raise ConfigError(f"BitConfig.out_indices must not contain duplicates, got {list(out_indices)}")
            if positive != sorted(positive):
                raise ConfigError(f"BitConfig.out_indices must be in the order of stage_names, got {list(out_indices)}")
            out_indices = list(out_indices)
        if out_features is None and out_indices is None:
            return [names[-1]], [len(names) - 1]
        if out_features is None:
            return [names[i] for i in out_indices], out_indices
        if out_indices is None:
            return out_features, [names.index(f) for f in out_features]
        if out_features != [names[i] for i in out_indices]:
            raise ConfigError(
                "BitConfig.out_features and BitConfig.out_indices must name the same stages, "
                f"got {out_features} and {out_indices}"
            )
        return out_features, out_indices

    def _set_labels(self, num_labels, id2label, label2id):
        if id2label is not None:
            if not isinstance(id2label, dict):
                raise ConfigError(f"BitConfig.id2label must be a dict, got {type(id2label).__name__}")
            id2label = {int(k): str(v) for k, v in id2label.items()}
            if sorted(id2label) != list(range(len(id2label))):
                raise ConfigError(f"BitConfig.id2label keys must be 0..N-1, got {sorted(id2label)[:10]}")
            if num_labels is not None and num_labels != len(id2label):
                raise ConfigError(
                    f"BitConfig.num_labels={num_labels} does not match the {len(id2label)} entries of id2label"
                )
        else:
            n = 2 if num_labels is None else num_labels
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ConfigError(f"BitConfig.num_labels must be a non-negative integer, got {n!r}")
            id2label = {i: f"LABEL_{i}" for i in range(n)}
        self.id2label = id2label
        self.label2id = {v: k for k, v in id2label.items()} if label2id is None else _label_ids(label2id)

    # -- derived architecture -------------------------------------------------------------------
    @property
    def num_labels(self):
        return len(self.id2label)

    @property
    def stage_channels(self):
        """Output channels of each stage (width factor applied consistently, unlike HF)."""
        return [make_div(h * self.width_factor) for h in self.hidden_sizes]

    @property
    def mid_channels(self):
        return [make_div(c * 0.25) for c in self.stage_channels]

    def stage_plan(self):
        """Per stage: (stride, dilation, first_dilation, drop-path rates of its units), HF's rules."""
        total = sum(self.depths)
        rates = [self.drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        plan, current_stride, dilation, start = [], 4, 1, 0
        for i, depth in enumerate(self.depths):
            stride = 1 if i == 0 else 2
            if current_stride >= self.output_stride:
                dilation *= stride
                stride = 1
            first_dilation = 1 if dilation in (1, 2) else 2
            plan.append((stride, dilation, first_dilation, rates[start : start + depth]))
            current_stride *= stride
            start += depth
        return plan

    # -- serialization --------------------------------------------------------------------------
    def to_dict(self):
        d = dict(self.extra)
        d.update({name: copy.deepcopy(getattr(self, name)) for name in _DEFAULTS})
        d.update(
            model_type=self.model_type,
            out_features=list(self.out_features),
            out_indices=list(self.out_indices),
            stage_names=list(self.stage_names),
            id2label={str(k): v for k, v in self.id2label.items()},
            label2id=dict(self.label2id),
        )
        return d

    @classmethod
    def from_dict(cls, config_dict):
        if not isinstance(config_dict, dict):
            raise ConfigError(f"BitConfig.from_dict expects a dict, got {type(config_dict).__name__}")
        d = dict(config_dict)
        d.pop("stage_names", None)  # derived from depths
        model_type = d.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"config has model_type={model_type!r}, expected 'bit': this is not a BiT checkpoint")
        return cls(**d)

    def to_json_string(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path):
        data = read_json(path)
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, path):
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise MissingFileError(f"no config.json in {path}")
        return cls.from_json_file(file)

    @classmethod
    def from_preset(cls, name, **fields):
        """The architecture of a named preset (`tfbit.presets()`), nothing downloaded; `fields`
        replace the preset's (`num_labels=10`, `id2label=...`, `out_features=...`). Label names
        come with the weights (`from_preset` of a model class): here they are LABEL_<i>."""
        from tfbit.models.presets import get  # the module: `tfbit.presets` is the listing function

        architecture = get(name).architecture
        if fields.get("id2label") is not None:  # the labels' count is the head's size
            del architecture["num_labels"]
        return cls(**{**architecture, **fields})

    def save_pretrained(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.to_json_file(os.path.join(directory, "config.json"))

    def __eq__(self, other):
        return isinstance(other, BitConfig) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"BitConfig {self.to_json_string()}"
