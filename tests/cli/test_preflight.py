"""What `optimum-grape prune` reads and checks before the model loads (cli/preflight.py): a plan or
statistics file, --method-kwargs, --dataset, --eval-tokens. Each problem is a clear error with exit
status 2, never a traceback, and nothing is written."""

from helpers import cli_prune, run_cli, write_json


def test_missing_plan_is_refused_before_loading(tmp_path):
    result = run_cli("prune", "/does/not/exist", "--output", tmp_path / "o", "--plan", tmp_path / "none.json")
    assert result.returncode == 2 and "is not a file" in result.stderr


def test_malformed_inputs_are_clear_errors(tmp_path, capsys, base_folder, planned):
    plan = {k: v for k, v in planned["plan"].items() if k != "experts_per_layer"}
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "not_a_dataset").mkdir()
    (tmp_path / "not_a_dataset" / "a.txt").write_text("text")
    (tmp_path / "bad.json").write_text("{not json")
    cases = [
        (["--plan", tmp_path / "bad.json"], "not valid JSON"),
        (["--plan", write_json(tmp_path / "p1.json", {k: v for k, v in plan.items() if k != "clusters"})],
         "missing ['clusters']"),
        (["--plan", write_json(tmp_path / "p2.json", {**plan, "clusters": {"0": "all"}})], "list of lists"),
        (["--plan", write_json(tmp_path / "p3.json", {**plan, "align_neurons": "yes"})], "align_neurons='yes'"),
        (["--plan", write_json(tmp_path / "p4.json", [plan])], "must be a JSON object"),
        (["--method-kwargs", "{max_subsets: 3}"], "--method-kwargs"),
        (["--method-kwargs", "[1, 2]"], "must be a JSON object"),
        (["--dataset", tmp_path / "binary.txt"], "looks binary"),
        (["--dataset", tmp_path / "latin1.txt"], "is not UTF-8 text (byte 0xe9"),
        (["--dataset", tmp_path / "empty.txt"], "holds no text"),
        (["--dataset", tmp_path / "not_a_dataset"], "not a dataset saved with"),
        (["--eval-tokens", "0"], "--eval-tokens 0 must be an integer >= 2"),
        (["--eval-tokens", "-100"], "--eval-tokens -100"),
        (["--stats", tmp_path / "binary.txt"], "Cannot read statistics"),
    ]
    for extra, needle in cases:
        code, err = cli_prune(capsys, base_folder, "--output", tmp_path / "o", *extra)
        assert code == 2 and needle in err, (extra, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()
