"""Registered comparisons (pipeline.registration, benchmarks/registered.py): a registration runs
only as committed, results record its commit, a changed registration is refused, and the
analysis (paired t, Holm) matches hand computations."""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from benchmark_helpers import BENCHMARKS, benchmark_module

from pipeline import registration as reg_lib
from pipeline.registration import RegistrationError


@pytest.fixture(autouse=True)
def scripts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark scripts importable by name for this module's tests (undone after each)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in ("registered", "tune_baselines", "quality"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


def registration_text(digest: str) -> dict:
    return {"name": "trial", "registered": "2026-12-01", "recipe": ["recipe.yaml"],
            "recipe_sha256": digest, "target_seeds": [200, 201, 202], "speed_ups": [2.0],
            "methods": ["metanetwork", "none"],
            "metanetwork": {"rule": "built once per machine", "below_identity": "checkpoint",
                            "min_draws": 2},
            "primary": [{"measure": "test acc at 2x", "first": "metanetwork", "second": "none"}],
            "decision": "metanetwork better when the Holm-adjusted p < 0.05 and the mean > 0"}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository holding a recipe (a benchmark config naming one stage config) and a
    registration of it, committed."""
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@example.com")
    git(tmp_path, "config", "user.name", "t")
    (tmp_path / "stage.yaml").write_text("trainer: {max_epochs: 3}\n")
    (tmp_path / "recipe.yaml").write_text("demo: {configs: {zoo: stage.yaml}}\nprune: {lr: 0.01}\n")
    composed = {"demo": {"configs": {"zoo": str(tmp_path / "stage.yaml")}}, "prune": {"lr": 0.01}}
    digest = reg_lib.recipe_sha256(composed)
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(registration_text(digest)))
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "register trial")
    return tmp_path


def fake_reports(seed: int, meta: float, none: float) -> dict[str, dict]:
    """Two run reports of one network, as prune.py run writes them (the fields read here)."""
    def report(method: str, acc: float) -> dict:
        return {"method": method, "time_s": 10.0, "speed_up": {"target": 2.0},
                "accuracy": {"final": {"test": acc}},
                "stage1_curve": {"range": [2.0, 3.0], "area": acc / 2}}
    return {f"seed{seed}/2x/metanetwork": report("metanetwork", meta),
            f"seed{seed}/2x/none": report("none", none)}


def write_result(reg: reg_lib.Registration, commit: str, seed: int, meta: float, none: float,
                 draw: str) -> dict:
    from pipeline.results import measures

    reports = fake_reports(seed, meta, none)
    record = reg_lib.ledger(reg, commit, "code", seed, reports, {"checkpoint_sha256": draw},
                            measures(reports))
    reg.results_dir.mkdir(parents=True, exist_ok=True)
    (reg.results_dir / f"seed{seed}.json").write_text(json.dumps(record))
    return record


def test_a_registration_runs_only_as_committed(repo: Path, capsys) -> None:
    registered = benchmark_module("registered")
    reg, commit, ledgers = registered.checked(str(repo / "trial.yaml"))
    assert commit == git(repo, "rev-parse", "HEAD") and ledgers == {}
    assert registered.composed_recipe(reg)["demo"]["target_seeds"] == [200, 201, 202]
    assert registered.main(["hash", str(repo / "trial.yaml")]) == 0
    assert capsys.readouterr().out.strip() == reg.recipe_sha256  # the value registered
    # an uncommitted edit of the registration, or of its recipe, is refused
    text = (repo / "trial.yaml").read_text()
    (repo / "trial.yaml").write_text(text.replace("min_draws: 2", "min_draws: 1"))
    with pytest.raises(RegistrationError, match="trial.yaml has uncommitted changes"):
        registered.checked(str(repo / "trial.yaml"))
    (repo / "trial.yaml").write_text(text)
    (repo / "recipe.yaml").write_text("demo: {configs: {zoo: stage.yaml}}\nprune: {lr: 0.1}\n")
    with pytest.raises(RegistrationError, match="recipe.yaml has uncommitted changes"):
        registered.checked(str(repo / "trial.yaml"))
    # committed, the changed recipe no longer hashes to the registered value
    git(repo, "commit", "-qam", "change the recipe")
    reg, _, _ = registered.checked(str(repo / "trial.yaml"))
    with pytest.raises(RegistrationError, match="hashes to .* not the registered"):
        registered.composed_recipe(reg)
    # a registration never committed is refused
    (repo / "other.yaml").write_text(yaml.safe_dump({**registration_text("0"), "name": "other"}))
    with pytest.raises(RegistrationError, match="other.yaml is not committed"):
        registered.checked(str(repo / "other.yaml"))


def test_results_record_the_commit_and_a_changed_registration_is_refused(repo: Path) -> None:
    registered = benchmark_module("registered")
    reg, commit, _ = registered.checked(str(repo / "trial.yaml"))
    record = write_result(reg, commit, 200, 0.50, 0.48, "drawA")
    assert record["registration_commit"] == commit and record["recipe_sha256"] == reg.recipe_sha256
    assert record["values"] == {"stage-1 curve area 2-3x": {"metanetwork": 0.25, "none": 0.24},
                                "test acc at 2x": {"metanetwork": 0.50, "none": 0.48}}
    assert record["seconds"] == {"metanetwork": 10.0, "none": 10.0}
    assert registered.checked(str(repo / "trial.yaml"))[2][200]["draw"] == {"checkpoint_sha256": "drawA"}
    # the registration edited and committed after a result exists: refused, naming both commits
    text = (repo / "trial.yaml").read_text().replace("min_draws: 2", "min_draws: 1")
    (repo / "trial.yaml").write_text(text)
    git(repo, "commit", "-qam", "move the goalposts")
    with pytest.raises(RegistrationError, match=f"changed after results exist.*{commit}"):
        registered.checked(str(repo / "trial.yaml"))


def test_holm_against_hand_values() -> None:
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> max so far 0.06
    assert reg_lib.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert reg_lib.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_verdicts_wait_for_every_network_and_draw(repo: Path) -> None:
    from scipy.stats import t

    registered = benchmark_module("registered")
    reg, commit, _ = registered.checked(str(repo / "trial.yaml"))
    assert registered.main(["report", str(repo / "trial.yaml")]) == 0  # before any result
    text = (repo / "trial" / "report.md").read_text()
    assert "## Interim" in text and "0 of 3 registered networks" in text
    assert json.loads((repo / "trial" / "report.json").read_text())["primary"][0]["mean"] is None
    for seed, (meta, none) in zip((200, 201), ((0.50, 0.48), (0.52, 0.49))):
        write_result(reg, commit, seed, meta, none, "drawA")
    ledgers = reg_lib.read_ledgers(reg)
    assert reg_lib.completeness(reg, ledgers)[0] is False  # 2 of 3 networks
    write_result(reg, commit, 202, 0.47, 0.46, "drawA")
    ledgers = reg_lib.read_ledgers(reg)
    assert reg_lib.completeness(reg, ledgers)[0] is False  # one draw of the two registered
    write_result(reg, commit, 202, 0.47, 0.46, "drawB")
    ledgers = reg_lib.read_ledgers(reg)
    assert reg_lib.completeness(reg, ledgers)[0] is True
    (v,) = reg_lib.verdicts(reg, ledgers)
    diffs = [0.02, 0.03, 0.01]  # by hand: mean 0.02, sd 0.01, t = 0.02 / (0.01 / sqrt 3)
    stat = 0.02 / (0.01 / math.sqrt(3))
    assert v.difference.mean == pytest.approx(sum(diffs) / 3)
    assert v.p == pytest.approx(2 * t.sf(stat, 2)) and v.p_adjusted == pytest.approx(v.p)
    assert v.verdict == ("metanetwork better" if v.p < 0.05 else "no difference shown")
    assert registered.main(["report", str(repo / "trial.yaml")]) == 0
    text = (repo / "trial" / "report.md").read_text()
    assert "## Registered verdicts" in text and f"{100 * v.difference.mean:+.2f}" in text


def test_a_bad_registration_names_the_key(tmp_path: Path) -> None:
    bad = {**registration_text("0"), "correction": "bonferroni"}
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(bad))
    (tmp_path / "recipe.yaml").write_text("demo: {}\n")
    with pytest.raises(RegistrationError, match="correction 'bonferroni'"):
        reg_lib.load_registration(tmp_path / "trial.yaml")
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump({**registration_text("0"), "name": "x"}))
    with pytest.raises(RegistrationError, match="must equal the file's stem"):
        reg_lib.load_registration(tmp_path / "trial.yaml")
    for targets in ({"weight_sparsities": [0.5]}, {"speed_ups": []}):  # both, or neither
        (tmp_path / "trial.yaml").write_text(yaml.safe_dump({**registration_text("0"), **targets}))
        with pytest.raises(RegistrationError, match="as speed_ups or as weight_sparsities"):
            reg_lib.load_registration(tmp_path / "trial.yaml")


def test_a_weight_registration_of_a_speed_up_recipe_has_only_its_targets(tmp_path: Path) -> None:
    """The registration's targets replace the recipe's: a weight-sparsity registration of a
    recipe written for speed-ups runs no speed-up (the demo refuses both kinds at once)."""
    (tmp_path / "recipe.yaml").write_text("demo: {speed_ups: [2.0, 3.0], methods: [none]}\n")
    digest = reg_lib.recipe_sha256({"demo": {"speed_ups": [2.0, 3.0], "methods": ["none"]}})
    text = {**registration_text(digest), "weight_sparsities": [0.9]}
    del text["speed_ups"]
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(text))
    demo = benchmark_module("registered").composed_recipe(
        reg_lib.load_registration(tmp_path / "trial.yaml"))["demo"]
    assert (demo["speed_ups"], demo["weight_sparsities"]) == ([], [0.9])
    assert demo["methods"] == ["metanetwork", "none"]


@pytest.mark.parametrize("draws, message", [
    ([{"name": "A", "meta_seed": 0, "networks": [200, 201]},
      {"name": "B", "meta_seed": 1, "networks": [201, 202]}], "every registered network once"),
    ([{"name": "A", "meta_seed": 0, "networks": [200]},
      {"name": "B", "meta_seed": 0, "networks": [201, 202]}], "its own meta_seed"),
    ([{"name": "A", "meta_seed": 0, "networks": [200, 201, 202]}], "fewer than min_draws 2"),
])
def test_registered_draws_partition_the_networks(tmp_path: Path, draws: list, message: str) -> None:
    text = registration_text("0")
    (tmp_path / "recipe.yaml").write_text("demo: {}\n")
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(
        {**text, "metanetwork": {**text["metanetwork"], "draws": draws}}))
    with pytest.raises(RegistrationError, match=message):
        reg_lib.load_registration(tmp_path / "trial.yaml")
    draws = [{"name": "A", "meta_seed": 0, "networks": [200, 202]},
             {"name": "B", "meta_seed": 1, "networks": [201]}]
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(
        {**text, "metanetwork": {**text["metanetwork"], "draws": draws}}))
    reg = reg_lib.load_registration(tmp_path / "trial.yaml")
    assert [reg_lib.draw_of(reg, s).name for s in (200, 201, 202)] == ["A", "B", "A"]


@pytest.mark.parametrize("path", sorted((BENCHMARKS / "registrations").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_registrations_hash_and_parse(path: Path, tmp_path: Path) -> None:
    """Every registration in the repository loads, its recipe still hashes to the registered
    value, and every stage of every method it runs parses (no data is read)."""
    from pipeline import demo as pipeline_demo

    registered = benchmark_module("registered")
    reg = reg_lib.load_registration(path)
    cfg = registered.composed_recipe(reg)  # raises when the recipe changed after registration
    assert not set(reg.target_seeds) & set(cfg["demo"]["zoo_seeds"])
    demo = pipeline_demo.load_demo_config(registered.quality.write_config(cfg, tmp_path))
    data = {"root": str(tmp_path / "data"), "download": True}
    stages, configs = pipeline_demo.demo_folder(demo, tmp_path / "out", data)
    pipeline_demo.check_demo(demo, stages, configs, data)
    measures = {c.measure for c in reg.primary + reg.secondary}
    areas = {"stage-1 curve area 2-3x", "stage-1 curve area, weight sparsity 0.5-0.9"}
    assert measures <= areas | {f"test acc at {t.text}" for t in demo.demo.targets}


def test_a_frozen_recipe_owns_copies_and_hashes_as_its_sources(repo: Path, tmp_path: Path,
                                                                capsys) -> None:
    """`freeze`: the merged recipe and copies of its stage configs, whose content (so hash) is
    that of the sources; a later edit of a source leaves the frozen copy, and its hash, alone."""
    registered = benchmark_module("registered")
    (repo / "delta.yaml").write_text("prune: {lr: 0.03}\n")
    sources = [str(repo / "recipe.yaml"), str(repo / "delta.yaml")]
    expected = reg_lib.recipe_sha256(registered.quality.merge_configs(sources))
    assert registered.main(["freeze", "--config", f"[{','.join(sources)}]",
                            "--out", str(tmp_path / "frozen")]) == 0
    assert capsys.readouterr().out.strip() == expected
    frozen = yaml.safe_load((tmp_path / "frozen" / "benchmark.yaml").read_text())
    assert frozen == {"demo": {"configs": {"zoo": "zoo.yaml"}}, "prune": {"lr": 0.03}}
    assert (tmp_path / "frozen" / "zoo.yaml").read_bytes() == (repo / "stage.yaml").read_bytes()
    (repo / "stage.yaml").write_text("trainer: {max_epochs: 4}\n")  # the shipped config moves on
    merged = registered.quality.merge_configs([str(tmp_path / "frozen" / "benchmark.yaml")])
    assert reg_lib.recipe_sha256(merged) == expected


def test_tuning_cells_are_named_by_their_settings_and_parsed_back() -> None:
    """benchmarks/tune_baselines.py keeps each setting in a folder named after it; the table
    reads the folder names back, so every cell ever run is tabulated."""
    tune = benchmark_module("tune_baselines")
    for cell in (tune.Cell("none", 0.03), tune.Cell("sparse", 0.01, 5e-05, 16.0)):
        assert tune.Cell.parse(cell.name) == cell
    assert tune.Cell("sparse", 0.01, 5e-3, 4.0).overrides() == {
        "prune": {**tune.TUNING, "reg": 5e-3, "alpha": 4.0},
        "finetune": {"model": {"init_args": {"lr": 0.01}}}, "final": {"model": {"init_args": {"lr": 0.01}}}}
    with pytest.raises(ValueError, match="not a tuning cell"):
        tune.Cell.parse("configs")
    # the learning rate by none's final val accuracy; sparse's cell among those at that rate,
    # although a cell at another rate scored higher
    row = lambda cell, area, acc: {"cell": vars(cell), "stage1_val_area": area, "final_val_acc": acc}  # noqa: E731
    results = {"lr": [row(tune.Cell("none", 0.01), 0.3, 0.50), row(tune.Cell("none", 0.1), 0.2, 0.52)],
               "sparse": [row(tune.Cell("sparse", 0.01, 5e-3, 16.0), 0.9, 0.5),
                          row(tune.Cell("sparse", 0.1, 5e-3, 4.0), 0.4, 0.5),
                          row(tune.Cell("sparse", 0.1, 5e-2, 4.0), 0.6, 0.4)]}
    best = tune.choices(results)
    assert best["lr"]["cell"]["lr"] == 0.1
    assert best["sparse"]["cell"] == vars(tune.Cell("sparse", 0.1, 5e-2, 4.0))


def test_baselines_first_then_the_metanetwork_arm(repo: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`run --baselines_only` trains the network and runs only the methods that need no
    metanetwork, writing no ledger; the later run builds the draw, prunes with the metanetwork
    and writes the ledger, costing the network's training by the first process's clock."""
    from pipeline import demo as pipeline_demo

    registered = benchmark_module("registered")
    reg, commit, _ = registered.checked(str(repo / "trial.yaml"))
    trained, pruned = [], []

    def zoo_member(options):  # trains once; a second call finds the member
        if options.seed not in trained:
            trained.append(options.seed)
        return None, {"file": f"members/seed{options.seed}.pt"}

    def prune_network(demo, config, out, seed, target, best, timed, step):
        pruned.append((seed, list(demo.methods), best))
        return {k: v for k, v in fake_reports(seed, 0.5, 0.4).items()
                if v["method"] in demo.methods}

    best = tmp_path / "best.ckpt"
    best.write_bytes(b"weights")
    (tmp_path / "selection.json").write_text(json.dumps({"score": 0.4, "identity_score": 0.3,
                                                         "beats_identity": True}))
    monkeypatch.setattr(pipeline_demo, "demo_stage_configs", lambda cfg, out, data: {"meta": {}})
    monkeypatch.setattr(pipeline_demo, "write_demo_configs",
                        lambda out, s, st: {"zoo": out / "z", "prune": out / "p"})
    monkeypatch.setattr(pipeline_demo, "demo_settings", lambda cfg, stages: {})
    monkeypatch.setattr(pipeline_demo, "metanetwork_stages", lambda *a: best)
    monkeypatch.setattr(pipeline_demo, "zoo_member", zoo_member)
    monkeypatch.setattr(pipeline_demo, "prune_network", prune_network)
    cfg = pipeline_demo.DemoConfig(pipeline_demo.DemoSettings(
        configs={}, zoo_seeds=[0], target_seeds=[200], speed_ups=[2.0],
        methods=["metanetwork", "none"]))
    folder = tmp_path / "work" / "draw"
    assert registered.run_draw(reg, commit, cfg, {}, folder, None, [200], None, True) == 0
    assert pruned == [(200, ["none"], None)] and not reg.results_dir.exists()
    assert registered.run_draw(reg, commit, cfg, {}, folder, None, [200], None, False) == 0
    assert pruned[1] == (200, ["metanetwork", "none"], best) and trained == [200]
    record = json.loads((reg.results_dir / "seed200.json").read_text())
    first = json.loads((folder / "target" / "seconds.json").read_text())["200"]
    assert record["seconds"]["target training"] == first
    assert record["draw"]["checkpoint_sha256"] == hashlib.sha256(b"weights").hexdigest()


def test_a_shared_draw_links_only_the_same_recipe(tmp_path: Path) -> None:
    """`--draw_from`: another registration's zoo and meta folders are linked when their stage
    configs equal this recipe's but for the folder; a source built otherwise is refused."""
    registered = benchmark_module("registered")
    source, folder = tmp_path / "a" / "A", tmp_path / "b" / "A"
    stages = {"zoo": {"zoo": {"dir": str(folder / "zoo")}, "seed": 0},
              "meta": {"trainer": {"default_root_dir": str(folder / "meta")}}}
    (source / "configs").mkdir(parents=True)
    for part in ("zoo", "meta"):
        text = yaml.safe_dump(stages[part]).replace(str(folder), str(source))
        (source / "configs" / f"{part}.yaml").write_text(text)
    folder.mkdir(parents=True)
    registered.Shared(source, ("zoo", "meta")).link(folder, stages)
    assert (folder / "zoo").resolve() == source / "zoo" and (folder / "meta").is_symlink()
    other = tmp_path / "c" / "A"
    other.mkdir(parents=True)
    with pytest.raises(RegistrationError, match="its zoo stage .* differs from this recipe's"):
        registered.Shared(source, ("zoo",)).link(other, {"zoo": {**stages["zoo"], "seed": 1}})
    assert not (other / "zoo").exists()
