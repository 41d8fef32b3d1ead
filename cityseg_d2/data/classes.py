"""The class sets a Cityscapes dataset can be registered with, taken from cityscapesscripts' label table."""
from cityscapesscripts.helpers.labels import labels, name2label

_EVALUATED = [label for label in labels if label.hasInstances and not label.ignoreInEval]

# cityscapes10 appends caravan and trailer (instance classes the official benchmark ignores) after the 8 evaluated
# classes, so the contiguous ids of the 8 stay the same in both sets.
CLASS_SETS = {
    "cityscapes8": tuple(_EVALUATED),
    "cityscapes10": tuple(_EVALUATED + [name2label["caravan"], name2label["trailer"]]),
}


def class_set_labels(class_set):
    """The cityscapesscripts Label tuples of a class set, in contiguous-id order."""
    if class_set not in CLASS_SETS:
        raise ValueError(f"unknown class set {class_set!r}; choose one of {sorted(CLASS_SETS)}")
    return CLASS_SETS[class_set]


def resolve_label(name):
    """(Label, is_crowd) for a polygon's label name, or None when cityscapesscripts does not know it.

    Like cityscapesscripts' json2instanceImg, an unknown name ending in "group" (e.g. "cargroup") is a crowd
    region of the label without that suffix.
    """
    label = name2label.get(name)
    if label is not None:
        return label, False
    if name.endswith("group"):
        label = name2label.get(name[: -len("group")])
        if label is not None:
            return label, True
    return None
