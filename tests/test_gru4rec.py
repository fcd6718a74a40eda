"""GRU4Rec on the sequential pipeline: causality, left-padding invariance, 2-rank training, export.

The data, losses and evaluation are SASRec's (tests/test_sasrec.py); these tests cover what the
recurrent encoder changes: the rotation that keeps left padding out of the GRU state, DDP over the
GRU weights, and a ``torch.export``-able query tower.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_engine import torchrun
from test_sasrec import popularity_baseline, world, write_config  # noqa: F401 - world is a fixture

from data.sequential import NegativeSampling, SequentialDataModule
from data.shards import PreparedDataset
from models.gru4rec import GRU4Rec, GRU4RecConfig, rotate_rows
from trainer.checkpoint import load_unsharded, save_unsharded

MODEL = {"embedding_dim": 32, "hidden_dim": 48, "num_layers": 2, "max_len": 20, "dropout": 0.1}


def small_model() -> GRU4Rec:
    torch.manual_seed(0)
    cfg = GRU4RecConfig(num_items=40, embedding_dim=12, hidden_dim=16, num_layers=2, max_len=10, dropout=0.3,
                        init_scale=0.5)  # fmt: skip
    return GRU4Rec(cfg).eval()


def all_scores(model: GRU4Rec, seq: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        hidden, _ = model(seq, torch.zeros(0, dtype=torch.int64))
        return hidden @ model.item_weight().T


def test_rotate_rows_moves_left_padding_to_the_right() -> None:
    x = torch.tensor([[0, 0, 1, 2], [1, 2, 3, 4], [0, 0, 0, 5]])
    pad = (x == 0).sum(dim=1)
    right = rotate_rows(x, pad)
    assert right.tolist() == [[1, 2, 0, 0], [1, 2, 3, 4], [5, 0, 0, 0]]
    assert torch.equal(rotate_rows(right, (4 - pad) % 4), x)


def test_future_items_never_change_earlier_positions() -> None:
    model = small_model()
    seq = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
    before = all_scores(model, seq)
    for t in range(seq.shape[1] - 1):
        changed = seq.clone()
        changed[:, t + 1 :] = torch.randint(1, 40, changed[:, t + 1 :].shape)
        after = all_scores(model, changed)
        torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-6)
    changed = seq.clone()
    changed[:, 4] = 12
    assert (all_scores(model, changed)[:, 4:] - before[:, 4:]).abs().max() > 1e-3


def test_extra_left_padding_does_not_change_scores() -> None:
    model = small_model()
    seq = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5], [0, 0, 0, 0, 7]])
    base = all_scores(model, seq)
    for extra in (1, 5):
        padded = torch.cat([torch.zeros(3, extra, dtype=torch.int64), seq], dim=1)
        torch.testing.assert_close(all_scores(model, padded)[:, extra:], base, rtol=0, atol=1e-5)


def plain_model(dataset: Path, checkpoint: Path, **overrides: object) -> GRU4Rec:
    num_items = int(PreparedDataset(dataset).info("sequences", "items").vocab or 0)
    model = GRU4Rec(GRU4RecConfig(num_items=num_items, **{**MODEL, **overrides}))  # type: ignore[arg-type]
    return load_unsharded(model, checkpoint).eval()  # type: ignore[return-value]


@pytest.fixture(scope="module")
def trained(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    d = tmp_path_factory.mktemp("gru4rec")
    cfg = write_config(d / "cfg.yaml", world, d / "run", model_name="gru4rec",
                       model={**MODEL, "loss": "sampled_softmax", "num_negatives": 100})  # fmt: skip
    torchrun(2, ["--config", str(cfg)])
    return d


@pytest.mark.slow
def test_learns_the_sequences_well_above_popularity(trained: Path, world: Path) -> None:  # noqa: F811
    summary = json.loads((trained / "run" / "summary.json").read_text())
    assert summary["plan"] == [{"table": "item", "sharding_type": "row_wise", "ranks": [0, 1]}]
    metrics, pop = summary["metrics"], popularity_baseline(world)
    assert metrics["test/full_hr@10"] >= 1.4 * pop["hr@10"], (metrics, pop)
    assert metrics["test/full_ndcg@10"] >= 1.4 * pop["ndcg@10"], (metrics, pop)


@pytest.mark.slow
def test_export_query_encoder_matches_the_model(trained: Path, world: Path, tmp_path: Path) -> None:  # noqa: F811
    from trainer.sequential import export_sasrec

    checkpoint = trained / "run" / "checkpoints" / "final.ckpt"
    out = export_sasrec(checkpoint, trained / "cfg.yaml", tmp_path / "artifact", "flat")
    assert json.loads((out / "meta.json").read_text())["model_type"] == "gru4rec"
    encoder = torch.export.load(out / "encoder.pt2").module()
    model = plain_model(world, checkpoint)
    seq = torch.tensor([[0] * 17 + [5, 6, 7], list(range(1, 21)), [0] * 19 + [9]])
    with torch.no_grad():
        hidden, _ = model(seq, torch.zeros(0, dtype=torch.int64))
        torch.testing.assert_close(encoder(seq), hidden[:, -1], rtol=0, atol=1e-5)
        torch.testing.assert_close(encoder(seq[:1]), hidden[:1, -1], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_rank_sharded_training_equals_unsharded(world: Path, tmp_path: Path) -> None:  # noqa: F811
    """BCE with the paper's per-position negatives; dropout off so both runs are deterministic."""
    steps, init_dir = 10, tmp_path / "init"
    num_items = int(PreparedDataset(world).info("sequences", "items").vocab or 0)
    torch.manual_seed(123)
    model = GRU4Rec(GRU4RecConfig(num_items=num_items, **{**MODEL, "dropout": 0.0}))  # type: ignore[arg-type]
    save_unsharded(model, init_dir)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    sparse = list(model.items.parameters())
    dense = [p for n, p in model.named_parameters() if not n.startswith("items.")]
    sgd, adam = torch.optim.SGD(sparse, lr=0.5), torch.optim.Adam(dense, lr=0.003)
    negatives = NegativeSampling("per_position")
    dm = SequentialDataModule(world, max_len=MODEL["max_len"], batch_size=64, negatives=negatives)
    for _, batch in zip(range(steps), dm.loader("train"), strict=False):
        valid = batch.targets > 0
        hidden, _ = model(batch.inputs, torch.zeros(0, dtype=torch.int64))
        h, weight = hidden[valid], model.item_weight()
        pos = (h * weight[batch.targets[valid]]).sum(dim=1)
        neg = (h * weight[batch.negatives[valid]]).sum(dim=1)
        loss = -(F.logsigmoid(pos) + F.logsigmoid(-neg)).mean()
        sgd.zero_grad()
        adam.zero_grad()
        loss.backward()
        sgd.step()
        adam.step()
    reference = model.state_dict()

    cfg = write_config(
        tmp_path / "cfg.yaml", world, tmp_path / "run", model_name="gru4rec",
        model={**MODEL, "dropout": 0.0, "loss": "bce"}, sparse_optimizer={"name": "sgd", "lr": 0.5},
        trainer={"max_steps": steps, "max_epochs": 1, "test_after_fit": False},
    )  # fmt: skip
    torchrun(2, ["--config", str(cfg), "--init-from", str(init_dir)])
    sharded = plain_model(world, tmp_path / "run" / "checkpoints" / "final.ckpt").state_dict()
    table = "items.embeddings.item.weight"
    assert (reference[table] - init[table]).abs().max() > 1e-3, "reference did not train the item table"
    diffs = {k: (sharded[k] - reference[k]).abs().max().item() for k in reference}
    worst = max(diffs.items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-5, f"largest difference {worst[1]:.3g} in {worst[0]}"
