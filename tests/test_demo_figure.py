"""The README demo figure: every panel labelled, chart colours explained by a legend."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from atlasdist import demo  # noqa: E402


def test_demo_figure_has_axis_labels_and_chart_legends(tmp_path, monkeypatch):
    figures = []

    def keep(sphere_atlas, sphere_test, circles_atlas, circles_test, path):
        figures.append(demo._figure(sphere_atlas, sphere_test, circles_atlas, circles_test))

    monkeypatch.setattr(demo, "_plot", keep)
    demo.main(["demo", "--points", "400", "--epochs", "1", "--out", str(tmp_path / "d.png")])
    (fig,) = figures
    try:
        axes = fig.get_axes()
        assert len(axes) == 3
        for ax in axes:
            assert ax.get_xlabel() == "x" and ax.get_ylabel() == "y", ax.get_title()
            if ax.name == "3d":
                assert ax.get_zlabel() == "z", ax.get_title()
        for ax in axes[1:]:  # the panels coloured by chart
            texts = [t.get_text() for legend in _legends(ax) for t in legend.get_texts()]
            charts = [t for t in texts if t.startswith("chart ")]
            assert charts and charts == sorted(set(charts), key=lambda t: int(t.split()[1]))
        circles_texts = [t.get_text() for lg in _legends(axes[2]) for t in lg.get_texts()]
        assert "held-out data" in circles_texts
    finally:
        plt.close(fig)


def _legends(ax):
    return [a for a in ax.get_children() if isinstance(a, matplotlib.legend.Legend)]
