"""ecobatch: an energy-aware adaptive batching proxy for LLM serving."""

__version__ = "0.1.0"
