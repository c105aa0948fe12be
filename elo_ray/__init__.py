"""elo-ray: ELO continual pretraining of multilingual LLMs (arXiv 2601.03648) on Ray."""

__version__ = "0.1.0"
