"""Built-in models and datasets (torch + numpy/scikit-learn/mnist1d; the ``transformers`` models
import it when built), and the cache of generated data and FP32 baselines."""
