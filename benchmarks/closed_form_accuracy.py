"""Largest |closed-form volume term - autodiff reference| over every transform of the test
case list (tests/_cases.py), many random parameter draws, dimensions and inputs, in float64.

    python benchmarks/closed_form_accuracy.py [--draws 200]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from _cases import CASES, build, draw_inputs  # noqa: E402

from atlasdist.geometry import jacobian, log_volume_ratio  # noqa: E402
from atlasdist.transforms import ConformalTransform  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args()
    print("| transform | max abs error of log-det | max relative error of J^T J = lambda^2 I |")
    print("|---|---:|---:|")
    overall = 0.0
    for name in sorted(CASES):
        worst, worst_gram = 0.0, None
        for seed in range(args.draws):
            d, extra = 1 + seed % 4, (seed // 4) % 4
            f = build(name, d, extra, seed)
            x = draw_inputs(f, (32,), seed)
            _, ladj = f.call_and_ladj(x)
            worst = max(worst, float((ladj - log_volume_ratio(f, x)).abs().max().detach()))
            if isinstance(f, ConformalTransform):
                jac = jacobian(f, x)
                lam2 = (2 * f.log_conformal_factor(x, f(x))).exp()
                eye = torch.eye(f.in_features, dtype=x.dtype)
                gram = (jac.mT @ jac - lam2[:, None, None] * eye) / lam2[:, None, None]
                worst_gram = max(worst_gram or 0.0, float(gram.abs().max().detach()))
        overall = max(overall, worst)
        gram_text = "n/a (not conformal)" if worst_gram is None else f"{worst_gram:.1e}"
        print(f"| {name} | {worst:.1e} | {gram_text} |")
    print(f"\nlargest log-det discrepancy over all transforms: {overall:.2e}")


if __name__ == "__main__":
    main()
