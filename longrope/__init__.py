"""LongRoPE: non-uniform RoPE rescaling, its evolutionary search, long-context fine-tuning and evaluation.

The package holds everything the three entry points (search.py, train.py, evaluate.py) share. Importing it does
no I/O and loads no model.
"""

from pathlib import Path

__version__ = "0.1.0"
# The repository checkout the package runs from (configs, models and data/prepare.py live there).
REPOSITORY = Path(__file__).resolve().parents[1]
