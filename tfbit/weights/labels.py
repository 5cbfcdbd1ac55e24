"""Class names of the standard BiT heads, for checkpoints that carry none (timm, .npz)."""

import importlib.util
from pathlib import Path

CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def known_labels(num_labels, name=""):
    """ImageNet-1k (1000) and ImageNet-21k (21843, Google's order) names from timm's bundled
    WordNet lemmas when timm is installed (its data files only: nothing is imported), CIFAR-10
    by file name; None otherwise."""
    if num_labels == 10 and "cifar10" in name.lower().replace("-", ""):
        return list(CIFAR10_LABELS)
    synsets = {1000: "imagenet_synsets.txt", 21843: "imagenet21k_goog_synsets.txt"}.get(num_labels)
    spec = importlib.util.find_spec("timm") if synsets else None
    if spec is None:
        return None
    info = Path(spec.submodule_search_locations[0], "data", "_info")
    lemmas = dict(
        line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text("utf-8").splitlines()
    )
    return [lemmas.get(s, s) for s in (info / synsets).read_text("utf-8").splitlines()]
