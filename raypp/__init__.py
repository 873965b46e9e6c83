"""raypp: serve one LLM replica over TP x PP workers on Ray, with bubble metrics."""
__version__ = "0.1.0"
