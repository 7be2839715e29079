"""Analyzers: one module per family of causes, registered by stable code (registry.py), run by run.py."""

from nanscope.analyzers.context import AnalysisContext
from nanscope.analyzers.registry import Analyzer, register
from nanscope.analyzers.run import get, registered, run_analyzers

__all__ = ["AnalysisContext", "Analyzer", "get", "register", "registered", "run_analyzers"]
