import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items):
    """The parity suite, the longest file, first: with two workers (pyproject's ``-n 2 --dist loadfile``)
    a long file that started last would run alone at the end."""
    items.sort(key=lambda item: item.path.name != "test_zero.py")  # stable: the rest keep their order
