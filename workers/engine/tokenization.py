"""A small, deterministic WordPiece tokenizer fitted on a dataset's train texts.

Used for transformers models built from a config (random init) when no tokenizer folder is given, so tiny
BERTs work offline. The vocabulary is chosen in plain Python rather than with ``tokenizers``'
WordPieceTrainer: that trainer breaks frequency ties in hash order, so two fits on the same texts can give
different vocabularies, and a teacher and a student built the same way must get identical tokenizers.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# A fast, close approximation of BertPreTokenizer (split on whitespace and punctuation) for counting words.
_WORD = re.compile(r"\w+|[^\w\s]")
_MAX_SUFFIX = 4


def fit_wordpiece_tokenizer(
    texts: Iterable[str], *, vocab_size: int, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Fit an uncased BERT-style WordPiece tokenizer.

    The vocabulary is the special tokens, every character (as a word start and as a ``##`` continuation),
    then the most frequent whole words and ``##`` suffixes (2-4 characters), ties broken alphabetically.
    Words not in the vocabulary split greedily into the longest known pieces, like any WordPiece.

    Args:
        texts: training texts (the train split only, so eval text never shapes the vocabulary).
        vocab_size: upper bound on the vocabulary (the model config's ``vocab_size``).
        model_max_length: longest sequence the model accepts.
    Returns:
        a transformers fast tokenizer (``[CLS] text [SEP]``, pad id 0) that ``save_pretrained`` can write.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw = Counter()
    for text in texts:
        raw.update(_WORD.findall(text.lower()))
    # Re-split the distinct raw words with the tokenizer's own normaliser and pre-tokeniser (cheap: only the
    # distinct words), so the counted words are exactly what the tokenizer will look up.
    words: Counter[str] = Counter()
    for word, count in raw.items():
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(word)):
            words[piece] += count

    chars: Counter[str] = Counter()
    suffixes: Counter[str] = Counter()
    for word, count in words.items():
        for ch in word:
            chars[ch] += count
        for n in range(2, min(_MAX_SUFFIX, len(word) - 1) + 1):
            suffixes["##" + word[-n:]] += count

    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab and len(vocab) < vocab_size:
            vocab[token] = len(vocab)

    for token in SPECIAL_TOKENS:
        add(token)
    for ch, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0])):
        add(ch)
        add("##" + ch)
    candidates = [(count, word) for word, count in words.items() if len(word) > 1 and count > 1]
    candidates += [(count, suffix) for suffix, count in suffixes.items() if count > 1]
    for _, token in sorted(candidates, key=lambda cw: (-cw[0], cw[1])):
        if len(vocab) >= vocab_size:
            break
        add(token)

    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )
