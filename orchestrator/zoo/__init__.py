"""Built-in models and datasets (torch + numpy/scikit-learn only)."""
