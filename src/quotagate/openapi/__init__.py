"""The OpenAPI 3.1 documents of the console API and the LLM API, generated from the code (docs/api.md)."""
