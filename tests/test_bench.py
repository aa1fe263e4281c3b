"""compress bench on real exports in real onnxruntime sessions."""

import json
import os
import subprocess
import sys

import pytest

from export.onnx_export import export_checkpoint

KEYS = {"model", "file_bytes", "threads", "batch", "session_start_ms", "latency_ms",
        "against", "ratio_p50", "budget_ms", "within_budget"}


@pytest.fixture(scope="module")
def models(dpf_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    packed, dense = root / "packed.onnx", root / "dense.onnx"
    export_checkpoint(dpf_run, packed, pack="bitmask", verify=False)
    export_checkpoint(dpf_run, dense, pack="none", verify=False)
    return packed, dense


def test_json_keys_and_against_ratio(cli, models):
    packed, dense = models
    result = cli("bench", packed, "--against", dense, "--runs", "60", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload) >= KEYS
    assert set(payload["latency_ms"]) == {"p50", "p90", "p99", "mean"}
    lat = payload["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert payload["against"]["file_bytes"] > payload["file_bytes"]
    ratio = payload["latency_ms"]["p50"] / payload["against"]["latency_ms"]["p50"]
    assert payload["ratio_p50"] == pytest.approx(ratio)
    assert payload["budget_ms"] is None and payload["within_budget"] is None
    assert payload["warnings"] == []



def test_bench_rates_the_file_against_the_peak_it_measures(cli, models):
    """MACs (as inspect counts them), the GMAC/s reached at p50, and its share of the best
    rate onnxruntime reaches here on a large conv or matmul, fp32 and int8."""
    packed, _ = models
    result = cli("bench", packed, "--runs", "40", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    inspected = json.loads(cli("inspect", packed, "--json").stdout)["total"]
    assert payload["macs"] == inspected["macs"] > 0 and payload["precision"] == "fp32"
    rate = payload["macs"] / (payload["latency_ms"]["p50"] / 1e3) / 1e9
    assert payload["gmacs_per_s"] == pytest.approx(rate)
    peak = payload["peak_gmacs_per_s"]
    assert peak["threads"] == 1 and peak["fp32"] > 0 and peak["int8"] > 0
    assert payload["share_of_peak"] == pytest.approx(rate / peak["fp32"])
    assert 0 < payload["share_of_peak"] < 1.5  # LeNet-5 runs far below a large conv's rate
    assert "GMAC/s" in cli("bench", packed, "--runs", "20").stdout
    plain = json.loads(cli("bench", packed, "--runs", "20", "--no-peak", "--json").stdout)
    assert "share_of_peak" not in plain


def test_budget_gate_exit_codes(cli, models):
    packed, _ = models
    over = cli("bench", packed, "--runs", "30", "--budget-ms", "0.000001", "--json")
    assert over.exit_code == 3 and json.loads(over.stdout)["within_budget"] is False
    within = cli("bench", packed, "--runs", "30", "--budget-ms", "10000",
                 "--percentile", "p99", "--json")
    assert within.exit_code == 0 and json.loads(within.stdout)["within_budget"] is True
    bad = cli("bench", packed, "--percentile", "p75")
    assert bad.exit_code == 2 and "--percentile" in bad.output
    for budget in ("inf", "nan", "0"):
        bad = cli("bench", packed, "--budget-ms", budget)
        assert bad.exit_code == 2 and "--budget-ms must be a positive" in bad.output, budget


def test_warns_where_figures_mean_less(cli, models, tmp_path):
    """Oversubscribed threads and a comparison of models with different inputs still run,
    and say what is wrong with them."""
    import onnx

    packed, _ = models
    info = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["n", 3, 8, 8])
            for n in ("x", "y")]
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                                   info[:1], info[1:])
    other = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(graph, ir_version=10,
                                     opset_imports=[onnx.helper.make_opsetid("", 20)]),
              str(other))
    threads = (os.cpu_count() or 1) + 1
    result = cli("bench", packed, "--against", other, "--threads", threads, "--runs", "10",
                 "--json")
    assert result.exit_code == 0, result.output
    warnings = json.loads(result.stdout)["warnings"]
    assert len(warnings) == 2 and f"--threads {threads} is more than" in warnings[0]
    assert "(1, 1, 28, 28) and (1, 3, 8, 8)" in warnings[1]
    assert "warning: the two models take different inputs" in result.stderr


def test_bench_without_torch(models):
    packed, dense = models
    code = ("import sys; sys.modules['torch'] = None\n"
            "from cli.app import main\n"
            f"sys.argv = ['compress', 'bench', {str(packed)!r}, '--against', {str(dense)!r},"
            " '--runs', '20', '--profile', '--json']\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["ratio_p50"] > 0 and payload["profile"]["by_op_type"]


def test_without_onnx_bench_profiles_and_inspect_says_what_is_missing(models):
    packed, _ = models
    blocked = "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
    bench = blocked + ("from cli.app import main\n"
                       f"sys.argv = ['compress', 'bench', {str(packed)!r}, '--runs', '10', "
                       "'--profile', '--json']\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", bench], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert all(r["layer"] is None for r in payload["profile"]["by_node"])
    assert payload["macs"] is None and payload["share_of_peak"] is None
    inspect = blocked + ("from cli.app import main\n"
                         f"sys.argv = ['compress', 'inspect', {str(packed)!r}]\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", inspect], capture_output=True, text=True)
    assert proc.returncode == 2 and "pip install onnx" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_profile_rates_each_layer(cli, models):
    """Each layer's kernel time, MACs (summing to the file's) and its own MAC rate."""
    packed, _ = models
    payload = json.loads(cli("bench", packed, "--runs", "20", "--profile", "--json").stdout)
    layers = payload["profile"]["by_layer"]
    assert layers and sum(r["macs"] for r in layers if r["macs"]) == payload["macs"]
    for row in layers:
        assert row["ms_per_run"] > 0 and row["gmacs_per_s"] > 0
        top = payload["peak_gmacs_per_s"]["fp32"]
        assert row["share_of_peak"] == pytest.approx(row["gmacs_per_s"] / top)


def test_profile_by_operator_type_and_layer(cli, models):
    packed, _ = models
    result = cli("bench", packed, "--runs", "40", "--profile", "--json")
    assert result.exit_code == 0, result.output
    profile = json.loads(result.stdout)["profile"]
    assert profile["runs"] == 40 and profile["kernel_ms_per_run"] > 0
    assert sum(r["share"] for r in profile["by_op_type"]) == pytest.approx(1.0)
    assert sum(r["nodes"] for r in profile["by_op_type"]) == len(profile["by_node"])
    ops = {r["op_type"] for r in profile["by_op_type"]}
    assert ops & {"Conv", "FusedConv"} and ops & {"Gemm", "FusedGemm"}
    # every LeNet-5 layer with a weight is found under its own name, and nothing else is
    layers = {r["layer"] for r in profile["by_node"]} - {None}
    assert layers == {"features.0", "features.3", "classifier.1", "classifier.3",
                      "classifier.5"}
    times = [r["ms_per_run"] for r in profile["by_node"]]
    assert times == sorted(times, reverse=True)
    table = cli("bench", packed, "--runs", "20", "--profile")
    assert "time by operator type" in table.output and "features.3" in table.output
    assert json.loads(cli("bench", packed, "--runs", "20", "--json").stdout)["profile"] is None


def test_bad_files(cli, tmp_path):
    (tmp_path / "noise.onnx").write_bytes(os.urandom(500))
    (tmp_path / "text.onnx").write_text("hello")
    for path in (tmp_path / "noise.onnx", tmp_path / "text.onnx", tmp_path / "missing.onnx"):
        result = cli("bench", path, "--runs", "5")
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and "error:" in result.output


def test_layer_table_times_every_layer_at_a_grid_of_widths(cli, models, tmp_path):
    """One entry per prunable layer (packed weights included), its full widths in the grid,
    positive times, and what the table was made on; an existing table is kept."""
    packed, _ = models
    out = tmp_path / "table.json"
    result = cli("bench", packed, "--runs", "20", "--no-peak", "--layer-table", out,
                 "--table-widths", "3", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["layer_table"]
    table = json.loads(out.read_text())
    inspected = json.loads(cli("inspect", packed, "--json").stdout)
    prunable = [r["name"].removesuffix(".weight") for r in inspected["layers"]
                if r["prunable"]]
    assert [e["layer"] for e in table["layers"]] == prunable
    assert summary["layers"] == len(prunable) and summary["full_width_ms"] > 0
    for entry in table["layers"]:
        widths = {(i, o) for i, o, _ in entry["times_ms"]}
        assert (entry["input_channels"], entry["output_channels"]) in widths
        assert len(widths) <= 9 and all(ms > 0 for *_, ms in entry["times_ms"])
    assert table["threads"] == 1 and table["precision"] == "fp32" and table["cpu"]
    assert table["onnxruntime"] and len(table["model_sha256"]) == 64
    out.write_text("mine")
    again = cli("bench", packed, "--runs", "20", "--no-peak", "--layer-table", out)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert out.read_text() == "mine"


def test_layer_table_without_torch(models, tmp_path):
    packed, _ = models
    out = tmp_path / "table.json"
    code = ("import sys; sys.modules['torch'] = None\n"
            "from cli.app import main\n"
            f"sys.argv = ['compress', 'bench', {str(packed)!r}, '--runs', '10', '--no-peak',"
            f" '--layer-table', {str(out)!r}, '--table-widths', '2']\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["layers"]
