"""Run or report a registered comparison (``pipeline.registration``, docs/registration.md).

    python benchmarks/registered.py run benchmarks/registrations/<name>.yaml \
        --data_root ../shared/data/cifar10-jpeg [--seeds [200,202,...]] [--out runs/registrations/<name>] \
        [--baselines_only] [--draw_from runs/registrations/<other>/<draw>]
    python benchmarks/registered.py report benchmarks/registrations/<name>.yaml
    python benchmarks/registered.py hash benchmarks/registrations/<name>.yaml
    python benchmarks/registered.py freeze --config [A.yaml,B.yaml,...] \
        --out benchmarks/registrations/<name>/recipe

``run`` refuses a registration that is not committed, has uncommitted changes, whose recipe
no longer hashes to the registered value, or whose existing results name another commit. Then
it builds the recipe's metanetwork on this machine when absent (zoo, meta-training, ``select``
on the meta-val members: one *draw*), applies the registration's rule when that draw scores no
better than the identity, and prunes the registered networks in order (or ``--seeds``, e.g.
two processes on disjoint halves), each with every method to every speed-up. After each
network it writes that network's ledger, ``<registration folder>/<name>/results/seed<N>.json``
(small; commit it: a fresh machine continues from the ledgers and rebuilds the rest).
``--baselines_only`` trains the networks and runs the methods that need no metanetwork, writing
no ledger: a second process's work while the first builds the draw (a later ``run`` reuses
both). ``--draw_from`` links another registration's draw (its zoo and meta-training, whose
stage configs must equal this recipe's) instead of building one, so that registrations of
one recipe share a metanetwork on a machine.

``freeze`` writes a recipe the registration can own: the benchmark configs merged in order into
``<out>/benchmark.yaml``, with copies of the stage configs it names beside it, so that later
changes to the shipped configs never move a registered run; it prints the frozen recipe's
hash. ``hash`` prints the sha256 of the registration's recipe as it is now, the value its
``recipe_sha256`` must hold (run it once while writing a registration). ``report`` writes
``<name>/report.md`` and ``<name>/report.png`` beside the registration: the registered verdicts
first (paired t per primary comparison, Holm over the family), only once every registered
network has a result from enough draws; before that, an interim table labelled as such.
Secondary comparisons, per-draw means and costs follow, labelled as such.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import quality

from pipeline import demo as pipeline_demo
from pipeline import registration as reg_lib
from pipeline import results
from pipeline.command_line import cli, summary
from pipeline.common import write_json, write_text
from pipeline.console import Stages
from pipeline.options import ZooOptions
from pipeline.paired import paired_table, save_paired_plot
from pipeline.registration import Registration, RegistrationError

# the code this process runs: HEAD when it started (a later commit does not change what it
# imported), recorded in every ledger it writes
CODE_COMMIT = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True).stdout.strip()


def composed_recipe(reg: Registration) -> dict:
    """The registration's recipe merged, with its seeds, targets and methods; refused when
    its content no longer hashes to the registered value."""
    cfg = quality.merge_configs([str(p) for p in reg.recipe_paths()])
    digest = reg_lib.recipe_sha256(cfg)
    if digest != reg.recipe_sha256:
        raise RegistrationError(f"registration {reg.path.name}: the recipe {reg.recipe} hashes to "
                                f"{digest}, not the registered {reg.recipe_sha256}: a recipe file "
                                "changed after registration; register a new one under a new name")
    # the registration's targets replace the recipe's of both kinds (a weight registration of
    # a recipe written for speed-ups leaves it no speed-ups)
    cfg["demo"].update(target_seeds=reg.target_seeds, methods=reg.methods,
                       speed_ups=reg.speed_ups, weight_sparsities=reg.weight_sparsities)
    return cfg


def checked(path: str) -> tuple[Registration, str, dict[int, dict]]:
    """The registration, its commit and its results, every check passed."""
    reg = reg_lib.load_registration(path)
    commit = reg_lib.registration_commit(reg)
    ledgers = reg_lib.read_ledgers(reg)
    reg_lib.check_ledgers(reg, commit, ledgers)
    return reg, commit, ledgers


def draw_record(best: Path) -> dict:
    """The metanetwork draw: its checkpoint's sha256 and its selection scores."""
    import hashlib

    verdict = json.loads((best.parent / "selection.json").read_text())
    return {"checkpoint_sha256": hashlib.sha256(best.read_bytes()).hexdigest(), **verdict}


def run(registration: str, *, data_root: str, seeds: list[int] | None = None,
        out: str | None = None, baselines_only: bool = False, draw_from: str | None = None) -> int:
    """Build what is missing and prune the registered networks.

    Args:
        registration: benchmarks/registrations/<name>.yaml
        data_root: CIFAR-10 (e.g. ../shared/data/cifar10-jpeg)
        seeds: only these registered networks
        out: work folder (default runs/registrations/<name>)
        baselines_only: train the networks and run only the methods that need no metanetwork;
            no ledger is written (a later run reuses this work)
        draw_from: a draw folder of another registration of the same zoo and meta-training
            recipe (e.g. runs/registrations/<other>/A): its metanetwork is used, not rebuilt
    """
    reg, commit, ledgers = checked(registration)
    unknown = sorted(set(seeds or []) - set(reg.target_seeds))
    if unknown:
        raise RegistrationError(f"--seeds {unknown} are not registered networks ({reg.target_seeds})")
    work = Path(out or f"runs/registrations/{reg.name}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    composed = quality.write_config(composed_recipe(reg), work)
    cfg = pipeline_demo.load_demo_config(composed)
    data = pipeline_demo.demo_data(data_root)[0]
    todo = [s for s in (seeds or reg.target_seeds) if s not in ledgers]
    groups: dict[str, list[int]] = {}
    for seed in todo:  # in order, grouped by the draw that prunes them
        draw = reg_lib.draw_of(reg, seed)
        groups.setdefault("draw" if draw is None else draw.name, []).append(seed)
    first = reg.metanetwork.draws[0].name if reg.metanetwork.draws else None
    for name, group in groups.items():
        spec = next((d for d in reg.metanetwork.draws if d.name == name), None)
        shared = None if first in (None, name) else Shared(work / first, ("zoo",))
        if draw_from:
            shared = Shared(Path(draw_from).resolve(), ("zoo", "meta"))
        if run_draw(reg, commit, cfg, data, work / name, spec, group, shared, baselines_only) != 0:
            return 1
    return 0 if baselines_only else report(registration)


@dataclass(frozen=True)
class Shared:
    """Parts of another draw folder (``zoo``, ``meta``) a draw links instead of building."""

    folder: Path
    parts: tuple[str, ...]

    def link(self, folder: Path, stages: dict[str, dict]) -> None:
        """Link each part into ``folder`` (when absent), refusing a source whose stage configs
        differ from ``stages`` in anything but the folder they live in."""
        for part in self.parts:
            theirs = self.folder / "configs" / f"{part}.yaml"
            if theirs.is_file():
                text = theirs.read_text().replace(str(self.folder), str(folder))
                if yaml.safe_load(text) != stages[part]:
                    raise RegistrationError(f"--draw_from {self.folder}: its {part} stage "
                                            f"({theirs}) differs from this recipe's; a draw is "
                                            "shared only by registrations of the same recipe")
            if not (folder / part).exists():
                (self.folder / part).mkdir(parents=True, exist_ok=True)
                (folder / part).symlink_to(self.folder / part, target_is_directory=True)


def run_draw(reg: Registration, commit: str, cfg: pipeline_demo.DemoConfig, data: dict,
             folder: Path, spec: reg_lib.Draw | None, seeds: list[int], shared: Shared | None,
             baselines_only: bool) -> int:
    """Build one draw in ``folder`` (meta-training seeded as registered; parts linked from
    ``shared`` when given) and prune ``seeds`` with it; with ``baselines_only``, no draw: the
    networks and the methods that need no metanetwork, no ledger."""
    folder.mkdir(parents=True, exist_ok=True)
    stages = pipeline_demo.demo_stage_configs(cfg, folder, data)
    if spec is not None:
        stages["meta"]["seed_everything"] = spec.meta_seed
    if shared is not None:
        shared.link(folder, stages)
    configs = pipeline_demo.write_demo_configs(folder, pipeline_demo.demo_settings(cfg, stages), stages)
    console = Stages(list(pipeline_demo.STAGES), folder / "logs")
    timed = pipeline_demo.Timings()
    best = None
    methods = [m for m in reg.methods if not (baselines_only and m == "metanetwork")]
    if "metanetwork" in methods:
        best = pipeline_demo.metanetwork_stages(cfg, stages, configs, folder, console, timed)
        assert best is not None  # one process, no DDP
        draw = {"name": folder.name, "meta_seed": stages["meta"].get("seed_everything"),
                **draw_record(best)}
        if not draw["beats_identity"] and reg.metanetwork.below_identity == "stop":
            print(f"registered.py: draw {folder.name} scores {draw['score']:.4f} <= identity "
                  f"{draw['identity_score']:.4f} on the meta-val members; the registration says "
                  "stop: nothing is run with it", file=sys.stderr)
            return 1
    else:
        draw = {"checkpoint_sha256": None}
    demo = dataclasses.replace(cfg.demo, methods=methods)
    with console.stage("pruning", len(seeds) * len(methods) * len(cfg.demo.targets), "runs") as step:
        for seed in seeds:
            target, seconds = train_target(pipeline_demo.target_config(configs),
                                           folder / "target", seed)
            reports = pipeline_demo.prune_network(demo, configs["prune"], folder, seed, target,
                                                  best, timed, step)
            if baselines_only:
                continue
            record = reg_lib.ledger(reg, commit, CODE_COMMIT, seed, reports, draw,
                                    results.measures(reports))
            record["seconds"]["target training"] = seconds
            write_json(reg.results_dir / f"seed{seed}.json", record)
            print(f"registered.py: seed{seed} done -> {reg.results_dir / f'seed{seed}.json'}",
                  file=sys.stderr)
    return 0


def train_target(config: Path, zoo: Path, seed: int) -> tuple[Path, float]:
    """One registered network trained by the recipe (reused when trained already), and the
    seconds its training took when it ran (kept in ``<zoo>/seconds.json``, so that a network
    trained by a ``--baselines_only`` process is costed by that process's clock)."""
    record = zoo / "seconds.json"
    t0 = time.perf_counter()
    _, row = pipeline_demo.zoo_member(ZooOptions(str(config), seed=seed, zoo_dir=str(zoo)))
    seconds = json.loads(record.read_text()) if record.is_file() else {}
    if str(seed) not in seconds:
        seconds[str(seed)] = round(time.perf_counter() - t0, 1)
        write_json(record, seconds)
    return zoo / row["file"], seconds[str(seed)]


def verdict_table(rows: list[reg_lib.Verdict]) -> str:
    lines = ["| comparison | networks | mean (points) | 95% CI | p | p (Holm) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for v in rows:
        if not v.difference.n:
            lines.append(f"| {v.comparison.label} | 0 | - | - | - | - | no result yet |")
            continue
        ci = v.difference.ci95
        interval = "-" if ci is None else f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"
        lines.append(f"| {v.comparison.label} | {v.difference.n} | {100 * v.difference.mean:+.2f} "
                     f"| {interval} | {v.p:.3f} | {v.p_adjusted:.3f} | **{v.verdict}** |")
    return "\n".join(lines)


def per_network(reg: Registration, ledgers: dict[int, dict]) -> str:
    """The primary comparisons' paired differences network by network (points), with the draw
    that pruned each network: the numbers the verdicts rest on."""
    diffs = reg_lib.differences(reg, ledgers, reg.primary)
    lines = ["| network | draw | " + " | ".join(c.label for c in reg.primary) + " |",
             "|---|---|" + "---|" * len(reg.primary)]
    for seed in sorted(ledgers):
        key = f"seed{seed}"  # as reg_lib.differences names a network
        cells = [f"{100 * d.differences[key]:+.2f}" if key in d.differences else "-" for d in diffs]
        draw = str(ledgers[seed]["draw"].get("checkpoint_sha256"))[:12]
        lines.append(f"| {seed} | {draw} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_draw(reg: Registration, ledgers: dict[int, dict]) -> str:
    """Each draw's networks, selection scores and mean primary differences (secondary)."""
    draws: dict[str, dict[int, dict]] = {}
    for seed, led in ledgers.items():
        draws.setdefault(str(led["draw"].get("checkpoint_sha256"))[:12], {})[seed] = led
    lines = ["| draw (checkpoint sha256) | networks | meta-val score | identity | beats identity | "
             + " | ".join(c.label for c in reg.primary) + " |",
             "|---|---|---|---|---|" + "---|" * len(reg.primary)]
    for name, group in draws.items():
        d = next(iter(group.values()))["draw"]
        means = [f"{100 * x.mean:+.2f}" if x.n else "-"
                 for x in reg_lib.differences(reg, group, reg.primary)]
        score = lambda k, d=d: f"{d[k]:.4f}" if k in d else "-"  # noqa: E731
        lines.append(f"| {name} | {sorted(group)} | {score('score')} | {score('identity_score')} "
                     f"| {d.get('beats_identity', '-')} | " + " | ".join(means) + " |")
    return "\n".join(lines)


def cost(ledgers: dict[int, dict]) -> str:
    """Mean seconds per network of each method (and of training the network)."""
    keys = sorted({k for led in ledgers.values() for k in led["seconds"]})
    mean = lambda k: statistics.fmean(led["seconds"][k] for led in ledgers.values()  # noqa: E731
                                      if k in led["seconds"])
    return ", ".join(f"{k} {mean(k):.0f} s" for k in keys)


def report(registration: str) -> int:
    """The registered verdicts from the committed results.

    Args:
        registration: benchmarks/registrations/<name>.yaml
    """
    reg, commit, ledgers = checked(registration)
    complete, status = reg_lib.completeness(reg, ledgers)
    rows = reg_lib.verdicts(reg, ledgers)
    secondary = [d for d in reg_lib.differences(reg, ledgers, reg.secondary) if d.n]
    margin = [f"{v.comparison.label}: lower end {100 * v.difference.ci95[0]:+.2f} "
              f"{'>' if v.difference.ci95[0] > -reg.margin else '<='} -{100 * reg.margin:g}"
              for v in rows if v.comparison.measure.startswith("test acc") and v.difference.ci95]
    head = ("## Registered verdicts" if complete else
            "## Interim (not a verdict: the registered run is incomplete)")
    folder = reg.path.parent / reg.name
    plot = ""
    if any(v.difference.n for v in rows):
        save_paired_plot([v.difference for v in rows], folder / "report.png",
                         f"{reg.name}: primary comparisons, per network ({status})")
        plot = "![primary comparisons](report.png)\n\n"
    text = (f"# Registered run {reg.name}\n\nRegistration: `{reg.path.name}` at commit {commit} "
            f"(registered {reg.registered}); recipe sha256 {reg.recipe_sha256[:16]}...; "
            f"{status}.\n\n{head}\n\nPaired t per comparison (two-sided), Holm over the "
            f"{len(reg.primary)} primary comparisons at level {reg.level:g}.\n\n"
            f"{verdict_table(rows)}\n\n{plot}Decision rule (registered): {reg.decision.strip()}\n\n"
            f"Per network (points; the draw is the selected checkpoint's sha256):\n\n"
            f"{per_network(reg, ledgers) if ledgers else '-'}\n\n"
            f"## Secondary (registered, not corrected)\n\nNon-inferiority margin "
            f"{100 * reg.margin:g} points on final accuracy: {'; '.join(margin) or 'no interval yet'}.\n\n"
            f"{paired_table(secondary) if secondary else ''}\n\n"
            f"## Per metanetwork draw (secondary)\n\n{per_draw(reg, ledgers)}\n\n"
            f"## Cost (mean seconds per network)\n\n{cost(ledgers) if ledgers else '-'}\n")
    write_text(folder / "report.md", text)
    write_json(folder / "report.json", {"registration_commit": commit, "complete": complete,
                                        "status": status,
                                        "primary": [reg_lib.as_record(v) for v in rows]})
    print(text)
    return 0


def freeze(*, config: list[str], out: str) -> int:
    """Merge benchmark configs into a recipe a registration owns (stage configs copied beside it).

    Args:
        config: benchmark configs, in order (e.g. [A.yaml,B.yaml])
        out: e.g. benchmarks/registrations/<name>/recipe
    """
    import shutil

    folder = Path(out)
    cfg = quality.merge_configs(config)
    stages = cfg["demo"]["configs"]
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in stages.items():
        shutil.copyfile(path, folder / f"{name}.yaml")
    cfg["demo"]["configs"] = {name: f"{name}.yaml" for name in stages}
    text = ("# A frozen recipe (benchmarks/registered.py freeze): merged from "
            f"{', '.join(Path(c).name for c in config)}; the stage configs beside it are "
            "copies.\n" + yaml.safe_dump(cfg, sort_keys=False))
    write_text(folder / "benchmark.yaml", text)
    print(reg_lib.recipe_sha256(quality.merge_configs([str(folder / "benchmark.yaml")])))
    return 0


def recipe_hash(registration: str) -> int:
    """The sha256 of the registration's recipe as it is now.

    Args:
        registration: benchmarks/registrations/<name>.yaml
    """
    reg = reg_lib.load_registration(registration)
    print(reg_lib.recipe_sha256(quality.merge_configs([str(p) for p in reg.recipe_paths()])))
    return 0


COMMANDS = {"run": run, "report": report, "hash": recipe_hash, "freeze": freeze}


def main(argv: list[str] | None = None) -> int:
    return cli(COMMANDS, argv, prog="registered.py", description=summary(__doc__))


if __name__ == "__main__":
    sys.exit(main())
