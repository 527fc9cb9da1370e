"""Find super weights in LLM checkpoints: streaming, one-prompt, data-free detection."""

__version__ = "0.3.0"
