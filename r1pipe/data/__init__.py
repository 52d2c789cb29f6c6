"""Data for r1pipe: the shipped tiny tokenizer, the embedded synthetic arithmetic task, and prompt-dataset loading.

`tokenizer` builds/loads the tokenizer asset, `task` generates verifiable rows, `datasets` loads and
validates prompt files (or builtin task splits) and formats prompts with the chat template.
Submodules are imported on first use so `python -m r1pipe.data.tokenizer` stays warning-free.
"""

__all__ = ["TINY_TOKENIZER_DIR", "load_tiny_tokenizer"]


def __getattr__(name):
    if name in __all__:
        from r1pipe.data import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module 'r1pipe.data' has no attribute {name!r}")
