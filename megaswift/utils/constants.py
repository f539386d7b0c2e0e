"""Constants shared across layers."""

#: The label of a position that is not trained (``torch.nn.functional.cross_entropy``'s default ignore_index).
IGNORE_INDEX = -100
