"""Explanation methods as pure functions of tensors and callables (no hooks, no engine)."""
