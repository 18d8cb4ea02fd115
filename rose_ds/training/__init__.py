"""What the training recipes in ``launch/`` share: arguments, processes, data, evaluation, metrics,
checkpoints and the DeepSpeed JSON (the recipe/components split of torchtune's ``training/``).

The method itself (``rose_ds.config``, ``selection``, ``optim``, ``zero``, ``hf`` ...) imports nothing
from here. Every module raises a :class:`RecipeError` subclass for bad input: one line naming what is
wrong and how to fix it, which a recipe prints as its exit-2 message.
"""


class RecipeError(ValueError):
    """Bad input to a recipe: the message is one line naming what is wrong and how to fix it."""


__all__ = ["RecipeError"]
