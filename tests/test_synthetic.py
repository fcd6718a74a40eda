"""The synthetic world: deterministic, streamable, structured, and honest about its ground truth."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from data import shards
from data.shards import SPLIT_CODES, PreparedDataset
from data.synthetic import (
    DENSE_NAMES,
    PRESETS,
    SyntheticConfig,
    generate,
    load_config,
    make_world,
    prepare_synthetic,
)

TINY = PRESETS["tiny"]
CTR_SPARSE = ["user", "item", "age_bucket", "gender", "occupation", "region", "category", "price_bucket"]


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Exact ROC AUC, tied scores counting one half (Mann-Whitney with average ranks)."""
    score = np.asarray(score, dtype=np.float64)
    pos = np.asarray(label) > 0.5
    order = np.argsort(score, kind="stable")
    _, first, counts = np.unique(score[order], return_index=True, return_counts=True)
    ranks = np.empty(len(score))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    p, n = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - p * (p + 1) / 2.0) / (p * n))


def test_auc_helper():
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 1])) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    return PreparedDataset(generate(TINY, tmp_path_factory.mktemp("syn") / "tiny"))


def _contents(path: Path) -> dict[str, bytes]:
    """Every file of a dataset; meta.json without its creation time."""
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file():
            out[str(f.relative_to(path))] = f.read_bytes()
    meta = json.loads(out.pop("meta.json"))
    meta.pop("created_at")
    out["meta.json"] = json.dumps(meta, sort_keys=True).encode()
    return out


# -- layout ----------------------------------------------------------------------------------------
def test_layout(tiny: PreparedDataset):
    nu, ni = TINY.num_users, TINY.num_items
    assert tiny.counts == {"interactions": 10_000, "users": nu, "items": ni, "ctr_rows": 20_000}
    rows = {t: info.rows for t, info in tiny.tables.items()}
    assert rows == {
        "users": nu + 1, "items": ni + 1, "sequences": nu, "truth": nu + 1,
        "interactions": 10_000, "ctr": 20_000,
    }  # fmt: skip
    assert len(tiny.idmap("user")) == nu and len(tiny.idmap("item")) == ni
    # row 0 is the OOV bucket; real values start at 1 and stay inside the vocabulary
    for table, cols in {
        "users": ["age_bucket", "gender", "occupation", "region"],
        "items": ["category"],
    }.items():
        for col in cols:
            x = np.asarray(tiny.column(table, col))
            info = tiny.info(table, col)
            assert x[0] == 0 and x[1:].min() >= 1 and x.max() < info.vocab, (table, col)
            assert len(tiny.idmap(info.idmap)) == info.vocab - 1
    tags = tiny.jagged("items", "tags")
    lengths = np.diff(np.asarray(tags.offsets))
    assert lengths[0] == 0 and lengths[1:].min() >= 1 and lengths.max() <= 4
    assert all(len(set(tags.row(i))) == len(tags.row(i)) for i in range(1, ni + 1))

    # interactions: leave-one-out, strictly increasing time within a user
    user = np.asarray(tiny.column("interactions", "user"))
    ts = np.asarray(tiny.column("interactions", "timestamp"))
    split = np.asarray(tiny.column("interactions", "split"))
    assert tiny.info("interactions", "split").dtype == "uint8"
    assert np.all(np.diff(user) >= 0) and np.all(np.diff(ts)[np.diff(user) == 0] > 0)
    per_user = np.bincount(user, minlength=nu + 1)[1:]
    assert per_user.min() >= 3
    for code in (SPLIT_CODES["val"], SPLIT_CODES["test"]):
        assert np.array_equal(np.bincount(user[split == code], minlength=nu + 1)[1:], np.ones(nu))
    last = np.flatnonzero(np.diff(np.append(user, -1)))
    assert np.all(split[last] == SPLIT_CODES["test"]) and np.all(split[last - 1] == SPLIT_CODES["val"])
    # sequences hold the same events in the same order
    seq = tiny.jagged("sequences", "items")
    assert np.array_equal(np.asarray(tiny.column("sequences", "user")), np.arange(1, nu + 1))
    assert np.array_equal(np.asarray(seq.values), np.asarray(tiny.column("interactions", "item")))
    assert np.array_equal(np.diff(np.asarray(seq.offsets)), per_user)

    # ctr: side features agree with the entity tables, dense is [rows, 8], prob is not a feature
    ctr_user = np.asarray(tiny.column("ctr", "user"))
    ctr_item = np.asarray(tiny.column("ctr", "item"))
    for col in ["age_bucket", "gender", "occupation", "region"]:
        assert np.array_equal(
            np.asarray(tiny.column("ctr", col)), np.asarray(tiny.column("users", col))[ctr_user]
        )
    for col in ["category", "price_bucket"]:
        assert np.array_equal(
            np.asarray(tiny.column("ctr", col)), np.asarray(tiny.column("items", col))[ctr_item]
        )
    vals, lens = tags.take(ctr_item[:50])
    ctr_tags = tiny.jagged("ctr", "tags")
    assert np.array_equal(np.asarray(ctr_tags.values[: lens.sum()]), vals)
    dense = tiny.info("ctr", "dense")
    assert (
        tiny.column("ctr", "dense").shape == (20_000, 8) and dense.width == 8 and dense.names == DENSE_NAMES
    )
    assert tiny.info("ctr", "prob").vocab is None and tiny.info("ctr", "label").dtype == "float32"
    assert set(np.unique(tiny.column("ctr", "label"))) <= {0.0, 1.0}
    ctr_split = np.bincount(tiny.column("ctr", "split"), minlength=3) / 20_000
    assert np.allclose(ctr_split, [0.8, 0.1, 0.1], atol=0.02)

    spec = {s["name"]: s for s in tiny.meta["feature_spec"]}
    assert set(spec) == {*CTR_SPARSE, "tags", "dense"}
    assert spec["tags"]["multi_valued"] and spec["dense"]["kind"] == "dense"
    for name in CTR_SPARSE:
        assert spec[name]["vocab"] == tiny.info("ctr", name).vocab and spec[name]["kind"] == "sparse"
    assert load_config(tiny.path) == TINY


# -- determinism and streaming ---------------------------------------------------------------------
def test_deterministic(tiny: PreparedDataset, tmp_path: Path):
    again = generate(TINY, tmp_path / "again")
    assert _contents(again) == _contents(tiny.path)
    other = PreparedDataset(generate(dataclasses.replace(TINY, seed=1), tmp_path / "seed1"))
    assert not np.array_equal(
        np.asarray(other.column("interactions", "item")), tiny.column("interactions", "item")
    )
    assert not np.array_equal(np.asarray(other.column("ctr", "label")), tiny.column("ctr", "label"))


def test_chunked_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    blocks = dataclasses.replace(TINY, block_users=64, block_rows=3_000)
    whole = generate(blocks, tmp_path / "whole")

    appended: dict[str, list[int]] = {}
    real_append = shards.ColumnWriter.append

    def spy(self: shards.ColumnWriter, chunk: np.ndarray) -> None:
        appended.setdefault(f"{self.path.parent.name}/{self.path.name}", []).append(len(chunk))
        real_append(self, chunk)

    monkeypatch.setattr(shards.ColumnWriter, "append", spy)
    chunked = generate(dataclasses.replace(blocks, chunk_rows=500), tmp_path / "chunked")
    monkeypatch.undo()

    streamed = {k: v for k, v in appended.items() if k.split("/")[0] not in ("users", "items")}
    assert {k.split("/")[0] for k in streamed} == {"interactions", "sequences", "ctr", "truth"}
    longest_sequence = int(np.diff(PreparedDataset(chunked).jagged("sequences", "items").offsets).max())
    for name, sizes in streamed.items():
        limit = max(500, longest_sequence) if name == "sequences/items.values.npy" else 500
        assert max(sizes) <= limit, name
    assert len(streamed["interactions/item.npy"]) >= 20 and len(streamed["ctr/dense.npy"]) >= 40
    ds = PreparedDataset(chunked)
    assert ds.tables["interactions"].rows == 10_000 and ds.tables["ctr"].rows == 20_000
    assert ds.tables["truth"].rows == TINY.num_users + 1
    # chunk_rows is an I/O knob only: the data is the same byte for byte
    a, b = _contents(whole), _contents(chunked)
    a.pop("meta.json"), b.pop("meta.json")
    assert a == b


def test_popularity_skew(tiny: PreparedDataset):
    items = np.asarray(tiny.column("interactions", "item"))
    counts = np.sort(np.bincount(items, minlength=TINY.num_items + 1)[1:])[::-1]
    share = counts[: TINY.num_items // 10].sum() / counts.sum()
    assert share > 0.4
    pop = tiny.meta["ground_truth"]["popularity"]
    assert pop["top10pct_item_share"] == pytest.approx(share)
    assert pop["repeat_rate"] < 0.15  # repeats happen, but rarely


def test_sequential_dynamics(tiny: PreparedDataset):
    """The previous item's category predicts the next one: beyond the marginal, and beyond the
    user's taste alone (the same sequences shuffled keep the taste but lose the order)."""
    category = np.asarray(tiny.column("items", "category"))
    seq = tiny.jagged("sequences", "items")
    c = TINY.num_categories + 1
    rng = np.random.default_rng(0)

    def pairs(shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
        prev, nxt = [], []
        for u in range(len(seq)):
            cats = category[np.asarray(seq.row(u))]
            if shuffle:
                cats = rng.permutation(cats)
            prev.append(cats[:-1])
            nxt.append(cats[1:])
        return np.concatenate(prev), np.concatenate(nxt)

    def accuracy(prev: np.ndarray, nxt: np.ndarray) -> float:
        half = len(prev) // 2  # fit on the first half of the users, score on the second
        counts = np.zeros((c, c))
        np.add.at(counts, (prev[:half], nxt[:half]), 1)
        return float((counts.argmax(axis=1)[prev[half:]] == nxt[half:]).mean())

    prev, nxt = pairs(shuffle=False)
    majority = float((nxt[len(nxt) // 2 :] == np.bincount(nxt[: len(nxt) // 2]).argmax()).mean())
    ordered = accuracy(prev, nxt)
    shuffled = accuracy(*pairs(shuffle=True))
    assert ordered > majority + 0.15, (ordered, majority)
    assert ordered > shuffled + 0.05, (ordered, shuffled)


# -- CTR ground truth ------------------------------------------------------------------------------
def _logistic_regression(
    ds: PreparedDataset, steps: int = 300, lr: float = 0.05, l2: float = 1e-3
) -> np.ndarray:
    """Logits of a one-hot + dense logistic regression fitted (full-batch Adam) on the train rows."""
    x = {f: np.asarray(ds.column("ctr", f)) for f in CTR_SPARSE}
    vocab = {f: ds.info("ctr", f).vocab for f in CTR_SPARSE}
    tags = ds.jagged("ctr", "tags")
    tag_lens = np.diff(np.asarray(tags.offsets))
    tag_row = np.repeat(np.arange(len(tag_lens)), tag_lens)
    tag_w = 1.0 / tag_lens[tag_row]  # mean over an item's tags
    tag_vals = np.asarray(tags.values)
    tag_vocab = ds.info("ctr", "tags").vocab
    dense = np.asarray(ds.column("ctr", "dense"), dtype=np.float64)
    y = np.asarray(ds.column("ctr", "label"), dtype=np.float64)
    train = np.asarray(ds.column("ctr", "split")) == SPLIT_CODES["train"]
    n = len(y)
    params = {f: np.zeros(vocab[f]) for f in CTR_SPARSE}
    params.update(tags=np.zeros(tag_vocab), dense=np.zeros(dense.shape[1]), bias=np.zeros(1))
    m1 = {k: np.zeros_like(v) for k, v in params.items()}
    m2 = {k: np.zeros_like(v) for k, v in params.items()}

    def logits() -> np.ndarray:
        z = params["bias"][0] + dense @ params["dense"]
        for f in CTR_SPARSE:
            z = z + params[f][x[f]]
        return z + np.bincount(tag_row, weights=params["tags"][tag_vals] * tag_w, minlength=n)

    for t in range(1, steps + 1):
        g = np.where(train, 1.0 / (1.0 + np.exp(-logits())) - y, 0.0) / train.sum()
        grads = {"bias": np.array([g.sum()]), "dense": dense.T @ g}
        for f in CTR_SPARSE:
            grads[f] = np.bincount(x[f], weights=g, minlength=vocab[f]) + l2 * params[f]
        grads["tags"] = (
            np.bincount(tag_vals, weights=g[tag_row] * tag_w, minlength=tag_vocab) + l2 * params["tags"]
        )
        for k, gk in grads.items():
            m1[k] = 0.9 * m1[k] + 0.1 * gk
            m2[k] = 0.999 * m2[k] + 0.001 * gk**2
            params[k] -= lr * (m1[k] / (1 - 0.9**t)) / (np.sqrt(m2[k] / (1 - 0.999**t)) + 1e-8)
    return logits()


def test_ctr_is_learnable_but_not_beyond_bayes(tiny: PreparedDataset):
    test = tiny.split_rows("ctr", "test")
    label = np.asarray(tiny.column("ctr", "label"))[test]
    model_auc = auc(_logistic_regression(tiny)[test], label)
    bayes = tiny.meta["ground_truth"]["bayes_auc"]["test"]
    assert model_auc > 0.65
    assert model_auc < bayes + 0.02
    assert bayes > model_auc + 0.03  # the pairwise terms leave room for models with interactions


def test_bayes_auc_matches_recomputation(tiny: PreparedDataset):
    gt = tiny.meta["ground_truth"]
    prob = np.asarray(tiny.column("ctr", "prob"))
    label = np.asarray(tiny.column("ctr", "label"))
    for split in SPLIT_CODES:
        rows = tiny.split_rows("ctr", split)
        assert gt["bayes_auc"][split] == pytest.approx(auc(prob[rows], label[rows]), abs=1e-9)
        assert gt["ctr"][split] == pytest.approx(label[rows].mean())
        assert 0.10 <= label[rows].mean() <= 0.25
    # the labels really are Bernoulli(prob): calibration in prob deciles
    edges = np.quantile(prob, np.linspace(0, 1, 11))
    bins = np.clip(np.searchsorted(edges, prob, side="right") - 1, 0, 9)
    for b in range(10):
        m = bins == b
        assert abs(label[m].mean() - prob[m].mean()) < 4 * np.sqrt(prob[m].mean() / m.sum()) + 0.01


def test_truth_top_items(tiny: PreparedDataset):
    world = make_world(load_config(tiny.path))
    top = tiny.jagged("truth", "top_items")
    top_scores = tiny.jagged("truth", "top_scores")
    assert len(top.row(0)) == 0
    users = np.arange(1, TINY.num_users + 1)
    scores = world.true_scores(users)  # [users, items], column j = item j + 1
    rng = np.random.default_rng(0)
    for u in users:
        items = np.asarray(top.row(u))
        assert len(items) == 50 and len(set(items)) == 50
        s = scores[u - 1, items - 1]
        assert np.allclose(s, np.asarray(top_scores.row(u)), atol=1e-4)
        assert np.all(np.diff(s) <= 1e-6)  # best first
        others = np.setdiff1d(np.arange(1, TINY.num_items + 1), items)
        assert s.min() >= scores[u - 1, others - 1].max() - 1e-5  # exactly the top 50
        random_items = rng.choice(others, size=50)
        assert s.mean() > scores[u - 1, random_items - 1].mean()
    # the scores are log-probabilities over all items
    assert np.allclose(np.exp(scores.astype(np.float64)).sum(axis=1), 1.0, atol=1e-3)

    # the truth predicts what users actually do better than popularity does
    user = np.asarray(tiny.column("interactions", "user"))
    item = np.asarray(tiny.column("interactions", "item"))
    split = np.asarray(tiny.column("interactions", "split"))
    held_out = split == SPLIT_CODES["test"]
    top_matrix = np.asarray(top.values).reshape(TINY.num_users, 50)
    truth_hits = (top_matrix[user[held_out] - 1] == item[held_out][:, None]).any(axis=1).mean()
    popular = np.argsort(-np.bincount(item[split == SPLIT_CODES["train"]]), kind="stable")[:50]
    assert truth_hits > np.isin(item[held_out], popular).mean()


# -- API ------------------------------------------------------------------------------------------
def test_prepare_synthetic_and_errors(tiny: PreparedDataset, tmp_path: Path):
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        prepare_synthetic(tmp_path / "x", "huge")
    with pytest.raises(FileExistsError):
        generate(TINY, tiny.path)
    with pytest.raises(ValueError, match="num_interactions"):
        generate(dataclasses.replace(TINY, num_interactions=100), tmp_path / "bad")
    with pytest.raises(ValueError, match="num_items"):
        make_world(dataclasses.replace(TINY, num_items=5))
    assert not (tmp_path / "bad").exists()
    out = prepare_synthetic(tmp_path / "p", "tiny", seed=3)
    ds = PreparedDataset(out)
    assert ds.meta["generator"]["seed"] == 3 and ds.counts["interactions"] == 10_000
    prepare_synthetic(out, "tiny", seed=4, overwrite=True)
    assert PreparedDataset(out).meta["generator"]["seed"] == 4
    with pytest.raises(ValueError, match="unknown SyntheticConfig field"):
        SyntheticConfig.from_json({**TINY.to_json(), "bogus": 1})


def test_presets():
    assert {"tiny", "small", "medium", "large"} <= set(PRESETS)
    for cfg in PRESETS.values():
        cfg.validate()
    assert PRESETS["tiny"].num_interactions <= 20_000
    assert 300_000 <= PRESETS["small"].num_interactions <= 1_000_000
    assert PRESETS["medium"].num_interactions >= 5_000_000
    large = PRESETS["large"]
    assert (
        large.num_interactions >= 100_000_000
        and large.num_users >= 1_000_000
        and large.num_items >= 1_000_000
    )
    # streamed: a block is a small fraction of the data
    assert large.block_users * 10 < large.num_users and large.chunk_rows * 10 < large.num_interactions
