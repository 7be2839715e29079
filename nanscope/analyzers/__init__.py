"""Analyzers: one module per family of causes, registered by stable code (see registry.py)."""

from nanscope.analyzers import (  # noqa: F401  (register the built-ins)
    boxes, checkpoint_fit, loss, numerics, origin, supervision, targets, text, transformers,
)
from nanscope.analyzers.context import AnalysisContext
from nanscope.analyzers.registry import Analyzer, get, register, registered, run_analyzers

__all__ = ["AnalysisContext", "Analyzer", "get", "register", "registered", "run_analyzers"]
