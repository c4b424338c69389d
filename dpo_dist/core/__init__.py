"""The pure core: data, tokenization, log-probs, losses, identity, the Arrow cache format.

Imports torch at most (pyarrow for the cache); never DeepSpeed or Ray.
"""
