"""The built-in synthetic recommendation world: funnel's default dataset, with its own ground truth.

Real datasets cannot tell how good a model could possibly be; this one can. Everything is drawn
from a known generative model, so the generator also writes the answers: the true click
probability of every CTR row, the Bayes-optimal AUC per split, and every user's true top items.

The world (all of it O(users + items), built by :func:`make_world`):

* Categories have latent centroids and a sparse Markov transition matrix ``T`` ("after a phone,
  a case"). Items belong to one category; ``item latent = centroid + noise``, popularity is Zipf
  over a random permutation, tags (1-4 per item) come from a per-category tag distribution and the
  price from a per-category price level, so every side feature carries signal about the latent.
* Users have a taste ``theta`` over categories drawn around a profile set by age, gender and
  occupation, and ``user latent = theta @ centroids + noise``.

Interactions: a user with ``n`` events (log-normal activity, at least ``min_events_per_user``)
walks a category chain, ``next category ~ markov_weight * T[previous] + (1 - markov_weight) *
theta``, and within the category picks an item with probability proportional to
``popularity * exp(affinity_scale * <user, item>)``. The within-category choice is done by
sampling-importance-resampling (``num_candidates`` popularity draws, Gumbel-max on the affinity),
which keeps a step O(candidates) rather than O(items in the category); items the user already
consumed are skipped so that repeats stay rare, and with ``repeat_prob`` the user deliberately
re-consumes an earlier item.

CTR impressions: a user (weighted by activity) is shown an item drawn either by popularity or by
the user's own taste, and clicks with ``sigmoid(bias + w . dense + beta <user, item> + W1[age,
category] + W2[gender, price_bucket] + mean_tags W3[region, tag])``. ``bias`` is calibrated on a
pilot sample so the mean click rate is ``target_ctr``. ``prob`` is quantised to multiples of
``2**-18`` *before* the label is drawn from it, so it is exactly the label's probability and the
Bayes AUC can be computed exactly from a histogram while streaming.

Truth: ``truth.top_items[u]`` are the ``truth_top_k`` items with the highest long-run probability
for user ``u`` under the interaction model (stationary category distribution of the chain times
the within-category choice), best first; ``truth.top_scores`` are those log-probabilities.

Tables written (the layout ``funnel data prepare`` gives real datasets, plus the truth):
``users`` (age_bucket, gender, occupation, region), ``items`` (category, price_bucket, jagged
tags), ``interactions`` (user, item, timestamp, split: leave-one-out per user), ``sequences``
(user, jagged items: the full time-ordered history, held-out events included), ``ctr`` (user,
item, the side features, jagged tags, dense [rows, 8], label, prob, split: random 80/10/10) and
``truth`` (jagged top_items / top_scores, row ``i`` = user ``i``). ``meta.json`` carries the
config (``generator``), ``ground_truth`` (Bayes AUC / log loss / CTR per split, popularity
statistics) and ``feature_spec`` (the ctr features). :func:`load_config` + :func:`make_world`
rebuild the latent world of a generated dataset.

Determinism and scale: every random draw comes from a PCG64 generator seeded with
``SeedSequence([seed, stream, block])``. Blocks have a fixed size (``block_users`` users for the
interactions, ``block_rows`` CTR rows) that is independent of ``chunk_rows``, which only caps the
rows handed to one column-writer append. Changing ``chunk_rows`` therefore never changes a byte of
the output; peak memory is the world plus one block.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.shards import SPLIT_CODES, ColumnInfo, ColumnWriter, DatasetWriter, JaggedColumnWriter

log = logging.getLogger(__name__)

# SeedSequence stream ids: a new stream must get a new id, or it would replay another's draws.
_STREAM_WORLD = 0
_STREAM_INTERACTIONS = 1
_STREAM_CTR = 2
_STREAM_PILOT = 3

PROB_LEVELS = 2**18  # ctr.prob is a multiple of 1 / PROB_LEVELS (exact in float32)
_PILOT_ROWS = 20_000  # fixed, so the calibrated bias does not depend on ctr_rows
_DOT_PILOT_PAIRS = 20_000
_SIR_ROWS = 16_384  # rows per within-category draw; a constant, so the draws do not depend on it

DENSE_NAMES = [
    "position",
    "hour",
    "is_weekend",
    "price",
    "item_popularity",
    "user_activity",
    "item_age",
    "session_depth",
]
# Weights of the dense features in the true click model; session_depth is pure noise on purpose,
# so feature-importance tools have a known null feature.
DENSE_WEIGHTS = np.array([-1.5, 0.3, 0.2, -0.3, 0.2, 0.25, -0.3, 0.0])
_MAX_POSITION = 20

USER_FEATURES = ["age_bucket", "gender", "occupation", "region"]
ITEM_FEATURES = ["category", "price_bucket"]  # plus the multi-valued "tags"


@dataclass
class SyntheticConfig:
    """Everything that determines a generated dataset (stored in ``meta.json`` as ``generator``)."""

    name: str = "synthetic"
    # sizes
    num_users: int = 6_000
    num_items: int = 5_000
    num_interactions: int = 500_000
    ctr_rows: int = 500_000
    # world
    latent_dim: int = 16
    zipf_exponent: float = 1.1
    num_categories: int = 20
    num_tags: int = 100
    max_tags_per_item: int = 4
    num_age_buckets: int = 7
    num_genders: int = 2
    num_occupations: int = 21
    num_regions: int = 50
    num_price_buckets: int = 10
    taste_concentration: float = 0.4  # Dirichlet mass per category; lower = users focus on fewer
    profile_scale: float = 0.8  # how strongly age/gender/occupation shape the taste profile
    item_noise: float = 0.7  # item latent = centroid + item_noise * N(0, I)
    user_noise: float = 0.5
    # interaction dynamics
    min_events_per_user: int = 3
    activity_sigma: float = 1.0  # log-normal spread of per-user activity (clipped at 3 sigma)
    markov_weight: float = 0.6
    self_transition: float = 0.3
    transition_sparsity: float = 0.3  # Dirichlet concentration of the transition rows
    affinity_scale: float = 2.0
    num_candidates: int = 32
    repeat_prob: float = 0.02
    time_start: int = 1_600_000_000
    time_span_days: int = 180
    # CTR
    target_ctr: float = 0.15
    ctr_taste_exposure: float = 0.5  # share of impressions drawn from the user's taste
    ctr_affinity_weight: float = 0.8
    ctr_pair_scale: float = 0.5  # std of the W1/W2/W3 pairwise interaction terms
    ctr_val_fraction: float = 0.1
    ctr_test_fraction: float = 0.1
    # ground truth
    truth_top_k: int = 50
    truth_pool: int = 50_000  # most popular items scored for the truth (exact when >= num_items)
    # reproducibility and memory
    seed: int = 0
    block_users: int = 2_048
    block_rows: int = 65_536
    chunk_rows: int = 1_000_000

    def validate(self) -> None:
        positive = [
            "num_users", "num_items", "num_interactions", "ctr_rows", "latent_dim", "num_categories",
            "num_tags", "max_tags_per_item", "num_age_buckets", "num_genders", "num_occupations",
            "num_regions", "num_price_buckets", "min_events_per_user", "num_candidates",
            "time_span_days", "truth_top_k", "truth_pool", "block_users",
            "block_rows", "chunk_rows",
        ]  # fmt: skip
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"SyntheticConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"SyntheticConfig.seed must be >= 0, got {self.seed}")
        if self.num_items < self.num_categories:
            raise ValueError(
                f"SyntheticConfig.num_items ({self.num_items}) must be >= "
                f"num_categories ({self.num_categories})"
            )
        # leave-one-out needs a train, a val and a test event per user
        if self.min_events_per_user < 3:
            raise ValueError(
                f"SyntheticConfig.min_events_per_user must be >= 3, got {self.min_events_per_user}"
            )
        if self.num_interactions < self.min_events_per_user * self.num_users:
            raise ValueError(
                f"SyntheticConfig.num_interactions ({self.num_interactions}) must be >= "
                f"min_events_per_user * num_users ({self.min_events_per_user * self.num_users})"
            )
        for name in ["markov_weight", "self_transition", "ctr_taste_exposure", "repeat_prob"]:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SyntheticConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.target_ctr < 1.0:
            raise ValueError(f"SyntheticConfig.target_ctr must be in (0, 1), got {self.target_ctr}")
        if (
            self.ctr_val_fraction < 0
            or self.ctr_test_fraction < 0
            or (self.ctr_val_fraction + self.ctr_test_fraction >= 1.0)
        ):
            raise ValueError("SyntheticConfig.ctr_val_fraction + ctr_test_fraction must be in [0, 1)")
        if self.zipf_exponent < 0:
            raise ValueError(f"SyntheticConfig.zipf_exponent must be >= 0, got {self.zipf_exponent}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SyntheticConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SyntheticConfig field(s) {unknown}")
        return cls(**d)


PRESETS: dict[str, SyntheticConfig] = {
    # the test fixture: ~10K interactions, generates in well under a second
    "tiny": SyntheticConfig(
        name="synthetic-tiny", num_users=300, num_items=500, num_interactions=10_000, ctr_rows=20_000,
        num_categories=10, num_tags=30, num_occupations=8, num_regions=10,
    ),
    # the demo default
    "small": SyntheticConfig(name="synthetic-small"),
    "medium": SyntheticConfig(
        name="synthetic-medium", num_users=60_000, num_items=40_000, num_interactions=5_000_000,
        ctr_rows=5_000_000, num_categories=32, num_tags=300,
    ),
    # streamed; about 20 GB on disk, never generated in tests
    "large": SyntheticConfig(
        name="synthetic-large", num_users=1_000_000, num_items=1_000_000, num_interactions=100_000_000,
        ctr_rows=100_000_000, num_categories=32, num_tags=1_000, num_regions=100, truth_pool=20_000,
        block_users=4_096, chunk_rows=4_000_000,
    ),
}  # fmt: skip


def _rng(seed: int, stream: int, block: int = 0) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, block])))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # tanh form: no overflow warnings for large |z|


def _sample_cumulative_rows(rng: np.random.Generator, cum: np.ndarray) -> np.ndarray:
    """One categorical draw per row of row-wise cumulative (unnormalised) weights ``cum [n, C]``."""
    r = rng.random(cum.shape[0])[:, None] * cum[:, -1:]
    return np.minimum((cum <= r).sum(axis=1), cum.shape[1] - 1)


@dataclass
class World:
    """The latent state of the generator. Arrays are indexed by user / item index (row 0 = OOV)."""

    config: SyntheticConfig
    # users
    user_age: np.ndarray  # int64 [U+1], values 1..num_age_buckets
    user_gender: np.ndarray
    user_occupation: np.ndarray
    user_region: np.ndarray
    user_taste: np.ndarray  # float32 [U+1, C]: theta, the user's preference over categories (0-based)
    user_latent: np.ndarray  # float32 [U+1, d]
    user_events: np.ndarray  # int64 [U+1]: number of interactions of each user
    # items
    item_category: np.ndarray  # int64 [I+1], values 1..num_categories
    item_price_bucket: np.ndarray
    item_log_price: np.ndarray  # float64 [I+1]
    item_tags: np.ndarray  # int64 [I+1, max_tags], 0-padded, valid tags first
    item_num_tags: np.ndarray  # int64 [I+1]
    item_latent: np.ndarray  # float32 [I+1, d]
    item_popularity: np.ndarray  # float64 [I+1], sums to 1 (row 0 is 0)
    item_age: np.ndarray  # float64 [I+1] in [0, 1]
    # categories (0-based here)
    centroids: np.ndarray  # float32 [C, d]
    transition: np.ndarray  # float64 [C, C], rows sum to 1
    # click model
    ctr_bias: float
    w_age_category: np.ndarray  # [A+1, C+1]
    w_gender_price: np.ndarray  # [G+1, P+1]
    w_region_tag: np.ndarray  # [R+1, T+1]
    feature_stats: dict[str, tuple[float, float]]  # mean / std used to normalise dense features
    # derived sampling tables
    cat_order: np.ndarray = dataclasses.field(init=False, repr=False)
    cat_cum: np.ndarray = dataclasses.field(init=False, repr=False)
    cat_lo: np.ndarray = dataclasses.field(init=False, repr=False)
    cat_mass: np.ndarray = dataclasses.field(init=False, repr=False)
    cat_first: np.ndarray = dataclasses.field(init=False, repr=False)
    cat_last: np.ndarray = dataclasses.field(init=False, repr=False)
    pop_cum: np.ndarray = dataclasses.field(init=False, repr=False)
    events_cum: np.ndarray = dataclasses.field(init=False, repr=False)
    transition_cum: np.ndarray = dataclasses.field(init=False, repr=False)
    stationary_map: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        c = self.config
        cat0 = self.item_category[1:] - 1
        # Items sorted by category, so one category's popularity mass is a contiguous range of a
        # single cumulative array and a within-category draw is one searchsorted.
        self.cat_order = np.argsort(cat0, kind="stable") + 1
        self.cat_cum = np.cumsum(self.item_popularity[self.cat_order])
        sizes = np.bincount(cat0, minlength=c.num_categories)
        self.cat_first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.cat_last = self.cat_first + sizes - 1
        self.cat_lo = np.where(self.cat_first > 0, self.cat_cum[np.maximum(self.cat_first - 1, 0)], 0.0)
        self.cat_mass = self.cat_cum[self.cat_last] - self.cat_lo
        self.pop_cum = np.cumsum(self.item_popularity[1:])
        self.events_cum = np.cumsum(self.user_events[1:])
        self.transition_cum = np.cumsum(self.transition, axis=1)
        lam = c.markov_weight
        # Long-run category distribution of the chain next ~ lam T[prev] + (1 - lam) theta:
        # pi = lam pi T + (1 - lam) theta  =>  pi = theta (1 - lam) (I - lam T)^-1.
        self.stationary_map = (1.0 - lam) * np.linalg.inv(np.eye(c.num_categories) - lam * self.transition)

    @property
    def item_cat0(self) -> np.ndarray:
        return self.item_category - 1

    def stationary(self, users: np.ndarray) -> np.ndarray:
        """Long-run category distribution ``[len(users), C]`` of the given users."""
        pi = self.user_taste[users].astype(np.float64) @ self.stationary_map
        return np.maximum(pi, 1e-12)

    def sample_popular(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = rng.random(n) * self.pop_cum[-1]
        return np.minimum(np.searchsorted(self.pop_cum, x, side="right"), self.config.num_items - 1) + 1

    def sample_users(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Users weighted by their activity, as impressions are."""
        r = rng.integers(0, int(self.events_cum[-1]), size=n)
        return np.searchsorted(self.events_cum, r, side="right") + 1

    def sample_in_category(
        self,
        rng: np.random.Generator,
        cat0: np.ndarray,
        users: np.ndarray,
        seen: np.ndarray | None = None,
        slots: int = 1,
    ) -> np.ndarray:
        """One item per row from category ``cat0`` with p ~ popularity * exp(scale * affinity).

        Sampling-importance-resampling: candidates are drawn by popularity, so the importance
        weight is exp(scale * affinity) and Gumbel-max picks one. Candidates whose slot
        ``item % slots`` is set in the row's ``seen`` lose unless every candidate is seen.
        """
        if len(cat0) > _SIR_ROWS:  # bounds the [rows, candidates, latent_dim] gather
            return np.concatenate(
                [
                    self.sample_in_category(
                        rng,
                        cat0[a : a + _SIR_ROWS],
                        users[a : a + _SIR_ROWS],
                        None if seen is None else seen[a : a + _SIR_ROWS],
                        slots,
                    )
                    for a in range(0, len(cat0), _SIR_ROWS)
                ]
            )
        k = self.config.num_candidates
        x = self.cat_lo[cat0][:, None] + rng.random((len(cat0), k)) * self.cat_mass[cat0][:, None]
        pos = np.searchsorted(self.cat_cum, x, side="right")
        pos = np.clip(pos, self.cat_first[cat0][:, None], self.cat_last[cat0][:, None])
        cand = self.cat_order[pos]
        aff = np.matmul(self.item_latent[cand], self.user_latent[users][:, :, None])[:, :, 0]
        score = self.config.affinity_scale * aff + rng.gumbel(size=cand.shape)
        if seen is not None:
            score -= 1e6 * seen[np.arange(len(cand))[:, None], cand % slots]
        return cand[np.arange(len(cand)), np.argmax(score, axis=1)]

    def true_scores(self, users: np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
        """Long-run log-probability ``[len(users), len(items)]`` (float32) of each user consuming each item.

        ``log pi_u(c_i) + log pop_i + s <u, v_i> - log sum_{j in c_i} pop_j exp(s <u, v_j>)``,
        the normaliser taken over ``items`` (all items by default), so for a subset it is the
        probability within that subset.
        """
        if items is None:
            items = np.arange(1, self.config.num_items + 1)
        items = np.asarray(items)
        # Work in category order, so each category's normaliser is over a contiguous slice.
        order = np.argsort(self.item_category[items], kind="stable")
        it = items[order]
        cats = self.item_cat0[it]
        s = self.user_latent[users] @ self.item_latent[it].T
        s *= np.float32(self.config.affinity_scale)
        s += np.log(self.item_popularity[it]).astype(np.float32)[None, :]
        log_pi = np.log(self.stationary(users)).astype(np.float32)
        bounds = np.flatnonzero(np.diff(cats)) + 1
        for a, b in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(it)]]), strict=True):
            part = s[:, a:b]  # a view: updated in place
            m = part.max(axis=1, keepdims=True)
            log_z = m + np.log(np.exp(part - m).sum(axis=1, keepdims=True))
            part += log_pi[:, cats[a] : cats[a] + 1] - log_z
        if np.array_equal(order, np.arange(len(order))):
            return s
        out = np.empty_like(s)
        out[:, order] = s
        return out


def make_world(config: SyntheticConfig) -> World:
    """Draw the latent world of ``config`` (deterministic in ``config``, independent of chunking)."""
    config.validate()
    c = config
    rng = _rng(c.seed, _STREAM_WORLD)
    nu, ni, nc, d = c.num_users, c.num_items, c.num_categories, c.latent_dim

    # -- categories ---------------------------------------------------------------------------
    centroids = rng.standard_normal((nc, d))
    transition = rng.dirichlet(np.full(nc, c.transition_sparsity), size=nc)
    transition = c.self_transition * np.eye(nc) + (1.0 - c.self_transition) * transition

    # -- items --------------------------------------------------------------------------------
    cat_share = rng.dirichlet(np.full(nc, 3.0))
    # the first nc items cover every category once so no category is empty
    item_cat0 = np.concatenate([rng.permutation(nc), rng.choice(nc, size=ni - nc, p=cat_share)])
    rank = rng.permutation(ni) + 1
    pop = rank.astype(np.float64) ** -c.zipf_exponent
    pop /= pop.sum()
    item_latent = centroids[item_cat0] + c.item_noise * rng.standard_normal((ni, d))
    cat_log_price = rng.normal(3.5, 0.8, size=nc)
    log_price = cat_log_price[item_cat0] + rng.normal(0.0, 0.5, size=ni)
    edges = np.quantile(log_price, np.linspace(0, 1, c.num_price_buckets + 1)[1:-1])
    price_bucket = np.searchsorted(edges, log_price, side="right") + 1
    item_age = rng.random(ni)

    tag_dist = rng.dirichlet(np.full(c.num_tags, 0.1), size=nc)
    tag_dist = 0.9 * tag_dist + 0.1 / c.num_tags  # mostly category-specific, a little shared
    mt = c.max_tags_per_item
    n_tags = rng.integers(1, mt + 1, size=ni)
    drawn = np.empty((ni, mt), dtype=np.int64)
    for cat in range(nc):
        members = np.flatnonzero(item_cat0 == cat)
        drawn[members] = rng.choice(c.num_tags, size=(len(members), mt), p=tag_dist[cat]) + 1
    keep = np.arange(mt)[None, :] < n_tags[:, None]
    for j in range(1, mt):  # drop duplicates of an earlier tag of the same item
        keep[:, j] &= ~(drawn[:, :j] == drawn[:, j : j + 1]).any(axis=1)
    first = np.argsort(~keep, axis=1, kind="stable")  # valid tags first, order kept
    tags = np.where(np.take_along_axis(keep, first, axis=1), np.take_along_axis(drawn, first, axis=1), 0)

    # -- users --------------------------------------------------------------------------------
    age = rng.choice(c.num_age_buckets, size=nu, p=rng.dirichlet(np.full(c.num_age_buckets, 5.0)))
    gender = rng.choice(c.num_genders, size=nu, p=rng.dirichlet(np.full(c.num_genders, 20.0)))
    occupation = rng.choice(c.num_occupations, size=nu, p=rng.dirichlet(np.full(c.num_occupations, 2.0)))
    region = rng.choice(c.num_regions, size=nu, p=rng.dirichlet(np.full(c.num_regions, 1.0)))
    a_age = c.profile_scale * rng.standard_normal((c.num_age_buckets, nc))
    a_gender = c.profile_scale * rng.standard_normal((c.num_genders, nc))
    a_occ = c.profile_scale * rng.standard_normal((c.num_occupations, nc))
    taste = np.empty((nu, nc), dtype=np.float32)
    step = 65_536  # bounds the float64 temporaries; a constant, so the draws do not depend on it
    for lo in range(0, nu, step):
        hi = min(nu, lo + step)
        logits = a_age[age[lo:hi]] + a_gender[gender[lo:hi]] + a_occ[occupation[lo:hi]]
        profile = np.exp(logits - logits.max(axis=1, keepdims=True))
        profile /= profile.sum(axis=1, keepdims=True)
        g = rng.gamma(c.taste_concentration * nc * profile) + 1e-9
        taste[lo:hi] = g / g.sum(axis=1, keepdims=True)
    user_latent = taste @ centroids.astype(np.float32) + c.user_noise * rng.standard_normal((nu, d)).astype(
        np.float32
    )

    # activity: log-normal weights (clipped so one user cannot hold most of a block), then an exact
    # largest-remainder allocation so the total is exactly num_interactions
    z = np.clip(rng.standard_normal(nu), -3.0, 3.0)
    weight = np.exp(c.activity_sigma * z)
    extra = c.num_interactions - c.min_events_per_user * nu
    share = weight / weight.sum() * extra
    base = np.floor(share).astype(np.int64)
    rest = extra - int(base.sum())
    base[np.argsort(-(share - base), kind="stable")[:rest]] += 1
    events = c.min_events_per_user + base

    # unit-variance affinity over random pairs, so affinity_scale and ctr_affinity_weight mean the
    # same thing whatever latent_dim and noise levels are
    pu = rng.integers(0, nu, size=_DOT_PILOT_PAIRS)
    pi = rng.integers(0, ni, size=_DOT_PILOT_PAIRS)
    dot_std = float(np.einsum("nd,nd->n", user_latent[pu].astype(np.float64), item_latent[pi]).std())
    scale = 1.0 / math.sqrt(max(dot_std, 1e-12))
    user_latent = user_latent * scale
    item_latent = item_latent * scale

    def pad_int(x: np.ndarray) -> np.ndarray:
        return np.concatenate([[0], np.asarray(x, dtype=np.int64)]).astype(np.int64)

    def pad_rows(x: np.ndarray, dtype: Any) -> np.ndarray:
        return np.concatenate([np.zeros((1, *x.shape[1:]), dtype=dtype), x.astype(dtype)])

    def pair_table(rows: int, cols: int) -> np.ndarray:
        w = np.zeros((rows + 1, cols + 1))
        w[1:, 1:] = c.ctr_pair_scale * rng.standard_normal((rows, cols))
        return w

    w1 = pair_table(c.num_age_buckets, nc)
    w2 = pair_table(c.num_genders, c.num_price_buckets)
    w3 = pair_table(c.num_regions, c.num_tags)
    log_pop = np.log(pop)
    log_events = np.log(events.astype(np.float64))
    stats = {
        "price": (float(log_price.mean()), float(log_price.std() + 1e-12)),
        "item_popularity": (float(log_pop.mean()), float(log_pop.std() + 1e-12)),
        "user_activity": (float(log_events.mean()), float(log_events.std() + 1e-12)),
    }
    world = World(
        config=c,
        user_age=pad_int(age + 1),
        user_gender=pad_int(gender + 1),
        user_occupation=pad_int(occupation + 1),
        user_region=pad_int(region + 1),
        user_taste=pad_rows(taste, np.float32),
        user_latent=pad_rows(user_latent, np.float32),
        user_events=pad_int(events),
        item_category=pad_int(item_cat0 + 1),
        item_price_bucket=pad_int(price_bucket),
        item_log_price=np.concatenate([[0.0], log_price]),
        item_tags=pad_rows(tags, np.int64),
        item_num_tags=pad_int((tags > 0).sum(axis=1)),
        item_latent=pad_rows(item_latent, np.float32),
        item_popularity=np.concatenate([[0.0], pop]),
        item_age=np.concatenate([[0.0], item_age]),
        centroids=(centroids * scale).astype(np.float32),
        transition=transition,
        ctr_bias=0.0,
        w_age_category=w1,
        w_gender_price=w2,
        w_region_tag=w3,
        feature_stats=stats,
    )
    world.ctr_bias = _calibrate_bias(world)
    return world


# -- CTR rows ------------------------------------------------------------------------------------
def _ctr_rows(world: World, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """``n`` impressions with features and the click logit *without* the bias."""
    c = world.config
    users = world.sample_users(rng, n)
    by_taste = rng.random(n) < c.ctr_taste_exposure
    items = np.empty(n, dtype=np.int64)
    items[~by_taste] = world.sample_popular(rng, int((~by_taste).sum()))
    tu = users[by_taste]
    if len(tu):
        cats = _sample_cumulative_rows(rng, np.cumsum(world.stationary(tu), axis=1))
        items[by_taste] = world.sample_in_category(rng, cats, tu)
    position = np.minimum(rng.geometric(0.15, size=n), _MAX_POSITION)
    hour = rng.integers(0, 24, size=n)
    weekend = rng.random(n) < 2.0 / 7.0
    session_depth = np.minimum(rng.geometric(0.3, size=n), 10)

    def norm(name: str, x: np.ndarray) -> np.ndarray:
        mean, std = world.feature_stats[name]
        return (x - mean) / std

    dense = np.stack(
        [
            (position - 1) / (_MAX_POSITION - 1),
            hour / 23.0,
            weekend.astype(np.float64),
            norm("price", world.item_log_price[items]),
            norm("item_popularity", np.log(world.item_popularity[items])),
            norm("user_activity", np.log(world.user_events[users].astype(np.float64))),
            world.item_age[items],
            (session_depth - 1) / 9.0,
        ],
        axis=1,
    ).astype(np.float32)
    affinity = np.einsum(
        "nd,nd->n", world.user_latent[users].astype(np.float64), world.item_latent[items].astype(np.float64)
    )
    age, gender, region = world.user_age[users], world.user_gender[users], world.user_region[users]
    category, price_bucket = world.item_category[items], world.item_price_bucket[items]
    tags = world.item_tags[items]
    region_tag = (world.w_region_tag[region[:, None], tags] * (tags > 0)).sum(axis=1)
    region_tag /= world.item_num_tags[items]  # mean over the item's tags
    logit = (
        dense.astype(np.float64) @ DENSE_WEIGHTS
        + c.ctr_affinity_weight * affinity
        + world.w_age_category[age, category]
        + world.w_gender_price[gender, price_bucket]
        + region_tag
    )
    return {
        "user": users,
        "item": items,
        "age_bucket": age,
        "gender": gender,
        "occupation": world.user_occupation[users],
        "region": region,
        "category": category,
        "price_bucket": price_bucket,
        "dense": dense,
        "logit": logit,
    }


def _quantised_prob(logit: np.ndarray) -> np.ndarray:
    return np.round(_sigmoid(logit) * PROB_LEVELS) / PROB_LEVELS


def _calibrate_bias(world: World) -> float:
    """Bias so that the mean click probability is ``target_ctr`` (bisection on a pilot sample)."""
    logit = _ctr_rows(world, _rng(world.config.seed, _STREAM_PILOT), _PILOT_ROWS)["logit"]
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _sigmoid(logit + mid).mean() < world.config.target_ctr:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# -- interactions --------------------------------------------------------------------------------
def _interaction_block(world: World, rng: np.random.Generator, lo: int, hi: int) -> dict[str, np.ndarray]:
    """Event sequences of users ``lo..hi-1``, user-major and time-ordered within a user."""
    c = world.config
    counts = world.user_events[lo:hi]
    n = hi - lo
    offsets = np.concatenate([[0], np.cumsum(counts)])
    out = np.zeros(int(offsets[-1]), dtype=np.int64)
    # Longest sequences first: the users still active at step t are then always a prefix.
    order = np.argsort(-counts, kind="stable")
    sorted_counts = counts[order]
    users = lo + order
    starts = offsets[:-1][order]
    taste_cum = np.cumsum(world.user_taste[users].astype(np.float64), axis=1)
    # Items each user has consumed, for skipping them as candidates: exact when the item range is
    # small, otherwise a direct-mapped slot table (item % slots) sized so that at most 1/8 of a
    # user's slots fill up; a collision only skips one more candidate.
    max_len = int(sorted_counts[0])
    slots = min(c.num_items + 1, 1 << int(math.ceil(math.log2(8 * max_len))))
    seen = np.zeros((n, slots), dtype=bool)
    prev_cat = np.zeros(n, dtype=np.int64)
    neg_counts = -sorted_counts
    for t in range(max_len):
        a = int(np.searchsorted(neg_counts, -t, side="left"))
        u = users[:a]
        if t == 0:
            cats = _sample_cumulative_rows(rng, taste_cum[:a])
        else:
            markov = rng.random(a) < c.markov_weight
            rows = np.where(markov[:, None], world.transition_cum[prev_cat[:a]], taste_cum[:a])
            cats = _sample_cumulative_rows(rng, rows)
        items = world.sample_in_category(rng, cats, u, seen=seen[:a], slots=slots)
        if t > 0 and c.repeat_prob > 0:
            rep = np.flatnonzero(rng.random(a) < c.repeat_prob)
            if len(rep):
                back = rng.integers(0, t, size=len(rep))
                items[rep] = out[starts[rep] + back]
        out[starts[:a] + t] = items
        seen[np.arange(a), items % slots] = True
        prev_cat[:a] = world.item_cat0[items]

    # Sessions: short gaps inside a session, user-paced gaps between sessions, so that heavy and
    # light users both span a good part of the time range.
    total = len(out)
    span = c.time_span_days * 86_400
    user_of_event = np.repeat(np.arange(lo, hi), counts)
    session_gap = (0.5 * span) / np.maximum(1.0, 0.2 * counts)
    new_session = rng.random(total) < 0.2
    gaps = np.where(
        new_session,
        rng.exponential(1.0, size=total) * np.repeat(session_gap, counts),
        rng.exponential(90.0, size=total),
    )
    gaps = 1 + np.floor(gaps).astype(np.int64)  # >= 1 s: timestamps strictly increase per user
    start = c.time_start + (rng.random(n) * 0.5 * span).astype(np.int64)
    cs = np.cumsum(gaps)
    first = offsets[:-1]
    cs_before = np.repeat(cs[first] - gaps[first], counts)
    timestamp = np.repeat(start, counts) + cs - cs_before
    pos = np.arange(total) - np.repeat(first, counts)
    remaining = np.repeat(counts, counts) - pos
    split = np.full(total, SPLIT_CODES["train"], dtype=np.uint8)
    split[remaining == 2] = SPLIT_CODES["val"]
    split[remaining == 1] = SPLIT_CODES["test"]
    return {"user": user_of_event, "item": out, "timestamp": timestamp, "split": split, "lengths": counts}


# -- writing -------------------------------------------------------------------------------------
class _TableStream:
    """Column writers of one table; each block is appended in pieces of at most ``chunk_rows`` rows
    (jagged columns: also at most ``chunk_rows`` values, unless a single row is longer)."""

    def __init__(self, writer: DatasetWriter, table: str, chunk_rows: int) -> None:
        self.writer = writer
        self.table = table
        self.chunk_rows = chunk_rows
        self.columns: dict[str, ColumnWriter | JaggedColumnWriter] = {}

    def add(self, column: str, info: ColumnInfo, trailing_shape: tuple[int, ...] = ()) -> None:
        self.columns[column] = self.writer.column_writer(self.table, column, info, trailing_shape)

    def append(self, rows: int, data: dict[str, Any]) -> None:
        for name, w in self.columns.items():
            if isinstance(w, JaggedColumnWriter):
                # at most chunk_rows rows and chunk_rows values per piece (a longer row goes alone)
                values, lengths = data[name]
                ends = np.cumsum(lengths)
                a = 0
                while a < rows:
                    v0 = int(ends[a - 1]) if a else 0
                    b = int(np.searchsorted(ends, v0 + self.chunk_rows, side="right"))
                    b = max(a + 1, min(b, a + self.chunk_rows, rows))
                    w.append(values[v0 : int(ends[b - 1])], lengths[a:b])
                    a = b
            else:
                for a in range(0, rows, self.chunk_rows):
                    w.append(data[name][a : a + self.chunk_rows])


def _id_names(prefix: str, n: int) -> np.ndarray:
    width = len(str(n))
    return np.char.add(prefix, np.char.zfill(np.arange(1, n + 1).astype(str), width))


def _auc_from_hist(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """Exact AUC (ties count one half) from per-score-level positive / negative counts."""
    p, n = float(pos.sum()), float(neg.sum())
    if p == 0 or n == 0:
        return None
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (p * n))


def _logloss_from_hist(pos: np.ndarray, neg: np.ndarray) -> float | None:
    total = float(pos.sum() + neg.sum())
    if total == 0:
        return None
    q = np.arange(len(pos)) / PROB_LEVELS
    with np.errstate(divide="ignore", invalid="ignore"):
        lp = np.where(pos > 0, pos * -np.log(q), 0.0)
        ln = np.where(neg > 0, neg * -np.log1p(-q), 0.0)
    return float((lp.sum() + ln.sum()) / total)


def generate(config: SyntheticConfig, out: Path, overwrite: bool = False) -> Path:
    """Generate the dataset of ``config`` into ``out`` (atomically) and return its path."""
    t0 = time.perf_counter()
    world = make_world(config)
    c = config
    nu, ni = c.num_users, c.num_items
    with DatasetWriter(out, name=c.name, overwrite=overwrite) as w:
        _write_entities(w, world)
        inter_stats = _write_interactions(w, world)
        ctr_stats = _write_ctr(w, world)
        truth_stats = _write_truth(w, world)
        w.source = {"type": "synthetic", "generator": "data.synthetic", "seed": c.seed}
        w.counts = {"interactions": c.num_interactions, "users": nu, "items": ni, "ctr_rows": c.ctr_rows}
        w.meta_extra = {
            "generator": c.to_json(),
            "ground_truth": {**ctr_stats, "popularity": inter_stats, "truth": truth_stats},
            "feature_spec": feature_spec(c),
        }
    log.info(
        "synthetic %s: %d interactions, %d ctr rows in %.1fs -> %s",
        c.name, c.num_interactions, c.ctr_rows, time.perf_counter() - t0, out,
    )  # fmt: skip
    return Path(out)


def feature_spec(config: SyntheticConfig) -> list[dict[str, Any]]:
    """The features of the ``ctr`` table (``label`` and ``prob`` are not features)."""
    c = config
    sparse = {
        "user": c.num_users + 1,
        "item": c.num_items + 1,
        "age_bucket": c.num_age_buckets + 1,
        "gender": c.num_genders + 1,
        "occupation": c.num_occupations + 1,
        "region": c.num_regions + 1,
        "category": c.num_categories + 1,
        "price_bucket": c.num_price_buckets + 1,
        "tags": c.num_tags + 1,
    }
    spec: list[dict[str, Any]] = [
        {"name": k, "kind": "sparse", "vocab": v, "multi_valued": k == "tags"} for k, v in sparse.items()
    ]
    spec.append(
        {
            "name": "dense",
            "kind": "dense",
            "vocab": None,
            "multi_valued": False,
            "width": 8,
            "names": DENSE_NAMES,
        }
    )
    return spec


def _vocab_names(config: SyntheticConfig) -> dict[str, np.ndarray]:
    c = config
    age_names = ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]
    return {
        "age_bucket": np.array(age_names) if c.num_age_buckets == 7 else _id_names("age", c.num_age_buckets),
        "gender": np.array(["F", "M"]) if c.num_genders == 2 else _id_names("g", c.num_genders),
        "occupation": _id_names("occ", c.num_occupations),
        "region": _id_names("r", c.num_regions),
        "category": _id_names("cat", c.num_categories),
        "price_bucket": _id_names("p", c.num_price_buckets),
        "tags": _id_names("tag", c.num_tags),
    }


def _info(config: SyntheticConfig, field: str) -> ColumnInfo:
    """Column info of a categorical field, named after its id map."""
    vocab = {spec["name"]: spec["vocab"] for spec in feature_spec(config) if spec["kind"] == "sparse"}
    return ColumnInfo(dtype="int64", vocab=vocab[field], idmap=field, jagged=field == "tags")


def _write_entities(w: DatasetWriter, world: World) -> None:
    c = world.config
    w.write_idmap("user", _id_names("u", c.num_users))
    w.write_idmap("item", _id_names("i", c.num_items))
    for name, raw in _vocab_names(c).items():
        w.write_idmap(name, raw)
    w.write_column("users", "age_bucket", world.user_age, _info(c, "age_bucket"))
    w.write_column("users", "gender", world.user_gender, _info(c, "gender"))
    w.write_column("users", "occupation", world.user_occupation, _info(c, "occupation"))
    w.write_column("users", "region", world.user_region, _info(c, "region"))
    w.write_column("items", "category", world.item_category, _info(c, "category"))
    w.write_column("items", "price_bucket", world.item_price_bucket, _info(c, "price_bucket"))
    tags = world.item_tags
    w.write_jagged("items", "tags", tags[tags > 0], world.item_num_tags, _info(c, "tags"))


def _write_interactions(w: DatasetWriter, world: World) -> dict[str, Any]:
    c = world.config
    inter = _TableStream(w, "interactions", c.chunk_rows)
    inter.add("user", _info(c, "user"))
    inter.add("item", _info(c, "item"))
    inter.add("timestamp", ColumnInfo("int64"))
    inter.add("split", ColumnInfo("uint8"))
    seqs = _TableStream(w, "sequences", c.chunk_rows)
    seqs.add("user", _info(c, "user"))
    seqs.add("items", ColumnInfo("int64", jagged=True, vocab=c.num_items + 1, idmap="item"))
    item_counts = np.zeros(c.num_items + 1, dtype=np.int64)
    repeats = 0
    t0 = time.perf_counter()
    n_blocks = -(-c.num_users // c.block_users)
    for b in range(n_blocks):
        lo = 1 + b * c.block_users
        hi = min(c.num_users + 1, lo + c.block_users)
        blk = _interaction_block(world, _rng(c.seed, _STREAM_INTERACTIONS, b), lo, hi)
        inter.append(len(blk["item"]), blk)
        seqs.append(hi - lo, {"user": np.arange(lo, hi), "items": (blk["item"], blk["lengths"])})
        item_counts += np.bincount(blk["item"], minlength=c.num_items + 1)
        keys = blk["user"] * (c.num_items + 1) + blk["item"]
        repeats += len(keys) - len(np.unique(keys))
        if n_blocks > 1 and (b + 1) % max(1, n_blocks // 20) == 0:
            log.info("interactions: block %d/%d (%.0fs)", b + 1, n_blocks, time.perf_counter() - t0)
    counts = np.sort(item_counts[1:])[::-1]
    total = float(counts.sum())
    top = max(1, c.num_items // 10)
    top1 = max(1, c.num_items // 100)
    cum = np.cumsum(counts[::-1]) / total  # Lorenz curve, ascending
    gini = float(1.0 - 2.0 * (cum.sum() - 0.5 * cum[-1]) / len(cum))
    events = world.user_events[1:]
    return {
        "zipf_exponent": c.zipf_exponent,
        "top10pct_item_share": float(counts[:top].sum() / total),
        "top1pct_item_share": float(counts[:top1].sum() / total),
        "item_gini": gini,
        "items_with_interactions": int((counts > 0).sum()),
        "repeat_rate": repeats / total,
        "events_per_user": {
            "mean": float(events.mean()),
            "median": float(np.median(events)),
            "max": int(events.max()),
        },
    }


def _write_ctr(w: DatasetWriter, world: World) -> dict[str, Any]:
    c = world.config
    t = _TableStream(w, "ctr", c.chunk_rows)
    for name in ["user", "item", *USER_FEATURES, *ITEM_FEATURES, "tags"]:
        t.add(name, _info(c, name))
    t.add(
        "dense", ColumnInfo("float32", width=len(DENSE_NAMES), names=list(DENSE_NAMES)), (len(DENSE_NAMES),)
    )
    t.add("label", ColumnInfo("float32"))
    t.add("prob", ColumnInfo("float32"))  # ground truth, deliberately without a vocab: not a feature
    t.add("split", ColumnInfo("uint8"))
    hist = np.zeros((len(SPLIT_CODES), 2, PROB_LEVELS + 1), dtype=np.int64)
    t0 = time.perf_counter()
    n_blocks = -(-c.ctr_rows // c.block_rows)
    for b in range(n_blocks):
        n = min(c.block_rows, c.ctr_rows - b * c.block_rows)
        rng = _rng(c.seed, _STREAM_CTR, b)
        rows = _ctr_rows(world, rng, n)
        prob = _quantised_prob(rows.pop("logit") + world.ctr_bias)
        label = rng.random(n) < prob
        r = rng.random(n)
        split = np.full(n, SPLIT_CODES["train"], dtype=np.uint8)
        split[r < c.ctr_val_fraction + c.ctr_test_fraction] = SPLIT_CODES["val"]
        split[r < c.ctr_test_fraction] = SPLIT_CODES["test"]
        tags = world.item_tags[rows["item"]]
        rows["tags"] = (tags[tags > 0], world.item_num_tags[rows["item"]])
        rows.update(label=label.astype(np.float32), prob=prob.astype(np.float32), split=split)
        t.append(n, rows)
        level = np.round(prob * PROB_LEVELS).astype(np.int64)
        for code in SPLIT_CODES.values():
            for lab in (0, 1):
                m = (split == code) & (label == bool(lab))
                hist[code, lab] += np.bincount(level[m], minlength=PROB_LEVELS + 1)
        if n_blocks > 1 and (b + 1) % max(1, n_blocks // 20) == 0:
            log.info("ctr: block %d/%d (%.0fs)", b + 1, n_blocks, time.perf_counter() - t0)
    out: dict[str, Any] = {"bayes_auc": {}, "bayes_logloss": {}, "ctr": {}}
    for split_name, code in SPLIT_CODES.items():
        neg, pos = hist[code, 0], hist[code, 1]
        out["bayes_auc"][split_name] = _auc_from_hist(pos, neg)
        out["bayes_logloss"][split_name] = _logloss_from_hist(pos, neg)
        rows_in = int(pos.sum() + neg.sum())
        out["ctr"][split_name] = float(pos.sum()) / rows_in if rows_in else None
    out["ctr_bias"] = world.ctr_bias
    out["dense_weights"] = dict(zip(DENSE_NAMES, DENSE_WEIGHTS.tolist(), strict=True))
    return out


def _write_truth(w: DatasetWriter, world: World) -> dict[str, Any]:
    c = world.config
    t = _TableStream(w, "truth", c.chunk_rows)
    t.add("top_items", ColumnInfo("int64", jagged=True, idmap="item"))
    t.add("top_scores", ColumnInfo("float32", jagged=True))
    exact = c.truth_pool >= c.num_items
    pool = np.arange(1, c.num_items + 1)
    if not exact:
        pool = np.sort(np.argsort(-world.item_popularity[1:], kind="stable")[: c.truth_pool] + 1)
    pool = pool[np.argsort(world.item_category[pool], kind="stable")]  # spares true_scores a scatter
    k = min(c.truth_top_k, len(pool))
    empty = np.zeros(0, dtype=np.int64)
    t.append(1, {"top_items": (empty, [0]), "top_scores": (empty.astype(np.float32), [0])})
    # the score matrix is [block, pool] float32; keep it near 32 MB whatever the pool size
    step = max(1, min(c.block_users, (8 << 20) // len(pool)))
    for lo in range(1, c.num_users + 1, step):
        users = np.arange(lo, min(c.num_users + 1, lo + step))
        s = world.true_scores(users, pool)
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(s, part, axis=1)
        best = np.argsort(-ps, axis=1, kind="stable")
        top = pool[np.take_along_axis(part, best, axis=1)]
        lengths = np.full(len(users), k, dtype=np.int64)
        t.append(
            len(users),
            {
                "top_items": (top.ravel(), lengths),
                "top_scores": (np.take_along_axis(ps, best, axis=1).ravel().astype(np.float32), lengths),
            },
        )
    return {"top_k": k, "exact": exact, "pool": len(pool), "score": "log long-run P(item | user)"}


def load_config(path: str | Path) -> SyntheticConfig:
    """The generator config of a generated dataset (``make_world`` of it rebuilds the world)."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    if "generator" not in meta:
        raise ValueError(f"{path}: not a synthetic dataset (no 'generator' in meta.json)")
    return SyntheticConfig.from_json(meta["generator"])


def prepare_synthetic(out: Path, preset: str, seed: int | None = None, overwrite: bool = False) -> Path:
    """``funnel data prepare synthetic``: generate preset ``preset`` into ``out``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[preset]
    if seed is not None:
        config = dataclasses.replace(config, seed=seed)
    return generate(config, Path(out), overwrite=overwrite)
