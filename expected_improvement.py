"""Gaussian-process Expected-Improvement search over compression policies.

A policy for a depth-L ViT is a vector of ``2L + 1`` numbers: the fraction of heads removed in
each block, the fraction of MLP neurons removed in each block, and one token-removal rate. The
search maximises an objective (accuracy on the search split) subject to the policy's FLOPs
being within a relative tolerance of a target.

Everything here is numpy / scipy / scikit-learn; the objective and the FLOPs model are plain
callables, so this module knows nothing about models or torch.

Main pieces:

- :func:`expected_improvement`: the acquisition function (maximisation).
- :class:`FeasibleSampler`: draws many policies on the FLOPs budget quickly, for any reachable
  target, by walking from a random point of the box towards the corner that moves the FLOPs in
  the right direction and bisecting onto the budget along the last leg of the walk.
- :class:`GPEI`: an ask/tell driver (random feasible start, then GP + EI over a fresh pool of
  feasible candidates with optional local refinement); deterministic given seed and history, so
  a search resumes by replaying its log.
- :func:`run_search`: a small loop around :class:`GPEI` for library users and tests.
"""

import time
import warnings

import numpy as np
from scipy.stats import norm
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
from threadpoolctl import threadpool_limits

__all__ = [
    "InfeasibleTarget",
    "expected_improvement",
    "FeasibleSampler",
    "unconstrained_sampler",
    "GPEI",
    "run_search",
]


class InfeasibleTarget(ValueError):
    """The FLOPs target (with its tolerance) cannot be met by any policy in the box."""


def _fmt_cost(v, unit="GMACs"):
    """Two decimals for ordinary ViTs, three significant digits for tiny models, with the unit."""
    return (f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.3g}") + (f" {unit}" if unit else "")


# ----------------------------------------------------------------------------------------------
# Acquisition
# ----------------------------------------------------------------------------------------------

def expected_improvement(mu, sigma, best, xi=0.01):
    """Expected Improvement of a Gaussian posterior over ``best``, for maximisation.

    ``EI = (mu - best - xi) * Phi(z) + sigma * phi(z)`` with ``z = (mu - best - xi) / sigma``.
    Where ``sigma`` is zero (or negative) EI is exactly 0. The result is finite and
    non-negative for finite inputs (tiny, huge, or ``mu == best`` included).
    """
    mu = np.asarray(mu, dtype=float)
    sigma = np.asarray(sigma, dtype=float)
    mu, sigma = np.broadcast_arrays(mu, sigma)
    positive = sigma > 0
    safe_sigma = np.where(positive, sigma, 1.0)
    improvement = mu - float(best) - float(xi)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        z = improvement / safe_sigma
        ei = improvement * norm.cdf(z) + safe_sigma * norm.pdf(z)
    ei = np.where(positive, ei, 0.0)
    # Cancellation for very negative z can leave a tiny negative number; overflow can leave inf.
    ei = np.nan_to_num(ei, nan=0.0, posinf=np.finfo(float).max, neginf=0.0)
    return np.maximum(ei, 0.0)


# ----------------------------------------------------------------------------------------------
# Feasible candidates
# ----------------------------------------------------------------------------------------------

class FeasibleSampler:
    """Random policies whose FLOPs are within ``tol * target`` of ``target``.

    Args:
        flops_fn: vectorised ``X [n, dim] -> GMACs [n]``; must be non-increasing in every
            coordinate (removing more never costs more). Step functions (rounding to whole heads
            and neurons) are fine.
        target: the FLOPs budget, in the units of ``flops_fn``.
        dim: policy length (``2L + 1``).
        lower, upper: box bounds, scalars or arrays of length ``dim``.
        tol: relative tolerance of the budget.
        active: boolean mask of the coordinates that may be non-zero; the others are always 0.
        unit: what ``flops_fn`` counts, for messages ("GMACs", or "ms" for a latency budget).

    Raises:
        InfeasibleTarget: when ``target +- tol`` lies outside :meth:`reachable_range`.
    """

    #: legs of the random monotone walk before falling back to the box corner
    walk_legs = 10
    #: bisection steps on a segment before giving up on it
    max_bisect = 40

    def __init__(self, flops_fn, target, dim, lower=0.0, upper=0.5, tol=0.02, active=None, unit="GMACs"):
        self.flops_fn = flops_fn
        self.unit = unit
        self.dim = int(dim)
        if self.dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if active is None:
            active = np.ones(self.dim, dtype=bool)
        active = np.asarray(active, dtype=bool).reshape(-1)
        if active.shape != (self.dim,):
            raise ValueError(f"active has {active.size} entries, expected {self.dim}")
        self.active = active.copy()
        lower = np.broadcast_to(np.asarray(lower, dtype=float), (self.dim,)).copy()
        upper = np.broadcast_to(np.asarray(upper, dtype=float), (self.dim,)).copy()
        lower[~self.active] = 0.0
        upper[~self.active] = 0.0
        if np.any(lower > upper):
            raise ValueError("lower bound above upper bound")
        self.lower, self.upper = lower, upper
        self.target = float(target)
        self.tol = float(tol)
        if not self.target > 0:
            raise ValueError(f"target must be positive, got {target}")
        if self.tol < 0:
            raise ValueError(f"tol must be non-negative, got {tol}")
        self.band = (self.target * (1.0 - self.tol), self.target * (1.0 + self.tol))
        fmin, fmax = self.reachable_range()
        if self.band[1] < fmin or self.band[0] > fmax:
            span = self.upper[self.active]
            if span.size and np.all(span == span[0]):
                ratio = f"max ratio {span[0]:g}"
            else:
                ratio = f"max ratio {span.max() if span.size else 0.0:g} (per-dimension bounds)"
            raise InfeasibleTarget(
                f"target {_fmt_cost(self.target, unit)} (+-{100 * self.tol:g}%) is outside the "
                f"reachable range [{_fmt_cost(fmin, '')}, {_fmt_cost(fmax, unit)}] ({ratio})")

    # -- FLOPs helpers ------------------------------------------------------------------------

    def flops(self, X):
        """``flops_fn`` on a 2-D array, checked to return one finite number per row."""
        X = np.asarray(X, dtype=float)
        if X.shape[0] == 0:
            return np.zeros(0)
        f = np.asarray(self.flops_fn(X), dtype=float).reshape(-1)
        if f.shape[0] != X.shape[0]:
            raise ValueError(f"flops_fn returned {f.shape[0]} values for {X.shape[0]} policies")
        return f

    def reachable_range(self):
        """``(min_gmacs, max_gmacs)``: everything at ``upper`` / everything at ``lower``."""
        f = self.flops(np.stack([self.upper, self.lower]))
        return float(f[0]), float(f[1])

    def _in_band(self, f):
        return (f >= self.band[0]) & (f <= self.band[1])

    def is_feasible(self, X):
        """Boolean per row: inside the box, inactive coordinates zero, FLOPs within tolerance."""
        X = np.atleast_2d(np.asarray(X, dtype=float))
        eps = 1e-12
        inside = np.all((X >= self.lower - eps) & (X <= self.upper + eps), axis=1)
        inactive_zero = np.all(X[:, ~self.active] == 0.0, axis=1)
        return inside & inactive_zero & self._in_band(self.flops(X))

    # -- sampling -----------------------------------------------------------------------------

    def _random_box(self, n, rng):
        """Random points of the box. Each point gets its own power tilt so that the set spans
        'mostly light' to 'mostly heavy' policies rather than clustering at the centre."""
        u = rng.random((n, self.dim))
        power = np.exp(rng.uniform(-np.log(3.0), np.log(3.0), size=(n, 1)))
        u = u ** power
        return self.lower + (self.upper - self.lower) * u

    def _bisect(self, A, B, need_more):
        """Bisect each segment ``A[i] -> B[i]`` onto the budget.

        ``A`` is on the wrong side of the band (above it where ``need_more``, i.e. too many
        FLOPs, below it otherwise) and ``B`` is on the other side or inside. Returns the points
        and a mask of the segments where a point inside the band was found (rounding can make
        the FLOPs jump over the whole band).
        """
        n = A.shape[0]
        out = np.empty_like(A)
        found = np.zeros(n, dtype=bool)
        t_lo = np.zeros(n)
        t_hi = np.ones(n)
        todo = np.arange(n)
        lo_band, hi_band = self.band
        for _ in range(self.max_bisect):
            if todo.size == 0:
                break
            t = 0.5 * (t_lo[todo] + t_hi[todo])
            a, b = A[todo], B[todo]
            mid = a + t[:, None] * (b - a)
            f = self.flops(mid)
            ok = (f >= lo_band) & (f <= hi_band)
            out[todo[ok]] = mid[ok]
            found[todo[ok]] = True
            wrong_side = np.where(need_more[todo], f > hi_band, f < lo_band)
            t_lo[todo] = np.where(wrong_side, t, t_lo[todo])
            t_hi[todo] = np.where(wrong_side, t_hi[todo], t)
            keep = ~ok & (t_hi[todo] - t_lo[todo] > 1e-9)
            todo = todo[keep]
        return out, found

    def _walk_and_bisect(self, Z, fZ, rng, random_walk=True):
        """Move infeasible points ``Z`` onto the budget; returns (points, found mask)."""
        n = Z.shape[0]
        need_more = fZ > self.band[1]  # too many FLOPs: remove more
        corner = np.where(need_more[:, None], self.upper, self.lower)
        start = Z.copy()
        end = np.empty_like(Z)
        settled = np.zeros(n, dtype=bool)
        if random_walk:
            # Random monotone walk: each leg moves every coordinate a random fraction of its
            # remaining distance to the corner (fraction U^2: most coordinates move a little,
            # a few a lot), so the FLOPs move monotonically towards the band along a random,
            # not diagonal, direction. Bisect on the leg that crosses the band.
            todo = np.arange(n)
            for _ in range(self.walk_legs):
                if todo.size == 0:
                    break
                cur = start[todo]
                nxt = cur + (corner[todo] - cur) * rng.random(cur.shape) ** 2
                f = self.flops(nxt)
                crossed = np.where(need_more[todo], f <= self.band[1], f >= self.band[0])
                end[todo[crossed]] = nxt[crossed]
                settled[todo[crossed]] = True
                start[todo[~crossed]] = nxt[~crossed]
                todo = todo[~crossed]
        rest = ~settled
        end[rest] = corner[rest]
        return self._bisect(start, end, need_more)

    def project(self, Z, rng=None):
        """Move points of the box onto the budget along the segment to the nearer-in-FLOPs
        corner (small moves for points that are close already). Returns (points, ok mask)."""
        Z = np.clip(np.atleast_2d(np.asarray(Z, dtype=float)), self.lower, self.upper)
        Z[:, ~self.active] = 0.0
        f = self.flops(Z)
        ok = self._in_band(f)
        out = Z.copy()
        if np.any(~ok):
            moved, found = self._walk_and_bisect(Z[~ok], f[~ok], rng, random_walk=False)
            out[~ok] = moved
            ok[~ok] = found
        return out, ok

    def _draw(self, m, rng):
        Z = self._random_box(m, rng)
        f = self.flops(Z)
        ok = self._in_band(f)
        out = Z
        if np.any(~ok):
            moved, found = self._walk_and_bisect(Z[~ok], f[~ok], rng)
            out[~ok] = moved
            ok[~ok] = found
        return out[ok]

    def sample(self, n, rng):
        """``n`` feasible policies, shape ``[n, dim]``; deterministic for a given generator."""
        n = int(n)
        if n <= 0:
            return np.zeros((0, self.dim))
        chunks, have, rate = [], 0, 1.0
        for _ in range(100):
            need = n - have
            m = int(np.ceil(need / max(rate, 0.05) * 1.05)) + 8
            got = self._draw(m, rng)
            rate = max(got.shape[0] / m, 1e-3)
            chunks.append(got)
            have += got.shape[0]
            if have >= n:
                X = np.concatenate(chunks)[:n]
                X[:, ~self.active] = 0.0
                return X
            if have == 0 and len(chunks) >= 5:
                break
        fmin, fmax = self.reachable_range()
        raise InfeasibleTarget(
            f"found only {have} of {n} policies within +-{100 * self.tol:g}% of "
            f"{_fmt_cost(self.target, self.unit)} (reachable range [{_fmt_cost(fmin, '')}, "
            f"{_fmt_cost(fmax, self.unit)}]): the cost steps of whole heads/neurons are coarser than the "
            f"tolerance here; try a larger tolerance")


def unconstrained_sampler(dim, lower=0.0, upper=1.0, active=None):
    """A :class:`FeasibleSampler` over the plain box (constant FLOPs, every point feasible)."""
    return FeasibleSampler(lambda X: np.ones(len(X)), 1.0, dim, lower=lower, upper=upper,
                           tol=0.0, active=active)


# ----------------------------------------------------------------------------------------------
# Search driver
# ----------------------------------------------------------------------------------------------

class GPEI:
    """Ask/tell Gaussian-process Expected-Improvement search over feasible policies.

    The first ``n_init`` asks are random feasible policies; afterwards each ask fits a GP
    (constant * Matern(nu=2.5) with one length scale per active coordinate, or one shared
    length scale with ``ard=False``, plus white noise, ``n_restarts`` optimiser restarts,
    normalised targets) on everything told so far and returns the EI maximiser over a fresh
    pool of ``pool_size`` feasible candidates, optionally refined by small feasible
    perturbations around the best few. ``mode="random"`` makes every ask random (baseline).

    Every ask draws its randomness from ``np.random.default_rng([seed, n_told])``, so the next
    ask depends only on the seed and the told history: a resumed search replays its log through
    :meth:`tell` and continues exactly as the uninterrupted one would.

    ``n_restarts=0`` by default: the optimiser starts from a sensible point (unit-box inputs,
    length scales 0.5, small noise) and extra random restarts rarely changed the fit in our
    tests while tripling its cost at 200 observations with one length scale per coordinate.

    ``xi`` is in units of the standard deviation of the observed objective values.
    ``gp_seconds`` accumulates the wall time of the model-based asks (GP fit, candidate pool,
    EI, refinement).
    """

    def __init__(self, dim, sampler, n_init, seed=0, pool_size=10000, xi=0.01, refine=True,
                 mode="ei", n_restarts=0, ard=True, blas_threads=1, refine_top=5,
                 refine_per_point=200, refit_every=5):
        if mode not in ("ei", "random"):
            raise ValueError(f"mode must be 'ei' or 'random', got {mode!r}")
        if int(dim) != sampler.dim:
            raise ValueError(f"dim {dim} does not match the sampler's {sampler.dim}")
        self.dim = int(dim)
        self.refit_every = max(1, int(refit_every))
        self._hyper = None  # (number of observations the hyperparameters were fitted on, kernel)
        self.sampler = sampler
        self.n_init = max(1, int(n_init))
        self.seed = int(seed)
        self.pool_size = int(pool_size)
        self.xi = float(xi)
        self.refine = bool(refine)
        self.mode = mode
        self.n_restarts = int(n_restarts)
        self.ard = bool(ard)
        self.blas_threads = blas_threads
        self.refine_top = int(refine_top)
        self.refine_per_point = int(refine_per_point)
        self.gp_seconds = 0.0
        self._X = []
        self._y = []
        # coordinates the GP sees: active and with a non-empty range
        self._cols = np.flatnonzero(sampler.active & (sampler.upper > sampler.lower))

    @property
    def n_told(self):
        return len(self._y)

    def _rng(self):
        return np.random.default_rng([self.seed, self.n_told])

    def tell(self, x, y):
        """Record that policy ``x`` scored ``y`` (higher is better)."""
        x = np.asarray(x, dtype=float).reshape(-1)
        if x.shape != (self.dim,):
            raise ValueError(f"policy has {x.size} entries, expected {self.dim}")
        y = float(y)
        if not np.isfinite(y):
            raise ValueError(f"objective value must be finite, got {y}")
        self._X.append(x.copy())
        self._y.append(y)

    def best(self):
        """``(x, y)`` of the best told policy (first one on ties); ``(None, None)`` if none."""
        if not self._y:
            return None, None
        i = int(np.argmax(self._y))
        return self._X[i].copy(), self._y[i]

    def ask(self):
        """The next policy to evaluate, as ``(x, ei)``.

        ``ei`` is the Expected Improvement of ``x`` in the objective's units, or None for the
        random asks (the first ``n_init``, and all of them in ``mode="random"``).
        """
        rng = self._rng()
        if self.mode == "random" or self.n_told < self.n_init:
            return self.sampler.sample(1, rng)[0], None

        t0 = time.perf_counter()
        try:
            # The matrices are small (n_told x n_told): one BLAS thread is as fast, and avoids
            # OpenBLAS's spin-waiting threads collapsing on a loaded or CPU-limited machine
            # (seen on a busy 2-CPU box: a 200 x 200 Cholesky took 0.2 s with 2 threads, 0.7 ms
            # with 1). blas_threads=None leaves the thread pools alone.
            if self.blas_threads is None:
                x, ei = self._ask_ei(rng)
            else:
                with threadpool_limits(limits=int(self.blas_threads), user_api="blas"):
                    x, ei = self._ask_ei(rng)
        finally:
            self.gp_seconds += time.perf_counter() - t0
        return x, ei

    # -- model-based ask ----------------------------------------------------------------------

    def _scale(self, X):
        s = self.sampler
        c = self._cols
        return (X[:, c] - s.lower[c]) / (s.upper[c] - s.lower[c])

    def _fit(self, rng):

        X = self._scale(np.asarray(self._X))
        y = np.asarray(self._y)
        d = max(X.shape[1], 1)
        kernel = (ConstantKernel(1.0, (1e-3, 1e3))
                  * Matern(length_scale=np.full(d, 0.5) if self.ard else 0.5,
                           length_scale_bounds=(1e-2, 1e2), nu=2.5)
                  + WhiteKernel(1e-2, (1e-6, 1.0)))
        seed = int(rng.integers(2 ** 31 - 1))
        if X.shape[1] == 0:
            X = np.zeros((X.shape[0], 1))
        # Kernel hyperparameters are optimised on the first m observations, m stepping by
        # refit_every past the initial population; between refits the GP reuses them (a fit
        # without optimisation is a single Cholesky). m depends only on the number of
        # observations, so replaying a log (resume) gives the same GP as an unbroken run.
        n = X.shape[0]
        m = n if n <= self.n_init else self.n_init + (n - self.n_init) // self.refit_every * self.refit_every
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self._hyper is None or self._hyper[0] != m:
                tuned = GaussianProcessRegressor(kernel=kernel, normalize_y=True,
                                                 n_restarts_optimizer=self.n_restarts, random_state=seed)
                tuned.fit(X[:m], y[:m])
                self._hyper = (m, tuned.kernel_)
            gp = GaussianProcessRegressor(kernel=self._hyper[1], normalize_y=True, optimizer=None)
            gp.fit(X, y)
        # Predict the latent function, not a noisy observation: EI then vanishes at points
        # already measured when the fitted noise is small, as it should.
        gp.kernel_ = gp.kernel_.clone_with_theta(gp.kernel_.theta)
        gp.kernel_.k2.noise_level = 0.0
        return gp

    def _acquisition(self, gp, X, best, scale):
        Xs = self._scale(X)
        if Xs.shape[1] == 0:
            Xs = np.zeros((Xs.shape[0], 1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "predicted variances smaller than 0" -> clipped
            mu, sd = gp.predict(Xs, return_std=True)
        return expected_improvement(mu, sd, best, xi=self.xi * scale)

    def _ask_ei(self, rng):
        y = np.asarray(self._y)
        scale = float(y.std()) if y.std() > 0 else 1.0
        best = float(y.max())
        gp = self._fit(rng)
        cand = self.sampler.sample(self.pool_size, rng)
        ei = self._acquisition(gp, cand, best, scale)
        if self.refine and self.refine_top > 0 and self.refine_per_point > 0:
            s = self.sampler
            span = s.upper - s.lower
            for step in (0.1, 0.03):
                top = np.argsort(-ei, kind="stable")[: self.refine_top]
                base = np.repeat(cand[top], self.refine_per_point, axis=0)
                noise = rng.normal(size=base.shape) * (step * span)
                moved, ok = s.project(base + noise, rng)
                moved = moved[ok]
                if moved.shape[0] == 0:
                    continue
                cand = np.concatenate([cand, moved])
                ei = np.concatenate([ei, self._acquisition(gp, moved, best, scale)])
        i = int(np.argmax(ei))
        return cand[i].copy(), float(ei[i])


def run_search(evaluate, sampler, n_init, n_iter, seed=0, mode="ei", history=(), on_record=None, share=None,
               leader=True, **gpei_kw):
    """THE search loop: ``n_init`` random feasible policies, then ``n_iter`` EI-chosen ones.

    ``evaluate(x)`` returns the objective (maximised) or ``(objective, extras)`` where ``extras``
    is a dict stored in the record. ``history`` holds records of an earlier, interrupted run of
    the same search; they are replayed (told, not evaluated), so the search continues exactly as
    the uninterrupted one would (every ask depends only on the seed and the told history).
    ``on_record(record)`` is called after each new evaluation (e.g. to append it to a log).

    Distributed use: every rank calls this with the same arguments; only the ``leader`` asks the
    GP, and ``share(proposal) -> proposal`` (a broadcast from the leader) hands its proposal to
    every rank before all of them evaluate it. Extra keywords go to :class:`GPEI`.

    Returns ``{"best_x", "best_y", "best" (its record), "history", "gp_seconds", "seconds"}``; each
    record is ``{"step", "x" (list), "y", "ei", "phase", "seconds", "gp_seconds", **extras}``.
    """
    opt = GPEI(sampler.dim, sampler, n_init, seed=seed, mode=mode, **gpei_kw)
    total = int(n_init) + int(n_iter)
    history = [dict(r) for r in list(history)[:total]]
    for rec in history:
        opt.tell(np.asarray(rec["x"], dtype=float), rec["y"])
    t_start = time.perf_counter()
    for step in range(len(history), total):
        t0, gp_before = time.perf_counter(), opt.gp_seconds
        proposal = None
        if leader:
            x, ei = opt.ask()
            proposal = (np.asarray(x, dtype=np.float64).tolist(), None if ei is None else float(ei))
        if share is not None:
            proposal = share(proposal)
        x, ei = np.asarray(proposal[0], dtype=np.float64), proposal[1]
        out = evaluate(x)
        y, extras = out if isinstance(out, tuple) else (out, {})
        y = float(y)
        opt.tell(x, y)
        record = {"step": step, "x": x.tolist(), "y": y, "ei": ei,
                  "phase": "init" if step < int(n_init) else mode,
                  "seconds": time.perf_counter() - t0, "gp_seconds": opt.gp_seconds - gp_before, **extras}
        history.append(record)
        if on_record is not None:
            on_record(record)
    best = max(history, key=lambda r: (r["y"], -r["step"])) if history else None
    return {"best_x": None if best is None else np.asarray(best["x"]), "best_y": None if best is None else best["y"],
            "best": best, "history": history, "gp_seconds": opt.gp_seconds,
            "seconds": time.perf_counter() - t_start}
