"""The plots the MLflow UI shows: colours follow each metric's direction, each scale gets its own axis."""
from __future__ import annotations

import pytest
from matplotlib.colors import to_hex

from fsku.quantize import ratio_verdict
from fsku.steps.distill import loss_curve_figures
from fsku.steps.quantize import comparison_figure


@pytest.mark.parametrize("key, ratio, verdict", [
    ("tokens_per_s_ratio", 1.09, "better"), ("tokens_per_s_ratio", 0.8, "worse"),
    ("mc_accuracy_ratio", 0.9, "worse"), ("mc_accuracy_ratio", 1.1, "better"),
    ("latency_mean_s_ratio", 1.09, "worse"), ("size_mb_ratio", 0.5, "better"),
    ("perplexity", 1.2, "worse"), ("load_s_ratio", 1.0, "same"),
])
def test_ratio_verdict_follows_the_metric_direction(key, ratio, verdict):
    assert ratio_verdict(key, ratio) == verdict


def test_comparison_colours():
    fig = comparison_figure({"tokens_per_s_ratio": 1.09, "mc_accuracy_ratio": 0.9, "size_mb_ratio": 0.5,
                             "load_s_ratio": 1.0, "original_size_mb": 100.0})
    bars = fig.axes[0].patches
    assert [to_hex(b.get_facecolor()) for b in bars] == ["#55a868", "#c44e52", "#55a868", "#8c8c8c"]


def test_learning_rate_has_its_own_axis():
    history = [{"loss": 2.0 - 0.1 * i, "grad_norm": 3.0 + i, "learning_rate": 2e-4 * (1 - i / 10)} for i in range(5)]
    figs = loss_curve_figures(history)
    fig = figs["plots/lr_grad_norm.png"]
    left, right = fig.axes
    assert [line.get_label() for line in left.get_lines()] == ["grad_norm"]
    assert [line.get_label() for line in right.get_lines()] == ["learning_rate"]
    assert max(right.get_lines()[0].get_ydata()) == pytest.approx(2e-4)
    # alone, a learning rate keeps the one axis
    only_lr = loss_curve_figures([{"loss": 1.0, "learning_rate": 1e-4}, {"loss": 0.9, "learning_rate": 5e-5}])
    assert len(only_lr["plots/lr_grad_norm.png"].axes) == 1


def test_evaluate_plots_positions_domains_and_gate():
    import pandas as pd

    from fsku.steps.evaluate import _plots, confusion, option_positions

    table = pd.DataFrame([
        {"question_type": "multiple_choice", "gold": "2", "answer": "2", "score": 1.0, "domain": "law", "inference_time": 1.0,
         "gate_score": 0.95},
        {"question_type": "multiple_choice", "gold": "3", "answer": "1", "score": 0.0, "domain": "law", "inference_time": 1.0,
         "gate_score": 0.80},
        {"question_type": "multiple_choice", "gold": "1", "answer": "1 파일 암호화", "score": 1.0, "domain": "security",
         "inference_time": 1.0, "gate_score": None},
        {"question_type": "descriptive", "gold": "긴 답", "answer": "답", "score": 0.6, "domain": "", "inference_time": 2.0,
         "gate_score": 0.91},
    ])
    gold, pred = option_positions(table)
    assert (gold, pred) == ([2, 3, 1], [2, 1, 1])
    assert confusion(gold, pred).tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 0]]
    assert confusion([], []).shape == (0, 0)
    figs = _plots(table, gate_threshold=0.9)
    assert {"plots/mc_positions.png", "plots/score_by_domain.png", "plots/gate_scores.png"} <= set(figs)
    left = figs["plots/mc_positions.png"].axes[0]
    assert [round(b.get_height()) for b in left.patches] == [1, 1, 1, 2, 1, 0]  # gold 1,2,3 then predicted 1,2,3
    assert figs["plots/gate_scores.png"].axes[0].get_title() == "best passage relevance (gate opens for 67%)"
    assert "plots/gate_scores.png" not in _plots(table.assign(gate_score=None))
