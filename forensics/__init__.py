"""llm-forensics: evidence on whether one language model was derived from another."""

__version__ = "0.4.0"
