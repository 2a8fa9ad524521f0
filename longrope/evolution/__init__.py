"""The LongRoPE evolutionary search (Algorithm 1 of arXiv 2402.13753) as a pure, resumable ask/tell algorithm.

The search knows nothing of models: the caller evaluates candidates and tells their fitness (perplexity, lower is
better). Everything random happens inside :meth:`EvolutionSearch.ask`, from one seeded ``numpy`` generator whose
state is part of :meth:`EvolutionSearch.state_dict`, so

* a run saved after any ``tell`` and resumed gives exactly the result of an uninterrupted run with the same seed;
* the order and grouping in which the caller evaluates a generation (one process or many) cannot change the outcome.

Search space (LongRoPE Table 4): one rescale factor per RoPE frequency pair on a 0.01 grid in [1, 1.25 * scale],
monotone non-decreasing; optionally the start tokens n (from a fixed set) and the attention scaling (mscale).
Variants: ``lambda`` (the released ``dim_mono``), ``lambda_start`` (also n, as in the internal ``dim_mono_n``),
``piecewise`` (``dim_piece_mono``: dims <= alpha keep 1, dims > beta get the scale, dims in between are searched)
and ``longrope2`` (LongRoPE2's critical-dimension search: dims >= d_rcd searched in [s, 2s], dims below NTK-filled).

Two modes (``EvolutionConfig.mode``; ``fast`` is the default):

* ``paper``: Algorithm 1 as published. Every candidate is scored on all ``num_samples`` samples.
* ``fast``: cheaper at equal quality. The caller scores a candidate one sample at a time and asks
  :meth:`EvolutionSearch.should_continue` after each sample. A candidate that cannot reach the current top-k is
  stopped (``stop_rule="bound"``: proved with an NLL floor; ``"race"``, the default: also predicted from its first
  samples with a calibrated error bar), and one that is in the top-k but not a new best is accepted with its
  predicted fitness. Only possible new bests are scored in full, so the reported best is always exact. The search
  itself is also greedier (each knob can be turned back to Algorithm 1's behaviour): the top ``elite_size`` (4)
  breed and set the stop threshold instead of the top ``num_parents``; a generation's children are bred in waves
  of ``wave_size`` (8), each from the elite the waves before it left; a mutation moves genes by multiplicative
  log-normal steps (``mutation_sigma``, 0.2) instead of redrawing them anywhere between their neighbours, and the
  step adapts after every wave by the 1/5 success rule (``adapt_sigma``); and the search starts from the seeds
  alone instead of ``population_size`` random mutations of them (``seeds_only_start``). On the tiny model these
  reach the paper mode's final fitness with 0.05-0.13x its tokens (median 0.085x over 6 seeds,
  ``benchmarks/README.md``).

Fitness of per-sample scores: ``exp(mean_j nll_j)`` where ``nll_j`` is the mean negative log-likelihood per token of
sample j (nats); with equal-length samples (the paper truncates every sample to the target length) this is the
perplexity over all tokens.

Modules, one job each: ``space`` (the search space, candidates, the factor grid), ``config`` (how the search runs),
``variants`` (one class of operators per variant), ``records`` (what is kept of each candidate, fitness, ranking),
``racing`` (fast mode's stop decisions and step adaptation), ``search`` (the ask/tell loop and its saved state) and
``checks`` (argument checks). This package re-exports the public names.
"""

from longrope.evolution.config import MODES, NLL_FLOORS, STOP_RULES, EvolutionConfig
from longrope.evolution.records import Evaluation, fitness_from_sample_nll
from longrope.evolution.search import STATE_FORMAT, EvolutionSearch
from longrope.evolution.space import (
    PAPER_START_TOKENS,
    VARIANTS,
    Candidate,
    SearchSpaceConfig,
    critical_dimension_range,
)

__all__ = [
    "MODES",
    "NLL_FLOORS",
    "PAPER_START_TOKENS",
    "STATE_FORMAT",
    "STOP_RULES",
    "VARIANTS",
    "Candidate",
    "Evaluation",
    "EvolutionConfig",
    "EvolutionSearch",
    "SearchSpaceConfig",
    "critical_dimension_range",
    "fitness_from_sample_nll",
]
