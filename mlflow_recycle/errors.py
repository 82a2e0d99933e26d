"""Exceptions raised for bad input.

Every message says what was wrong and what to do about it, so a user never has to
read our source to recover. They subclass ``ValueError`` because in every case the
caller passed something unusable, and code that already catches ``ValueError`` keeps
working.
"""


class RecycleError(ValueError):
    """Base class of every error this package raises on purpose."""


class IncompatibleModelError(RecycleError):
    """A prompt or recycler was used with a model it does not fit (dim or tokenizer)."""


class PromptArtifactError(RecycleError):
    """A stored soft prompt is missing, unreadable or inconsistent."""
