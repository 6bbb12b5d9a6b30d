"""Broken model directories, unreadable files, malformed teacher URLs and mistyped model paths end in
one `opd.errors` line naming the file (or option) and what to do, in every command that loads a model.

Each case is one a new user meets: an empty or half-saved directory, a config.json of another model
(size, model_type, a bad value), weights that lack a tensor or hold extra ones (transformers would load
those with random values), a file this user may not read, ``--teacher.urls '[not a url]'``, and a path
that does not exist but would otherwise be sent to the Hugging Face Hub and its retries.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import transformers
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import opd.models.loading as loading
from opd.cli import app
from opd.cli.common import os_error
from opd.errors import ConfigError, ModelError, StorageError
from opd.models.loading import load_model, load_tokenizer, model_directory

runner = CliRunner()
WEIGHT = "model.layers.1.mlp.down_proj.weight"


def _error_line(res) -> str:
    """The single `error:` line of a CLI run that failed with exit 2 and no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    lines = [line for line in (res.output or "").splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.output
    return lines[0]


def _copy(tiny_pair, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(tiny_pair["student"], tmp_path / name))


def _edit_config(d: Path, **changes) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _edit_weights(d: Path, edit) -> Path:
    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _check(tiny_pair, teacher: Path | str):
    return runner.invoke(
        app,
        ["check", "--student", str(tiny_pair["student"]), "--teacher", str(teacher),
         "--prompts", str(tiny_pair["prompts"]), "--device", "cpu", "--max-new-tokens", "2", "--n-prompts", "1"],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# 1. Empty directories and missing tokenizer files


def test_empty_teacher_directory_is_one_line_in_check_and_eval(tiny_pair, tmp_path):
    empty = tmp_path / "teacher"
    empty.mkdir()
    line = _error_line(_check(tiny_pair, empty))
    assert f"{empty}: empty directory, not a model" in line
    assert "pass the directory that holds config.json, the weights and the tokenizer files" in line
    assert "sentencepiece" not in line
    res = runner.invoke(app, ["eval", "--model", str(empty), "--prompts", str(tiny_pair["prompts"]),
                              "--out", str(tmp_path / "out"), "--device", "cpu"])  # fmt: skip
    assert "empty directory, not a model" in _error_line(res)
    with pytest.raises(ModelError, match="empty directory, not a model"):
        load_model(str(empty))


def test_weights_without_tokenizer_files_name_the_missing_files(tiny_pair, tmp_path):
    d = _copy(tiny_pair, tmp_path, "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / name).unlink()
    with pytest.raises(ModelError) as ei:
        load_tokenizer(str(d))
    msg = str(ei.value)
    assert msg.startswith(f"{d}: no tokenizer files (none of tokenizer.json, tokenizer_config.json")
    assert "tokenizer.save_pretrained(DIR)" in msg and "\n" not in msg
    load_model(str(d))  # the weights alone are fine


# ---------------------------------------------------------------------------------------------------
# 2-3. config.json transformers refuses


def test_unknown_model_type_is_one_line_in_check(tiny_pair, tmp_path):
    d = _edit_config(_copy(tiny_pair, tmp_path, "unknown"), model_type="not_a_model")
    line = _error_line(_check(tiny_pair, d))
    assert (
        f"{d / 'config.json'}: model_type 'not_a_model' is unknown to transformers {transformers.__version__}"
        in line
    )
    assert "pip install -U transformers" in line and "trust_remote_code" in line


def test_unknown_model_type_with_its_own_code_suggests_trust_remote_code(tiny_pair, tmp_path):
    d = _edit_config(_copy(tiny_pair, tmp_path, "remote"), model_type="not_a_model",
                     auto_map={"AutoConfig": "configuration_x.XConfig"})  # fmt: skip
    with pytest.raises(ModelError, match=r"names the model's own code \(auto_map\): set trust_remote_code"):
        load_model(str(d))


def test_missing_model_type_names_config_json(tiny_pair, tmp_path):
    d = _edit_config(_copy(tiny_pair, tmp_path, "no_type"), model_type=None, architectures=None)
    with pytest.raises(ModelError) as ei:
        load_model(str(d))
    assert str(ei.value).startswith(f'{d / "config.json"}: no "model_type"')


def test_config_that_is_not_json_fails_on_the_tokenizer_path_too(tiny_pair, tmp_path):
    d = _copy(tiny_pair, tmp_path, "not_json")
    (d / "config.json").write_text('{"model_type": "llama",')
    for load in (load_tokenizer, load_model):  # tokenizers load first, and read config.json too
        with pytest.raises(ModelError, match=r"config\.json:1: not valid JSON"):
            load(str(d))


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"hidden_size": "abc"}, "hidden_size"),
        ({"num_attention_heads": 5, "head_dim": None}, "attention heads (5)"),
    ],
)
def test_invalid_config_values_name_config_json(tiny_pair, tmp_path, changes, words):
    d = _edit_config(_copy(tiny_pair, tmp_path, "bad_value"), **changes)
    for load in (load_tokenizer, load_model):
        with pytest.raises(ModelError) as ei:
            load(str(d))
        msg = str(ei.value)
        assert msg.startswith(
            f"{d / 'config.json'}: transformers {transformers.__version__} refuses this config ("
        )
        assert words in msg and "\n" not in msg


# ---------------------------------------------------------------------------------------------------
# 4-5. Weights that do not fill the model the config describes


def test_size_mismatched_config_names_tensor_shapes_and_config(tiny_pair, tmp_path):
    d = _edit_config(_copy(tiny_pair, tmp_path, "size"), hidden_size=64)
    with pytest.raises(ModelError) as ei:
        load_model(str(d))
    msg = str(ei.value)
    assert msg.startswith(f"{d / 'model.safetensors'}: tensor ")
    assert ", 32] in the weights but " in msg and f"{d / 'config.json'} makes it " in msg and ", 64]" in msg


def test_missing_tensor_is_refused_in_check(tiny_pair, tmp_path):
    d = _edit_weights(_copy(tiny_pair, tmp_path, "missing"), lambda w: w.pop(WEIGHT))
    line = _error_line(_check(tiny_pair, d))
    assert f"{d / 'model.safetensors'}: 1 tensor the model needs is not in the weights ({WEIGHT})" in line
    assert "random values" in line and "Re-download the weights" in line


def test_many_missing_tensors_show_the_first_few_and_the_count(tiny_pair, tmp_path):
    d = _edit_weights(
        _copy(tiny_pair, tmp_path, "missing_layer"),
        lambda w: [w.pop(k) for k in [k for k in w if k.startswith("model.layers.1.")]],
    )
    with pytest.raises(ModelError, match=r": 9 tensors the model needs are not in the weights \(model\.layers\.1\.\S+, "
                       r"\S+, \S+ and 6 more\)"):  # fmt: skip
        load_model(str(d))


def test_extra_tensors_inside_the_model_are_refused(tiny_pair, tmp_path):
    d = _edit_weights(
        _copy(tiny_pair, tmp_path, "extra"),
        lambda w: w.update({"model.layers.2.mlp.down_proj.weight": w[WEIGHT].clone()}),
    )
    with pytest.raises(ModelError) as ei:
        load_model(str(d))
    msg = str(ei.value)
    assert "1 tensor in the weights has no place in the model" in msg
    assert "(model.layers.2.mlp.down_proj.weight)" in msg and "fewer layers" in msg


def test_tensors_of_a_part_the_class_lacks_are_only_logged(tiny_pair, tmp_path, caplog):
    d = _edit_weights(
        _copy(tiny_pair, tmp_path, "vision"),
        lambda w: w.update({"vision_tower.proj.weight": w[WEIGHT].clone()}),
    )
    load_model(str(d))
    assert (
        "1 tensor not used by LlamaForCausalLM, which has no such part (vision_tower.proj.weight)"
        in caplog.text
    )


def test_real_tiny_models_still_load(tiny_pair, tmp_path, tiny_tokenizer):
    """Tied heads (absent from the files, or present), the lab zoo and GGUF are not refusals."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opd.models.tiny import build_tiny_model, save_tiny_gguf

    cfg = Qwen2Config(vocab_size=103, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    tied = tmp_path / "tied"
    Qwen2ForCausalLM(cfg).save_pretrained(tied)
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")
    load_model(str(tied))
    _edit_weights(tied, lambda w: w.update({"lm_head.weight": w["model.embed_tokens.weight"].clone()}))
    load_model(str(tied))
    load_model(str(tiny_pair["teacher"]))
    load_model("lab:student")
    model = build_tiny_model(tiny_tokenizer, hidden=32, layers=2, vocab_pad_to=64, seed=3)
    load_model(str(save_tiny_gguf(model, tiny_tokenizer, tmp_path / "gguf" / "tiny.gguf")))


# ---------------------------------------------------------------------------------------------------
# 6. Files this user may not read; paths it may not write


def _nobody() -> int | None:
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return None


@pytest.mark.skipif(os.geteuid() != 0 or _nobody() is None, reason="needs root and a `nobody` user")
def test_unreadable_model_files_as_another_user(tiny_pair):
    """As root chmod stops no read, so a child process drops to `nobody` (after its imports) and loads
    copies whose config.json / model.safetensors / tokenizer.json are mode 000."""
    root = Path(tempfile.mkdtemp(prefix="opd-perm-"))  # not under pytest's 0700 tmp dir
    try:
        cases = {}
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            d = Path(shutil.copytree(tiny_pair["student"], root / name.replace(".", "_")))
            for f in d.iterdir():
                f.chmod(0o644)
            (d / name).chmod(0)
            cases[name] = d
        for p in (root, *cases.values()):
            p.chmod(0o755)
        script = textwrap.dedent(f"""
            import os, sys
            from opd.models.loading import load_model, load_tokenizer
            load_model({str(tiny_pair["student"])!r}); load_tokenizer({str(tiny_pair["student"])!r})
            os.setegid({_nobody()}); os.seteuid({_nobody()})
            for d in sys.argv[1:]:
                for load in (load_tokenizer, load_model):
                    try:
                        load(d)
                        print("loaded", d)
                    except Exception as e:
                        print(type(e).__name__, e)
        """)
        out = subprocess.run([sys.executable, "-c", script, *map(str, cases.values())],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        lines = [line for line in out.stdout.splitlines() if line.strip()]
        assert len(lines) == 6, out.stdout + out.stderr
        for name, d in cases.items():
            want = f"ModelError permission denied: {d / name} (reading, EACCES); "
            assert sum(line.startswith(want) for line in lines) >= 1, (name, lines)
        assert all(f"chmod -R a+rX {root}" in line for line in lines if line.startswith("ModelError"))
        assert f"loaded {cases['model.safetensors']}" in lines  # its tokenizer is readable
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_permission_error_while_loading_is_one_line(tiny_pair, monkeypatch):
    target = str(tiny_pair["student"] / "tokenizer.json")

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", target)

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", refuse)
    with pytest.raises(ModelError) as ei:
        load_tokenizer(str(tiny_pair["student"]))
    assert str(ei.value).startswith(
        f"permission denied: {target} (reading, EACCES); opd must read every file"
    )


def test_os_errors_reaching_the_cli_are_one_line(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    err = os_error(PermissionError(errno.EACCES, "Permission denied", str(run_dir)))
    assert isinstance(err, StorageError)
    assert str(err).startswith(f"permission denied: {run_dir} (writing, EACCES); check its owner and mode")
    assert os_error(ValueError("x")) is None and os_error(OSError("no path")) is None


def test_unwritable_run_directory_is_one_line_in_train(tiny_pair, tmp_path):
    (tmp_path / "afile").write_text("")
    run_dir = tmp_path / "afile" / "run"
    res = runner.invoke(app, ["train", "--student", str(tiny_pair["student"]), "--teacher", str(tiny_pair["teacher"]),
                              "--prompts", str(tiny_pair["prompts"]), "--run_dir", str(run_dir), "--steps", "1"])  # fmt: skip
    line = _error_line(res)
    assert f"not a directory: {run_dir} (writing, ENOTDIR); a part of the path is a file" in line


# ---------------------------------------------------------------------------------------------------
# 7. Teacher server URLs


def test_bad_teacher_url_is_a_config_error_before_any_model_loads(tiny_pair, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before teacher.urls was checked")

    monkeypatch.setattr(loading, "load_tokenizer", no_load)
    res = runner.invoke(app, ["train", "--student", str(tiny_pair["student"]), "--teacher", str(tiny_pair["teacher"]),
                              "--prompts", str(tiny_pair["prompts"]), "--run_dir", str(tmp_path / "run"),
                              "--teacher.backend", "http", "--teacher.urls", "[not a url]",
                              "--loss.support", "teacher"])  # fmt: skip
    line = _error_line(res)
    assert "teacher.urls" in line and "'not a url' is not a server URL" in line and "http://HOST:PORT" in line


@pytest.mark.parametrize(
    "url, words",
    [("localhost:8000", "did you mean http://localhost:8000?"), ("ftp://a:1", "must be http or https"),
     ("http://a:99999", "Port out of range"), ("http://a:8000/v1", "drop the /v1")],
)  # fmt: skip
def test_teacher_url_mistakes_are_named(url, words):
    from opd.config import TeacherConfig
    from opd.teachers.http import HTTPTeacher

    with pytest.raises(ConfigError, match=rf"teacher\.urls: .*{words[:12]}"):
        HTTPTeacher([url])
    with pytest.raises(ValueError, match="expected http://HOST:PORT"):
        TeacherConfig(urls=[url])
    TeacherConfig(urls=["http://10.0.0.5:8000", "https://teacher.example/", "http://[::1]:8000"])


# ---------------------------------------------------------------------------------------------------
# 8-9. Paths that do not exist: at once, without the hub's retries


def test_serve_teacher_names_a_missing_path_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for spec, words in (("runs/sft", "(runs/ is a directory here"), ("mymodels/teacher", "not a hub id"),
                        (str(tmp_path / "nope"), "pass an existing directory")):  # fmt: skip
        line = _error_line(runner.invoke(app, ["serve-teacher", spec]))
        assert line.startswith(f"error: model path not found: {spec}") and words in line
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="empty directory"):
        model_directory(str(empty), "opd serve-teacher")


@pytest.fixture
def no_network(monkeypatch):
    """The hub probe fails like a machine without DNS; the probe's cache is cleared around the test."""
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    loading._hub_unreachable.cache_clear()
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    yield
    loading._hub_unreachable.cache_clear()


def test_local_looking_specs_never_reach_the_hub(tmp_path, monkeypatch):
    def probe(spec):
        raise AssertionError(f"the hub was asked for {spec}")

    monkeypatch.setattr(loading, "_hub_unreachable", probe)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sft-1").mkdir(parents=True)
    with pytest.raises(ModelError) as ei:
        load_model("runs/sft")
    assert str(ei.value).startswith(
        "model path not found: runs/sft (runs/ is a directory here, so 'runs/sft' is read as a path in it, not a "
        "hub id; it holds sft-1)"
    )
    for spec in ("final/model.safetensors", "weights.bin", "a/b/c"):
        with pytest.raises(ModelError, match="model path not found"):
            load_tokenizer(spec)


def test_unreachable_hub_fails_at_once_from_an_empty_cache(tmp_path, monkeypatch, no_network):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    t0 = time.perf_counter()
    for load in (load_tokenizer, load_model):
        with pytest.raises(ModelError) as ei:
            load("org/name")
        msg = str(ei.value)
        assert "the Hugging Face Hub is unreachable (OSError: [Errno -2] Name or service not known)" in msg
        assert "local model directory or a .gguf path" in msg
    assert time.perf_counter() - t0 < 10  # transformers' own retries take ~25 s per file


def test_unreachable_hub_still_loads_a_cached_model(tiny_pair, tmp_path, monkeypatch, no_network):
    import huggingface_hub

    snapshot = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--org--tiny"
    shutil.copytree(tiny_pair["student"], repo / "snapshots" / snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    t0 = time.perf_counter()
    load_tokenizer("org/tiny")
    load_model("org/tiny")
    assert time.perf_counter() - t0 < 10  # the adapter lookup is told to stay offline too


def test_an_os_error_no_command_words_is_one_line_in_every_command(tiny_pair, tmp_path):
    """`opd eval --out` under a file (ENOTDIR): the group-level catch in `opd.cli.OpdGroup.invoke` words it."""
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"prompt": "1+1=", "answer": "2"}\n', encoding="utf-8")
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_pair["student"]), "--prompts", str(problems),
                                   "--samples", "1", "--max-new-tokens", "2", "--out", str(blocker / "out")])  # fmt: skip
    out = " ".join((res.output or "").split())
    assert res.exit_code == 2, out
    assert "error: not a directory:" in out and "ENOTDIR" in out and "Traceback" not in out, out
