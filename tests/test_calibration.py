"""Calibration metrics: equality with the reference libraries, edge cases, Brier, JSON and PNG output."""

import json
import math

import numpy as np
import pytest

from app.metrics import calibration as cal

ref = pytest.importorskip("calibration", reason="uncertainty-calibration (dev extra) is needed for reference checks")
torch = pytest.importorskip("torch")
tm_cls = pytest.importorskip("torchmetrics.classification")

TOL = 1e-9


def _random_case(rng, n=None, discrete=False):
    """Scores from a skewed distribution, outcomes from a miscalibrated link."""
    n = int(rng.integers(1, 400)) if n is None else n
    s = rng.beta(rng.uniform(0.5, 4), rng.uniform(0.5, 4), size=n)
    if discrete:
        s = np.round(s, int(rng.integers(1, 3)))
    y = (rng.random(n) < np.clip(s ** rng.uniform(0.5, 2.0), 0, 1)).astype(np.int64)
    return s, y


def _cases(seed, count):
    rng = np.random.default_rng(seed)
    out = [_random_case(rng, discrete=(i % 4 == 0)) for i in range(count)]
    out += [_random_case(rng, n=n) for n in (1, 2, 3, 4, 5, 14, 15, 16, 31)]
    return out


# ------------------------------------------------------------------------------------------------------------------
# Kumar et al. (uncertainty-calibration)
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("debias", [True, False])
def test_l2_matches_reference_get_calibration_error(debias):
    for s, y in _cases(1 if debias else 2, 150):
        expected = ref.get_calibration_error(s, y, p=2, debias=debias)
        assert cal.binned_calibration_error(s, y, p=2, debias=debias) == pytest.approx(expected, abs=TOL)


def test_l1_plugin_matches_reference():
    for s, y in _cases(3, 100):
        expected = ref.get_calibration_error(s, y, p=1, debias=False)
        assert cal.binned_calibration_error(s, y, p=1, debias=False) == pytest.approx(expected, abs=TOL)


def test_l1_debiased_matches_reference_with_the_same_random_stream():
    rng = np.random.default_rng(4)
    checked = 0
    for i in range(20):
        s, y = _random_case(rng, n=int(rng.integers(40, 400)))
        np.random.seed(i)
        expected = ref.get_calibration_error(s, y, p=1, debias=True)
        assert cal.binned_calibration_error(s, y, p=1, debias=True, seed=i) == pytest.approx(expected, abs=TOL)
        np.random.seed(i)
        assert cal.binned_calibration_error(s, y, p=1, debias=True, seed=None) == pytest.approx(expected, abs=TOL)
        checked += 1
    assert checked == 20


@pytest.mark.parametrize("debias", [True, False])
def test_explicit_equal_mass_bins_match_reference_scaling_ce(debias):
    rng = np.random.default_rng(5)
    for _ in range(40):
        s, y = _random_case(rng, n=int(rng.integers(20, 400)))
        for beta in (1, 7, 50, 1000):
            k = max(1, len(s) // beta)
            expected = ref.lower_bound_scaling_ce(s, y, p=2, debias=debias, num_bins=k)
            got = cal.binned_calibration_error(s, y, p=2, debias=debias, calib_beta=beta)
            assert got == pytest.approx(expected, abs=TOL)
            assert cal.binned_calibration_error(s, y, 2, debias, num_bins=k) == pytest.approx(expected, abs=TOL)


def test_equal_mass_edges_match_reference():
    rng = np.random.default_rng(6)
    for _ in range(50):
        s, _ = _random_case(rng, discrete=bool(rng.integers(0, 2)))
        for k in (1, 3, 15, 40):
            assert np.array_equal(cal.equal_mass_bin_edges(s, k), np.array(ref.utils.get_equal_bins(list(s), k)))
        assert np.array_equal(cal.discrete_bin_edges(s), np.array(ref.utils.get_discrete_bins(s)))
        assert cal.is_discrete(s) == ref.utils.is_discrete(s)


@pytest.mark.parametrize("mode", ["marginal", "top-label"])
@pytest.mark.parametrize("debias", [True, False])
def test_multiclass_matches_reference(mode, debias):
    rng = np.random.default_rng(7)
    for i in range(15):
        n, k = int(rng.integers(30, 300)), int(rng.integers(2, 5))
        logits = rng.normal(size=(n, k)) * 2
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        if i % 3 == 0:
            probs = np.round(probs, 1)
        labels = np.array([rng.choice(k, p=row / row.sum()) if row.sum() else 0 for row in probs])
        expected = ref.get_calibration_error(probs, labels, p=2, debias=debias, mode=mode)
        got = cal.binned_calibration_error(probs, labels, p=2, debias=debias, mode=mode)
        assert got == pytest.approx(expected, abs=TOL)


def test_plugin_estimators_by_direct_formula():
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9, 0.95, 0.99])
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    # two equal-mass bins of four: boundary midway between 0.6 and 0.7
    assert np.allclose(cal.equal_mass_bin_edges(s, 2), [0.65, 1.0])
    g1, g2 = abs(0.3 - 0.0), abs(0.885 - 0.75)
    assert cal.binned_calibration_error(s, y, 1, False, num_bins=2) == pytest.approx((g1 + g2) / 2, abs=TOL)
    assert cal.binned_calibration_error(s, y, 2, False, num_bins=2) == pytest.approx(
        math.sqrt((g1 ** 2 + g2 ** 2) / 2), abs=TOL)
    assert cal.binned_calibration_error(s, y, math.inf, False, num_bins=2) == pytest.approx(max(g1, g2), abs=TOL)
    var = (0.0 + 0.75 * 0.25 / 3) / 2
    assert cal.binned_calibration_error(s, y, 2, True, num_bins=2) == pytest.approx(
        math.sqrt((g1 ** 2 + g2 ** 2) / 2 - var), abs=TOL)


def test_debiased_resampling_is_reproducible_and_close_to_plugin_for_inf():
    rng = np.random.default_rng(8)
    s, y = _random_case(rng, n=2000)
    a = cal.binned_calibration_error(s, y, p=math.inf, debias=True, seed=3)
    b = cal.binned_calibration_error(s, y, p=math.inf, debias=True, seed=3)
    plug = cal.binned_calibration_error(s, y, p=math.inf, debias=False)
    assert a == b
    assert a <= plug + 1e-12  # the max of noisy gaps is biased upwards, so the correction lowers it
    assert plug - a < 0.1


# ------------------------------------------------------------------------------------------------------------------
# torchmetrics BinaryCalibrationError
# ------------------------------------------------------------------------------------------------------------------


def test_equal_width_edges_match_torch_linspace():
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("torch runs its unfused (no FMA) CPU kernels here; the edges follow the AVX2/AVX-512/CUDA ones")
    for n_bins in range(1, 400):
        expected = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64).numpy()
        assert np.array_equal(cal.equal_width_bin_edges(n_bins), expected), n_bins


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_equal_width_matches_torchmetrics(norm):
    rng = np.random.default_rng({"l1": 10, "l2": 11, "max": 12}[norm])
    metrics = {nb: tm_cls.BinaryCalibrationError(n_bins=nb, norm=norm) for nb in (1, 2, 7, 10, 15, 37)}
    for i in range(40):
        s, y = _random_case(rng, discrete=(i % 4 == 0))
        if i % 5 == 1:
            s[: len(s) // 3] = 1.0  # torchmetrics' own bin for exactly 1.0
        for nb, metric in metrics.items():
            metric.reset()
            expected = metric(torch.tensor(s, dtype=torch.float64), torch.tensor(y)).item()
            got = cal.equal_width_calibration_error(s, y, n_bins=nb, norm=norm)
            assert got == pytest.approx(expected, abs=TOL), (i, nb)


def test_equal_width_on_bin_boundaries_matches_torchmetrics():
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("torch runs its unfused (no FMA) CPU kernels here")
    s = np.array([0.0, 0.1, 0.2, 0.3, 0.3, 0.4, 0.5, 0.6, 0.6, 0.7, 0.8, 0.9, 1.0, 0.25, 0.55, 0.75])
    y = np.array([0, 0, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1])
    for nb in (2, 3, 4, 5, 10, 20):
        for norm in ("l1", "l2", "max"):
            expected = tm_cls.BinaryCalibrationError(n_bins=nb, norm=norm)(
                torch.tensor(s, dtype=torch.float64), torch.tensor(y)).item()
            assert cal.equal_width_calibration_error(s, y, nb, norm) == pytest.approx(expected, abs=TOL)


def test_torchmetrics_docstring_example():
    s, y = [0.25, 0.25, 0.55, 0.75, 0.75], [0, 0, 1, 1, 1]
    assert cal.equal_width_calibration_error(s, y, 2, "l1") == pytest.approx(0.2900, abs=1e-4)
    assert cal.equal_width_calibration_error(s, y, 2, "l2") == pytest.approx(0.2918, abs=1e-4)
    assert cal.equal_width_calibration_error(s, y, 2, "max") == pytest.approx(0.3167, abs=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# Brier, report, edge cases, validation
# ------------------------------------------------------------------------------------------------------------------


def test_brier_direct_formula():
    rng = np.random.default_rng(13)
    for _ in range(20):
        s, y = _random_case(rng)
        assert cal.brier_score(s, y) == pytest.approx(sum((a - b) ** 2 for a, b in zip(s, y)) / len(s), abs=TOL)
    assert cal.brier_score([1.0, 0.0], [True, False]) == 0.0
    assert cal.brier_score([0.0], [1]) == 1.0


def test_report_contents_match_the_parts():
    rng = np.random.default_rng(14)
    s, y = _random_case(rng, n=500)
    r = cal.calibration_report(s, y, n_bins=10)
    assert r["num_samples"] == 500 and r["n_bins"] == 10 and r["calib_beta"] is None
    assert r["accuracy"] == pytest.approx(y.mean()) and r["mean_confidence"] == pytest.approx(s.mean())
    assert r["brier"] == pytest.approx(cal.brier_score(s, y), abs=TOL)
    for norm in ("l1", "l2", "max"):
        assert r[f"ece_{norm}"] == pytest.approx(cal.equal_width_calibration_error(s, y, 10, norm), abs=TOL)
    assert r["ce_l2_debiased"] == pytest.approx(ref.get_calibration_error(s, y, p=2, debias=True), abs=TOL)
    assert r["ce_l2_plugin"] == pytest.approx(ref.get_calibration_error(s, y, p=2, debias=False), abs=TOL)
    assert r["ce_l1_plugin"] == pytest.approx(ref.get_calibration_error(s, y, p=1, debias=False), abs=TOL)
    assert r["ce_max_plugin"] == pytest.approx(cal.binned_calibration_error(s, y, math.inf, False), abs=TOL)
    assert r["equal_mass_bins"] == 15
    assert r["reliability"] == cal.reliability_data(s, y, 10)
    assert sum(b["count"] for b in r["reliability"]["bins"]) == 500
    json.dumps(r, allow_nan=False)  # JSON-able as is
    assert cal.calibration_report(s, y) == r  # deterministic (seeded resampling)

    rb = cal.calibration_report(s, y, n_bins=10, calib_beta=100)
    assert rb["equal_mass_bins"] == 5 and rb["calib_beta"] == 100
    assert rb["ce_l2_debiased"] == pytest.approx(
        ref.lower_bound_scaling_ce(s, y, p=2, debias=True, num_bins=5), abs=TOL)


@pytest.mark.parametrize("outcome", [0, 1])
def test_one_class_only(outcome):
    rng = np.random.default_rng(15)
    s = rng.random(60)
    y = np.full(60, outcome)
    r = cal.calibration_report(s, y)
    for key in ("ce_l2_debiased", "ce_l2_plugin", "ece_l1", "ece_l2", "ece_max", "brier"):
        assert math.isfinite(r[key])
    assert r["ece_l1"] == pytest.approx(abs(s.mean() - outcome), abs=TOL)
    assert r["ce_l1_plugin"] == pytest.approx(abs(s.mean() - outcome), abs=TOL)
    assert r["ce_l1_debiased"] == pytest.approx(r["ce_l1_plugin"], abs=TOL)  # no label noise to correct
    for d in (True, False):
        assert r[f"ce_l2_{'debiased' if d else 'plugin'}"] == pytest.approx(
            ref.get_calibration_error(s, y, p=2, debias=d), abs=TOL)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 50])
def test_all_confidences_equal(n):
    s = np.full(n, 0.7)
    y = np.array([1, 0] * n)[:n]
    r = cal.calibration_report(s, y)
    gap = abs(0.7 - y.mean())
    assert r["ece_l1"] == pytest.approx(gap, abs=TOL) and r["ece_max"] == pytest.approx(gap, abs=TOL)
    assert r["ce_l1_plugin"] == pytest.approx(gap, abs=TOL)
    assert r["ce_max_plugin"] == pytest.approx(gap, abs=TOL)
    assert r["equal_mass_bins"] == 1
    for d in (True, False):
        assert cal.binned_calibration_error(s, y, 2, d) == pytest.approx(
            ref.get_calibration_error(s, y, p=2, debias=d), abs=TOL)
    assert [b["count"] for b in r["reliability"]["bins"] if b["count"]] == [n]


def test_fewer_samples_than_a_bin():
    s = np.array([0.2, 0.9, 0.6])
    y = np.array([0, 1, 0])
    r = cal.calibration_report(s, y, n_bins=10, calib_beta=100)
    assert r["equal_mass_bins"] == 1
    gap = abs(s.mean() - y.mean())
    assert r["ce_l1_plugin"] == pytest.approx(gap, abs=TOL)
    assert r["ce_l2_debiased"] == pytest.approx(math.sqrt(max(gap ** 2 - (1 / 3) * (2 / 3) / 2, 0)), abs=TOL)
    assert math.isfinite(r["ce_l1_debiased"]) and math.isfinite(r["ce_max_debiased"])
    # a single sample: everything defined, nothing raised
    r1 = cal.calibration_report([0.8], [1], n_bins=15, calib_beta=50)
    assert r1["ce_l2_debiased"] == 0.0  # a bin of one sample has no unbiased estimate: contributes 0
    assert r1["ce_l1_plugin"] == pytest.approx(0.2)
    assert r1["ece_l1"] == pytest.approx(0.2)
    # singleton bins where the reference refuses the resampling debias
    s5 = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    assert math.isfinite(cal.binned_calibration_error(s5, [0, 1, 0, 1, 1], p=1, debias=True, num_bins=5))


def test_extreme_confidences():
    s = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    y = np.array([0, 1, 1, 1, 0, 1])
    r = cal.calibration_report(s, y, n_bins=10)
    assert r["reliability"]["bins"][-1]["count"] == 3  # 1.0 drawn in the last bin
    assert r["reliability"]["bins"][0]["count"] == 2


@pytest.mark.parametrize(
    "conf, corr, match",
    [
        ([0.1, 0.2], [1], "differ in length"),
        ([], [], "empty"),
        ([0.5, 1.2], [1, 0], r"\[0, 1\]"),
        ([-0.1, 0.5], [1, 0], r"\[0, 1\]"),
        ([0.5, float("nan")], [1, 0], "NaN"),
        ([0.5, 0.5], [1, 2], "0/1"),
        ([[0.5, 0.5]], [1], "one-dimensional"),
        (["a"], [1], "numeric"),
    ],
)
def test_bad_input_raises_value_error(conf, corr, match):
    with pytest.raises(ValueError, match=match):
        cal.calibration_report(conf, corr)


def test_bad_arguments_raise_value_error():
    s, y = [0.2, 0.8], [0, 1]
    with pytest.raises(ValueError, match="norm"):
        cal.equal_width_calibration_error(s, y, 10, "l3")
    with pytest.raises(ValueError, match="n_bins"):
        cal.equal_width_calibration_error(s, y, 0)
    with pytest.raises(ValueError, match="p must be"):
        cal.binned_calibration_error(s, y, p=0.5)
    with pytest.raises(ValueError, match="not both"):
        cal.binned_calibration_error(s, y, calib_beta=2, num_bins=2)
    with pytest.raises(ValueError, match="calib_beta"):
        cal.calibration_report(s, y, calib_beta=0)
    with pytest.raises(ValueError, match="mode"):
        cal.binned_calibration_error([[0.3, 0.7]], [1], mode="top")
    with pytest.raises(ValueError, match="labels must be between 0 and 1"):
        cal.binned_calibration_error([[0.3, 0.7]], [2])
    with pytest.raises(ValueError, match="differ in length"):
        cal.brier_score([0.1], [0, 1])


def test_accepts_torch_tensors_and_booleans():
    s = torch.tensor([0.1, 0.4, 0.8, 0.9], dtype=torch.bfloat16)
    y = torch.tensor([False, True, True, True])
    r = cal.calibration_report(s, y, n_bins=5)
    assert r["num_samples"] == 4 and r["accuracy"] == 0.75


# ------------------------------------------------------------------------------------------------------------------
# Output files
# ------------------------------------------------------------------------------------------------------------------


def _read_png(path):
    """(height, width, distinct RGB colours) of a PNG read back with matplotlib."""
    image = pytest.importorskip("matplotlib.image", reason="matplotlib (plots extra) draws the PNGs")
    rgb = np.round(image.imread(str(path))[..., :3] * 255).astype(np.uint8)
    return rgb.shape[0], rgb.shape[1], len(np.unique(rgb.reshape(-1, 3), axis=0))


@pytest.mark.parametrize("size", [600, 400])
def test_png_is_valid(tmp_path, size):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(16)
    s, y = _random_case(rng, n=300)
    data = cal.reliability_data(s, y, n_bins=10)
    path = cal.save_reliability_png(data, tmp_path / "sub" / "reliability_epoch_1.png", size=size)
    assert path == tmp_path / "sub" / "reliability_epoch_1.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, colours = _read_png(path)
    assert (height, width) == (size, size)
    assert colours > 20  # bars, gap, diagonal, text: not a blank canvas
    assert [p.name for p in path.parent.iterdir()] == ["reliability_epoch_1.png"]  # no temp file left


def test_png_with_empty_bins_and_bad_data(tmp_path):
    pytest.importorskip("matplotlib")
    data = cal.reliability_data([0.95, 0.97], [1, 0], n_bins=10)
    assert sum(b["count"] == 0 for b in data["bins"]) == 9
    cal.save_reliability_png(data, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="bins"):
        cal.save_reliability_png({"n_bins": 3}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_json_round_trip(tmp_path):
    rng = np.random.default_rng(17)
    s, y = _random_case(rng, n=120)
    data = cal.reliability_data(s, y, n_bins=12)
    path = cal.save_reliability_json(data, tmp_path / "reliability_epoch_3.json")
    assert json.loads(path.read_text()) == data
    assert len(data["bins"]) == 12
    for b in data["bins"]:
        assert set(b) == {"lower", "upper", "count", "mean_confidence", "accuracy"}
        if b["count"]:
            assert b["lower"] <= b["mean_confidence"] <= b["upper"]
    # overwriting in place is atomic and leaves no temp file behind
    cal.save_reliability_json(cal.calibration_report(s, y), path)
    assert json.loads(path.read_text())["num_samples"] == 120
    assert [p.name for p in tmp_path.iterdir()] == ["reliability_epoch_3.json"]
    with pytest.raises(ValueError):
        cal.save_reliability_json({"x": float("nan")}, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
