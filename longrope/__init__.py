"""LongRoPE: non-uniform RoPE rescaling, its evolutionary search, long-context fine-tuning and evaluation.

The package holds everything the three entry points (search.py, train.py, evaluate.py) share. Importing it does
no I/O and loads no model.
"""

__version__ = "0.1.0"
