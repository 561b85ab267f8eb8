"""The data package on real data: BBC News, Fashion-MNIST, digits, and user files made from them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tokenizers import Tokenizer

from fullchain.config import DataConfig, TokenizerConfig
from fullchain.data import build_data
from fullchain.data.images import FASHION_MNIST_DIR, FASHION_MNIST_ENV
from fullchain.data.splits import deduplicate, fraction_size, plan_official_splits, plan_splits, text_key
from fullchain.data.text import headline, read_bbc_news
from fullchain.data.tokenizer import TextEncoding, train_tokenizer
from fullchain.errors import MissingDatasetError, UserError

BBC_ARTICLES, BBC_DUPLICATES = 2225, 101
BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason="Fashion-MNIST is not installed; install it with: sudo apt-get install dataset-fashion-mnist",
)


def split_sizes(bundle) -> list[int]:
    return [len(bundle.train), 0 if bundle.val is None else len(bundle.val), len(bundle.test)]


def first_input(sample: dict) -> torch.Tensor:
    return next(v for k, v in sample.items() if k != "labels")


def all_inputs(dataset) -> list[torch.Tensor]:
    return [first_input(dataset[i]) for i in range(len(dataset))]


@pytest.fixture(scope="module")
def bbc():
    return build_data(DataConfig(name="bbc_news"), seed=0)


@pytest.fixture(scope="module")
def bbc_rows() -> list[tuple[str, str]]:
    """A small real slice for user-format files: 24 articles from each of three topics."""
    texts, labels = read_bbc_news()
    rows = [(t, y) for t, y in zip(texts, labels, strict=True) if y in ("business", "sports", "tech")]
    return [
        row for topic in ("business", "sports", "tech") for row in [r for r in rows if r[1] == topic][:24]
    ]


# --- BBC News ---------------------------------------------------------------------------------


def test_bbc_news_has_five_topics_and_deduplicated_sizes(bbc):
    assert bbc.kind == "text"
    assert bbc.label_names == BBC_TOPICS
    assert bbc.input_spec["num_classes"] == 5
    assert sum(split_sizes(bbc)) == BBC_ARTICLES - BBC_DUPLICATES
    train, val, test = split_sizes(bbc)
    assert abs(test - 0.2 * sum(split_sizes(bbc))) < 10 and abs(val - 0.1 * sum(split_sizes(bbc))) < 10


def test_bbc_news_splits_share_no_article():
    """Checked on the texts themselves: no article (nor another version of its story) crosses splits."""
    texts, labels = read_bbc_news()
    labels = np.array([BBC_TOPICS.index(y) for y in labels])
    groups = [headline(t) for t in texts]
    split = plan_splits([text_key(t) for t in texts], labels, DataConfig(name="bbc_news"), 0, groups)
    parts = [split.train, split.val, split.test]
    for key in (text_key, headline):
        seen = [{key(texts[i]) for i in idx} for idx in parts]
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert sum(len(p) for p in parts) == len({text_key(t) for t in texts}) == BBC_ARTICLES - BBC_DUPLICATES


def test_bbc_news_token_ids(bbc):
    vocab_size = bbc.input_spec["vocab_size"]
    assert bbc.encoder.tokenizer.token_to_id("[PAD]") == 0 == bbc.preprocessing["pad_id"]
    assert vocab_size == bbc.encoder.vocab_size <= 8000
    for dataset in (bbc.train, bbc.val, bbc.test):
        for ids in all_inputs(dataset):
            assert ids.dtype == torch.long and ids.ndim == 1
            assert 0 < len(ids) <= 256
            assert int(ids.min()) > 0 and int(ids.max()) < vocab_size
    batch = bbc.collate([bbc.train[0], bbc.train[1], bbc.train[2]])
    x, y = batch["input_ids"], batch["labels"]
    assert x.shape[0] == 3 and y.shape == (3,) and y.dtype == torch.long
    lengths = torch.tensor([len(bbc.train[i]["input_ids"]) for i in range(3)])
    assert torch.equal(batch["attention_mask"].sum(1), lengths)
    assert json.loads(json.dumps(bbc.preprocessing)) == bbc.preprocessing


def test_bbc_news_same_seed_same_split(bbc):
    again = build_data(DataConfig(name="bbc_news"), seed=0)
    for first, second in zip(
        (bbc.train, bbc.val, bbc.test), (again.train, again.val, again.test), strict=True
    ):
        assert len(first) == len(second)
        assert all(torch.equal(a, b) for a, b in zip(all_inputs(first), all_inputs(second), strict=True))
        assert torch.equal(first.targets, second.targets)
    other = build_data(DataConfig(name="bbc_news", max_samples=300), seed=1)
    assert sum(split_sizes(other)) >= 300


def test_a_given_tokenizer_is_reused(bbc):
    """Evaluation rebuilds the data from the saved tokenizer.json: ids must not change."""
    saved = Tokenizer.from_str(bbc.encoder.tokenizer.to_str())
    rebuilt = build_data(DataConfig(name="bbc_news"), seed=0, encoding=TextEncoding(saved, 256))
    assert rebuilt.encoder.tokenizer is saved
    assert all(torch.equal(a, b) for a, b in zip(all_inputs(bbc.test), all_inputs(rebuilt.test), strict=True))


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_tokenizer_training_is_deterministic(kind):
    """WordPiece needs a workaround for huggingface/tokenizers#1794; ties appear on a few hundred articles."""
    texts = read_bbc_news()[0][::3]
    vocabularies = [
        train_tokenizer(texts, TokenizerConfig(kind=kind, vocab_size=3000)).get_vocab() for _ in range(4)
    ]
    assert all(v == vocabularies[0] for v in vocabularies)
    assert len(vocabularies[0]) == 3000 and vocabularies[0]["[PAD]"] == 0


def test_literal_pad_in_text_is_not_padding(tmp_path, bbc_rows):
    rows = [{"text": f"[PAD] [CLS] {t}", "label": y} for t, y in bbc_rows]
    path = tmp_path / "pad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    bundle = build_data(DataConfig(name="jsonl", path=str(path), tokenizer={"vocab_size": 500}), seed=0)
    assert all(int(ids.min()) > 0 for ids in all_inputs(bundle.train))


def test_bpe_tokenizer(bbc):
    cfg = DataConfig(name="bbc_news", max_samples=200, tokenizer={"kind": "bpe", "vocab_size": 1000})
    bundle = build_data(cfg, seed=0)
    assert bundle.encoder.tokenizer.token_to_id("[PAD]") == 0
    ids = all_inputs(bundle.train)
    assert all(0 < int(x.min()) and int(x.max()) < bundle.input_spec["vocab_size"] for x in ids)
    assert bundle.preprocessing["tokenizer"] == "bpe"


# --- causal LM stream -------------------------------------------------------------------------


def test_lm_text_blocks_are_shifted_by_one():
    cfg = DataConfig(name="lm_text", max_samples=200, block_size=32, val_fraction=0.0)
    bundle = build_data(cfg, seed=0)
    assert bundle.kind == "lm" and bundle.label_names == [] and bundle.val is None
    assert bundle.input_spec["max_length"] == 32
    for dataset in (bundle.train, bundle.test):
        sample = dataset[len(dataset) // 2]
        x, y = sample["input_ids"], sample["labels"]
        assert x.shape == y.shape == (32,)
        assert torch.equal(x[1:], y[:-1])
        assert int(x.max()) < bundle.input_spec["vocab_size"]
    assert len(bundle.train) > len(bundle.test) > 0


# --- Fashion-MNIST and digits -----------------------------------------------------------------


@needs_fashion_mnist
def test_fashion_mnist_uses_the_official_test_set():
    bundle = build_data(DataConfig(name="fashion_mnist"), seed=0)
    assert bundle.kind == "image" and bundle.label_names[0] == "T-shirt/top" and bundle.num_classes == 10
    assert len(bundle.test) == 10_000 and len(bundle.train) + len(bundle.val) == 60_000
    x, y = bundle.test[0]["pixel_values"], bundle.test[0]["labels"]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    spec = bundle.input_spec
    assert (spec["channels"], spec["height"], spec["width"], spec["num_classes"]) == (1, 28, 28, 10)
    assert abs(float(bundle.train.inputs.mean())) < 1e-3 and abs(float(bundle.train.inputs.std()) - 1) < 1e-3
    small = build_data(DataConfig(name="fashion_mnist", max_samples=1000), seed=0)
    assert split_sizes(small) == [720, 80, 200]


def test_fashion_mnist_missing_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(MissingDatasetError, match="apt-get install dataset-fashion-mnist"):
        build_data(DataConfig(name="fashion_mnist"), seed=0)


def test_digits():
    bundle = build_data(DataConfig(name="digits"), seed=0)
    assert bundle.label_names == [str(i) for i in range(10)]
    assert sum(split_sizes(bundle)) == 1797
    assert bundle.train[0]["pixel_values"].shape == (1, 8, 8)
    assert len(bundle.preprocessing["mean"]) == 1
    assert json.loads(json.dumps(bundle.preprocessing)) == bundle.preprocessing
    batch = bundle.collate([bundle.train[0], bundle.train[1]])
    x, y = batch["pixel_values"], batch["labels"]
    assert x.shape == (2, 1, 8, 8) and y.shape == (2,)


def test_official_test_set_stays_whole_and_train_copies_of_it_are_dropped():
    keys = [0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12] + [2, 13, 13]  # last three: the official test
    labels = np.array([k % 2 for k in keys])
    official = np.arange(len(keys)) >= 14
    split = plan_official_splits(keys, labels, official, DataConfig(name="fashion_mnist"), seed=0)
    assert split.test.tolist() == [14, 15, 16]
    pool = sorted(split.train.tolist() + split.val.tolist())
    assert pool == [0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13] and len(split.val) == 1


# --- user formats -----------------------------------------------------------------------------


def test_csv_text_classification(tmp_path, bbc_rows):
    path = tmp_path / "news.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "body", "topic"])
        writer.writerows([i, text, topic] for i, (text, topic) in enumerate(bbc_rows))
    cfg = DataConfig(name="csv", path=str(path), text_column="body", label_column="topic")
    bundle = build_data(cfg, seed=0)
    assert bundle.label_names == ["business", "sports", "tech"]
    assert sum(split_sizes(bundle)) == len({text_key(t) for t, _ in bbc_rows})
    with pytest.raises(UserError, match=r"news\.csv.*'text'"):
        build_data(DataConfig(name="csv", path=str(path)), seed=0)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match=r"empty\.csv.*'body'"):
        build_data(cfg.model_copy(update={"path": str(tmp_path / "empty.csv")}), seed=0)
    with pytest.raises(UserError, match=r"missing\.csv: no such file"):
        build_data(cfg.model_copy(update={"path": str(tmp_path / "missing.csv")}), seed=0)


def test_jsonl_with_integer_labels(tmp_path, bbc_rows):
    topics = {"business": 2, "sports": 10, "tech": 7}
    path = tmp_path / "news.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": topics[y]}) for t, y in bbc_rows) + "\n\n")
    bundle = build_data(DataConfig(name="jsonl", path=str(path), val_fraction=0.0), seed=0)
    assert bundle.label_names == ["2", "7", "10"]
    assert bundle.val is None
    with pytest.raises(UserError, match=r"news\.jsonl:1: no column 'title'"):
        build_data(DataConfig(name="jsonl", path=str(path), label_column="title"), seed=0)
    path.write_text('{"text": "fine", "label": 1}\nnot json\n')
    with pytest.raises(UserError, match=r"news\.jsonl:2: not valid JSON"):
        build_data(DataConfig(name="jsonl", path=str(path)), seed=0)


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_image_folder(tmp_path):
    """Fashion-MNIST-like folders written from scikit-learn's digits (real images)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(60):
        label = int(digits.target[i])
        if label in (0, 1, 2):
            write_png(
                tmp_path / "imgs" / f"digit{label}" / f"{i:03d}.png", (digits.images[i] * 15).astype(np.uint8)
            )
    bundle = build_data(DataConfig(name="image_folder", path=str(tmp_path / "imgs")), seed=0)
    assert bundle.label_names == ["digit0", "digit1", "digit2"]
    assert first_input(bundle.train[0]).shape == (1, 8, 8)
    assert bundle.preprocessing["color_mode"] == "L"

    write_png(tmp_path / "imgs" / "digit2" / "zz_colour.png", np.full((12, 10, 3), 200, dtype=np.uint8))
    with pytest.raises(UserError, match=r"zz_colour\.png: image is 10x12.*data\.image_size"):
        build_data(DataConfig(name="image_folder", path=str(tmp_path / "imgs")), seed=0)
    resized = build_data(DataConfig(name="image_folder", path=str(tmp_path / "imgs"), image_size=16), seed=0)
    assert first_input(resized.train[0]).shape == (3, 16, 16) and resized.preprocessing["color_mode"] == "RGB"
    assert len(resized.preprocessing["mean"]) == 3


def test_npz_features_images_and_errors(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    names = np.array([f"digit {i}" for i in range(10)])
    np.savez(tmp_path / "features.npz", x=digits.data, y=digits.target, label_names=names)
    features = build_data(DataConfig(name="npz", path=str(tmp_path / "features.npz")), seed=0)
    assert features.kind == "features" and features.label_names[3] == "digit 3"
    assert features.input_spec["num_features"] == 64 and first_input(features.train[0]).shape == (64,)
    assert len(features.preprocessing["mean"]) == 64
    assert json.loads(json.dumps(features.preprocessing)) == features.preprocessing

    np.savez(tmp_path / "images.npz", x=digits.images.astype(np.uint8), y=digits.target)
    images = build_data(DataConfig(name="npz", path=str(tmp_path / "images.npz")), seed=0)
    assert images.kind == "image" and first_input(images.train[0]).shape == (1, 8, 8)

    np.savez(tmp_path / "nolabels.npz", x=digits.data)
    with pytest.raises(UserError, match=r"nolabels\.npz: no array 'y'"):
        build_data(DataConfig(name="npz", path=str(tmp_path / "nolabels.npz")), seed=0)


# --- the split function -----------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    keys=st.lists(st.integers(0, 60), min_size=1, max_size=120),
    n_classes=st.integers(1, 5),
    val_fraction=st.sampled_from([0.0, 0.05, 0.1, 0.25]),
    test_fraction=st.sampled_from([0.01, 0.1, 0.2, 0.5]),
    max_samples=st.sampled_from([None, 10, 25]),
    seed=st.integers(0, 2**16),
    grouped=st.booleans(),
)
def test_splits_are_disjoint_complete_and_deterministic(
    keys, n_classes, val_fraction, test_fraction, max_samples, seed, grouped
):
    labels = np.array([k % n_classes for k in keys])
    groups = [k // 3 for k in keys] if grouped else None
    cfg = DataConfig(
        name="digits", val_fraction=val_fraction, test_fraction=test_fraction, max_samples=max_samples
    )
    unique = deduplicate(keys)
    units = len(unique) if groups is None else len({groups[i] for i in unique})
    units = min(units, max_samples or units)
    if units - fraction_size(units, test_fraction) - fraction_size(units, val_fraction) < 1:
        with pytest.raises(UserError, match="too few"):
            plan_splits(keys, labels, cfg, seed, groups)
        return
    split = plan_splits(keys, labels, cfg, seed, groups)
    assert (split.val is None) == (val_fraction == 0)
    parts = [p for p in (split.train, split.val, split.test) if p is not None]
    assert all(len(p) > 0 for p in parts)
    chosen = np.concatenate(parts)
    assert len(chosen) == len(set(chosen.tolist()))  # disjoint
    assert len({keys[i] for i in chosen}) == len(chosen)  # no duplicate items anywhere
    if max_samples is None:
        assert set(chosen.tolist()) == set(unique.tolist())  # covers every deduplicated item
    if groups is not None:
        owners = [{groups[i] for i in p} for p in parts]
        assert sum(len(o) for o in owners) == len(set().union(*owners))  # a group never spans splits
    again = plan_splits(keys, labels, cfg, seed, groups)
    assert all(
        np.array_equal(a, b)
        for a, b in zip((split.train, split.test), (again.train, again.test), strict=True)
    )
    assert split.val is None or np.array_equal(split.val, again.val)
