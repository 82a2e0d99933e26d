"""mlflow-recycle: recycle soft prompts to new base-model versions, as an MLflow plugin.

The core (this package's ``prompt``, ``anchors``, ``recyclers``, ``recycle``) is pure torch;
MLflow glue lives in ``soft_prompt``, ``registry``, ``migrate`` and ``hook``, Lightning in
the sibling package ``lightning_modules``.
"""

from importlib.metadata import PackageNotFoundError, version

from .anchors import Anchors, embedding_table, find_anchors
from .errors import IncompatibleModelError, PromptArtifactError, RecycleError
from .prompt import SoftPrompt
from .recycle import fit_recycler
from .recyclers import Recycler, available_recyclers, get_recycler, load_recycler
from .task import TaskSpec
from .vocab import tokenizer_fingerprint

try:
    __version__ = version("mlflow-recycle")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Anchors",
    "IncompatibleModelError",
    "PromptArtifactError",
    "RecycleError",
    "Recycler",
    "SoftPrompt",
    "TaskSpec",
    "available_recyclers",
    "embedding_table",
    "find_anchors",
    "fit_recycler",
    "get_recycler",
    "load_recycler",
    "tokenizer_fingerprint",
]
