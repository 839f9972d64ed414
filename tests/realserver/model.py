"""A tiny model made at test time, for a real llama.cpp ``llama-server`` to load.

No weights are downloaded: a byte-level BPE tokenizer is trained with Hugging Face ``tokenizers`` on
generated English-ish text, and a llama-architecture GGUF with random weights is written with ``gguf``,
the tokenizer and a ChatML chat template embedded. Everything comes from fixed seeds, so the same
files come out every time (in well under a second).

What matters for the tests is the *tokenizer*, not the weights: llama.cpp must split a prompt into
exactly the tokens that ``tokenizers`` gives for the same text, so that a token count made from the
``tokenizer.json`` (what the gateway can do with a model's own tokenizer) equals what the model server
reports. The model is stored as "gpt2" BPE with the "gpt-2" pre-tokenizer, which is llama.cpp's name for
the ByteLevel pre-tokenizer's regex that the HF tokenizer uses.

The weights are random but shaped so that greedy decoding never picks a special token: every reply
runs to ``max_tokens`` (no early end of turn), which keeps completion counts predictable. See
``_weights``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

SEED = 20240611
VOCAB_SIZE = 1000           # the trained vocabulary incl. the 256 byte tokens and the special tokens
N_EMBD = 64
N_HEAD = 4
N_LAYER = 2
N_FF = 128
CONTEXT_LENGTH = 2048

BOS = "<|endoftext|>"       # as Qwen2: no BOS is added; <|endoftext|> doubles as padding
EOS = "<|im_end|>"          # the end of a ChatML turn is what stops generation
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added but not special, like Qwen2's: always one token, even where special tokens are not parsed.
ADDED_TOKENS = ["<tool_call>", "</tool_call>"]

# ChatML with tools in the Qwen2.5 style. Every tag strips whitespace itself ({%- -%}), so the output
# does not depend on trim_blocks/lstrip_blocks, which transformers sets and other engines may not.
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments ' }}
    {{- 'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
    {{- '{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@dataclass(frozen=True)
class TinyModel:
    directory: Path
    gguf_path: Path
    tokenizer_path: Path      # tokenizer.json
    config_path: Path         # tokenizer_config.json (the chat template, bos/eos)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.tokenizer_path))

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> str:
        """The prompt text, rendered from tokenizer_config.json the way transformers does it."""
        config = json.loads(self.config_path.read_text())
        return render_chat_template(config["chat_template"], messages, tools=tools,
                                    add_generation_prompt=add_generation_prompt,
                                    bos_token=config["bos_token"], eos_token=config["eos_token"])

    def count(self, text: str) -> int:
        """Tokens of an already rendered prompt (special tokens in it are parsed, none are added)."""
        return len(self.tokenizer().encode(text, add_special_tokens=False).ids)


def render_chat_template(template: str, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None,
                         add_generation_prompt: bool, **special_tokens: str) -> str:
    """transformers' ``apply_chat_template(..., tokenize=False)`` without transformers: the same Jinja
    environment (sandboxed, trim_blocks, lstrip_blocks, loop controls), the same ``tojson`` (Python's
    json.dumps, non-ASCII kept) and ``raise_exception``, and the same variables."""

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, tools=tools,
                                            add_generation_prompt=add_generation_prompt, **special_tokens)


# ------------------------------------------------------------------------------------------------------
# The training text: English-ish sentences, chat and tool-call shapes, numbers, code, a little
# non-ASCII, so that the merges cover what the tests send and the pre-tokenizer meets every class of
# character (letters, digits, punctuation, runs of spaces and newlines, contractions, multi-byte text).

_WORD_TEXT = """the a an of to and in is it you that he was for on are as with his they at be this from I have
or by one had not but what all were when we there can your which their said if do will each about how up
out them then she many some so these would other into has more her two like him see time could no make than
first been its who now people my made over did down only way find use may water long little very after
words called just where most know get through back much before go good new write our used me man too any
day same right look think also around another came come work three word must because does part even place
well such here take why things help put years different away again off went old number great tell men say
small every found still between name should home big give air line set own under read last never us left
end along while might next sound below saw something thought both few those always looks show large often
together asked house world going want school important until form food keep children feet land side without
boy once animals life enough took sometimes four head above kind began almost live page got earth need far
hand high year mother light parts country father let night following picture being study second eyes soon
times story boys since white days paper hard near sentence better best across during today others however
sure means knew try told young miles sun ways thing whole hear example heard several change answer room
sea against top turned learn point city play toward five using himself usually weather model server token
budget limit request key gateway stream usage prompt completion minute hour month Paris London Berlin Tokyo
"""
_WORDS = _WORD_TEXT.split()
_NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy"]
_NON_ASCII = ["café", "naïve", "jalapeño", "Zürich", "São Paulo", "crème brûlée", "日本語", "Привет", "αβγ",
              "👋", "🙂", "—", "“quoted”", "…"]
_PUNCT = [".", ".", ".", "!", "?", ";", ":", ","]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), rng.choice(_NAMES))
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
    if rng.random() < 0.1:
        words.insert(rng.randrange(len(words)), rng.choice(_NON_ASCII))
    if rng.random() < 0.15:
        words.insert(rng.randrange(len(words)), rng.choice(["don't", "it's", "we're", "I'm", "they'll", "you've"]))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice(_PUNCT)


def _corpus(rng: random.Random, lines: int = 6000) -> list[str]:
    out: list[str] = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.7:
            out.append(" ".join(_sentence(rng) for _ in range(rng.randint(1, 4))))
        elif kind < 0.85:
            # The tool JSON the chat template writes, so the tests' tool prompts are not all single bytes.
            name = rng.choice(["get_weather", "lookup", "search", "send_email"])
            arg = rng.choice(["city", "query", "to", "unit"])
            out.append(json.dumps({"type": "function", "function": {
                "name": name, "description": _sentence(rng),
                "parameters": {"type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]}}}))
        else:
            indent = " " * rng.choice([0, 2, 4, 8])
            name = f"{rng.choice(_WORDS)}_{rng.randint(1, 9)}"
            out.append(f"{indent}def {name}(x):\n{indent}    return x * {rng.randint(2, 9)}\n")
    return out


def _train_tokenizer(rng: random.Random) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(rng), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tok


# ------------------------------------------------------------------------------------------------------
# The GGUF.

def _vocab(tok: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens in id order, their llama.cpp token types, merges as "a b") from the trained tokenizer,
    as llama.cpp's convert_hf_to_gguf.py writes a GPT-2-style BPE vocabulary."""
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    assert sorted(by_id) == list(range(len(by_id))), "token ids must be dense"
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [int(gguf.TokenType.CONTROL) if t in SPECIAL_TOKENS
             else int(gguf.TokenType.USER_DEFINED) if t in ADDED_TOKENS
             else int(gguf.TokenType.NORMAL) for t in tokens]
    merges = json.loads(tok.to_str())["model"]["merges"]
    # tokenizers >= 0.20 saves merges as pairs; older ones as "a b" strings.
    merge_strings = [" ".join(m) if isinstance(m, list) else m for m in merges]
    return tokens, types, merge_strings


def _weights(n_vocab: int, never: list[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random llama weights (numpy shapes are ggml's reversed: (out, in)), with one twist.

    Dimension 0 of the residual stream is a constant: every token embedding has 4.0 there and no layer
    writes to it (row 0 of each output projection is zero). After the final RMS norm it is therefore
    always positive, and the output rows of the ``never`` tokens are -50 along it and zero elsewhere,
    so their logits are far below any other token's: greedy (or any sane) sampling never emits them.
    Those are the special and added tokens, so a reply never ends early on an end-of-turn token and
    never contains a control token. Every other dimension is random.
    """

    def normal(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    head_dim = N_EMBD // N_HEAD
    w: dict[str, np.ndarray] = {}
    embd = normal(n_vocab, N_EMBD, scale=1.0)
    embd[:, 0] = 4.0
    w["token_embd.weight"] = embd
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        w[p + "attn_q.weight"] = normal(N_HEAD * head_dim, N_EMBD, scale=N_EMBD ** -0.5)
        w[p + "attn_k.weight"] = normal(N_HEAD * head_dim, N_EMBD, scale=N_EMBD ** -0.5)
        w[p + "attn_v.weight"] = normal(N_HEAD * head_dim, N_EMBD, scale=N_EMBD ** -0.5)
        out = normal(N_EMBD, N_HEAD * head_dim, scale=N_EMBD ** -0.5)
        out[0, :] = 0.0
        w[p + "attn_output.weight"] = out
        w[p + "ffn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        w[p + "ffn_gate.weight"] = normal(N_FF, N_EMBD, scale=N_EMBD ** -0.5)
        w[p + "ffn_up.weight"] = normal(N_FF, N_EMBD, scale=N_EMBD ** -0.5)
        down = normal(N_EMBD, N_FF, scale=N_FF ** -0.5)
        down[0, :] = 0.0
        w[p + "ffn_down.weight"] = down
    w["output_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
    output = normal(n_vocab, N_EMBD, scale=0.5)
    output[:, 0] = 0.0
    output[never, :] = 0.0
    output[never, 0] = -50.0
    w["output.weight"] = output
    return w


def _write_gguf(path: Path, tok: Tokenizer) -> None:
    tokens, types, merges = _vocab(tok)
    ids = tok.get_vocab(with_added_tokens=True)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name("quotagate-tiny-test")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp: the GPT-2 regex, i.e. HF's ByteLevel(use_regex=True)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids[BOS])
    writer.add_eos_token_id(ids[EOS])
    writer.add_pad_token_id(ids[BOS])
    writer.add_add_bos_token(False)   # ChatML models add no BOS; the template has all the text
    writer.add_chat_template(CHAT_TEMPLATE)
    never = [ids[t] for t in SPECIAL_TOKENS + ADDED_TOKENS]
    for name, array in _weights(len(tokens), never, np.random.default_rng(SEED)).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_model(directory: Path) -> TinyModel:
    """Write tokenizer.json, tokenizer_config.json and model.gguf into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(random.Random(SEED))
    model = TinyModel(directory=directory, gguf_path=directory / "model.gguf",
                      tokenizer_path=directory / "tokenizer.json", config_path=directory / "tokenizer_config.json")
    tok.save(str(model.tokenizer_path))
    model.config_path.write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": BOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": CONTEXT_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2, ensure_ascii=False) + "\n")
    _write_gguf(model.gguf_path, tok)
    return model
