"""Stage: INT8 — quantization, recipe choice, fallback, pick, graph rewrites, layouts, optimization."""
