"""Tiny but real tokenizer and Llama models, built locally.

Tests (and the offline lab) need models that exercise the same code paths as real checkpoints: a
`tokenizers`-backed fast tokenizer with BOS/EOS/PAD, a Jinja chat template and added special tokens, and
`save_pretrained` directories that `from_pretrained` reloads, with no hub access. A character-level
vocabulary keeps them small enough to build in milliseconds while still round-tripping arbitrary
ASCII text exactly.

The teacher written by `save_tiny_pair` has its output layer padded to a multiple of 64, like Qwen2.5
7B/14B, so the padded-vocabulary trap (field notes #5) is present in every test that uses the pair.

`save_shaped_pair` writes the other extreme: random-weight models with the exact shapes of a real pair
(Qwen2.5 0.5B/1.5B: Qwen2 architecture, 151,936-row vocabulary, tied embeddings) for timing and memory
checks on machines that cannot download the real one; its tokenizer is byte-level like Qwen's, padded with
filler tokens to the full vocabulary size, so the LM head and the loss run at real width.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Characters of the tiny vocabulary; `build_tiny_tokenizer(charset=...)` can take another set to make a
# deliberately incompatible tokenizer for mismatch tests.
DEFAULT_CHARSET = string.digits + string.ascii_letters + string.punctuation + " \n"

# Assistant turns end with EOS so that a conversation rendered for SFT teaches the model to stop, matching
# how generation is stopped (on eos_token_id). `enable_thinking=False` appends an empty think block like
# Qwen3, which gives tests a real template variable to pass through `chat_template_kwargs`.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|assistant|>\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


def build_tiny_tokenizer(charset: str = DEFAULT_CHARSET) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with BOS post-processing and a chat template.

    Special tokens come first (ids 0..3: pad, bos, eos, unk) so their ids are stable across charsets;
    role markers are added special tokens, so a rendered chat template maps each marker to one id.
    A BPE model with no merges is exactly character-level and, unlike WordLevel, needs no
    pre-tokenizer to split text into characters (newlines and spaces included).
    """
    chars = list(dict.fromkeys(charset))  # de-duplicate, keep order
    vocab: dict[str, int] = {}
    for tok in (PAD, BOS, EOS, UNK, *chars):
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.add_special_tokens([PAD, BOS, EOS, UNK])
    backend.add_special_tokens(list(ROLE_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        padding_side="left",  # saved with the tokenizer: batched generation needs left padding
    )
    return tok


# Unicode blocks the filler tokens of a padded tokenizer are drawn from, in this order: CJK ideographs,
# CJK extension A, Hangul syllables, then the private-use areas (BMP, planes 15 and 16). Fixed ranges rather
# than `unicodedata` categories, so the same vocabulary comes out under every Python/Unicode version; none
# of them holds combining marks, controls, spaces or surrogates, so each filler decodes to one whole
# character.
FILLER_BLOCKS: tuple[tuple[int, int], ...] = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0xAC00, 0xD7A3),
    (0xE000, 0xF8FF),
    (0xF0000, 0xFFFFD),
    (0x100000, 0x10FFFD),
)


def filler_characters(n: int, *, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """`n` distinct single characters from `FILLER_BLOCKS` (skipping `exclude`), to pad a vocabulary."""
    out: list[str] = []
    for lo, hi in FILLER_BLOCKS:
        for cp in range(lo, hi + 1):
            if len(out) == n:
                return out
            ch = chr(cp)
            if ch not in exclude:
                out.append(ch)
    if len(out) < n:
        raise ValueError(f"only {len(out)} filler characters are available, {n} asked for")
    return out


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    vocab_pad_to: int | None = None,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama whose special-token ids agree with `tokenizer`.

    `vocab_pad_to` rounds the embedding/output size up to a multiple, reproducing checkpoints whose
    logits have more rows than the tokenizer has tokens; callers must slice those rows away.
    """
    n_tokens = len(tokenizer)
    vocab_size = n_tokens
    if vocab_pad_to:
        vocab_size = -(-n_tokens // vocab_pad_to) * vocab_pad_to
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.eval()


def tiny_prompts(n: int = 64, *, seed: int = 0) -> list[dict[str, str]]:
    """Short addition problems with answers: enough structure for rollouts and answer checks."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        out.append({"prompt": f"{a}+{b}=", "answer": str(a + b)})
    return out


def save_tiny_pair(out_dir: str | Path, *, seed: int = 0) -> dict[str, Path]:
    """Write a student dir, a padded-vocabulary teacher dir and a prompt file; return their paths.

    Student and teacher share one tokenizer (same vocabulary, as OPD requires) but differ in width and
    in output size, so tests see the same-family-padded-vocab situation of real pairs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer()
    paths: dict[str, Path] = {}
    for name, kwargs in (
        ("student", {"hidden": 32, "layers": 2, "seed": seed}),
        ("teacher", {"hidden": 48, "layers": 2, "vocab_pad_to": 64, "seed": seed + 1}),
    ):
        model = build_tiny_model(tok, **kwargs)
        path = out / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = path
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in tiny_prompts(64, seed=seed)))
    paths["prompts"] = prompts
    return paths


# ----------------------------------------------------------------------------------------------------
# Real-shaped pairs with random weights: the GPU check and benchmark need the compute and memory of a real
# pair (the Qwen2.5 0.5B student / 1.5B teacher of the paper's setups) on machines that cannot download it.

QWEN_VOCAB_SIZE = 151_936
"""Qwen2.5's embedding/LM-head rows (its tokenizer has 151,665 tokens; the rest are padding rows)."""


@dataclass(frozen=True)
class Qwen2Shape:
    """The dimensions of one Qwen2-architecture model (the rest of the config is Qwen2.5's)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


SHAPED_PAIRS: dict[str, dict[str, Qwen2Shape]] = {
    # Qwen2.5-0.5B(-Instruct) and Qwen2.5-1.5B(-Instruct), from their config.json (both tie embeddings)
    "qwen2.5-0.5b/1.5b": {
        "student": Qwen2Shape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864),
        "teacher": Qwen2Shape(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960),
    },
    # the same architecture and vocabulary at toy width and depth: the full-vocabulary loss and LM head on
    # a CPU in seconds (the GPU check's --cpu mode)
    "qwen2.5-tiny": {
        "student": Qwen2Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
        "teacher": Qwen2Shape(hidden=96, layers=2, heads=6, kv_heads=2, intermediate=192),
    },
}


# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX), copied so the synthetic
# tokenizer is processed the same whichever class loads it.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def build_byte_level_tokenizer(vocab_size: int = QWEN_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer shaped like Qwen2.5's, with exactly `vocab_size` entries.

    Why byte-level rather than the tiny character-level one: transformers loads the tokenizer of a
    `qwen2` model directory with its own `Qwen2Tokenizer` class, which rebuilds the pipeline (NFC, Qwen's
    regex split, byte-level pre-tokenizer and decoder) around the saved vocabulary, ignoring the saved
    one. A character-level vocabulary then loses every space, newline and non-ASCII character. This
    tokenizer has that same pipeline, so it behaves identically however it is loaded.

    Ids 0..255 are the 256 byte symbols (any text encodes, one token per UTF-8 byte, and decodes back
    exactly: there are no merges), then filler tokens up to the size, each the bytes of one whole
    character (`filler_characters`), so a sampled id always decodes to valid text, then the special
    tokens at the end, as in Qwen's vocabulary: pad, bos, eos, unk and the tiny chat template's role
    markers. The chat template is the tiny one (`CHAT_TEMPLATE`: it writes `bos_token` itself, since a
    byte-level Qwen tokenizer adds no BOS).
    """
    from tokenizers import Regex, normalizers, pre_tokenizers

    specials = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]
    byte_map = _bytes_to_unicode()
    base = [byte_map[b] for b in range(256)]
    n_fill = vocab_size - len(base) - len(specials)
    if n_fill < 0:
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than {len(base) + len(specials)} (bytes + specials)"
        )
    fillers = ["".join(byte_map[b] for b in ch.encode("utf-8")) for ch in filler_characters(n_fill)]
    vocab = {tok: i for i, tok in enumerate([*base, *fillers, *specials])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,  # never produced (every byte is a token); named so that no loader adds a default one
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def build_shaped_tokenizer(
    vocab_size: int = QWEN_VOCAB_SIZE, tokenizer_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """The tokenizer of a shaped pair: a real one from `tokenizer_dir`, else `build_byte_level_tokenizer`."""
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return build_byte_level_tokenizer(vocab_size)


def build_shaped_model(
    tokenizer: PreTrainedTokenizerFast,
    shape: Qwen2Shape,
    *,
    vocab_size: int = QWEN_VOCAB_SIZE,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A randomly initialised Qwen2 model of `shape`, with Qwen2.5's config otherwise (tied embeddings,
    RoPE theta 1e6, RMSNorm eps 1e-6) and the special-token ids of `tokenizer`.

    It is built directly on `device` (`from_config` under `torch.device(device)`): a 1.5B model is
    initialised on a GPU in a fraction of a second, against tens of seconds on a CPU.
    """
    from transformers import AutoModelForCausalLM, Qwen2Config

    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_theta": 1_000_000.0, "rope_type": "default"},
        tie_word_embeddings=True,
        use_sliding_window=False,
        max_window_layers=shape.layers,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model.eval()


def save_shaped_pair(
    out_dir: str | Path,
    shape: str = "qwen2.5-0.5b/1.5b",
    *,
    vocab_size: int = QWEN_VOCAB_SIZE,
    tokenizer_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    save_dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    n_prompts: int = 64,
) -> dict[str, Path]:
    """Write a real-shaped student/teacher pair with random weights, and a prompt file; return their paths.

    `shape` names an entry of `SHAPED_PAIRS`. The weights are saved as safetensors in `save_dtype`
    (bfloat16 by default, as the real checkpoints ship: half the bytes to write and read; loaders choose
    their own compute dtype). Random models almost never emit EOS, so rollouts run to their token budget:
    right for timing, meaningless for accuracy. A `pair.json` beside them records what was built, so a
    caller can reuse the directory instead of building it again (`shaped_pair_matches`).
    """
    if shape not in SHAPED_PAIRS:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPED_PAIRS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_shaped_tokenizer(vocab_size, tokenizer_dir)
    paths: dict[str, Path] = {}
    for i, (name, dims) in enumerate(SHAPED_PAIRS[shape].items()):
        model = build_shaped_model(tok, dims, vocab_size=vocab_size, seed=seed + i, device=device)
        path = out / name
        model.to(save_dtype).save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = path
        del model
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in tiny_prompts(n_prompts, seed=seed)))
    paths["prompts"] = prompts
    (out / "pair.json").write_text(
        json.dumps(_pair_record(shape, vocab_size, tokenizer_dir, save_dtype, seed))
    )
    return paths


def _pair_record(
    shape: str, vocab_size: int, tokenizer_dir: str | Path | None, save_dtype: torch.dtype, seed: int
) -> dict[str, Any]:
    return {
        "shape": shape,
        "vocab_size": vocab_size,
        "tokenizer": str(Path(tokenizer_dir).resolve()) if tokenizer_dir else None,
        "dtype": str(save_dtype).removeprefix("torch."),
        "seed": seed,
    }


def shaped_pair_matches(
    out_dir: str | Path,
    shape: str = "qwen2.5-0.5b/1.5b",
    *,
    vocab_size: int = QWEN_VOCAB_SIZE,
    tokenizer_dir: str | Path | None = None,
    save_dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> bool:
    """Whether `out_dir` already holds the pair `save_shaped_pair` would write with these arguments."""
    out = Path(out_dir)
    try:
        record = json.loads((out / "pair.json").read_text())
    except (OSError, ValueError):
        return False
    want = _pair_record(shape, vocab_size, tokenizer_dir, save_dtype, seed)
    files = [out / n / "config.json" for n in ("student", "teacher")] + [out / "prompts.jsonl"]
    return record == want and all(f.exists() for f in files)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable-character table, which GGUF `gpt2` tokenizers store tokens in."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def save_tiny_gguf(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: str | Path, *, quant: str = "F32"
) -> Path:
    """Write a tiny Llama as a GGUF file, the format the real offline models ship in.

    Lets tests exercise the GGUF load path (dequantisation, config from metadata, the
    `quantization_config` that must be dropped before `save_pretrained`) without a 100 MB download.
    Q/K weights are permuted the way llama.cpp's converter does, because transformers un-permutes them
    on load; the vocabulary is stored as a `gpt2` (byte-level) tokenizer with no merges, which is
    exactly character-level for ASCII text. `quant="Q8_0"` stores the 2-D weights block-quantized
    (row sizes must be multiples of 32), like the real Q4 files, so loading must de-quantize.
    """
    import gguf
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("opd-tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    byte_map = _bytes_to_unicode()
    id_to_tok = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        tok = id_to_tok.get(i)
        if tok is None:
            # transformers' byte-level GGUF converter adds `<|endoftext|>` when the file lacks it, which
            # would make the loaded tokenizer one longer than the model; a padded row can carry it.
            tokens.append("<|endoftext|>" if i == len(id_to_tok) else f"<extra_{i}>")
            types.append(gguf.TokenType.CONTROL if i == len(id_to_tok) else gguf.TokenType.UNUSED)
        elif i in special:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL)
        else:
            tokens.append("".join(byte_map[b] for b in tok.encode("utf-8")))
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    qtype = gguf.GGMLQuantizationType[quant]

    def add(name: str, w: np.ndarray) -> None:
        if qtype == gguf.GGMLQuantizationType.F32 or w.ndim == 1:
            writer.add_tensor(name, w)
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], n_head))
        add(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], n_kv))
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
