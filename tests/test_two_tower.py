"""Two-tower retrieval: the loss by hand, leakage-free history, cross-rank negatives on real ranks,
a 2-rank sharded training run that beats popularity, distributed-correct evaluation, and the export.

One small synthetic world (1,500 users, 1,000 items) is trained once on 2 gloo ranks through
`python -m trainer --config configs/two_tower_synthetic.yaml` and shared by the slow tests.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.retrieval import HISTORY, RetrievalDataModule, UserBatch
from data.shards import SPLIT_CODES, PreparedDataset, dataset_fingerprint
from data.synthetic import PRESETS, generate
from launch.cli import main as funnel
from models.two_tower import QueryEncoder, TwoTower
from serving.bundle import verify
from trainer.checkpoint import load_unsharded, save_unsharded
from trainer.config import load_config
from trainer.logq import StreamingItemFrequency
from trainer.retrieval import (
    RetrievalLossConfig,
    build_two_tower,
    catalog_softmax_loss,
    cosine_contrastive_loss,
    mixture_log_q,
    retrieval_loss,
    sampled_softmax_loss,
    unsharded_model,
)
from trainer.sharding import ConfigError
from trainer.topk_metrics import TopKAccumulator, mask_scores, metric_names, topk_metrics_from_scores

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "two_tower_synthetic.yaml"
KS = (10, 20, 50, 100)


def torchrun(nproc: int, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


# -- the loss --------------------------------------------------------------------------------------
def test_in_batch_loss_matches_hand_computation() -> None:
    """3 queries, 3 in-batch positives + 1 uniform sample, logQ, and both kinds of accidental hit."""
    t = 0.5
    q = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    cands = [[0.8, 0.6], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]]  # positives of q0, q1, q2; then a sample
    items = [5, 7, 9, 5]  # the sample drew item 5, query 0's positive
    users = [1, 2, 1, 0]  # queries 0 and 2 belong to user 1
    prob = [0.5, 0.25, 0.25, 0.5]  # training share of each candidate's item
    b, n, num_items = 3, 1, 10
    log_q = [math.log(b * p + n / num_items) for p in prob]  # expected copies of the item in the pool

    def ce(row: int, label: int, allowed: list[int], strength: float = 1.0) -> float:
        logit = {
            j: sum(x * y for x, y in zip(q[row], cands[j], strict=True)) / t - strength * log_q[j]
            for j in allowed
        }
        return -logit[label] + math.log(sum(math.exp(v) for v in logit.values()))

    expected = (
        ce(0, 0, [0, 1])  # column 2: same user; column 3: the same item as the positive
        + ce(1, 1, [0, 1, 2, 3])
        + ce(2, 2, [1, 2, 3])  # column 0: same user
    ) / 3
    tensor = torch.tensor
    got = sampled_softmax_loss(
        tensor(q), tensor(cands), torch.arange(3), temperature=t,
        log_q=mixture_log_q(tensor(prob), b, n, num_items),
        candidate_items=tensor(items), candidate_users=tensor(users),
    )  # fmt: skip
    assert got.item() == pytest.approx(expected, rel=1e-6)

    # the same through the training entry point (positives first, then the sample)
    via_training = retrieval_loss(
        tensor(q), tensor(cands), tensor(items), tensor(users), tensor(prob),
        cfg=RetrievalLossConfig(num_negatives=n), temperature=t, num_items=num_items,
    )  # fmt: skip
    assert via_training.item() == pytest.approx(expected, rel=1e-6)
    # a stronger correction (logq_weight 1.5: log Q scaled, popular items pushed down harder in training)
    strong = (ce(0, 0, [0, 1], 1.5) + ce(1, 1, [0, 1, 2, 3], 1.5) + ce(2, 2, [1, 2, 3], 1.5)) / 3
    assert abs(strong - expected) > 1e-3
    stronger = retrieval_loss(
        tensor(q), tensor(cands), tensor(items), tensor(users), tensor(prob),
        cfg=RetrievalLossConfig(num_negatives=n, logq_weight=1.5), temperature=t, num_items=num_items,
    )  # fmt: skip
    assert stronger.item() == pytest.approx(strong, rel=1e-6)
    plain = retrieval_loss(
        tensor(q), tensor(cands), tensor(items), tensor(users), tensor(prob),
        cfg=RetrievalLossConfig(logq_correction=False, remove_accidental_hits=False), temperature=t,
        num_items=num_items,
    )  # fmt: skip
    no_correction = sum(ce_plain for ce_plain in [
        -1.6 + math.log(math.exp(1.6) + 1 + math.exp(1.2) + math.exp(2)),
        -2 + math.log(math.exp(1.2) + math.exp(2) + math.exp(1.6) + 1),
        -2 + math.log(math.exp(1.92) + math.exp(1.6) + math.exp(2) + math.exp(1.2)),
    ]) / 3  # fmt: skip
    assert plain.item() == pytest.approx(no_correction, rel=1e-6)


def test_cosine_contrastive_loss_matches_hand_computation() -> None:
    """SimpleX's CCL: 1 - cos(positive) + w * mean over the allowed negatives of relu(cos - margin)."""
    q = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    cands = [[0.8, 0.6], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]]
    items, users, prob = [5, 7, 9, 5], [1, 2, 1, 0], [0.5, 0.25, 0.25, 0.5]
    margin, weight = 0.5, 10.0

    def cos(i: int, j: int) -> float:
        return sum(x * y for x, y in zip(q[i], cands[j], strict=True))

    def ccl(row: int, negatives: list[int]) -> float:
        pushed = [max(cos(row, j) - margin, 0.0) for j in negatives]
        return 1 - cos(row, row) + weight * sum(pushed) / len(pushed)

    # accidental hits as in the softmax test: query 0 loses columns 2 (its user) and 3 (its item)
    expected = (ccl(0, [1]) + ccl(1, [0, 2, 3]) + ccl(2, [1, 3])) / 3
    t = torch.tensor
    cfg = RetrievalLossConfig(kind="ccl", num_negatives=1, margin=margin, negative_weight=weight)
    got = retrieval_loss(t(q), t(cands), t(items), t(users), t(prob), cfg=cfg, temperature=0.1, num_items=10)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # uniform negatives only (SimpleX): the other queries' positives leave the pool
    uniform = dataclasses.replace(cfg, in_batch_negatives=False)
    got = retrieval_loss(
        t(q), t(cands), t(items), t(users), t(prob), cfg=uniform, temperature=0.1, num_items=10
    )
    assert got.item() == pytest.approx((ccl(1, [3]) + ccl(2, [3])) / 3 + (1 - cos(0, 0)) / 3, rel=1e-6)
    plain = cosine_contrastive_loss(t(q), t(cands), torch.arange(3), margin=margin, negative_weight=weight)
    assert plain.item() == pytest.approx((ccl(0, [1, 2, 3]) + ccl(1, [0, 2, 3]) + ccl(2, [0, 1, 3])) / 3)


def test_uniform_only_pool_is_the_softmax_over_the_positive_and_the_samples() -> None:
    g = torch.Generator().manual_seed(0)
    b, n, d = 5, 4, 3
    q = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=1)
    cands = torch.nn.functional.normalize(torch.randn(b + n, d, generator=g), dim=1)
    items = torch.arange(1, b + n + 1)
    users, prob = torch.cat([torch.arange(1, b + 1), torch.zeros(n, dtype=torch.int64)]), torch.rand(b + n)
    cfg = RetrievalLossConfig(num_negatives=n, in_batch_negatives=False)
    got = retrieval_loss(q, cands, items, users, prob, cfg=cfg, temperature=0.2, num_items=50)
    # uniform samples only: log Q is the same constant for every candidate, so it cancels
    want = sum(
        torch.nn.functional.cross_entropy((q[i] @ torch.cat([cands[i : i + 1], cands[b:]]).T / 0.2)[None],
                                          torch.tensor([0]))
        for i in range(b)
    ) / b  # fmt: skip
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="in_batch_negatives false needs model.loss.num_negatives"):
        RetrievalLossConfig(in_batch_negatives=False)
    with pytest.raises(ValueError, match="model.loss.kind 'bpr'"):
        RetrievalLossConfig(kind="bpr")


def test_catalog_softmax_loss_matches_hand_computation() -> None:
    """Multinomial: each user's training items under one softmax over the catalog; padding never scored."""
    t = 0.5
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    catalog = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, 0.0]])  # items 1, 2, 3, padding
    ids = torch.tensor([1, 2, 3, 0])
    targets = torch.zeros(2, 4, dtype=torch.bool)
    targets[0, [1, 3]] = True  # user 0 trained on items 1 and 3
    targets[1, 2] = True

    def nll(logits: list[float], picked: list[int]) -> float:
        lse = math.log(sum(math.exp(v) for v in logits))
        return sum(lse - logits[j] for j in picked)

    expected = (nll([2.0, 0.0, 1.2], [0, 2]) + nll([0.0, 2.0, 1.6], [1])) / 2
    got = catalog_softmax_loss(q, catalog, ids, targets, temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # the padding row would add exp(0) = 1 to every normaliser if it were scored
    assert abs(nll([2.0, 0.0, 1.2, 0.0], [0, 2]) - nll([2.0, 0.0, 1.2], [0, 2])) > 0.1
    with pytest.raises(ValueError, match="multinomial scores the whole catalog"):
        RetrievalLossConfig(kind="multinomial")
    RetrievalLossConfig(kind="multinomial", logq_correction=False)


CROSS_RANK_SCRIPT = r"""
import dataclasses, json, sys
import torch, torch.distributed as dist
import torch.nn.functional as F
from trainer.retrieval import RetrievalLossConfig, retrieval_loss

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(0)
B, N, D, I = 8, 6, 4, 20  # global batch, global uniform samples, dim, catalog
query = F.normalize(torch.randn(B, D, generator=g), dim=1)
pos = F.normalize(torch.randn(B, D, generator=g), dim=1)
neg = F.normalize(torch.randn(N, D, generator=g), dim=1)
pos_ids = torch.tensor([3, 4, 5, 6, 7, 3, 8, 9])  # item 3 is a positive on both ranks
users = torch.tensor([1, 2, 3, 4, 2, 5, 6, 7])  # user 2 has a positive on each rank
neg_ids = torch.tensor([6, 11, 12, 13, 14, 4])  # samples that hit positives of the other rank
prob = torch.rand(I + 1, generator=g)
prob = prob / prob.sum()
base = RetrievalLossConfig(num_negatives=N)

def loss_of(q, p, n, pi, ni, pu, gather):
    items, ids = torch.cat([p, n]), torch.cat([pi, ni])
    cand_users = torch.cat([pu, torch.zeros(len(ni), dtype=torch.int64)])
    cfg = dataclasses.replace(base, cross_rank_negatives=gather)
    return retrieval_loss(q, items, ids, cand_users, prob[ids], cfg=cfg, temperature=0.1, num_items=I)

ref_leaves = [t.clone().requires_grad_() for t in (query, pos, neg)]
ref = loss_of(*ref_leaves, pos_ids, neg_ids, users, gather=False)  # one rank, whole batch
ref.backward()
b, n = B // world, N // world
sb, sn = slice(rank * b, (rank + 1) * b), slice(rank * n, (rank + 1) * n)
mine = [t.clone().requires_grad_() for t in (query[sb], pos[sb], neg[sn])]
loss = loss_of(*mine, pos_ids[sb], neg_ids[sn], users[sb], gather=True)
loss.backward()
mean = loss.detach().clone()
dist.all_reduce(mean)
# DDP averages gradients over ranks, so grad / world is this rank's share of the global gradient
errors = [(m.grad / world - r.grad[s]).abs().max().item() for m, r, s in zip(mine, ref_leaves, [sb, sb, sn])]
local = loss_of(*[t.detach() for t in mine], pos_ids[sb], neg_ids[sn], users[sb], gather=False)
local_mean = local.clone()
dist.all_reduce(local_mean)

# the multinomial loss: users split over ranks, each rank embedding a 0-padded slice of the catalog
from trainer.retrieval import catalog_softmax_loss
U, C = 6, 7  # users, catalog items (ids 1..7); two slices of 4, the last padded with id 0
users_q = F.normalize(torch.randn(U, D, generator=g), dim=1)
catalog = F.normalize(torch.randn(C, D, generator=g), dim=1)
targets = torch.rand(U, C + 1, generator=g) < 0.4
targets[:, 0] = False
targets[torch.arange(U), torch.arange(U) + 1] = True  # every user has a target
ref_q, ref_c = users_q.clone().requires_grad_(), catalog.clone().requires_grad_()
ref_mn = -(torch.log_softmax(ref_q @ ref_c.T / 0.1, 1) * targets[:, 1:]).sum(1).mean()
ref_mn.backward()
u = U // world
ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]][rank])
rows = torch.cat([torch.zeros(1, D), catalog])[ids]  # id 0: padding, a zero row
my_q, my_c = users_q[rank * u : (rank + 1) * u].clone().requires_grad_(), rows.clone().requires_grad_()
mn = catalog_softmax_loss(my_q, my_c, ids, targets[rank * u : (rank + 1) * u], temperature=0.1)
mn.backward()
mn_mean = mn.detach().clone()
dist.all_reduce(mn_mean)
real = ids > 0
errors += [
    (my_q.grad / world - ref_q.grad[rank * u : (rank + 1) * u]).abs().max().item(),
    (my_c.grad[real] / world - ref_c.grad[ids[real] - 1]).abs().max().item(),
]
if rank == 0:
    result = {"two_ranks": mean.item() / world, "one_rank": ref.item(), "grad_errors": errors,
              "without_gather": local_mean.item() / world, "multinomial_two_ranks": mn_mean.item() / world,
              "multinomial_one_rank": ref_mn.item()}
    print("RESULT " + json.dumps(result))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_cross_rank_losses_equal_one_rank_with_the_concatenated_batch(tmp_path: Path) -> None:
    script = tmp_path / "cross_rank.py"
    script.write_text(CROSS_RANK_SCRIPT)
    proc = torchrun(2, [str(script)], timeout=300)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[len("RESULT ") :])
    assert r["two_ranks"] == pytest.approx(r["one_rank"], abs=1e-6)
    assert max(r["grad_errors"]) < 1e-6, r["grad_errors"]
    # without the gather each rank sees half the pool: a different (easier) loss
    assert abs(r["without_gather"] - r["one_rank"]) > 1e-3
    # the multinomial loss over gathered catalog slices (gradients are in grad_errors too)
    assert r["multinomial_two_ranks"] == pytest.approx(r["multinomial_one_rank"], abs=1e-5)


# -- data ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = dataclasses.replace(
        PRESETS["tiny"], name="two-tower-test", num_users=1500, num_items=1000, num_interactions=45_000,
        ctr_rows=1000,
    )  # fmt: skip
    return generate(cfg, tmp_path_factory.mktemp("data") / "world")


@pytest.mark.parametrize("split", ["dataset", "temporal", "random"])
def test_history_is_strictly_earlier_visible_items_and_targets_exclude_seen(world: Path, split: str) -> None:
    # leave-one-out (as stored), a global time cut, and a random split (which puts held-out events
    # between training ones: the history must skip them)
    dm = RetrievalDataModule(world, history_length=4, split=split)
    user, item, codes = dm.inter_user, dm.inter_item, dm.codes
    rng = np.random.default_rng(0)
    train_rows = rng.choice(np.flatnonzero(codes == SPLIT_CODES["train"]), 200, replace=False)
    batch = dm.train_batch(train_rows, num_negatives=5)
    history = batch.features.to_dict()[HISTORY]
    for k, row in enumerate(train_rows):
        earlier = [item[j] for j in range(row) if user[j] == user[row] and codes[j] == SPLIT_CODES["train"]]
        assert history.values()[history.offsets()[k] : history.offsets()[k + 1]].tolist() == earlier[-4:]
    assert batch.features.stride() == 205 and batch.num_queries == 200
    assert batch.user[200:].eq(0).all() and batch.item[:200].tolist() == item[train_rows].tolist()
    for stage, visible in (("val", {0}), ("test", {0, 1})):
        ev = dm.eval_users(stage)
        assert ev is not None
        arrays = dm.query_arrays(stage, np.arange(50))
        for k in range(50):
            u = ev.users[k]
            rows = np.flatnonzero(user == u)
            first = rows[codes[rows] == SPLIT_CODES[stage]][0]
            seen = {item[j] for j in rows if codes[j] in visible}
            held_out = {item[j] for j in rows if codes[j] == SPLIT_CODES[stage]}
            assert set(ev.seen.row(k).tolist()) == seen
            assert set(ev.targets.row(k).tolist()) == held_out - seen
            earlier = [item[j] for j in rows if j < first and codes[j] in visible][-4:]
            assert [i for i in arrays["history"][k] if i] == earlier
    ub = dm.user_batch("test", np.arange(3))
    assert isinstance(ub, UserBatch) and ub.to(torch.device("cpu")).user.tolist() == ub.user.tolist()
    assert ub.target_mask(dm.schema.num_items + 1).sum().item() == len(ub.target_values)


def test_others_history_never_holds_the_interactions_own_item(world: Path) -> None:
    """history_mode=others (non-temporal splits): the user's other visible items, sampled above 6."""
    dm = RetrievalDataModule(world, history_length=6, history_mode="others", split="random")
    user, item, codes = dm.inter_user, dm.inter_item, dm.codes
    rows = np.random.default_rng(1).choice(np.flatnonzero(codes == SPLIT_CODES["train"]), 300, replace=False)
    history = dm.train_batch(rows).features.to_dict()[HISTORY]
    sampled = 0
    for k, row in enumerate(rows):
        others = [
            j for j in np.flatnonzero(user == user[row]) if j != row and codes[j] == SPLIT_CODES["train"]
        ]
        bag = history.values()[history.offsets()[k] : history.offsets()[k + 1]].tolist()
        if len(others) <= 6:
            assert sorted(bag) == sorted(item[others].tolist())
        else:
            sampled += 1
            assert len(bag) == 6 and set(bag) <= set(item[others].tolist())
    assert sampled > 50
    again = dm.train_batch(rows).features.to_dict()[HISTORY]
    assert again.values().tolist() == history.values().tolist()  # keyed by the rows: reproducible
    ev = dm.eval_users("test")
    assert ev is not None
    arrays = dm.query_arrays("test", np.arange(20))
    for k in range(20):
        mine = np.flatnonzero(user == ev.users[k])
        visible = set(item[mine[np.isin(codes[mine], [0, 1])]].tolist())
        assert {i for i in arrays["history"][k] if i} <= visible


def test_history_dropout_thins_training_bags_only(world: Path) -> None:
    """history_dropout: each training bag keeps a random subset (never empty), queries keep every item."""
    full = RetrievalDataModule(world, history_length=50, history_mode="others", split="random")
    thin = RetrievalDataModule(
        world, history_length=50, history_mode="others", split="random", history_dropout=0.6
    )
    rows = np.flatnonzero(thin.codes == SPLIT_CODES["train"])[:400]
    a = full.train_batch(rows).features.to_dict()[HISTORY]
    b = thin.train_batch(rows).features.to_dict()[HISTORY]
    kept = 0
    for k in range(len(rows)):
        bag = a.values()[a.offsets()[k] : a.offsets()[k + 1]].tolist()
        sub = b.values()[b.offsets()[k] : b.offsets()[k + 1]].tolist()
        assert set(sub) <= set(bag) and (len(sub) > 0) == (len(bag) > 0)
        kept += len(sub)
    assert 0.3 < kept / a.lengths().sum().item() < 0.5  # ~40% kept, plus one per otherwise empty bag
    again = thin.train_batch(rows).features.to_dict()[HISTORY]
    assert again.values().tolist() == b.values().tolist()  # keyed by the rows: reproducible
    index = np.arange(30)
    queries = thin.query_arrays("test", index)["history"]
    assert np.array_equal(queries, full.query_arrays("test", index)["history"])
    with pytest.raises(ValueError, match=r"model.history_dropout must be in \[0, 1\)"):
        RetrievalDataModule(world, history_dropout=1.0)


def test_catalog_batches_pair_users_with_all_their_training_items_and_a_catalog_slice(world: Path) -> None:
    """train_on=users: a row per user, bag = their training items thinned by dropout, targets = all of
    them; the ranks' catalog slices cover every item once (0-padded to equal sizes)."""
    dm = RetrievalDataModule(
        world, history_length=10_000, history_mode="others", split="random", history_dropout=0.5,
        train_on="users", batch_size=64,
    )  # fmt: skip
    train = dm.codes == SPLIT_CODES["train"]
    slices = [dm.catalog_slice(r, 3) for r in range(3)]
    assert len({len(x) for x in slices}) == 1
    flat = np.concatenate(slices)
    assert sorted(flat[flat > 0].tolist()) == list(range(1, dm.schema.num_items + 1))
    loader = dm.make_loader("train", 1, 2)
    seen_users, kept, total = set(), 0, 0
    for batch in loader:
        assert batch.item.tolist() == dm.catalog_slice(1, 2).tolist()
        bags = batch.features.to_dict()
        assert bags["item"].lengths()[: batch.num_queries].sum() == 0  # user rows carry no item
        assert bags["item"].lengths()[batch.num_queries :].tolist() == (batch.item > 0).long().tolist()
        history = bags[HISTORY]
        for k, user in enumerate(batch.user.tolist()):
            mine = (dm.inter_user == user) & train
            want = set(dm.inter_item[mine].tolist())
            targets = batch.target_values[batch.target_offsets[k] : batch.target_offsets[k + 1]].tolist()
            bag = history.values()[history.offsets()[k] : history.offsets()[k + 1]].tolist()
            assert set(targets) == want and len(targets) == mine.sum()
            assert set(bag) <= want and len(bag) > 0
            kept, total = kept + len(bag), total + len(targets)
            seen_users.add(user)
    assert 0.45 < kept / total < 0.6  # half dropped, one kept per otherwise empty bag
    # rank 1 of 2 gets half of the users of each global batch; both ranks together see every user
    everyone = set(dm.seq_user[dm.training_sequences()].tolist())
    assert len(seen_users) == pytest.approx(len(everyone) / 2, abs=len(everyone) / 64)
    with pytest.raises(ValueError, match="train_on 'items'"):
        RetrievalDataModule(world, train_on="items")


def test_user_norms_are_the_squared_norms_of_the_user_feature_rows(world: Path) -> None:
    """The input of the user-id regulariser, which the unit-norm outputs cannot show."""
    module, dm = build_two_tower(load_config(CONFIG, [f"data.path={world}", "model.loss.user_l2=0.1"]))
    torch.manual_seed(0)
    model = TwoTower(module.config)
    batch = dm.train_batch(np.flatnonzero(dm.codes == SPLIT_CODES["train"])[:16], num_negatives=4)
    user, item, norms = model(batch.features, 16, 20, True)
    pooled = model.sparse_arch(batch.features).to_dict()
    want = sum(pooled[f][:16].pow(2).sum(1) for f in module.config.user_features)
    assert torch.allclose(norms, want) and norms.min() > 0
    assert torch.allclose(user.norm(dim=1), torch.ones(16))
    assert torch.allclose(item.norm(dim=1), torch.ones(20))
    same_user, same_item = model(batch.features, 16, 20)
    assert torch.equal(same_user, user) and torch.equal(same_item, item)


def test_user_blend_sums_the_normalised_user_row_and_history_in_model_and_encoder(world: Path) -> None:
    """projection false with user_blend: w * normalise(user row) + normalise(history mean), a missing
    user id adding nothing; the exported encoder computes the same."""
    sets = [f"data.path={world}", "model.user_features=[user]", "model.item_features=[item]",
            "model.projection=false", "model.user_arch=[]", "model.item_arch=[]", "model.embedding_dim=16",
            "model.output_dim=16", "model.share_item_table=false", "model.user_blend={user: 0.5}",
    ]  # fmt: skip
    module, dm = build_two_tower(load_config(CONFIG, sets))
    torch.manual_seed(0)
    model = TwoTower(module.config)
    index = np.arange(12)
    batch = dm.user_batch("test", index)
    user = model(batch.features, batch.num_queries, 0)[0]
    pooled = model.sparse_arch(batch.features).to_dict()
    bag = pooled[HISTORY][:12] / batch.features[HISTORY].lengths().clamp(min=1).unsqueeze(1)
    norm = torch.nn.functional.normalize
    want = 0.5 * norm(pooled["user"][:12], dim=1) + norm(bag, dim=1)
    assert torch.allclose(user, norm(want, dim=1), atol=1e-6)
    arrays = dm.query_arrays("test", index)
    encoder = QueryEncoder(model)
    with torch.no_grad():
        got = encoder(torch.from_numpy(arrays["user_features"]), torch.from_numpy(arrays["history"]))
        assert torch.allclose(got, user, atol=1e-6)
        unknown = encoder(
            torch.zeros_like(torch.from_numpy(arrays["user_features"])), torch.from_numpy(arrays["history"])
        )
    assert torch.allclose(unknown, norm(bag, dim=1), atol=1e-6)  # a new user: the history alone
    for bad, match in [
        (["model.projection=true", "model.user_arch=[8]"], "a projection learns its own blend"),
        (["model.user_blend={zip: 0.5}"], r"model.user_blend \{'zip': 0.5\}: weights >= 0 of user-tower"),
    ]:
        with pytest.raises(ConfigError, match=match):
            build_two_tower(load_config(CONFIG, [*sets, *bad]))


def test_streaming_logq_loss_converges_to_the_data_frequencies_loss(world: Path) -> None:
    """logq_source=streaming: fed the training stream, the estimate gives the data counts' loss."""
    dm = RetrievalDataModule(world, batch_size=512, history_length=5)
    num_items = dm.schema.num_items
    freq = StreamingItemFrequency(num_items + 1, num_items)
    g = torch.Generator().manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(num_items + 1, 16, generator=g), dim=1)
    probe = dm.train_batch(np.flatnonzero(dm.codes == SPLIT_CODES["train"])[:512], num_negatives=64)
    query = table[torch.randint(1, num_items + 1, (probe.num_queries,), generator=g)]
    cfg = RetrievalLossConfig(num_negatives=64)

    def loss(prob: torch.Tensor) -> float:
        args = (query, table[probe.item], probe.item, probe.user, prob)
        return retrieval_loss(*args, cfg=cfg, temperature=0.1, num_items=num_items).item()

    reference = loss(probe.item_prob)
    gaps = []
    loader = dm.make_loader("train", 0, 1)
    for batch in loader:  # one epoch of the real batches, in the training order
        freq.update(batch.item[: batch.num_queries])
        gaps.append(abs(loss(freq.probability(probe.item).float()) - reference) / reference)
    assert gaps[-1] < 0.01 and gaps[-1] < gaps[0] / 5, (gaps[0], gaps[-1])
    with pytest.raises(ValueError, match="model.loss.logq_source 'batch'"):
        RetrievalLossConfig(logq_source="batch")


def test_validation_hold_out_moves_a_share_of_each_users_training_rows(world: Path) -> None:
    """model.val_fraction: a validation split carved from training only (the test split untouched)."""
    stored = RetrievalDataModule(world, split="random", fractions=(0.9, 0.0, 0.1))
    dm = RetrievalDataModule(world, split="random", fractions=(0.9, 0.0, 0.1), val_fraction=0.25)
    before, after, user = stored.codes, dm.codes, dm.inter_user
    train, val, test = SPLIT_CODES["train"], SPLIT_CODES["val"], SPLIT_CODES["test"]
    assert not (before == val).any() and np.array_equal(before == test, after == test)
    assert ((after == val) <= (before == train)).all()
    for u in np.unique(user[before == train]):
        n = int(((user == u) & (before == train)).sum())
        moved = int(((user == u) & (after == val)).sum())
        assert moved == (max(1, round(0.25 * n)) if n >= 3 else 0), (u, n, moved)
    again = RetrievalDataModule(world, split="random", fractions=(0.9, 0.0, 0.1), val_fraction=0.25)
    assert np.array_equal(again.codes, after)  # seeded: every rank and re-run agree
    # the training popularity (logQ, baseline) no longer counts the held-out rows
    assert dm.item_counts.sum() == (after == train).sum()
    with pytest.raises(ValueError, match="already has validation rows"):
        RetrievalDataModule(world, val_fraction=0.1)  # the stored leave-one-out split has one
    with pytest.raises(ValueError, match=r"model.val_fraction must be in \(0, 1\)"):
        RetrievalDataModule(world, split="random", fractions=(0.9, 0.0, 0.1), val_fraction=1.5)


def test_evaluation_queries_take_the_longer_history(world: Path) -> None:
    """eval_history_length: training bags stay sampled at 3 items, queries hold every visible item."""
    dm = RetrievalDataModule(
        world, history_length=3, history_mode="others", split="random", eval_history_length=10_000
    )
    user, item, codes = dm.inter_user, dm.inter_item, dm.codes
    rows = np.flatnonzero(codes == SPLIT_CODES["train"])[:300]
    bags = dm.train_batch(rows).features.to_dict()[HISTORY]
    assert bags.lengths().max().item() == 3
    for stage, visible in (("val", [0]), ("test", [0, 1])):
        ev = dm.eval_users(stage)
        assert ev is not None
        index = np.arange(40)
        arrays = dm.query_arrays(stage, index)
        history = dm.user_batch(stage, index).features.to_dict()[HISTORY]
        longest = 0
        for k, u in enumerate(ev.users[index]):
            mine = np.flatnonzero((user == u) & np.isin(codes, visible))
            bag = history.values()[history.offsets()[k] : history.offsets()[k + 1]].tolist()
            assert sorted(bag) == sorted(item[mine].tolist())
            assert sorted(i for i in arrays["history"][k] if i) == sorted(bag)
            longest = max(longest, len(bag))
        assert arrays["history"].shape == (40, longest)  # padded to the longest bag, not the cap
    with pytest.raises(ValueError, match="model.eval.history_length"):
        RetrievalDataModule(world, history_length=0, eval_history_length=5)


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("two_tower_*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_build_on_any_user_item_dataset(world: Path, config: Path) -> None:
    """The recipes' model and loss settings are valid (their datasets may be absent here: the test
    world stands in, with the recipe's features it lacks, such as ML-100K's zip code, left out)."""
    tables = PreparedDataset(world).tables
    model = load_config(config).model
    overrides = [f"data.path={world}"]
    for tower, entity in (("user_features", "user"), ("item_features", "item")):
        if model.get(tower) is not None:
            has = set(tables[f"{entity}s"].columns) | {entity}
            overrides.append(f"model.{tower}=[{', '.join(f for f in model[tower] if f in has)}]")
    module, dm = build_two_tower(load_config(config, overrides))
    multinomial = module.loss_config.kind == "multinomial"
    assert dm.train_on == ("users" if multinomial else "interactions")
    TwoTower(module.config, device=torch.device("meta"))


def test_config_errors_name_the_field(world: Path) -> None:
    def build(*overrides: str) -> None:
        build_two_tower(load_config(CONFIG, [f"data.path={world}", *overrides]))

    with pytest.raises(ConfigError, match=r"model\.user_features: unknown feature\(s\) \['zip'\]"):
        build("model.user_features=[user, zip]")
    with pytest.raises(ConfigError, match="model.item_features must include 'item'"):
        build("model.item_features=[category]")
    with pytest.raises(ConfigError, match="model.split 'weekly'"):
        build("model.split=weekly")
    with pytest.raises(ConfigError, match="unexpected keyword argument 'embeding_dim'"):
        build("model.embeding_dim=8")
    with pytest.raises(ConfigError, match="model.eval: unknown key"):
        build("model.eval={k: [10]}")
    with pytest.raises(ConfigError, match="model.history_mode 'all'"):
        build("model.history_mode=all")
    with pytest.raises(ConfigError, match="model.loss.logq_weight must be >= 0"):
        build("model.loss.logq_weight=-1")
    with pytest.raises(ConfigError, match=r"projection false: .*output_dim 64 must equal both towers"):
        build("model.projection=false", "model.user_arch=[]", "model.item_arch=[]")
    with pytest.raises(ConfigError, match="data.path: .*not a prepared dataset"):
        build_two_tower(load_config(CONFIG, [f"data.path={world.parent / 'missing'}"]))


# -- the sharded run -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 gloo ranks, user and item tables row-wise: the shipped config on the test world."""
    run = tmp_path_factory.mktemp("run") / "run"
    torchrun(2, ["-m", "trainer", "--config", str(CONFIG), *_overrides(world, run)], timeout=600)
    return run


def _overrides(world: Path, run: Path) -> list[str]:
    sets = [
        f"data.path={world}", f"run_dir={run}", "data.batch_size=512", "model.loss.num_negatives=256",
        "model.history_length=10", "trainer.max_epochs=3", "trainer.log_every_n_steps=5",
        "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    return [arg for s in sets for arg in ("--set", s)]


def _truth_ceiling(world: Path, dm: RetrievalDataModule, k: int) -> float:
    """Recall@k of ranking by the generator's true long-run preferences (its top 50 per user)."""
    ds = PreparedDataset(world)
    top, scores = ds.jagged("truth", "top_items"), ds.jagged("truth", "top_scores")
    ev = dm.eval_users("test")
    assert ev is not None
    batch = dm.user_batch("test", np.arange(len(ev.users)))
    width = dm.schema.num_items + 1
    truth = torch.full((len(ev.users), width), -1e9)
    for i, u in enumerate(ev.users):
        truth[i, torch.from_numpy(top.row(u).astype(np.int64))] = torch.from_numpy(
            scores.row(u).astype(np.float32)
        )
    seen = batch.seen_mask(width)
    seen[:, 0] = True
    acc = TopKAccumulator(metric_names((k,)))
    acc.update(topk_metrics_from_scores(mask_scores(truth, seen), batch.target_mask(width), (k,)))
    return acc.compute()[f"recall@{k}"]


@pytest.mark.slow
def test_two_rank_row_wise_training_beats_popularity(trained: Path, world: Path) -> None:
    summary = json.loads((trained / "summary.json").read_text())
    plan = {row["table"]: row for row in summary["plan"]}
    for table in ("user", "item"):
        assert plan[table]["sharding_type"] == "row_wise" and plan[table]["ranks"] == [0, 1]
    assert summary["world_size"] == 2 and all(b > 0 for b in summary["embedding_bytes_per_rank"])
    rows = list(csv.DictReader((trained / "logs" / "version_0" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses

    m = summary["metrics"]
    dm = RetrievalDataModule(world)
    ceiling = _truth_ceiling(world, dm, 20)
    model, pop = m["test/recall@20"], m["test/pop_recall@20"]
    assert m["test/users"] == len(dm.eval_users("test").users)  # type: ignore[union-attr]
    # the world's own preferences bound what is learnable; a clear share of their lift over popularity
    assert ceiling > pop + 0.05
    assert model - pop >= 0.35 * (ceiling - pop), (
        f"recall@20 {model:.4f}, popularity {pop:.4f}, truth {ceiling:.4f}"
    )
    for k in KS:
        assert m[f"test/ndcg@{k}"] > m[f"test/pop_ndcg@{k}"]
        assert 0 < m[f"test/recall@{k}"] <= m[f"test/hr@{k}"] + 1e-9  # one target per user here: equal
    assert m["val/recall@20"] > m["val/pop_recall@20"]


@pytest.mark.slow
def test_two_rank_multinomial_training_without_dense_layers_beats_popularity(
    world: Path, tmp_path: Path
) -> None:
    """loss.kind multinomial (users against the catalog) with projection false: the towers are the
    row-wise sharded tables alone (the user-id row blended with the history bag), so nothing is left
    for the dense optimizer and the fused one trains everything."""
    run = tmp_path / "run"
    sets = [
        f"data.path={world}", f"run_dir={run}", "model.user_features=[user]", "model.user_blend={user: 0.25}",
        "model.item_features=[item]",
        "model.share_item_table=false", "model.projection=false", "model.user_arch=[]", "model.item_arch=[]",
        "model.embedding_dim=32", "model.output_dim=32", "model.history_length=10000",
        "model.history_mode=others", "model.history_dropout=0.5", "model.temperature=0.1",
        "model.loss.kind=multinomial", "model.loss.logq_correction=false", "model.loss.num_negatives=0",
        "sharding.tables={user: {sharding_types: [row_wise]}, item: {sharding_types: [row_wise]}, "
        "history: {sharding_types: [row_wise]}}",
        "sparse_optimizer.name=adagrad", "data.batch_size=256", "trainer.max_epochs=10",
        "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    torchrun(2, ["-m", "trainer", "--config", str(CONFIG), *[a for s in sets for a in ("--set", s)]])
    summary = json.loads((run / "summary.json").read_text())
    assert {row["table"]: row["sharding_type"] for row in summary["plan"]} == {
        "user": "row_wise", "item": "row_wise", "history": "row_wise",
    }  # fmt: skip
    rows = list(csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    m = summary["metrics"]
    ceiling = _truth_ceiling(world, RetrievalDataModule(world), 20)
    model, pop = m["test/recall@20"], m["test/pop_recall@20"]
    # an unordered bag of every item on a sequential world: a smaller share of the lift than the
    # in-batch model's recent-items history takes, still a clear one
    assert model - pop >= 0.25 * (ceiling - pop), (
        f"recall@20 {model:.4f}, popularity {pop:.4f}, truth {ceiling:.4f}"
    )
    # without DDP around a dense part, the checkpoint keys are still the plain module's: it exports
    out = tmp_path / "retrieval"
    flags = [a for s in sets for a in ("--set", s)]
    args = ["export", "retrieval", "--checkpoint", str(run / "checkpoints" / "final.ckpt"), "--config",
            str(CONFIG), "--out", str(out), "--index", "flat", *flags]  # fmt: skip
    assert funnel(args) == 0
    verify(out)
    module, dm = build_two_tower(load_config(CONFIG, sets))
    plain = unsharded_model(module.config, run / "checkpoints" / "final.ckpt")
    index = np.arange(50)
    arrays = dm.query_arrays("test", index)
    encoder = torch.export.load(out / "encoder.pt2").module()
    got = encoder(torch.from_numpy(arrays["user_features"]), torch.from_numpy(arrays["history"]))
    with torch.no_grad():
        batch = dm.user_batch("test", index)
        want = plain(batch.features, batch.num_queries, 0)[0]
    assert (got - want).abs().max().item() < 1e-5
    table = plain.sparse_arch.embedding_bags["item"].weight.detach()
    items = np.load(out / "item_embeddings.npy")
    assert np.allclose(items, torch.nn.functional.normalize(table[1:], dim=1).numpy(), atol=1e-6)


@pytest.mark.slow
def test_streaming_logq_sees_the_global_batch_and_is_checkpointed(world: Path, tmp_path: Path) -> None:
    """2 ranks: the estimator is fed the global batch's positives (both ranks identical) and saved."""
    run = tmp_path / "run"
    sets = [*_overrides(world, run)[1::2], "model.loss.logq_source=streaming", "trainer.max_epochs=1",
            "trainer.limit_train_batches=12", "trainer.test_after_fit=false",
            "lr_schedule.decay=cosine", "lr_schedule.decay_to=0.1"]  # fmt: skip
    torchrun(2, ["-m", "trainer", "--config", str(CONFIG), *[a for s in sets for a in ("--set", s)]])
    freq = StreamingItemFrequency(1001, 1000)
    load_unsharded(freq, run / "checkpoints" / "final.ckpt", prefix="item_frequency.")
    assert int(freq.step) == 12 and float(freq.rows_per_step) == 512  # the global batch, not a rank's half
    dm = RetrievalDataModule(world)
    head = np.argsort(dm.item_counts)[::-1][:20]
    estimate = freq.probability(torch.from_numpy(head.copy())).numpy()
    assert np.corrcoef(estimate, dm.item_prob[head])[0, 1] > 0.5
    # the engine's cosine schedule reaches the two-tower: its factor falls from 1 towards 0.1 over
    # the 12 steps (logged every 5; tests/test_lr_schedule.py proves the kernels follow it)
    rows = list(csv.DictReader((run / "logs" / "version_0" / "metrics.csv").open()))
    factors = [float(r["train/lr_factor"]) for r in rows if r.get("train/lr_factor")]
    assert factors == sorted(factors, reverse=True) and 0.1 < factors[-1] < 0.3 and factors[0] > 0.5


def _model_and_data(world: Path, trained: Path) -> tuple[TwoTower, RetrievalDataModule]:
    module, dm = build_two_tower(load_config(CONFIG, _overrides(world, trained)[1::2]))
    return unsharded_model(module.config, trained / "checkpoints" / "final.ckpt"), dm


@pytest.mark.slow
def test_sharded_evaluation_equals_single_process_ranking(trained: Path, world: Path) -> None:
    """Item slices from 2 sharded ranks + per-rank users == one process ranking everything."""
    model, dm = _model_and_data(world, trained)
    width = dm.schema.num_items + 1
    with torch.no_grad():
        items = dm.item_batch(np.arange(1, width))
        table = torch.cat([torch.zeros(1, model.config.output_dim), model(items.features, 0, width - 1)[1]])
        ev = dm.eval_users("test")
        assert ev is not None
        batch = dm.user_batch("test", np.arange(len(ev.users)))
        users = model(batch.features, batch.num_queries, 0)[0]
    seen = batch.seen_mask(width)
    seen[:, 0] = True
    acc = TopKAccumulator(metric_names(KS))
    acc.update(topk_metrics_from_scores(mask_scores(users @ table.T, seen), batch.target_mask(width), KS))
    ref = acc.compute()
    logged = json.loads((trained / "summary.json").read_text())["metrics"]
    for name in ("recall@10", "recall@100", "ndcg@20", "hr@50", "mrr"):
        assert logged[f"test/{name}"] == pytest.approx(ref[name], abs=1e-4), name


@pytest.mark.slow
def test_export_encoder_index_and_overwrite_guard(trained: Path, world: Path, tmp_path: Path) -> None:
    out = tmp_path / "retrieval"
    sets = [arg for s in _overrides(world, trained)[1::2] for arg in ("--set", s)]
    args = ["export", "retrieval", "--checkpoint", str(trained / "checkpoints" / "final.ckpt"),
            "--config", str(CONFIG), "--out", str(out), "--index", "flat", *sets]  # fmt: skip
    assert funnel(args) == 0
    manifest = verify(out)
    meta = json.loads((out / "meta.json").read_text())
    assert manifest["kind"] == "retrieval" and meta["model_type"] == "two_tower"
    # the one dataset fingerprint of every artifact (the bundle compares them), the split beside it
    assert meta["data_fingerprint"] == dataset_fingerprint(world)
    assert meta["dataset"]["split"] == {"split": "dataset", "val_fraction": 0.0, "seed": 0}
    assert meta["item_count"] == 1000 and meta["normalised"] and meta["ann"]["recall@100"] == 1.0

    # encoder.pt2 on plain tensors == the trained TorchRec user tower, at any batch size
    model, dm = _model_and_data(world, trained)
    encoder = torch.export.load(out / "encoder.pt2").module()
    ev = dm.eval_users("test")
    assert ev is not None
    for index in (np.arange(1), np.arange(7), np.arange(300)):
        arrays = dm.query_arrays("test", index)
        got = encoder(torch.from_numpy(arrays["user_features"]), torch.from_numpy(arrays["history"]))
        with torch.no_grad():
            batch = dm.user_batch("test", index)
            want = model(batch.features, batch.num_queries, 0)[0]
        assert got.shape == want.shape and (got - want).abs().max().item() < 1e-5
    # a longer, partly padded history gives the same embedding (padding contributes nothing)
    arrays = dm.query_arrays("test", np.arange(5))
    padded = np.concatenate([arrays["history"], np.zeros((5, 6), dtype=np.int64)], axis=1)
    a = encoder(torch.from_numpy(arrays["user_features"]), torch.from_numpy(arrays["history"]))
    b = encoder(torch.from_numpy(arrays["user_features"]), torch.from_numpy(padded))
    assert (a - b).abs().max().item() < 1e-6
    # id maps turn raw ids into the encoder's indices
    raw_user = meta["id_maps"]["user"]["raw_ids"][int(arrays["user"][0]) - 1]
    assert meta["id_maps"]["user"]["raw_ids"].index(raw_user) + 1 == arrays["user"][0]

    # the flat index returns the items the model ranks highest (raw ids through ids.npy)
    import faiss

    index = faiss.read_index(str(out / "index.faiss"))
    ids = np.load(out / "ids.npy")
    _, rows = index.search(a.detach().numpy(), 10)
    items = torch.from_numpy(np.load(out / "item_embeddings.npy"))
    best = torch.topk(a.detach() @ items.T, 10).indices.numpy()
    assert (ids[rows] == ids[best]).mean() > 0.95
    assert set(ids[rows].ravel()) <= set(PreparedDataset(world).idmap("item").tolist())

    # another model's export must not silently replace this index
    other = tmp_path / "other.ckpt"
    save_unsharded(TwoTower(model.config), other)
    args_other = [a if a != str(trained / "checkpoints" / "final.ckpt") else str(other) for a in args]
    before = (out / "index.faiss").read_bytes()
    assert funnel(args_other) == 1
    assert (out / "index.faiss").read_bytes() == before
    assert funnel([*args_other, "--overwrite"]) == 0
    assert json.loads((out / "meta.json").read_text())["model_fingerprint"] != meta["model_fingerprint"]


def _final_weights(run: Path, world: Path) -> dict[str, torch.Tensor]:
    module, _ = build_two_tower(load_config(CONFIG, [f"data.path={world}", "model.history_length=10"]))
    return load_unsharded(TwoTower(module.config), run / "checkpoints" / "final.ckpt").state_dict()


@pytest.mark.slow
def test_pipelined_training_equals_the_plain_loop(trained: Path, world: Path, tmp_path: Path) -> None:
    """trainer.pipeline=on: the forward is FX-traced to find the sharded input; on CPU (no streams)
    TorchRec's pipeline must then train exactly like the plain loop of the ``trained`` run."""
    run = tmp_path / "run"
    proc = torchrun(
        2, ["-m", "trainer", "--config", str(CONFIG), *_overrides(world, run), "--set", "trainer.pipeline=on"]
    )
    assert "dataloader_iter" in proc.stderr, "the pipelined training_step was not used"
    piped, plain = (json.loads((r / "summary.json").read_text()) for r in (run, trained))
    assert piped["pipelined"] and not plain["pipelined"]
    assert piped["global_step"] == plain["global_step"] > 0
    a, b = _final_weights(run, world), _final_weights(trained, world)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
