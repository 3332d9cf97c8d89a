"""Procedurally rendered shape scenes: the embedded model's dataset and its prompt-fidelity evaluator."""
