"""Tests for expected_improvement.py: EI formula, feasible sampler, GP-EI search, resume."""

import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import norm

from expected_improvement import (GPEI, FeasibleSampler, InfeasibleTarget,
                                  expected_improvement, run_search, unconstrained_sampler)

# ---------------------------------------------------------------------------------------------
# A DeiT-S-like FLOPs model (GMACs), written independently of the module under test.
# ---------------------------------------------------------------------------------------------

L, H, HD, D, M, P = 12, 6, 64, 384, 1536, 196
DIM = 2 * L + 1


def deit_s_gmacs(X):
    X = np.atleast_2d(np.asarray(X, dtype=float))
    out = np.empty(len(X))
    for i, x in enumerate(X):  # the slow obvious way: one policy at a time
        total = P * (3 * 16 * 16) * D + D * 1000
        patches = P
        stage = 0
        for b in range(L):
            if b + 1 in (4, 7, 10):
                stage += 1
                patches = int(np.ceil(P * (1 - x[-1]) ** stage - 1e-9))
            n = 1 + patches + (1 if patches < P else 0)
            h = H - int(np.round(x[b] * H))
            m = M - int(np.round(x[L + b] * M))
            total += n * D * 3 * h * HD + 2 * n * n * h * HD + n * h * HD * D + 2 * n * D * m
        out[i] = total
    return out / 1e9


def deit_s_gmacs_fast(X):
    X = np.atleast_2d(np.asarray(X, dtype=float))
    heads = H - np.round(X[:, :L] * H)
    neurons = M - np.round(X[:, L:2 * L] * M)
    total = np.full(len(X), P * (3 * 16 * 16) * D + D * 1000.0)
    patches = np.full(len(X), float(P))
    for b in range(L):
        if b + 1 in (4, 7, 10):
            patches = np.ceil(P * (1 - X[:, -1]) ** ((b + 1) // 3) - 1e-9)
        n = 1 + patches + (patches < P)
        a = heads[:, b] * HD
        total += n * D * 3 * a + 2 * n * n * a + n * a * D + 2 * n * D * neurons[:, b]
    return total / 1e9


def test_fast_flops_matches_loop():
    X = np.random.default_rng(0).uniform(0, 0.5, (300, DIM))
    np.testing.assert_allclose(deit_s_gmacs_fast(X), deit_s_gmacs(X), rtol=1e-12)
    assert abs(deit_s_gmacs(np.zeros((1, DIM)))[0] - 4.6) < 0.05  # DeiT-S model card: 4.6G


def reference_feasible(X, target, tol=0.02):
    return np.abs(deit_s_gmacs(X) - target) <= tol * target


# ---------------------------------------------------------------------------------------------
# Expected Improvement
# ---------------------------------------------------------------------------------------------

def test_ei_matches_hand_formula():
    mu = np.array([0.5, 1.0, 2.0, -3.0, 1.2])
    sigma = np.array([1.0, 0.5, 2.0, 0.1, 0.3])
    best, xi = 1.0, 0.01
    expected = []
    for m, s in zip(mu, sigma):
        z = (m - best - xi) / s
        expected.append((m - best - xi) * norm.cdf(z) + s * norm.pdf(z))
    np.testing.assert_allclose(expected_improvement(mu, sigma, best, xi), expected, rtol=1e-12)
    # mu == best, xi = 0: EI = sigma * phi(0)
    np.testing.assert_allclose(expected_improvement([1.0], [2.0], 1.0, xi=0.0),
                               [2.0 * norm.pdf(0.0)], rtol=1e-12)


def test_ei_zero_where_sigma_zero_and_never_nan():
    mu = np.array([5.0, 1.0, -5.0, 1.0, 1.0, 1.0, 1e6, -1e6])
    sigma = np.array([0.0, 0.0, 0.0, 1e-300, 1e300, 1e-12, 1e-300, 1e300])
    ei = expected_improvement(mu, sigma, best=1.0, xi=0.01)
    assert np.all(np.isfinite(ei)) and np.all(ei >= 0)
    assert ei[0] == 0.0 and ei[1] == 0.0 and ei[2] == 0.0  # exactly zero, even above best
    assert ei[3] == 0.0  # mu == best, no improvement beyond xi, vanishing sigma
    assert ei[6] == pytest.approx(1e6 - 1.01)  # certain improvement
    assert ei[4] > 0 and ei[7] > 0
    # monotone in mu and in sigma
    assert np.all(np.diff(expected_improvement(np.linspace(-2, 2, 50), 0.3, 0.0)) > 0)
    assert np.all(np.diff(expected_improvement(0.0, np.linspace(0.01, 2, 50), 0.5)) > 0)


# ---------------------------------------------------------------------------------------------
# Feasible sampler
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flops_range():
    s = FeasibleSampler(deit_s_gmacs_fast, 2.0, DIM)
    return s.reachable_range()


def test_reachable_range(flops_range):
    fmin, fmax = flops_range
    assert fmin == pytest.approx(deit_s_gmacs(np.full((1, DIM), 0.5))[0])
    assert fmax == pytest.approx(deit_s_gmacs(np.zeros((1, DIM)))[0])
    assert 1.0 < fmin < 1.3 and 4.5 < fmax < 4.7


@pytest.mark.parametrize("where", ["low_end", 1.25, 1.84, 4.0, "high_end"])
def test_sampler_feasible_at_every_target(where, flops_range):
    fmin, fmax = flops_range
    target = {"low_end": fmin * 1.02, "high_end": fmax * 0.98}.get(where, where)
    s = FeasibleSampler(deit_s_gmacs_fast, target, DIM)
    X = s.sample(2000, np.random.default_rng(1))
    assert X.shape == (2000, DIM)
    assert np.all((X >= 0) & (X <= 0.5))
    assert np.all(reference_feasible(X[:300], target))
    assert np.all(s.is_feasible(X))
    assert len(np.unique(X, axis=0)) == len(X)


def test_sampler_is_diverse():
    # At 1.84 GMACs, uniform rejection sampling (the slow obvious reference) gives a per-policy
    # standard deviation over the 24 head/neuron ratios of about 0.14; the diagonal policy has 0.
    # Ours must cover the set: every ratio spans most of [0, 0.5] and policies are uneven.
    s = FeasibleSampler(deit_s_gmacs_fast, 1.84, DIM)
    X = s.sample(5000, np.random.default_rng(0))
    q = np.percentile(X, [2, 98], axis=0)
    assert np.all(q[1, :-1] - q[0, :-1] > 0.3)
    assert X[:, :-1].std(axis=1).mean() > 0.08
    assert X[:, -1].max() - X[:, -1].min() > 0.2  # several token rates, not one


def test_sampler_inactive_dims_stay_zero():
    active = np.ones(DIM, dtype=bool)
    active[-1] = False  # no token pruning
    active[:3] = False
    s = FeasibleSampler(deit_s_gmacs_fast, 3.0, DIM, active=active)
    X = s.sample(1000, np.random.default_rng(0))
    assert np.all(X[:, ~active] == 0.0)
    assert np.all(reference_feasible(X[:200], 3.0))
    # without token pruning, 1.25 GMACs is out of reach
    with pytest.raises(InfeasibleTarget):
        FeasibleSampler(deit_s_gmacs_fast, 1.25, DIM, active=active)


def test_infeasible_target_message(flops_range):
    fmin, fmax = flops_range
    for target in (9.0, 0.5):
        with pytest.raises(InfeasibleTarget) as info:
            FeasibleSampler(deit_s_gmacs_fast, target, DIM)
        msg = str(info.value)
        assert "\n" not in msg
        assert f"{fmin:.2f}" in msg and f"{fmax:.2f}" in msg and f"{target:.2f}" in msg
        assert "0.5" in msg
    assert issubclass(InfeasibleTarget, ValueError)


def test_sampler_deterministic():
    s = FeasibleSampler(deit_s_gmacs_fast, 1.84, DIM)
    a = s.sample(500, np.random.default_rng(7))
    b = s.sample(500, np.random.default_rng(7))
    c = s.sample(500, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_project_lands_on_budget():
    s = FeasibleSampler(deit_s_gmacs_fast, 2.5, DIM)
    Z = np.random.default_rng(0).uniform(0, 0.5, (500, DIM))
    X, ok = s.project(Z)
    assert ok.mean() > 0.95
    assert np.all(reference_feasible(X[ok][:200], 2.5))
    # already-feasible points do not move
    F = s.sample(50, np.random.default_rng(1))
    np.testing.assert_array_equal(s.project(F)[0], F)


# ---------------------------------------------------------------------------------------------
# GP-EI search on synthetic functions with known maxima
# ---------------------------------------------------------------------------------------------

def bump_1d(x):
    x = x[0]
    return float(np.exp(-(x - 0.73) ** 2 / (2 * 0.04 ** 2))
                 + 0.5 * np.exp(-(x - 0.2) ** 2 / (2 * 0.1 ** 2)))


def bump_2d(x):
    a = np.sum((x - np.array([0.7, 0.3])) ** 2)
    b = np.sum((x - np.array([0.2, 0.75])) ** 2)
    return float(np.exp(-a / (2 * 0.1 ** 2)) + 0.5 * np.exp(-b / (2 * 0.15 ** 2)))


@pytest.mark.parametrize("fn,dim,n_init,n_iter", [(bump_1d, 1, 4, 11), (bump_2d, 2, 5, 25)])
def test_ei_beats_random_search(fn, dim, n_init, n_iter):
    sampler = unconstrained_sampler(dim)
    regret = {"ei": [], "random": []}
    for seed in range(4):
        for mode in regret:
            res = run_search(fn, sampler, n_init, n_iter, seed=seed, mode=mode, pool_size=1000)
            assert len(res["history"]) == n_init + n_iter
            regret[mode].append(1.0 - res["best_y"])  # both maxima are 1 (up to 1e-6)
    ei, rnd = np.mean(regret["ei"]), np.mean(regret["random"])
    assert ei < 0.02, regret
    assert ei < 0.25 * rnd, regret


def test_search_under_flops_budget_stays_feasible():
    s = FeasibleSampler(deit_s_gmacs_fast, 1.84, DIM)

    def objective(x):  # keep heads and neurons, prune tokens: best is high r, low others
        return float(x[-1] - 0.3 * np.mean(x[:-1]))

    res = run_search(objective, s, n_init=5, n_iter=5, seed=0, pool_size=2000)
    X = np.array([h["x"] for h in res["history"]])
    assert np.all(reference_feasible(X, 1.84))
    assert all(h["ei"] is None for h in res["history"][:5])
    assert all(np.isfinite(h["ei"]) and h["ei"] >= 0 for h in res["history"][5:])
    assert res["best_y"] == max(h["y"] for h in res["history"])
    assert res["gp_seconds"] > 0


# ---------------------------------------------------------------------------------------------
# ask/tell determinism and resume
# ---------------------------------------------------------------------------------------------

def _objective(x):
    return float(np.sin(5 * x[-1]) - np.mean((x[:-1] - 0.25) ** 2))


def _drive(opt, steps):
    asked = []
    for _ in range(steps):
        x, ei = opt.ask()
        asked.append((x, ei))
        opt.tell(x, _objective(x))
    return asked


def test_resume_by_replaying_tells_gives_same_search():
    s = FeasibleSampler(deit_s_gmacs_fast, 2.2, DIM)
    kw = dict(n_init=4, seed=3, pool_size=1500)
    full = _drive(GPEI(DIM, s, **kw), 15)

    first = GPEI(DIM, s, **kw)
    part = _drive(first, 7)
    resumed = GPEI(DIM, s, **kw)  # fresh object, as after a restart
    for x, _ in part:
        resumed.tell(x, _objective(x))
    rest = _drive(resumed, 8)

    for (xa, ea), (xb, eb) in zip(full, part + rest):
        np.testing.assert_array_equal(xa, xb)
        assert ea == eb or (ea is None and eb is None)
    # asking twice without telling returns the same policy
    again = GPEI(DIM, s, **kw)
    for x, _ in part:
        again.tell(x, _objective(x))
    np.testing.assert_array_equal(again.ask()[0], again.ask()[0])
    assert resumed.best()[1] == max(_objective(x) for x, _ in full)


def test_random_mode_never_fits():
    s = FeasibleSampler(deit_s_gmacs_fast, 2.2, DIM)
    opt = GPEI(DIM, s, n_init=2, mode="random")
    asked = _drive(opt, 6)
    assert all(ei is None for _, ei in asked)
    assert opt.gp_seconds == 0.0
    with pytest.raises(ValueError):
        GPEI(DIM, s, n_init=2, mode="bayes")
    with pytest.raises(ValueError):
        opt.tell(asked[0][0], float("nan"))


def test_module_does_not_import_torch():
    code = ("import sys, expected_improvement; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
