"""The greedy design problems (metaopt.greedy): each budget recovers the optimizer it should, the
closed forms agree with numeric solves, and the statistics estimators recover known streams."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metaopt.greedy import (
    LagAutocorrelation,
    ar1_autocorrelation,
    ar1_optimal_momentum,
    ar1_stream,
    diagonal_optimizer,
    ema_debiased,
    free_filter,
    frobenius_optimizer,
    geometric_tail,
    lag_products,
    lyapunov_optimizer,
    momentum_learning_rate,
    momentum_motion_energy,
    momentum_objective,
    motion_budget_filter,
    optimal_momentum,
    scalar_optimizer,
    spectral_optimizer,
    whitening_optimizer,
)

DTYPE = torch.float64


def random_psd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank or n, generator=g, dtype=DTYPE)
    return a @ a.T / (rank or n)


def random_symmetric(n: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, n, generator=gen, dtype=DTYPE)
    return 0.5 * (a + a.T)


def objective(Q: torch.Tensor, R: torch.Tensor) -> float:
    return float((Q * R).sum())


def psd_projection(a: torch.Tensor) -> torch.Tensor:
    """The PSD part of ``a``; an all-negative ``a`` would project to 0, so its sign is flipped."""
    lam, vec = torch.linalg.eigh(a)
    if lam.max() <= 0:
        lam = -lam
    return (vec * lam.clamp(min=0)) @ vec.T


# ---- memoryless optimizers: which budget recovers which optimizer ---------------------------


def test_frobenius_budget_gives_the_gradient_covariance_and_beats_every_feasible_point():
    R, c = random_psd(4, 0), 0.7
    Q = frobenius_optimizer(R, c)
    torch.testing.assert_close(Q, c * R / torch.linalg.matrix_norm(R))
    gen = torch.Generator().manual_seed(1)
    for _ in range(500):
        P = psd_projection(random_symmetric(4, gen))
        P = c * P / torch.linalg.matrix_norm(P)
        assert objective(P, R) <= objective(Q, R) + 1e-12


def test_frobenius_budget_projects_an_indefinite_lag_autocorrelation_on_the_psd_cone():
    gen = torch.Generator().manual_seed(2)
    R = random_symmetric(5, gen)  # a lagged R_k need not be PSD
    Q = frobenius_optimizer(R, 1.0)
    assert torch.linalg.eigvalsh(Q).min() > -1e-12
    assert math.isclose(float(torch.linalg.matrix_norm(Q)), 1.0, rel_tol=1e-12)
    assert objective(Q, R) == pytest.approx(float(torch.linalg.matrix_norm(psd_projection(R))))


def test_spectral_budget_gives_plain_sgd_with_lr_equal_to_the_radius():
    R = random_psd(5, 3)
    torch.testing.assert_close(spectral_optimizer(R, 0.1), 0.1 * torch.eye(5, dtype=DTYPE))
    gen = torch.Generator().manual_seed(4)
    for _ in range(300):
        P = psd_projection(random_symmetric(5, gen))
        P = 0.1 * P / torch.linalg.matrix_norm(P, ord=2)
        assert objective(P, R) <= objective(spectral_optimizer(R, 0.1), R) + 1e-12


def test_lyapunov_family_solves_its_equation_and_contains_frobenius_and_normalised_sgd():
    R, c = random_psd(4, 5), 0.3
    A = random_psd(4, 6) + 0.1 * torch.eye(4, dtype=DTYPE)
    Q = lyapunov_optimizer(R, A, c)
    # Stationarity: AQ + QA ∝ R, on the budget tr(QAQ) = c².
    lhs = A @ Q + Q @ A
    torch.testing.assert_close(lhs / lhs.norm(), R / R.norm())
    assert float(torch.trace(Q @ A @ Q)) == pytest.approx(c * c)
    assert torch.linalg.eigvalsh(Q).min() > -1e-12
    gen = torch.Generator().manual_seed(7)
    for _ in range(500):
        P = random_symmetric(4, gen)
        P = c * P / torch.trace(P @ A @ P).sqrt()
        assert objective(P, R) <= objective(Q, R) + 1e-12
    # A = I: the Frobenius budget. A = R: the expected motion E‖Qg‖² = tr(QRQ): normalised SGD.
    torch.testing.assert_close(lyapunov_optimizer(R, torch.eye(4, dtype=DTYPE), c), frobenius_optimizer(R, c))
    eta = scalar_optimizer(R, c)
    torch.testing.assert_close(lyapunov_optimizer(R, R, c), eta * torch.eye(4, dtype=DTYPE))
    with pytest.raises(ValueError, match="metric"):
        lyapunov_optimizer(R, -torch.eye(4, dtype=DTYPE))


def test_motion_budget_scalar_is_normalised_sgd():
    R = random_psd(6, 8)
    eta = scalar_optimizer(R, 0.5)
    assert eta == pytest.approx(0.5 / math.sqrt(float(torch.trace(R))))
    assert scalar_optimizer(torch.trace(R), 0.5) == pytest.approx(eta)
    with pytest.raises(ValueError, match="radius"):
        scalar_optimizer(R, 0.0)


def test_motion_covariance_budget_gives_full_matrix_adagrad():
    gen = torch.Generator().manual_seed(9)
    grads = torch.randn(50, 4, generator=gen, dtype=DTYPE) * torch.tensor([3.0, 1.0, 0.3, 0.1], dtype=DTYPE)
    R = grads.T @ grads  # AdaGrad's accumulated outer products (Duchi et al. 2011)
    Q = whitening_optimizer(R, 0.2)
    lam, vec = torch.linalg.eigh(R)
    torch.testing.assert_close(Q, 0.2 * (vec * lam.rsqrt()) @ vec.T)
    # The budget Q R Q ⪯ c² I holds with equality in every direction.
    torch.testing.assert_close(Q @ R @ Q, 0.04 * torch.eye(4, dtype=DTYPE))
    for _ in range(500):
        P = psd_projection(random_symmetric(4, gen))
        P = P * (0.2 / torch.linalg.matrix_norm(P @ R @ P, ord=2).sqrt())
        assert objective(P, R) <= objective(Q, R) + 1e-9


def test_per_coordinate_motion_budget_gives_rmsprop():
    torch.manual_seed(0)
    x = torch.randn(6, requires_grad=True)
    opt = torch.optim.RMSprop([x], lr=0.01, alpha=0.9, eps=1e-8)
    v = torch.zeros(6, dtype=DTYPE)
    for _ in range(5):
        g = torch.randn(6)
        x0 = x.detach().clone()
        x.grad = g.clone()
        opt.step()
        v = 0.9 * v + 0.1 * g.to(DTYPE) ** 2
        q = diagonal_optimizer(v, 0.01, eps=1e-8)
        torch.testing.assert_close((x0 - x.detach()).to(DTYPE), q * g.to(DTYPE), rtol=1e-5, atol=1e-7)
    # Each coordinate sits on its budget q_i² v_i = c².
    torch.testing.assert_close(diagonal_optimizer(v, 0.3) ** 2 * v, torch.full((6,), 0.09, dtype=DTYPE))


# ---- filters over lags -----------------------------------------------------------------------


def test_free_filter_is_the_normalised_autocorrelation():
    r = np.array([2.0, 0.9, 0.5, -0.2, 0.1])
    q = free_filter(r)
    np.testing.assert_allclose(q, r / np.linalg.norm(r))
    rng = np.random.default_rng(0)
    for _ in range(500):
        p = rng.standard_normal(5)
        assert p @ r / np.linalg.norm(p) <= q @ r + 1e-12
    np.testing.assert_array_equal(free_filter(np.zeros(3)), np.zeros(3))


@pytest.mark.parametrize("rho,snr", [(0.9, 1.0), (0.5, 0.2), (-0.5, 3.0)])
def test_motion_budget_filter_is_memoryless_whatever_the_statistics(rho, snr):
    r = ar1_autocorrelation(rho, snr, 1.0, 6).numpy()
    T = np.array([[r[abs(i - j)] for j in range(7)] for i in range(7)])
    q_solve = np.linalg.solve(T, r)  # the stationarity condition q ∝ T⁻¹ r
    q_solve *= 0.4 / np.sqrt(q_solve @ T @ q_solve)
    np.testing.assert_allclose(motion_budget_filter(r, 0.4), q_solve, atol=1e-12)
    assert motion_budget_filter(r, 0.4)[0] == pytest.approx(0.4 / math.sqrt(r[0]))


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.8, 0.9, 0.97])
def test_exponential_family_recovers_beta_equal_rho_without_noise(rho):
    """The worked example of shared/papers.md §1: r_k = r_0 ρ^k gives β* = ρ."""
    r = ar1_autocorrelation(rho, 2.5, 0.0, 8)
    sol = optimal_momentum(r, max_momentum=0.99)
    assert abs(float(sol.momentum) - rho) < 1e-6
    assert ar1_optimal_momentum(rho) == rho


@pytest.mark.parametrize("rho", [0.5, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("snr", [0.05, 0.3, 1.0, 10.0])
def test_solver_matches_the_closed_form_for_ar1_in_white_noise(rho, snr):
    """β* solves σ_s²(ρ − β) = σ_n² β (1 − ρβ)² (derived in ar1_optimal_momentum)."""
    beta = ar1_optimal_momentum(rho, snr, 1.0)
    r = ar1_autocorrelation(rho, snr, 1.0, 8)
    assert abs(float(optimal_momentum(r, max_momentum=0.999).momentum) - beta) < 1e-6
    # It is the maximiser of J on a dense grid, and below ρ.
    grid = np.linspace(0.0, 0.999, 20001)
    values = np.sqrt(1 - grid ** 2) * (1.0 + snr / (1 - grid * rho))
    assert grid[values.argmax()] == pytest.approx(beta, abs=1e-4)
    assert beta <= rho
    if beta not in (0.0, 0.999):
        assert snr * (rho - beta) == pytest.approx(beta * (1 - rho * beta) ** 2, abs=1e-9)


def test_momentum_bounds_are_respected_and_checked():
    r = ar1_autocorrelation(0.95, 1.0, 0.0, 8)
    assert float(optimal_momentum(r, max_momentum=0.9).momentum) == pytest.approx(0.9)
    assert float(optimal_momentum(ar1_autocorrelation(0.1, 1, 0, 8), min_momentum=0.5).momentum) == 0.5
    assert float(optimal_momentum(np.zeros(9)).momentum) == 0.0  # no signal: no momentum
    with pytest.raises(ValueError, match="momentum bounds"):
        optimal_momentum(r, max_momentum=1.0)
    with pytest.raises(ValueError, match="tail"):
        optimal_momentum(r, tail="linear")


def test_batched_solve_equals_one_solve_per_block():
    rows = [ar1_autocorrelation(rho, snr, 1.0, 8) for rho, snr in ((0.5, 1.0), (0.9, 0.2), (0.99, 5.0))]
    batched = optimal_momentum(torch.stack(rows))
    for i, r in enumerate(rows):
        assert batched.momentum[i] == pytest.approx(float(optimal_momentum(r).momentum), abs=1e-12)


def test_geometric_tail_is_exact_for_ar1_and_absent_for_white_noise():
    ratio, anchor = geometric_tail(ar1_autocorrelation(0.8, 2.0, 1.0, 8))
    assert float(ratio) == pytest.approx(0.8) and float(anchor) == pytest.approx(2.0 * 0.8 ** 8)
    ratio, anchor = geometric_tail(np.array([1.0, 0, 0, 0, 0]))
    assert ratio == 0 and anchor == 0
    # Without the tail, K = 8 lags cannot support a long momentum: β* is biased down.
    r = ar1_autocorrelation(0.98, 1.0, 0.0, 8)
    assert float(optimal_momentum(r, tail=None).momentum) < 0.9
    assert float(optimal_momentum(r).momentum) == pytest.approx(0.98, abs=1e-6)


def test_objective_equals_the_filter_inner_product_with_the_autocorrelation():
    r = ar1_autocorrelation(0.7, 1.0, 0.5, 300).numpy()  # lags far beyond the filter's decay
    beta = 0.6
    q = math.sqrt(1 - beta ** 2) * beta ** np.arange(301)
    assert float(momentum_objective(r[:9], beta, geometric_tail(r[:9]))) == pytest.approx(q @ r, rel=1e-10)


def test_motion_energy_and_learning_rate_of_the_heavy_ball():
    r = ar1_autocorrelation(0.7, 1.0, 0.5, 400).numpy()
    beta = 0.8
    q = beta ** np.arange(401)
    T = np.array([[r[abs(i - j)] for j in range(401)] for i in range(401)])
    energy = momentum_motion_energy(r[:9], beta, geometric_tail(r[:9]))
    assert float(energy) == pytest.approx(q @ T @ q, rel=1e-8)
    lr = momentum_learning_rate(r[:9], beta, 0.1, geometric_tail(r[:9]))
    assert float(lr) ** 2 * (q @ T @ q) == pytest.approx(0.01, rel=1e-8)
    # β = 0: normalised SGD.
    assert float(momentum_learning_rate(r[:9], 0.0, 0.1)) == pytest.approx(0.1 / math.sqrt(r[0]))


# ---- statistics ------------------------------------------------------------------------------


def test_lag_products_follow_the_ring_order():
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(7, 5, generator=gen, dtype=DTYPE)
    ring = torch.zeros(4, 5, dtype=DTYPE)
    for t in range(7):
        prods = lag_products(ring, t, xs[t])
        for k in range(4):
            expect = float(xs[t] @ xs[t - k]) if t >= k else 0.0
            assert float(prods[k]) == pytest.approx(expect)
    w = torch.rand(5, generator=gen, dtype=DTYPE)
    prods = lag_products(ring, 7, xs[0], weighted=w * xs[0])
    assert float(prods[1]) == pytest.approx(float((w * xs[0]) @ xs[6]))


def test_debiased_ema_of_a_constant_is_that_constant():
    ema = torch.zeros(3, dtype=DTYPE)
    for t in range(5):
        live = min(t + 1, 3)
        ema[:live].lerp_(torch.full((live,), 2.0, dtype=DTYPE), 0.1)
    torch.testing.assert_close(ema_debiased(ema, 5, 0.9), torch.full((3,), 2.0, dtype=DTYPE))
    assert math.isnan(float(ema_debiased(ema, 1, 0.9)[2]))


def test_estimator_recovers_ar1_autocorrelation_and_its_optimal_momentum():
    rho, snr, dim = 0.9, 0.5, 256
    xs = ar1_stream(rho, snr, 1.0, 3000, dim, torch.Generator().manual_seed(0))
    _check_recovery(xs, rho, snr)
    est = LagAutocorrelation(dim, lags=8, horizon=1000.0)
    for x in xs[:300]:
        est.update(x)

    per_coord = LagAutocorrelation(dim, lags=3, horizon=1000.0, per_coordinate=True)
    for x in xs[:500]:
        per_coord.update(x)
    assert per_coord.value().shape == (4, dim)
    torch.testing.assert_close(per_coord.value().mean(1), _trace_estimate(xs[:500], 3) / dim)

    copy = LagAutocorrelation(dim, lags=8, horizon=1000.0)
    copy.load_state_dict(est.state_dict())
    torch.testing.assert_close(copy.value(), est.value())
    with pytest.raises(ValueError, match="lags"):
        LagAutocorrelation(dim, lags=0, horizon=10.0)
    with pytest.raises(ValueError, match="horizon"):
        LagAutocorrelation(dim, lags=2, horizon=0.5)


def _check_recovery(xs: torch.Tensor, rho: float, snr: float) -> None:
    dim = xs.shape[1]
    r_hat = _trace_estimate(xs, 8) / dim
    truth = ar1_autocorrelation(rho, snr, 1.0, 8)
    assert (r_hat - truth).abs().max() < 0.05
    beta_hat = float(optimal_momentum(r_hat).momentum)
    beta_star = ar1_optimal_momentum(rho, snr, 1.0, max_momentum=0.99)
    assert abs(beta_hat - beta_star) < 0.03, (beta_hat, beta_star)


def test_recovery_survives_a_long_weak_signal():
    """ρ = 0.99 at signal-to-noise 0.1: J peaks at β* ≈ 0.11, but an uncapped tail ratio, a hair
    above the true 0.99 from estimation noise, inflates J near β = 1 and flips the choice."""
    xs = ar1_stream(0.99, 0.1, 1.0, 3000, 256, torch.Generator().manual_seed(0))
    _check_recovery(xs, 0.99, 0.1)


def _trace_estimate(xs: torch.Tensor, lags: int) -> torch.Tensor:
    est = LagAutocorrelation(xs.shape[1], lags=lags, horizon=1000.0)
    for x in xs:
        est.update(x)
    return est.value()


def test_an_explicit_scalar_tail_gives_a_tail_ratio_per_block():
    r = np.tile([1.0, 0.8, 0.6, 0.4, 0.3], (3, 1))
    sol = optimal_momentum(r, tail=(0.5, 0.3))
    assert sol.tail_ratio.shape == sol.momentum.shape == (3,)
