"""OpenAI's Responses API (``POST /v1/responses``), forwarded natively to the model server's own.

``parsing`` checks a body and bounds its prompt; ``prompt`` counts it with the model's tokenizer (as the
chat request servers turn it into); ``relay`` relays its typed event stream; ``usage`` reads and writes its
``usage``; ``endpoint`` puts them together with the gateway's admission, forwarding and metering.
"""
