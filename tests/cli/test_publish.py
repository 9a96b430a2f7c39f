"""`optimum-grape publish` (cli/publish.py): a variant over the perplexity threshold is refused, and
publishing without a token is an error; every bad flag, work dir or manifest is refused before any pruning."""

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


PUBLISH = ["--methods", "random", "--ratios", "0.5", "--repo-prefix", "me/t", "--dry-run", "--num-samples", "4",
           "--sequence-length", "32", "--eval-tokens", "128"]


def _refused(capsys, base_folder, work, *changes) -> str:
    """Run publish with PUBLISH changed by `changes` (flag, value pairs): it must exit 2 before any
    work (the work dir is left as it was) and name the value; returns the message."""
    from optimum_grape.cli import main

    args = list(PUBLISH)
    for flag, value in zip(changes[::2], changes[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    before = sorted(str(p) for p in work.parent.rglob("*"))
    assert main(["publish", str(base_folder), "--work-dir", str(work), *args]) == 2
    assert sorted(str(p) for p in work.parent.rglob("*")) == before
    return capsys.readouterr().err


def test_the_quality_gate_cannot_be_switched_off(capsys, base_folder, tmp_path):
    # issue 25: NaN compared false and let every variant through; infinity and negatives are no gate either
    for value in ("nan", "inf", "-1", "0.5"):
        assert f"--max-ppl-ratio {float(value)}" in _refused(capsys, base_folder, tmp_path / "w", "--max-ppl-ratio", value)


def test_repository_names_are_checked_before_any_work(capsys, base_folder, tmp_path):
    assert "not a valid Hub repository id" in _refused(capsys, base_folder, tmp_path / "w", "--repo-prefix",
                                                       "not a valid repo!!/x y")
    assert "names no owner" in _refused(capsys, base_folder, tmp_path / "w", "--repo-prefix", "mixtral")
    assert "--base-model" in _refused(capsys, base_folder, tmp_path / "w", "--base-model", "org/name\n[x](javascript:1)")


def test_two_ratios_that_round_to_one_variant_name_are_refused(capsys, base_folder, tmp_path):
    assert "random-25" in _refused(capsys, base_folder, tmp_path / "w", "--ratios", "0.25,0.251")


def test_a_damaged_work_dir_is_refused_before_pruning(capsys, base_folder, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    assert "is a file" in _refused(capsys, base_folder, tmp_path / "file")
    for text in ("[]", '{"variants": [', '{"variants": [1]}'):
        work = tmp_path / f"w{len(text)}"
        work.mkdir()
        (work / "publish_manifest.json").write_text(text)
        assert "publish_manifest.json" in _refused(capsys, base_folder, work)
        assert (work / "publish_manifest.json").read_text() == text


def test_an_upload_is_refused_offline_before_any_work(capsys, base_folder, tmp_path, monkeypatch):
    from optimum_grape.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_not_used")
    args = [a for a in PUBLISH if a != "--dry-run"]
    assert main(["publish", str(base_folder), "--work-dir", str(tmp_path / "w"), *args]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and not (tmp_path / "w").exists()
    assert main(["prune", str(base_folder), "--output", str(tmp_path / "o"), "--push-to-hub", "me/x"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and not (tmp_path / "o").exists()
