"""Constants shared by several layers (the bottom layer: imports nothing of the package).

``IGNORE_INDEX``: the label value that no loss counts (PyTorch's ``cross_entropy`` default and the HF
convention). The collator writes it for prompts, image prefixes and padding; the model's causal-LM loss
and the stage steps pad and mask with it.
"""

IGNORE_INDEX = -100
