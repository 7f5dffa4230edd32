import json

import numpy as np
import pytest
import torch

from helpers import plotting
from helpers.plotting import figures_dir, heatmap, line, save_figure, scatter, show


def test_heatmap_labels_and_symmetric_signed_scale():
    values = torch.tensor([[1.0, -3.0], [0.5, 2.0], [0.0, 0.1]])
    fig = heatmap(values, title="effects", x_label="head", y_label="layer")
    trace = fig.data[0]
    assert np.asarray(trace.z).shape == (3, 2)
    assert trace.zmin == -3.0 and trace.zmax == 3.0 and trace.zmid == 0
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    assert list(trace.y) == ["0", "1", "2"]


def test_heatmap_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        heatmap(torch.zeros(2, 3, 4), title="bad")


def test_line_and_scatter_build_traces():
    fig = line({"train": [3, 2, 1], "test": [4, 4, 1]}, title="loss", x=[0, 100, 200], log_y=True)
    assert [t.name for t in fig.data] == ["train", "test"] and fig.layout.yaxis.type == "log"
    fig = scatter([1, 2, 3], [1, 2, 2.5], title="s", labels=["a", "b", "c"], diagonal=True, hline=0)
    assert len(fig.data) == 2  # points + the y = x line


def test_figures_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MI_FIGURES_DIR", str(tmp_path / "out"))
    assert figures_dir() == tmp_path / "out" and (tmp_path / "out").is_dir()


def test_save_figure_writes_html_and_png_when_export_works(monkeypatch, tmp_path):
    monkeypatch.setenv("MI_FIGURES_DIR", str(tmp_path))
    written = save_figure(heatmap([[1.0]], title="t"), "nb/one")
    assert (tmp_path / "nb" / "one.html").is_file()
    if plotting._static_export:
        png = (tmp_path / "nb" / "one.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(written) == 2
    else:
        assert len(written) == 1


@pytest.mark.parametrize("bad", ["", "/abs/path", "../escape"])
def test_save_figure_rejects_bad_names(bad):
    with pytest.raises(ValueError, match="relative name"):
        save_figure(heatmap([[1.0]], title="t"), bad)


def test_show_emits_one_bundle_with_plotly_json_and_png(monkeypatch, tmp_path):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, raw=False: shown.append((obj, raw)))
    monkeypatch.setenv("MI_FIGURES_DIR", str(tmp_path))
    show(heatmap([[1.0, 2.0]], title="bundle"), "nb/bundle")
    (bundle, raw), = shown
    assert raw and "application/vnd.plotly.v1+json" in bundle
    json.dumps(bundle["application/vnd.plotly.v1+json"])  # serialisable into the notebook
    if plotting._static_export:
        assert bundle["image/png"].startswith(b"\x89PNG")
    else:
        assert "text/html" in bundle  # degraded: still visible without PNG
    assert (tmp_path / "nb" / "bundle.html").is_file()


def test_missing_browser_degrades_to_html_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(plotting, "_static_export", None)
    monkeypatch.setattr(plotting, "_find_chrome", lambda: None)
    assert plotting.to_png(heatmap([[1.0]], title="t")) is None
    assert "apt-get install chromium" in capsys.readouterr().err
    monkeypatch.setattr(plotting, "_static_export", None)  # let later tests retry the real browser


def test_png_follows_the_figures_own_size():
    if not plotting._ensure_static_export():
        return
    import struct

    fig = heatmap([[1.0, 2.0]], title="wide")
    fig.update_layout(width=1200, height=300)
    png = plotting.to_png(fig)
    assert struct.unpack(">II", png[16:24]) == (1200, 300)
