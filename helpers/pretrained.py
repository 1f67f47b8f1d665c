"""Pretrained Hugging Face checkpoints for the lessons' optional cells, from the local cache only.

The course never downloads at run time: a cell that shows a real checkpoint (lesson 03's BERT
heads, lesson 05's GPT-2) runs when the checkpoint is already on disk, and otherwise says in
one line why it skipped. Get one once, while online, with
``transformers.AutoTokenizer.from_pretrained(name)`` and the model class's
``from_pretrained(name)``.
"""

from __future__ import annotations

from typing import Any

from helpers.device import is_autograding


def local_pretrained(model_class: str, name: str, **kwargs: Any) -> tuple[Any, Any] | None:
    """``(tokenizer, model)`` for checkpoint ``name`` loaded with ``transformers.<model_class>``
    from local files only, or ``None`` after printing why not (autograding, no
    ``transformers``, no local copy). ``kwargs`` go to the model's ``from_pretrained``."""
    if is_autograding():
        print("skipped: not while autograding")
        return None
    try:
        import transformers
    except ImportError:
        print("skipped: the transformers package is not installed")
        return None
    transformers.logging.set_verbosity_error()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = getattr(transformers, model_class).from_pretrained(name, local_files_only=True, **kwargs)
    except (OSError, ValueError) as error:
        print(f"skipped: no local copy of the {name} checkpoint ({type(error).__name__})")
        return None
    return tokenizer, model
