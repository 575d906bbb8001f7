"""Silence the library warnings a user of this pipeline cannot act on, and nothing else.

Each entry is matched by message *and* category (and, where the library is known, the module
that raises it), so an unrelated warning -- from these libraries or from our own code -- still
shows. ``install()`` is idempotent and cheap; call it before the libraries are imported (the
CLI, the flow module and the benchmarks do). Warning filters and logger filters are
process-global, so Prefect task threads are covered too.
"""
from __future__ import annotations

import logging
import os
import re
import warnings

# (message regex, category, module regex, why it is harmless here)
KNOWN_WARNINGS: list[tuple[str, type[Warning], str, str]] = [
    (r"Initializing an NVTabular Dataset in CPU mode", UserWarning, r"merlin\.io\.dataset",
     "CPU is a supported ETL device of this pipeline (GPU is picked when present)"),
    (r"PyTorch dtype mappings did not load successfully", UserWarning, r"merlin\.dtypes",
     "the TensorFlow stack does not use PyTorch, which is not installed"),
    (r"The '\w+' attribute with value .* was provided to the `Field\(\)` function", Warning, r"pydantic",
     "Prefect's own settings models (pydantic UnsupportedFieldAttributeWarning)"),
]

# The same, for child Python processes (Prefect's temporary API server, which prints the pydantic one):
# PYTHONWARNINGS entries "action:message prefix:category:module", builtin categories only.
CHILD_WARNINGS = ",".join([
    "ignore:Initializing an NVTabular Dataset in CPU mode:UserWarning:merlin.io.dataset",
    "ignore:PyTorch dtype mappings did not load successfully:UserWarning:merlin.dtypes.mappings.torch",
    "ignore:The 'deprecated' attribute with value True was provided to the `Field()` function"
    ":UserWarning:pydantic._internal._generate_schema",
])

# logger name -> message regexes (libraries that report through `logging`, not `warnings`)
KNOWN_LOG_MESSAGES: dict[str, list[str]] = {
    "tensorflow": [
        r"^Please fix your imports\. Module tensorflow\.python\.training\.tracking",  # merlin-models on TF 2.12
        # loading a saved encoder for inference only (retrieval): nothing to compile
        r"^No training configuration found in save file, so the model was \*not\* compiled",
    ],
    "absl": [
        r"^Found untraced functions such as",  # every Keras SavedModel export of a Merlin model
    ],
}


class DropKnownMessages(logging.Filter):
    """A logger filter that drops records whose message matches one of ``patterns``."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record is not ours to hide
            return True
        return not any(p.search(msg) for p in self.patterns)


_LOG_FILTERS: dict[str, DropKnownMessages] = {}


def _pydantic_category() -> type[Warning]:
    try:
        from pydantic.warnings import UnsupportedFieldAttributeWarning

        return UnsupportedFieldAttributeWarning
    except ImportError:  # older pydantic: it never raised it
        return UserWarning


def install() -> None:
    """Install the filters (idempotent: ``warnings.filterwarnings`` replaces an identical entry)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up notices
    current = os.environ.get("PYTHONWARNINGS", "")
    if CHILD_WARNINGS not in current:
        os.environ["PYTHONWARNINGS"] = f"{current},{CHILD_WARNINGS}" if current else CHILD_WARNINGS
    for message, category, module, _ in KNOWN_WARNINGS:
        if module == r"pydantic":
            category, module = _pydantic_category(), r"pydantic\..*"
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, patterns in KNOWN_LOG_MESSAGES.items():
        if name not in _LOG_FILTERS:
            _LOG_FILTERS[name] = DropKnownMessages(patterns)
        logger = logging.getLogger(name)
        if _LOG_FILTERS[name] not in logger.filters:
            logger.addFilter(_LOG_FILTERS[name])


def show_progress(level: int = logging.INFO) -> None:
    """Let ``pipeline_lib.*`` progress lines (epochs, Triton start, ETL) through: the root logger is
    at WARNING by default (Prefect's too), which would drop them."""
    lib = logging.getLogger("pipeline_lib")
    if lib.level == logging.NOTSET or lib.level > level:
        lib.setLevel(level)
