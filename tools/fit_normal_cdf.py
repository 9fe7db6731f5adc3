"""Fit the fp32 GELU's normal CDF: Phi(-a) = 2^-Q(a) on [0, A] (tkern.activations._normal_cdf).

Q(a) = -log2(Phi(-a)) is smooth on [0, inf) (Q(0) = 1, ~0.72 a^2 for large a), so a polynomial
fits it on [0, A] with few terms.  The fit minimises the largest error of Phi itself,
|Phi(-a)| * ln 2 * |dQ(a)| (the absolute error of both Phi(-a) and 1 - Phi(-a)), by Lawson's
iteratively reweighted least squares in a Chebyshev basis, then rounds to fp32 monomial
coefficients (the constant term pinned to 1: Phi(0) = 1/2 exactly) and reports the error of the
rounded polynomial evaluated by fp32 Horner steps, against mpmath at 40 digits.

    python tools/fit_normal_cdf.py [A] [degree]      # the committed fit: 5.6 10
"""

import sys

import mpmath as mp
import numpy as np

mp.mp.dps = 40


def fit(a_max: float, degree: int, nodes: int = 3000, rounds: int = 200):
    a = (1 - np.cos(np.linspace(0, np.pi, nodes))) / 2 * a_max  # Chebyshev-like nodes
    q = np.array([float(-mp.log(mp.ncdf(-mp.mpf(v)), 2)) for v in a])
    weight = np.array([max(float(mp.ncdf(-mp.mpf(v))), 1e-3) for v in a])
    basis = np.polynomial.chebyshev.chebvander(2 * a / a_max - 1, degree)
    lawson = np.ones(nodes)
    for _ in range(rounds):
        w = np.sqrt(lawson) * weight
        c, *_ = np.linalg.lstsq(basis * w[:, None], q * w, rcond=None)
        err = np.abs((basis @ c - q) * weight)
        lawson = lawson * err / (lawson * err).sum()
    in_t = np.polynomial.Polynomial(np.polynomial.chebyshev.cheb2poly(c))
    mono = in_t(np.polynomial.Polynomial([-1.0, 2.0 / a_max])).coef  # in a, ascending
    mono = mono.astype(np.float32)
    mono[0] = 1.0
    return mono


def horner_f32(coef, a):
    r = np.full_like(a, coef[-1], dtype=np.float32)
    for c in coef[-2::-1]:  # one rounding a step, as an FMA
        r = (r.astype(np.float64) * a.astype(np.float64) + np.float64(c)).astype(np.float32)
    return r


def main():
    a_max = float(sys.argv[1]) if len(sys.argv) > 1 else 5.6
    degree = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    coef = fit(a_max, degree)
    a = np.linspace(0, a_max, 20001).astype(np.float32)
    exact = np.array([float(mp.ncdf(-mp.mpf(float(v)))) for v in a])
    ours = np.exp2(-horner_f32(coef, a).astype(np.float64))
    print(f"A = {a_max}, degree {degree}: max |error of Phi| {np.abs(ours - exact).max():.3e}, "
          f"max relative error of Phi(-a) {(np.abs(ours - exact) / exact).max():.3e}, "
          f"Phi(-A) = {float(mp.ncdf(-a_max)):.3e}")
    print("coefficients of -Q, ascending:", ", ".join(repr(float(-c)) for c in coef))


if __name__ == "__main__":
    main()
