"""`optimum-grape publish` (cli/publish.py): a variant over the perplexity threshold is refused, and
publishing without a token is an error."""

import json


def test_publish_refuses_a_variant_over_the_threshold(base_folder, tmp_path, monkeypatch):
    from optimum_grape.cli import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    status = main(["publish", str(base_folder), "--methods", "random", "--ratios", "0.5", "--repo-prefix", "me/t",
                   "--max-ppl-ratio", "1.0", "--work-dir", str(tmp_path), "--dry-run", "--num-samples", "4",
                   "--sequence-length", "32", "--eval-tokens", "128"])
    manifest = json.loads((tmp_path / "publish_manifest.json").read_text())
    assert status == 3 and manifest["variants"][0]["status"] == "refused"
    assert "exceeds --max-ppl-ratio 1.0" in manifest["variants"][0]["reason"]
    assert main(["publish", str(base_folder), "--repo-prefix", "me/t", "--work-dir", str(tmp_path)]) == 2  # no token
