"""tinylm: train small GPT language models and measure which training mechanics matter."""

__version__ = "0.1.0"
