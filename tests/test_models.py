"""Model/tokenizer loading (dir, GGUF, hub failure), tokenizer hygiene and the student/teacher checks."""

from __future__ import annotations

import logging
import string

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.errors import ConfigError, ModelError, OpdError, TokenizerMismatchError
from opd.models import loading as models
from opd.models.loading import (
    check_tokenizers,
    freeze_teacher,
    load_model,
    load_tokenizer,
    prepare_tokenizer,
    resolve_dtype,
    shared_vocab_size,
    special_tokens_report,
)
from opd.models.tiny import DEFAULT_CHARSET, build_tiny_model, build_tiny_tokenizer, save_tiny_gguf

IDS = torch.tensor([[1, 5, 6, 76, 11, 84]])


# ------------------------------------------------------------------------------------------------ tiny builders


def test_tiny_tokenizer_is_character_level_with_bos(tiny_tokenizer):
    text = "12+7= ab\nC!~"
    ids = tiny_tokenizer(text)["input_ids"]
    assert ids[0] == tiny_tokenizer.bos_token_id and len(ids) == len(text) + 1
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (tiny_tokenizer.pad_token, tiny_tokenizer.bos_token, tiny_tokenizer.eos_token) == (
        "<pad>",
        "<bos>",
        "<eos>",
    )
    chat = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = tiny_tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.convert_ids_to_tokens(ids)[:2] == ["<bos>", "<|user|>"]
    # assistant turns end with EOS, so SFT on rendered conversations teaches the model to stop
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert tiny_tokenizer.apply_chat_template(conv, tokenize=False).endswith("a<eos>\n")


def test_tiny_pair_on_disk(tiny_pair, tiny_pair_dir):
    assert tiny_pair["teacher"] == tiny_pair_dir / "teacher"
    tok = AutoTokenizer.from_pretrained(tiny_pair["student"])
    assert tok.get_vocab() == build_tiny_tokenizer().get_vocab()
    student = AutoModelForCausalLM.from_pretrained(tiny_pair["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"])
    assert student.config.vocab_size == len(tok) == 103
    assert teacher.config.vocab_size == 128 and teacher.config.hidden_size == 48
    assert teacher.generation_config.eos_token_id == tok.eos_token_id


def test_build_tiny_model_is_seeded(tiny_tokenizer):
    a = build_tiny_model(tiny_tokenizer, seed=1)
    b = build_tiny_model(tiny_tokenizer, seed=1)
    c = build_tiny_model(tiny_tokenizer, seed=2)
    assert torch.equal(a(IDS).logits, b(IDS).logits)
    assert not torch.equal(a(IDS).logits, c(IDS).logits)


# ------------------------------------------------------------------------------------------------ loading


def test_load_round_trip_from_dir(tiny_pair):
    tok = load_tokenizer(str(tiny_pair["student"]))
    model = load_model(str(tiny_pair["student"]))
    assert not model.training
    assert model.dtype == torch.float32
    ref = AutoModelForCausalLM.from_pretrained(tiny_pair["student"])
    assert torch.equal(model(IDS).logits, ref(IDS).logits)
    assert tok("1+1=")["input_ids"][0] == tok.bos_token_id


def test_load_model_returns_separate_objects(tiny_pair):
    a = load_model(str(tiny_pair["student"]))
    b = load_model(str(tiny_pair["student"]))
    assert a is not b
    assert a.lm_head.weight.data_ptr() != b.lm_head.weight.data_ptr()


@pytest.mark.parametrize(
    "name, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("bf16", torch.bfloat16)]
)
def test_load_model_dtype(tiny_pair, name, expected):
    assert load_model(str(tiny_pair["student"]), dtype=name).dtype == expected


def test_dtype_auto_and_unknown(tiny_pair):
    assert load_model(str(tiny_pair["student"]), dtype="auto").dtype == torch.float32  # as saved
    with pytest.raises(ConfigError, match=r"unknown dtype 'float8'.*float32, bfloat16, float16, auto"):
        load_model(str(tiny_pair["student"]), dtype="float8")
    assert resolve_dtype("FP32") is torch.float32


def test_missing_local_paths(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_model(str(tmp_path / "m.gguf"))
    with pytest.raises(ModelError, match="model path not found"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf"):
        load_tokenizer(str(tmp_path / "weights.bin"))


def test_hub_unreachable_is_explained(monkeypatch):
    # The real call retries for ~50 s offline; simulate what transformers raises.
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", offline)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelError, match=r"Hub is unreachable.*local model directory or a \.gguf path"):
        load_model("Qwen/Qwen3-1.7B")
    with pytest.raises(ModelError, match="Hub is unreachable"):
        load_tokenizer("Qwen/Qwen3-1.7B")


def test_other_hub_errors_are_not_masked(monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("unrecognized configuration class")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(ValueError, match="unrecognized"):
        load_model("org/model")


def test_trust_remote_code_passed_through(monkeypatch, tiny_pair):
    seen = {}
    real = models.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(str(tiny_pair["student"]))
    assert seen["trust_remote_code"] is False
    load_model(str(tiny_pair["student"]), trust_remote_code=True)
    assert seen["trust_remote_code"] is True


def test_gguf_round_trip(tmp_path, tiny_tokenizer):
    ref = build_tiny_model(tiny_tokenizer, hidden=32, layers=2, vocab_pad_to=64, seed=3)
    path = save_tiny_gguf(ref, tiny_tokenizer, tmp_path / "gguf" / "tiny.gguf")
    model = load_model(str(path))
    assert not model.training
    assert getattr(model.config, "quantization_config", None) is None
    torch.testing.assert_close(model(IDS).logits, ref(IDS).logits)
    # the quantization marker is gone, so a plain safetensors copy can be written and reloaded
    model.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in (tmp_path / "plain" / "config.json").read_text()
    again = load_model(str(tmp_path / "plain"), dtype="bfloat16")
    assert again.dtype == torch.bfloat16
    tok = load_tokenizer(str(path))
    text = "12+7= ab\nc"
    assert tok(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert shared_vocab_size(model, model, tok) == 128


def test_quantized_gguf_is_dequantized_and_trainable(tmp_path, tiny_tokenizer, monkeypatch):
    ref = build_tiny_model(tiny_tokenizer, seed=4)
    path = save_tiny_gguf(ref, tiny_tokenizer, tmp_path / "q8.gguf", quant="Q8_0")
    seen = {}
    real = models.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy)
    model = load_model(str(path))
    # asked to unpack even where `kernels` would keep packed (untrainable) GGUF blocks
    assert seen["quantization_config"].dequantize is True
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, atol=0.05, rtol=0)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    assert model.lm_head.weight.grad is not None
    model.save_pretrained(tmp_path / "plain")


# ------------------------------------------------------------------------------------------------ hygiene


def test_prepare_tokenizer(tiny_tokenizer, caplog):
    tiny_tokenizer.padding_side = "right"
    with caplog.at_level(logging.WARNING):
        notes = prepare_tokenizer(tiny_tokenizer)
    assert tiny_tokenizer.padding_side == "left" and tiny_tokenizer.pad_token == "<pad>"
    assert len(notes) == 1 and "left" in notes[0]
    tiny_tokenizer.pad_token = None
    with caplog.at_level(logging.WARNING):
        notes = prepare_tokenizer(tiny_tokenizer)
    assert tiny_tokenizer.pad_token == "<eos>" and tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id
    assert notes == [n for n in notes if "no pad token" in n] and len(notes) == 1
    assert "no pad token" in caplog.text
    tiny_tokenizer.pad_token = None
    tiny_tokenizer.eos_token = None
    with pytest.raises(ModelError, match="neither a pad nor an EOS"):
        prepare_tokenizer(tiny_tokenizer)


def test_check_tokenizers_same(tiny_tokenizer):
    report = check_tokenizers(tiny_tokenizer, build_tiny_tokenizer())
    assert report["same_vocab"] and report["warnings"] == []
    assert report["student_vocab_size"] == report["teacher_vocab_size"] == 103


def test_check_tokenizers_mismatch(tiny_tokenizer):
    other = build_tiny_tokenizer(charset=string.ascii_letters + string.digits + " \n")
    with pytest.raises(TokenizerMismatchError, match=r"student 103 tokens, teacher 71.*TRL #4562") as info:
        check_tokenizers(tiny_tokenizer, other)
    assert "student id" in str(info.value) and "teacher id" in str(info.value)
    assert issubclass(TokenizerMismatchError, ModelError) and issubclass(ModelError, OpdError)
    # same size, permuted ids: still refused
    perm = build_tiny_tokenizer(charset="".join(reversed(DEFAULT_CHARSET)))
    with pytest.raises(TokenizerMismatchError, match="student 103 tokens, teacher 103"):
        check_tokenizers(tiny_tokenizer, perm)


def test_check_tokenizers_warns_on_eos_and_template(tiny_tokenizer):
    teacher = build_tiny_tokenizer()
    teacher.eos_token = "<|assistant|>"
    teacher.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    report = check_tokenizers(tiny_tokenizer, teacher)
    assert report["same_vocab"] and not report["same_chat_template"]
    assert any(w.startswith("EOS differs") and "runaway" in w for w in report["warnings"])
    assert any("chat templates: they differ" in w for w in report["warnings"])
    teacher.chat_template = None
    assert any("only the student" in w for w in check_tokenizers(tiny_tokenizer, teacher)["warnings"])


def test_shared_vocab_size_with_padded_teacher(tiny_pair):
    tok = load_tokenizer(str(tiny_pair["student"]))
    student, teacher = load_model(str(tiny_pair["student"])), load_model(str(tiny_pair["teacher"]))
    assert shared_vocab_size(student, teacher, tok) == 103 == len(tok)
    assert teacher.get_output_embeddings().weight.shape[0] == 128


def test_shared_vocab_size_too_small(tiny_tokenizer):
    small = build_tiny_tokenizer(charset=string.digits)
    student = build_tiny_model(small)  # 17 rows, the tokenizer has 103
    teacher = build_tiny_model(tiny_tokenizer)
    with pytest.raises(ModelError, match=r"the student model is too small.*17 output rows.*103 tokens"):
        shared_vocab_size(student, teacher, tiny_tokenizer)
    with pytest.raises(ModelError, match="the teacher model is too small"):
        shared_vocab_size(teacher, student, tiny_tokenizer)


def test_special_tokens_report(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer)
    report = special_tokens_report(tiny_tokenizer, model)
    assert report["eos"] == {"token": "<eos>", "id": 2}
    assert report["bos"]["id"] == 1 and report["pad"]["id"] == 0
    assert report["generation_eos_ids"] == [2] and report["config_eos_ids"] == [2]
    assert report["has_chat_template"] and report["warnings"] == []
    model.generation_config.eos_token_id = [101]
    assert any(
        "not a generation stop id" in w for w in special_tokens_report(tiny_tokenizer, model)["warnings"]
    )


def test_freeze_teacher(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer).train()
    assert freeze_teacher(model) is model
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
