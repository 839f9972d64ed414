"""quotagate: a self-hosted gateway for LLM inference keys."""

__version__ = "0.1.0"
