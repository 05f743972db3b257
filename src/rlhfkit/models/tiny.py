"""Build a tiny random-init causal LM (or reward model) plus a tokenizer trained locally, offline.

Tests and the demo use these: nothing is downloaded. The saved folder loads with plain
``AutoTokenizer.from_pretrained`` / ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>"]

# Used when a tokenizer ships without a chat template. Every assistant turn ends with EOS so that a
# model trained on it learns to stop, and nothing follows that EOS: a conversation's text then ends at the
# token a reward model reads (users score apply_chat_template(messages) text); the prompt ends with the
# assistant header.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ '\\n' }}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)
# A template that also renders ``tools=`` (as Qwen's and Llama 3's do), in one short line a tiny model can
# read past: "Tools: capital_of(country) add(a, b)" in a system turn; tool turns are user turns in
# <tool_response> tags (Qwen 2.5's convention). The demo world's tool demo (configs/tools.yaml) uses it.
TOOLS_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>{{ '\\n' }}Tools:{% for t in tools %} {{ t['function']['name'] }}("
    "{{ t['function']['parameters']['properties'] | list | join(', ') }}){% endfor %}{{ '\\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'tool' %}"
    "<|user|>{{ '\\n' }}<tool_response>{{ '\\n' }}{{ message['content'] }}{{ '\\n' }}</tool_response>{{ '\\n' }}"
    "{% else %}<|{{ message['role'] }}|>{{ '\\n' }}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)
CHAT_TEMPLATES = {"default": DEFAULT_CHAT_TEMPLATE, "tools": TOOLS_CHAT_TEMPLATE}


def tools_line(schemas: Sequence[dict]) -> str:
    """The system text :data:`TOOLS_CHAT_TEMPLATE` renders for ``tools=schemas`` (to write it into data)."""
    return "Tools:" + "".join(f" {s['function']['name']}({', '.join(s['function']['parameters']['properties'])})"
                              for s in schemas)


# Every fallback template rlhfkit has written into saved tokenizers (the first one put a newline after an
# assistant's EOS): a tokenizer carrying one of them has no chat template of its own.
FALLBACK_CHAT_TEMPLATES = (
    DEFAULT_CHAT_TEMPLATE,
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ '\\n' }}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}",
)

_WORDS = (
    "the a an of to and in is it that for on with as was be by at this are from or have not but "
    "what all were when we there can you your which their said if do will each about how up out "
    "them then she many some so these would other into has more her two like him see time could no "
    "make than first been its who now people my made over did down only way find use may water long "
    "little very after words called just where most know get through back much before go good new "
    "write our used me man too any day same right look think also around another came come work three "
    "word must because does part even place well such here take why things help put years different "
    "away again off went old number great tell men say small every found still between name should "
    "home big give air line set own under read last never us left end along while might next sound "
    "below saw something thought both few those always looked show large often together asked house "
    "world going want school important until form food keep children feet land side without boy once "
    "animals life enough took sometimes four head above kind began almost live page got earth need far "
    "hand high year mother light parts country father let night following picture being study second "
    "eyes soon times story boys since white days ever paper hard near sentence better best across "
    "during today others however sure means knew try told young miles sun ways thing whole hear example "
    "heard several change answer room sea against top turned learn point city play toward five using "
    "question yes sorry cannot help please thanks hello great happy sad true false because answer "
    "steal cheat exam harmful safe honest unsure maybe capital color river mountain planet number plus "
    "minus equals zero one two three four five six seven eight nine ten hundred"
).split()


def default_corpus(num_lines: int = 4000, seed: int = 0) -> Iterator[str]:
    """Deterministic pseudo-English lines (with digits, punctuation and chat markers) for BPE training."""
    rng = random.Random(seed)
    for _ in range(num_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 999)))
        line = " ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"])
        if rng.random() < 0.2:
            line = f"\n\nHuman: {line}\n\nAssistant: {line.lower()}"
        yield line


def train_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 2048,
                    spaces_apart: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (every byte is covered, so no unknown tokens) on ``corpus``.

    ``spaces_apart``: a space is a token of its own, never the start of the next word's, so a word has the
    same tokens wherever it stands (" Velmor" in a question, '"Velmor"' in a call's JSON, "\nVelmor" in a
    tool's answer). GPT-style tokenizers fold the space into the word; a large model learns that the two
    spellings are one word, a tiny one copies tokens, and needs them to be the same."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", behavior="isolated"), byte_level]) \
        if spaces_apart else byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else default_corpus(), trainer=trainer)
    # Plain-text encodes start with BOS, as Llama-style tokenizers do.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    return fast


def build_tiny_model(
    out_dir: str | Path,
    *,
    reward: bool = False,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    vocab: int = 2048,
    max_positions: int = 1024,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    chat_template: str = "default",
    spaces_apart: bool = False,
) -> Path:
    """Create a random-init Llama-architecture model and its tokenizer in ``out_dir``.

    ``reward=True`` gives a ``LlamaForSequenceClassification`` with one output (a scalar reward).
    Dropout is zero so training is deterministic given the seed. ``chat_template``: "default" or "tools"
    (:data:`TOOLS_CHAT_TEMPLATE`) and ``spaces_apart`` (:func:`train_tokenizer`) for a new tokenizer.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else train_tokenizer(corpus, vocab, spaces_apart)
    if tokenizer is None:
        tok.chat_template = CHAT_TEMPLATES[chat_template]
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        num_labels=1,
    )
    torch.manual_seed(seed)
    model = (LlamaForSequenceClassification if reward else LlamaForCausalLM)(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
