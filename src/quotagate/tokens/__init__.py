"""Counting tokens with a model's own tokenizer, as its model server will: exact accounting.

``counter.TokenCounter`` holds one model's tokenizer (Hugging Face ``tokenizers``, from the
``tokenizer.json`` the model ships with) and its chat template (Jinja, rendered as transformers'
``apply_chat_template`` does). Models without one keep the byte bound of ``gateway/parsing.py``.
"""
