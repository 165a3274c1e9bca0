"""A tiny random-weight Qwen2-style chat model, built locally for the engine
tests (there is no model hub here): a byte-level BPE tokenizer trained on the
Python standard library's source, a chat template that renders tools the
hermes way (`<tool_call>` blocks, so vLLM's `--tool-call-parser hermes` finds
them), and a 2-layer model with random weights. It answers nonsense, but with
real token ids and logprobs, which is what the tests check.

Run with the engine's Python (`.venv-engine/bin/python tests/engine/tinymodel.py DIR`);
it builds DIR once and leaves an existing complete build alone.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

VOCAB_SIZE = 2048  # BPE merges on top of the 256 bytes, specials included
# Room for a real agent's whole prompt (Claude Code's and Codex's system prompts
# and tool lists run to tens of thousands of this tokenizer's tokens).
CONTEXT = 65536
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Not special: vLLM decodes with skip_special_tokens, and the hermes parser must see these in the text.
TOOL_MARKS = ["<tool_call>", "</tool_call>"]

# Hermes-style: tools listed in the system turn, the model's calls as
# <tool_call>{"name": ..., "arguments": ...}</tool_call>, tool results as user-side
# <tool_response> blocks. Earlier assistant turns are rendered as they were.
CHAT_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You may call functions. Their signatures:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call one as <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}
{%- set fn = call.function if call.function is defined else call %}<tool_call>
{"name": "{{ fn.name }}", "arguments": {{ fn.arguments if fn.arguments is string else fn.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def corpus(limit: int = 3_000_000) -> list[str]:
    """Text to train the tokenizer on: the standard library's own source, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text)
        if size >= limit:
            break
    return texts


def build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # Every newline a token of its own: text of newlines re-tokenizes to the very
    # ids the model produced, so a multi-turn session can continue token for token.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    tokenizer.add_tokens([AddedToken(mark, special=False, normalized=False) for mark in TOOL_MARKS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, seed: int = 0):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 32: vLLM's CPU attention needs at least that
        num_key_value_heads=1,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return model


def fingerprint() -> str:
    """Changes when this builder does: a cached build of another version is not reused."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def build(directory: Path) -> Path:
    """The model in `directory` (built there first unless a complete build is present)."""
    done = directory / ".built"
    if done.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(directory)
    build_model(tokenizer).save_pretrained(directory, safe_serialization=True)
    done.write_text(fingerprint())
    return directory


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: tinymodel.py DIR  (builds the tiny model in DIR, once)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(build(Path(sys.argv[1])))
