"""A tiny, randomly initialised causal LM and its tokenizer, saved in HF format.

The tokenizer is byte-level with no merges (every byte is a token, so "é" or
"日" take several tokens: good for testing incremental decoding) plus the
ChatML special tokens and a ChatML chat template. The model is a 2-layer
Llama with a wide output layer, so its greedy choices are decisive (padding
or batching cannot flip them through rounding), and with the special tokens'
output rows zeroed, so greedy decoding never ends early: a reply is exactly
``max_new_tokens`` long unless a test says otherwise.

Building and saving takes well under a second.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# ChatML with tools, in the Hermes / Qwen2.5 way.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    "Call a tool as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{% for call in message.get('tool_calls', []) %}<tool_call>\n"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "\n</tool_call>{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0)
        for token in SPECIAL_TOKENS:
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)] = 0.0
    return model.eval()


def snap_to_four_bits(weight) -> None:
    """Round a weight in place as llama.cpp's Q4_1 does, then de-quantize it.

    Each group of 32 inputs gets 16 evenly spaced values from its minimum
    (code 0) to its maximum (code 15): what a de-quantized Q4_1 GGUF holds.
    """
    import torch

    with torch.no_grad():
        groups = weight.view(weight.shape[0], -1, 32)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = (high - low) / 15
        groups.copy_(((groups - low) / scale).round() * scale + low)


def snap_to_eight_bits(weight) -> None:
    """Round a weight in place as llama.cpp's Q8_0 does, then de-quantize it.

    Each group of 32 inputs gets a scale, its largest magnitude over 127,
    times integers from -127 to 127.
    """
    import torch

    with torch.no_grad():
        groups = weight.view(weight.shape[0], -1, 32)
        scale = groups.abs().amax(-1, keepdim=True) / 127
        groups.copy_((groups / torch.where(scale > 0, scale, 1)).round() * scale)


def save_tiny_model(folder: Path, four_bit: bool = False,
                    chat_template: str = CHAT_TEMPLATE) -> Path:
    """Build the tokenizer and the model and save both into ``folder``.

    ``four_bit``: the weights as the bundled Q4_1 GGUF's: the decoder layers'
    linear weights on a Q4_1 grid, the output layer (259 wide) on Q8_0's.
    ``chat_template``: e.g. TOOLS_TEMPLATE, for a model that takes tools.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    model = build_model(tokenizer)
    if four_bit:
        for layer in model.model.layers:
            for module in layer.modules():
                if type(module).__name__ == "Linear":
                    snap_to_four_bits(module.weight)
        snap_to_eight_bits(model.lm_head.weight)
    model.save_pretrained(folder)
    return folder


def save_tiny_sliding_model(folder: Path) -> Path:
    """A tiny Mistral with a sliding window of 16 tokens: its cache layers are
    transformers' sliding ones, not the engine's growing ones."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        sliding_window=16, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    MistralForCausalLM(config).eval().save_pretrained(folder)
    return folder
