"""SASRec: model invariants, losses, leave-one-out data, distributed training/evaluation, export.

The multi-process tests run real torchrun jobs on gloo (2 CPU ranks) with the item table row-wise
sharded: 2-rank training equals plain 1-process training for each loss, the distributed
log-sum-exp equals the single-process one (this file is also the torchrun script for that check),
the model learns the synthetic world's sequences well above popularity, and the 2-rank evaluation
of both protocols equals a brute-force evaluation of the same checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from test_engine import torchrun

from data.sequential import NegativeSampling, SequenceBatch, SequenceSplits, SequentialDataModule
from data.shards import ColumnInfo, DatasetWriter, PreparedDataset
from models.sasrec import SASRec, SASRecConfig, lookup_items
from trainer.checkpoint import load_unsharded, save_unsharded
from trainer.sequential import (
    bce_loss,
    candidate_ranges,
    distributed_logsumexp,
    full_scores,
    sampled_softmax_loss,
)

REPO = Path(__file__).resolve().parents[1]

MAX_LEN = 20
MODEL = {"embedding_dim": 32, "max_len": MAX_LEN, "num_blocks": 2, "num_heads": 2, "dropout": 0.2}


# -- model invariants ------------------------------------------------------------------------------
# The encoder's block layouts: ours pre-LN (the default), ours post-LN, and the paper's TF1 block
# with its Glorot init (which sets the item table's init itself, so no init_scale).
BLOCKS = {
    "pre_ln": {"init_scale": 0.5},
    "post_ln": {"pre_ln": False, "init_scale": 0.5},
    "paper": {"block": "paper", "init": "xavier"},
}


def small_config(block: str, dropout: float) -> SASRecConfig:
    sizes = {"num_items": 40, "embedding_dim": 12, "max_len": 10, "num_blocks": 2, "num_heads": 2}
    return SASRecConfig(**sizes, dropout=dropout, **BLOCKS[block])  # type: ignore[arg-type]


def small_model(block: str = "pre_ln", seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(small_config(block, dropout=0.3)).eval()


def all_scores(model: SASRec, seq: torch.Tensor) -> torch.Tensor:
    """Scores ``[B, L, items]`` of every position against every item."""
    with torch.no_grad():
        hidden, _ = model(seq, torch.zeros(0, dtype=torch.int64))
        return hidden @ model.item_weight().T


@pytest.mark.parametrize("block", list(BLOCKS))
def test_future_items_never_change_earlier_positions(block: str) -> None:
    model = small_model(block)
    seq = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 9, 10, 11]])
    before = all_scores(model, seq)
    for t in range(seq.shape[1] - 1):
        changed = seq.clone()
        changed[:, t + 1 :] = torch.randint(1, 40, changed[:, t + 1 :].shape)
        after = all_scores(model, changed)
        torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-6)
    # and the positions after the change do move: the test would catch a model that ignores inputs
    changed = seq.clone()
    changed[:, 5] = 12
    assert (all_scores(model, changed)[:, 5:] - before[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("block", list(BLOCKS))
def test_extra_left_padding_does_not_change_scores(block: str) -> None:
    model = small_model(block)
    seq = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5], [0, 0, 0, 0, 7]])
    base = all_scores(model, seq)
    for extra in (1, 5):
        padded = torch.cat([torch.zeros(3, extra, dtype=torch.int64), seq], dim=1)
        torch.testing.assert_close(all_scores(model, padded)[:, extra:], base, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds model.max_len"):
        all_scores(model, torch.ones(1, 11, dtype=torch.int64))


@pytest.mark.parametrize("block", list(BLOCKS))
def test_training_on_the_real_items_only_equals_the_padded_grid(block: str) -> None:
    """Training packs the real positions (``TokenLayout``); evaluation keeps the grid: same numbers."""
    seq = torch.tensor([[0, 0, 0, 3, 4, 5], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 9]])
    results = []
    for training in (True, False):
        torch.manual_seed(0)
        model = SASRec(small_config(block, dropout=0.0)).train(training)
        hidden, _ = model(seq, torch.zeros(0, dtype=torch.int64))
        (hidden * torch.linspace(-1, 1, 12)).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((hidden.detach(), grads))
    (packed, packed_grads), (grid, grid_grads) = results
    assert (grid[seq == 0] == 0).all() and (packed[seq == 0] == 0).all()
    torch.testing.assert_close(packed, grid, rtol=0, atol=1e-6)
    assert packed_grads.keys() == grid_grads.keys() and len(grid_grads) > 10
    for name, grad in grid_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=1e-5, msg=name)


def test_paper_block_differs_from_ours_as_the_tf1_code() -> None:
    """``block: paper`` by hand: queries and residual from LN(x), keys/values from x, no projection."""
    torch.manual_seed(0)
    encoder = SASRec(SASRecConfig(num_items=40, embedding_dim=8, max_len=4, num_blocks=1, num_heads=1,
                                  dropout=0.0, block="paper")).encoder.eval()  # fmt: skip
    block = encoder.blocks[0]
    assert isinstance(block.attn.proj, torch.nn.Identity) and block.attn_norm.eps == 1e-8
    x = torch.randn(1, 4, 8)
    with torch.no_grad():
        hidden = encoder(x, torch.ones(1, 4, dtype=torch.bool))
        h = x * math.sqrt(8) + encoder.positions.weight
        q_in = F.layer_norm(h, (8,), block.attn_norm.weight, block.attn_norm.bias, eps=1e-8)
        q, k, v = block.attn.query(q_in), block.attn.key(h), block.attn.value(h)
        future = ~torch.ones(4, 4, dtype=torch.bool).tril()
        scores = (q @ k.transpose(1, 2) / math.sqrt(8)).masked_fill(future, -math.inf)
        y = q_in + scores.softmax(dim=-1) @ v
        y = block.ffn_norm(y)
        y = encoder.final_norm(y + block.ffn(y))
    torch.testing.assert_close(hidden, y, rtol=0, atol=1e-5)


def glorot_bound(weight: torch.Tensor) -> float:
    return math.sqrt(6.0 / (weight.shape[0] + weight.shape[1]))


def assert_glorot(weight: torch.Tensor, bound: float, name: str) -> None:
    """Within Glorot's U(-b, b) and filling it (torch's default inits have other bounds or are normal)."""
    top = weight.detach().abs().max().item()
    assert 0.9 * bound < top <= bound, f"{name}: max |w| {top:.4f}, Glorot bound {bound:.4f}"


def test_xavier_init_gives_the_glorot_bounds() -> None:
    """``init: xavier`` on a plain module, and through the TorchRec path: built on meta, materialised
    by DMP (one gloo process), which calls each module's ``reset_parameters``."""
    import tempfile

    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    from trainer.sharding import sharders

    kwargs = {"num_items": 3000, "embedding_dim": 10, "max_len": 10, "num_heads": 2, "ffn_dim": 20}
    torch.manual_seed(0)
    default = SASRec(SASRecConfig(**kwargs)).encoder  # type: ignore[arg-type]
    cfg = SASRecConfig(**kwargs, block="paper", init="xavier")  # type: ignore[arg-type]
    assert cfg.item_init_scale() == pytest.approx(math.sqrt(6 / (3000 + 10)))
    # torch's default kernel init stays well inside Glorot's bound: the test can tell the inits apart
    default_kernel = default.blocks[0].ffn[0].weight
    assert default_kernel.abs().max() < 0.9 * glorot_bound(default_kernel)
    plain = SASRec(cfg)
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        try:
            dmp = DistributedModelParallel(SASRec(cfg, torch.device("meta")), device=torch.device("cpu"),
                                           env=ShardingEnv.from_process_group(dist.group.WORLD),
                                           sharders=sharders())  # fmt: skip
            table = dmp.state_dict()["items.embeddings.item.weight"].local_shards()[0].tensor
            sharded = dmp.module
        finally:
            dist.destroy_process_group()
    assert table.shape == (3000, 12)
    assert_glorot(table[:, :10], cfg.item_init_scale(), "sharded item table")
    for name, model in (("plain", plain), ("sharded", sharded)):
        encoder = model.encoder
        assert_glorot(encoder.positions.weight, glorot_bound(encoder.positions.weight), f"{name} positions")
        for kernel in ("attn.query", "ffn.0", "ffn.3"):
            linear = encoder.blocks[1].get_submodule(kernel)
            assert_glorot(linear.weight, glorot_bound(linear.weight), f"{name} {kernel}")
            assert (linear.bias == 0).all(), f"{name} {kernel}.bias"
    assert_glorot(plain.item_weight(), cfg.item_init_scale(), "plain item table")


def test_compiled_encoder_equals_eager() -> None:
    """``model.compile: true`` (``encoder.compile()``, inductor on CPU here) changes no number: the
    evaluation grid and the packed training layout, outputs and gradients."""
    import os
    import shutil

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"inductor's CPU backend needs a C++ compiler; {compiler!r} is not on PATH")
    seq = torch.tensor([[0, 0, 0, 3, 4, 5], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 9]])
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg = SASRecConfig(num_items=40, embedding_dim=12, max_len=10, num_blocks=2, num_heads=2, dropout=0.0,
                           init_scale=0.5)  # fmt: skip
        model = SASRec(cfg)
        if compiled:
            model.encoder.compile()
        with torch.no_grad():
            grid, _ = model.eval()(seq, torch.zeros(0, dtype=torch.int64))
        packed, _ = model.train()(seq, torch.zeros(0, dtype=torch.int64))
        (packed * torch.linspace(-1, 1, 12)).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((grid, packed.detach(), grads))
    (grid, packed, grads), (grid_c, packed_c, grads_c) = results
    torch.testing.assert_close(grid_c, grid, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed_c, packed, rtol=0, atol=1e-5)
    assert grads_c.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=0, atol=1e-5, msg=name)


def test_lookup_scatters_the_jagged_history_into_its_positions() -> None:
    model = small_model()
    seq = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 4], [0, 0, 0, 7]])
    out_ids = torch.tensor([5, 9, 5])
    history, out = lookup_items(model.items, seq, out_ids, 12)
    weight = model.item_weight()
    expected = weight[seq] * (seq != 0).unsqueeze(-1)
    torch.testing.assert_close(history, expected, rtol=0, atol=0)
    torch.testing.assert_close(out, weight[out_ids], rtol=0, atol=0)


def test_bf16_autocast_trains_close_to_fp32() -> None:
    """What ``precision: bf16-mixed`` does on GPUs, on the CPU: the losses stay float32 and close."""
    model = small_model()
    model.train()
    seq = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    targets = torch.tensor([[0, 0, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7]])
    valid = targets > 0
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            hidden, items = model(seq, torch.arange(1, 40))
            lse = distributed_logsumexp(hidden[valid], items)
            loss = (lse - (hidden[valid] * items[targets[valid] - 1]).sum(dim=1)).mean()
        assert loss.dtype == torch.float32
        loss.backward()
        losses[dtype] = loss.item()
    assert losses[torch.bfloat16] == pytest.approx(losses[torch.float32], rel=2e-2)


# -- losses against hand-computed values ---------------------------------------------------------------
def test_bce_loss_hand_computed() -> None:
    # -log s(2) - log(1 - s(-1)) = log(1 + e^-2) + log(1 + e^-1)
    got = bce_loss(torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 0.0]))
    expected = [math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)), 2 * math.log(2)]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-6)


def test_sampled_softmax_loss_hand_computed() -> None:
    # positive logit 1 (q 0.5), negatives 2 (q 0.25) and 0 (q 0.25, an accidental hit: ignored)
    got = sampled_softmax_loss(
        torch.tensor([1.0]), torch.tensor([[2.0, 0.0]]), torch.log(torch.tensor([0.5])),
        torch.log(torch.tensor([[0.25, 0.25]])), torch.tensor([[False, True]]),
    )  # fmt: skip
    pos, neg = 1.0 - math.log(0.5), 2.0 - math.log(0.25)
    expected = math.log(math.exp(pos) + math.exp(neg)) - pos
    torch.testing.assert_close(got, torch.tensor([expected]), rtol=0, atol=1e-6)
    # uniform q: the correction is a constant shift and changes nothing
    plain = sampled_softmax_loss(torch.tensor([1.0]), torch.tensor([[2.0]]), torch.tensor([-3.0]),
                                 torch.tensor([[-3.0]]), torch.tensor([[False]]))  # fmt: skip
    expected_plain = math.log(math.exp(1) + math.exp(2)) - 1
    torch.testing.assert_close(plain, torch.tensor([expected_plain]), rtol=0, atol=1e-6)


def test_full_softmax_logsumexp_hand_computed() -> None:
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    got = distributed_logsumexp(queries, items)  # one process: every item is local
    expected = [math.log(math.e + 1 + math.e**2), math.log(1 + math.e**2 + 1)]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-6)
    # the training loss of a position is lse - target logit: target item 2 of query 0
    assert float(got[0] - 2.0) == pytest.approx(math.log(math.exp(-1) + math.exp(-2) + 1), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_logsumexp_equals_torch(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Values and gradients of the chunked log-sum-exp (several chunks, a short last one) vs torch."""
    import trainer.sequential as seq

    monkeypatch.setattr(seq, "_LSE_CHUNK_ELEMENTS", {"cpu": 8 * 30})
    monkeypatch.setattr(seq, "_LSE_MIN_CHUNK_ROWS", 1)  # 8 rows a chunk: 37 queries in 5 chunks
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(37, 6, generator=gen, dtype=dtype).requires_grad_()
    items = (torch.randn(30, 6, generator=gen, dtype=dtype) * 3).requires_grad_()
    weights = torch.rand(37, generator=gen, dtype=dtype)
    got = seq.local_logsumexp(queries, items)
    assert got.dtype == dtype
    grads = torch.autograd.grad((got * weights).sum(), (queries, items))
    ref = torch.logsumexp(queries @ items.T, dim=1)
    ref_grads = torch.autograd.grad((ref * weights).sum(), (queries, items))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, ref, rtol=0, atol=tol)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=tol)
    empty = seq.local_logsumexp(queries, items[:0])  # a rank without candidates
    assert torch.isneginf(empty).all()


def test_candidate_ranges_follow_the_row_wise_plan() -> None:
    rows = [{"table": "item", "sharding_type": "row_wise",
             "shards": [{"rank": 0, "offsets": [0, 0], "sizes": [51, 52]},
                        {"rank": 1, "offsets": [51, 0], "sizes": [50, 52]}]}]  # fmt: skip
    assert candidate_ranges(rows, 101, 2) == [(1, 51), (51, 101)]
    tw = [{"table": "item", "sharding_type": "table_wise", "shards": []}]
    assert candidate_ranges(tw, 101, 2) == [(1, 51), (51, 101)]
    assert candidate_ranges([], 101, 1) == [(1, 101)]


# -- leave-one-out data --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def handmade(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Users with 6, 2, 3 and 1 items over a 30-item catalog."""
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11], [3]]
    path = tmp_path_factory.mktemp("loo") / "ds"
    with DatasetWriter(path, "handmade") as w:
        w.write_column("sequences", "user", np.arange(1, 5), ColumnInfo("int64", vocab=5))
        w.write_jagged("sequences", "items", np.concatenate(seqs), np.array([len(s) for s in seqs]),
                       ColumnInfo("int64", vocab=31))  # fmt: skip
    return path


def test_leave_one_out_windows(handmade: Path) -> None:
    s = SequenceSplits(PreparedDataset(handmade), max_len=3, negatives=NegativeSampling("per_position"))
    assert s.rows["train"].tolist() == [0, 1]  # row 2 keeps 1 training item, row 3 has one item
    assert s.rows["val"].tolist() == s.rows["test"].tolist() == [0, 2]
    train = s.train_batch(np.array([0, 1]), epoch=0)
    assert train.inputs.tolist() == [[1, 2, 3], [0, 0, 7]]  # training items [1 2 3 4] / [7 8]
    assert train.targets.tolist() == [[2, 3, 4], [0, 0, 8]]
    assert (train.negatives[1, :2] == 0).all() and (train.negatives[train.targets > 0] > 0).all()
    assert not np.isin(train.negatives[0].numpy(), [1, 2, 3, 4]).any()  # not the user's training items
    assert not np.isin(train.negatives[1, 2:].numpy(), [7, 8]).any()
    val = s.eval_batch(np.array([0, 2]), "val")
    assert val.inputs.tolist() == [[2, 3, 4], [0, 0, 9]] and val.targets.tolist() == [5, 10]
    test = s.eval_batch(np.array([0, 2]), "test")
    assert test.inputs.tolist() == [[3, 4, 5], [0, 9, 10]] and test.targets.tolist() == [6, 11]
    assert test.negatives.shape == (2, 100)
    # a batch is as wide as its longest row: user 3's validation history is one item
    assert s.eval_batch(np.array([2]), "val").inputs.tolist() == [[9]]
    assert not np.isin(test.negatives[0].numpy(), [1, 2, 3, 4, 5, 6]).any()  # never interacted with
    assert not np.isin(test.negatives[1].numpy(), [9, 10, 11]).any()
    assert test.negatives.min() >= 1 and test.negatives.max() <= 30


def test_negatives_are_per_row_deterministic(handmade: Path) -> None:
    s = SequenceSplits(PreparedDataset(handmade), max_len=3, negatives=NegativeSampling("per_position"))
    both = s.train_batch(np.array([0, 1]), epoch=0)
    alone = s.train_batch(np.array([1]), epoch=0)  # the row on another rank, in another batch
    width = alone.negatives.shape[1]  # a batch is as wide as its longest row: 1 here, 3 in `both`
    assert width == 1 and both.negatives.shape[1] == 3
    assert torch.equal(both.negatives[1, -width:], alone.negatives[0])
    assert (both.negatives[1, :-width] == 0).all()
    assert not torch.equal(s.train_batch(np.array([0]), epoch=1).negatives[0], both.negatives[0])
    single, pair = s.eval_batch(np.array([2]), "test"), s.eval_batch(np.array([0, 2]), "test")
    assert torch.equal(single.negatives[0], pair.negatives[1])
    per_sequence = NegativeSampling("per_sequence", 7, "popularity")
    seq = SequenceSplits(PreparedDataset(handmade), 3, negatives=per_sequence)
    neg = seq.train_batch(np.array([0, 1]), epoch=0).negatives
    assert neg.shape == (2, 7) and neg.min() >= 1 and neg.max() <= 30
    # popularity proposal: training counts + 1, row 0 never drawn
    # item 3 is trained on twice (users 1 and 4): weight 3 of 8 training items + 30
    assert seq.proposal[0] == 0 and seq.proposal[3] == pytest.approx(3 / (8 + 30))


def test_batch_is_pipelineable(handmade: Path) -> None:
    from torchrec.streamable import Pipelineable

    batch = SequentialDataModule(handmade, max_len=3, batch_size=2).loader("train").__iter__().__next__()
    assert isinstance(batch, SequenceBatch) and isinstance(batch, Pipelineable)
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert torch.equal(moved.inputs, batch.inputs) and moved.batch_size == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.loss=softmax"], "model.loss 'softmax'"),
        (["model.num_blocks=0"], "model.num_blocks must be > 0"),
        (["model.heads=2"], "model: .*heads"),
        (["model.loss=sampled_softmax", "model.num_negatives=0"], "model.num_negatives must be > 0"),
        (["data.features=[item]"], "data.features"),
        (["model.block=tf1"], "model.block 'tf1'"),
        (["model.init=glorot"], "model.init 'glorot'"),
        (["model.block=paper", "model.pre_ln=false"], "model.pre_ln false does not apply to model.block"),
        (["model.init=xavier", "model.init_scale=0.1"], "model.init_scale and model.init 'xavier'"),
    ],
)
def test_bad_config_names_the_field(handmade: Path, overrides: list[str], message: str) -> None:
    from trainer.config import load_config
    from trainer.sequential import build_sequential
    from trainer.sharding import ConfigError

    cfg = load_config(None, ["model_name=sasrec", f"data.path={handmade}", "model.max_len=3", *overrides])
    with pytest.raises(ConfigError, match=message):
        build_sequential(cfg, "sasrec")


# -- distributed runs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic world with strong sequential dynamics (category Markov chain), small enough for CPUs."""
    from data.synthetic import SyntheticConfig, generate

    cfg = SyntheticConfig(
        name="seq-test", num_users=2000, num_items=500, num_interactions=50_000, ctr_rows=1000,
        num_categories=10, num_tags=20, num_occupations=5, num_regions=5, markov_weight=0.8, truth_top_k=10,
    )  # fmt: skip
    return generate(cfg, tmp_path_factory.mktemp("data") / "seq")


def write_config(
    path: Path, dataset: Path, run_dir: Path, model_name: str = "sasrec", **sections: dict
) -> Path:
    cfg = {
        "model_name": model_name,
        "model": {**MODEL, "loss": "ce"},
        "data": {"path": str(dataset), "batch_size": 64, "eval_batch_size": 512, "seed": 0},
        "optimizer": {"name": "adam", "lr": 0.003},
        "sparse_optimizer": {"name": "adagrad", "lr": 0.05},
        "sharding": {"tables": {"item": {"sharding_types": ["row_wise"]}}},
        "trainer": {"max_epochs": 8, "log_every_n_steps": 5, "enable_progress_bar": False},
        "logger": {"kind": "csv"},
        "run_dir": str(run_dir),
    }
    for key, value in sections.items():  # sections are merged, except the model, which is replaced
        cfg[key] = {**cfg[key], **value} if isinstance(cfg.get(key), dict) and key != "model" else value
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-rank SASRec run (full softmax, row-wise item table) shared by several tests."""
    d = tmp_path_factory.mktemp("sasrec")
    torchrun(2, ["--config", str(write_config(d / "cfg.yaml", world, d / "run"))])
    return d


@pytest.mark.slow
def test_item_table_is_row_wise_on_both_ranks(trained: Path) -> None:
    summary = json.loads((trained / "run" / "summary.json").read_text())
    assert summary["plan"] == [{"table": "item", "sharding_type": "row_wise", "ranks": [0, 1]}]
    assert all(b > 0 for b in summary["embedding_bytes_per_rank"])


def popularity_baseline(dataset: Path) -> dict[str, float]:
    """Full-ranking HR@10 / NDCG@10 of ranking every test user's items by training popularity."""
    s = SequenceSplits(PreparedDataset(dataset), MAX_LEN)
    rows = s.rows["test"]
    targets = s.values[s.offsets[rows + 1] - 1]
    counts = s.train_counts.astype(np.float64)
    rank = (counts[1:][None, :] > counts[targets][:, None]).sum(axis=1)  # items strictly more popular
    ndcg = np.where(rank < 10, 1 / np.log2(rank + 2), 0)
    return {"hr@10": float((rank < 10).mean()), "ndcg@10": float(ndcg.mean())}


@pytest.mark.slow
def test_learns_the_sequences_well_above_popularity(trained: Path, world: Path) -> None:
    metrics = json.loads((trained / "run" / "summary.json").read_text())["metrics"]
    pop = popularity_baseline(world)
    assert metrics["test/full_hr@10"] >= 1.4 * pop["hr@10"], (metrics, pop)
    assert metrics["test/full_ndcg@10"] >= 1.4 * pop["ndcg@10"], (metrics, pop)
    assert metrics["test/sampled_ndcg@10"] > metrics["test/full_ndcg@10"]  # 100 candidates are easier


def plain_model(dataset: Path, checkpoint: Path, **overrides: object) -> SASRec:
    num_items = int(PreparedDataset(dataset).info("sequences", "items").vocab or 0)
    model = SASRec(SASRecConfig(num_items=num_items, **{**MODEL, **overrides}))  # type: ignore[arg-type]
    return load_unsharded(model, checkpoint).eval()  # type: ignore[return-value]


@pytest.mark.slow
def test_two_rank_evaluation_equals_brute_force(trained: Path, world: Path) -> None:
    """Both protocols of the 2-rank test step against one process scoring every user by hand."""
    metrics = json.loads((trained / "run" / "summary.json").read_text())["metrics"]
    model = plain_model(world, trained / "run" / "checkpoints" / "final.ckpt")
    s = SequenceSplits(PreparedDataset(world), MAX_LEN, eval_negatives=100)
    rows = s.rows["test"]
    seqs = [s.values[s.offsets[r] : s.offsets[r + 1]] for r in rows]
    inputs = torch.tensor([[0] * (MAX_LEN - len(x[:-1][-MAX_LEN:])) + list(x[:-1][-MAX_LEN:]) for x in seqs])
    targets = np.array([x[-1] for x in seqs])
    with torch.no_grad():
        hidden, _ = model(inputs, torch.zeros(0, dtype=torch.int64))
        scores = (hidden[:, -1] @ model.item_weight().T).numpy()  # [users, items], column 0 = padding
    target_scores = scores[np.arange(len(rows)), targets][:, None]
    others = scores[:, 1:].copy()  # protocol 2 candidates: every item but the padding and the target
    others[np.arange(len(rows)), targets - 1] = -np.inf
    negatives = s.eval_batch(rows, "test").negatives.numpy()
    for x, neg in zip(seqs, negatives, strict=True):
        assert not np.isin(neg, x).any()
    sampled_scores = np.take_along_axis(scores, negatives, axis=1)

    def expected(shift: float) -> dict[str, float]:
        """The metrics with every other item's score moved by ``shift`` (a rounding-size tie margin)."""
        # protocol 2: rank among all items 1..n (history included), padding excluded
        rank = (others + shift > target_scores).sum(axis=1)
        out = {"full_mrr": np.mean(1 / (rank + 1))}
        for k in (10, 20):
            out[f"full_hr@{k}"] = np.mean(rank < k)
            out[f"full_ndcg@{k}"] = np.mean(np.where(rank < k, 1 / np.log2(rank + 2), 0))
        # protocol 1: rank among the user's 100 sampled items, ties counted against the target
        sampled_rank = (sampled_scores + shift >= target_scores).sum(axis=1)
        out["sampled_hr@10"] = np.mean(sampled_rank < 10)
        out["sampled_ndcg@10"] = np.mean(np.where(sampled_rank < 10, 1 / np.log2(sampled_rank + 2), 0))
        out["sampled_mrr"] = np.mean(1 / (sampled_rank + 1))
        return out

    # The sharded run scores in other matmul shapes, so a near-tie may round the other way: the
    # result must lie between the metrics with the other items a rounding margin below and above.
    margin = 1e-5 * float(np.abs(scores).max())
    best, exact, worst = expected(-margin), expected(0.0), expected(margin)
    for name in exact:
        got = metrics[f"test/{name}"]
        assert worst[name] - 1e-6 <= got <= best[name] + 1e-6, (name, got, exact[name])
        assert best[name] - worst[name] <= 2 / len(rows), name  # a near-tie or two at most: still tight


def reference_training(
    dataset: Path,
    loss: str,
    steps: int,
    sparse_lr: float,
    dense_lr: float,
    init_dir: Path,
    model_overrides: dict[str, object] | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    table_on_adam: bool = False,
) -> dict[str, torch.Tensor]:
    """Plain single-process training on the global batches: unsharded table, torch SGD + Adam
    (the table on SGD at ``sparse_lr``, or with ``table_on_adam`` on the dense Adam).

    The losses are written out here from their definitions (full-catalog cross-entropy, the paper's
    BCE, logQ-corrected sampled softmax), not taken from the module under test.
    """
    torch.manual_seed(123)
    num_items = int(PreparedDataset(dataset).info("sequences", "items").vocab or 0)
    overrides = {**MODEL, "dropout": 0.0, **(model_overrides or {})}
    model = SASRec(SASRecConfig(num_items=num_items, **overrides))  # type: ignore[arg-type]
    save_unsharded(model, init_dir)
    sparse = [] if table_on_adam else list(model.items.parameters())
    dense = [p for n, p in model.named_parameters() if table_on_adam or not n.startswith("items.")]
    optimizers = [torch.optim.Adam(dense, lr=dense_lr, betas=betas)]
    optimizers += [torch.optim.SGD(sparse, lr=sparse_lr)] if sparse else []
    negatives = {"ce": NegativeSampling("none"), "bce": NegativeSampling("per_position"),
                 "sampled_softmax": NegativeSampling("per_sequence", 50, "popularity")}[loss]  # fmt: skip
    dm = SequentialDataModule(dataset, max_len=MAX_LEN, batch_size=64, seed=0, negatives=negatives)
    log_q = torch.log(torch.from_numpy(dm.splits.proposal[1:])).float()
    for _, batch in zip(range(steps), dm.loader("train"), strict=False):
        valid = batch.targets > 0
        hidden, _ = model(batch.inputs, torch.zeros(0, dtype=torch.int64))
        h, targets, weight = hidden[valid], batch.targets[valid], model.item_weight()
        pos = (h * weight[targets]).sum(dim=1)
        if loss == "ce":
            value = F.cross_entropy(h @ weight[1:].T, targets - 1)
        elif loss == "bce":
            neg = (h * weight[batch.negatives[valid]]).sum(dim=1)
            value = -(F.logsigmoid(pos) + F.logsigmoid(-neg)).mean()
        else:
            neg_ids = batch.negatives[valid.nonzero()[:, 0]]
            neg = torch.einsum("nd,nkd->nk", h, weight[neg_ids]) - log_q[neg_ids - 1]
            neg = neg.masked_fill(neg_ids == targets[:, None], float("-inf"))
            logits = torch.cat([(pos - log_q[targets - 1])[:, None], neg], dim=1)
            value = F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.int64))
        for opt in optimizers:
            opt.zero_grad()
        value.backward()
        for opt in optimizers:
            opt.step()
    return model.state_dict()


PAPER_BLOCK = {"block": "paper", "init": "xavier"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss", "block", "table"),
    [("ce", {}, "row_wise"), ("bce", {}, "row_wise"), ("sampled_softmax", {}, "row_wise"),
     ("bce", PAPER_BLOCK, "row_wise"), ("ce", PAPER_BLOCK, "data_parallel")],
    ids=["ce", "bce", "sampled_softmax", "bce-paper_block", "ce-paper_block-table_on_adam"],
)  # fmt: skip
def test_two_rank_sharded_training_equals_unsharded(
    loss: str, block: dict[str, object], table: str, world: Path, tmp_path: Path
) -> None:
    """Row-wise: the table on fused SGD. Data-parallel: the table replicated and trained by the dense
    Adam with the paper's betas (how the paper's Adam on the table runs on CPU, where FBGEMM has no
    fused Adam and its dense lookup needed :func:`trainer.sharding.exact_cpu_unpooled_lookups`)."""
    steps = 10
    init_dir = tmp_path / "init"
    on_adam = table == "data_parallel"
    betas = (0.9, 0.98) if on_adam else (0.9, 0.999)
    reference = reference_training(world, loss, steps, sparse_lr=0.5, dense_lr=0.003, init_dir=init_dir,
                                   model_overrides=block, betas=betas, table_on_adam=on_adam)  # fmt: skip
    cfg = write_config(
        tmp_path / "cfg.yaml", world, tmp_path / "run",
        model={**MODEL, **block, "dropout": 0.0, "loss": loss, "num_negatives": 50,
               "negative_sampler": "popularity"},
        optimizer={"name": "adam", "lr": 0.003, "betas": list(betas)},
        sparse_optimizer={"name": "sgd", "lr": 0.5},
        sharding={"tables": {"item": {"sharding_types": [table]}}},
        trainer={"max_steps": steps, "max_epochs": 1, "test_after_fit": False},
    )  # fmt: skip
    torchrun(2, ["--config", str(cfg), "--init-from", str(init_dir)])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["plan"][0]["sharding_type"] == table and summary["global_step"] == steps
    sharded = plain_model(world, tmp_path / "run" / "checkpoints" / "final.ckpt", **block).state_dict()
    init = plain_model(world, init_dir, **block).state_dict()
    table = "items.embeddings.item.weight"
    assert (reference[table] - init[table]).abs().max() > 1e-3, "reference did not train the item table"
    # Tolerance: 1e-5 plus 0.1% of how far training moved the tensor. The two runs sum the same
    # gradients in other matmul shapes (2 x 32 rows vs 64), and Adam turns that rounding into up to
    # ~1.5e-5 on a LayerNorm bias that moved by ~0.03 in 10 steps; a wrong loss or gradient moves
    # tensors by a sizeable fraction of their update.
    excess = {k: (sharded[k] - reference[k]).abs().max().item()
              - 1e-3 * (reference[k] - init[k]).abs().max().item() for k in reference}  # fmt: skip
    worst = max(excess.items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-5, f"difference beyond 0.1% of the update: {worst[1]:.3g} in {worst[0]}"


# -- the distributed log-sum-exp (this file doubles as the torchrun script) --------------------------------
def _max_abs(x: torch.Tensor) -> float:
    return x.abs().max().item() if x.numel() else 0.0


def _distributed_check(out: Path) -> None:
    """Run by 2 torchrun ranks: distributed LSE/gradients and full scores vs one-process results."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    errors: dict[str, float] = {}
    # uneven splits, including a rank without candidates and a rank without queries
    for case, (q_split, c_split) in {"uneven": ((4, 3), (6, 5)), "empty": ((0, 5), (9, 0))}.items():
        gen = torch.Generator().manual_seed(0)
        queries = torch.randn(sum(q_split), 6, generator=gen)
        items = torch.randn(sum(c_split), 6, generator=gen) * 3
        weights = torch.rand(sum(q_split), generator=gen)
        q_lo, c_lo = sum(q_split[:rank]), sum(c_split[:rank])
        q = queries[q_lo : q_lo + q_split[rank]].clone().requires_grad_()
        c = items[c_lo : c_lo + c_split[rank]].clone().requires_grad_()
        lse = distributed_logsumexp(q, c)
        (lse * weights[q_lo : q_lo + q_split[rank]]).sum().backward()
        ref_q, ref_c = queries.clone().requires_grad_(), items.clone().requires_grad_()
        ref = torch.logsumexp(ref_q @ ref_c.T, dim=1)
        (ref * weights).sum().backward()
        assert ref_q.grad is not None and ref_c.grad is not None and q.grad is not None and c.grad is not None
        assert ref_c.grad.abs().sum() > 1e-3  # the gradients compared are not all zero
        mine, theirs = slice(q_lo, q_lo + q_split[rank]), slice(c_lo, c_lo + c_split[rank])
        errors[f"{case}/lse"] = _max_abs(lse - ref[mine])
        errors[f"{case}/grad_queries"] = _max_abs(q.grad - ref_q.grad[mine])
        errors[f"{case}/grad_items"] = _max_abs(c.grad - ref_c.grad[theirs])
        scores = full_scores(q.detach(), c.detach(), list(c_split))
        errors[f"{case}/full_scores"] = _max_abs(scores - queries[mine] @ items.T)
    gathered: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, errors)
    if rank == 0:
        out.write_text(json.dumps(gathered))
    dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_logsumexp_equals_single_process(tmp_path: Path) -> None:
    import os
    import subprocess

    out = tmp_path / "errors.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
           "--distributed-check", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 2
    for errors in per_rank:
        assert len(errors) == 8
        for name, value in errors.items():
            assert value <= 1e-5, (name, value)


# -- export ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_writes_an_index_and_a_standalone_query_encoder(
    trained: Path, world: Path, tmp_path: Path
) -> None:
    import faiss

    from serving.bundle import verify
    from trainer.sequential import export_sasrec

    checkpoint = trained / "run" / "checkpoints" / "final.ckpt"
    out = export_sasrec(checkpoint, trained / "cfg.yaml", tmp_path / "artifact", "flat")
    manifest = verify(out)
    assert {"index.faiss", "ids.npy", "encoder.pt2", "meta.json"} <= set(manifest["files"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model_type"] == "sasrec" and meta["item_count"] == 500
    assert meta["dim"] == MODEL["embedding_dim"]
    ids = np.load(out / "ids.npy")
    assert ids.tolist() == PreparedDataset(world).idmap("item").tolist()

    program = torch.export.load(out / "encoder.pt2")
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert all(t.startswith("aten.") or "built-in" in t for t in targets), targets  # no custom ops
    encoder = program.module()
    model = plain_model(world, checkpoint)
    seq = torch.tensor([[0] * 17 + [5, 6, 7], list(range(1, 21)), [0] * 19 + [9]])
    with torch.no_grad():
        hidden, _ = model(seq, torch.zeros(0, dtype=torch.int64))
        for batch in (seq, seq[:1]):  # dynamic batch
            torch.testing.assert_close(encoder(batch), hidden[: len(batch), -1], rtol=0, atol=1e-5)
    index = faiss.read_index(str(out / "index.faiss"))
    _, found = index.search(hidden[:, -1].numpy(), 10)
    scores = hidden[:, -1] @ model.item_weight()[1:].T
    assert (found == scores.topk(10, dim=1).indices.numpy()).all()  # index row r = item index r + 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--distributed-check", type=Path, required=True)
    _distributed_check(parser.parse_args().distributed_check)
