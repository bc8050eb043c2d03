"""A byte-level BPE tokenizer with a ChatML template, built offline for random test models of any vocabulary size."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: pad, bos, eos
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_level_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Specials, the 256 byte symbols, then merges (byte pairs, then longer) until `vocab_size` ids exist."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: (not c.isalnum(), c))
    minimum = len(SPECIAL) + len(alphabet)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} for a byte-level tokenizer, got {vocab_size}")
    vocab = {token: i for i, token in enumerate(SPECIAL + alphabet)}
    merges: list[tuple[str, str]] = []
    tokens = list(alphabet)
    prefix = 0
    while len(vocab) < vocab_size:
        left = tokens[prefix]
        for right in alphabet:
            if len(vocab) >= vocab_size:
                break
            vocab[left + right] = len(vocab)
            merges.append((left, right))
            tokens.append(left + right)
        prefix += 1
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=SPECIAL[0],
        bos_token=SPECIAL[1],
        eos_token=SPECIAL[2],
        additional_special_tokens=SPECIAL,
        chat_template=CHATML,
    )
