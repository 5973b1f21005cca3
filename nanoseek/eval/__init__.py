"""Evaluation: loss / bits-per-byte and task accuracy (pass@k, maj@k)."""
