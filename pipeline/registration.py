"""Registered comparisons: what a confirmatory run may claim, fixed before its networks exist.

A registration is a YAML file in the repository (``benchmarks/registrations/<name>.yaml``,
format in docs/registration.md) naming the recipe (benchmark configs, merged in order, and the
sha256 of their composed content), the fresh network seeds, how the metanetwork is drawn, the
primary comparisons, the level and the correction. ``benchmarks/registered.py`` runs one only
when the file is committed and unchanged; every result it writes (one ledger per network,
``benchmarks/registrations/<name>/results/seed<N>.json``) records the commit that last changed
the registration, and a registration whose commit no longer matches its results is refused: it
cannot be edited once results exist (register a new one under another name instead).

The analysis is fixed here, not in the report: paired differences per network, a two-sided
paired t test per primary comparison, Holm's correction over the primary family, and a
verdict per comparison only when every registered network has a result from at least
``metanetwork.min_draws`` metanetwork draws.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metaprune.errors import UserError

from .config_files import load_config_file
from .paired import PairedDifference

LEDGER_FORMAT = "metaprune.registered_result/v1"
BELOW_IDENTITY = ("checkpoint", "stop")


class RegistrationError(UserError):
    """A registration that cannot be run or analysed: the message names the file and the fix."""


@dataclass(frozen=True)
class Comparison:
    """``first - second`` on ``measure`` (a key of ``pipeline.demo.measures``)."""

    measure: str
    first: str
    second: str

    @property
    def label(self) -> str:
        return f"{self.measure}: {self.first} - {self.second}"


@dataclass
class Draw:
    """One metanetwork draw: meta-training seeded with ``meta_seed`` (the recipe's zoo,
    shared by every draw) and the registered networks it prunes. Its folder is
    ``<run folder>/<name>``."""

    name: str
    meta_seed: int
    networks: list[int]


@dataclass
class MetanetworkDraw:
    """How the metanetwork arm gets its metanetwork.

    Args:
        rule: in words, how a draw is made (recorded, not interpreted).
        below_identity: what happens when the selected checkpoint scores no better than the
            identity on the meta-val members: "checkpoint" (use it anyway; every result records
            it) or "stop" (run nothing with this draw).
        min_draws: verdicts need results from at least this many different draws.
        draws: which draw prunes which networks (together, every registered network once);
            empty: one draw per machine, with the recipe's meta-training seed, folder ``draw``.
    """

    rule: str
    below_identity: str = "checkpoint"
    min_draws: int = 2
    draws: list[Draw] = field(default_factory=list)


@dataclass
class Registration:
    """A registration file's content (docs/registration.md)."""

    name: str
    registered: str
    recipe: list[str]
    recipe_sha256: str
    target_seeds: list[int]
    methods: list[str]
    metanetwork: MetanetworkDraw
    primary: list[Comparison]
    speed_ups: list[float] = field(default_factory=list)
    weight_sparsities: list[float] = field(default_factory=list)
    secondary: list[Comparison] = field(default_factory=list)
    level: float = 0.05
    correction: str = "holm"
    margin: float = 0.005
    decision: str = ""
    path: Path = Path()

    @property
    def results_dir(self) -> Path:
        """Where the ledgers go: ``<registration folder>/<name>/results``."""
        return self.path.parent / self.name / "results"

    def recipe_paths(self) -> list[Path]:
        return [(self.path.parent / r).resolve() for r in self.recipe]


def load_registration(path: str | Path) -> Registration:
    """Read and check a registration file."""
    path = Path(path).resolve()
    where = f"registration {str(path)!r}"
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RegistrationError(f"{where} cannot be read: {e}") from None
    if not isinstance(raw, dict):
        raise RegistrationError(f"{where}: expected a mapping of keys (docs/registration.md)")
    try:
        meta = dict(raw["metanetwork"])
        meta["draws"] = [Draw(**d) for d in meta.get("draws") or []]
        raw["metanetwork"] = MetanetworkDraw(**meta)
        for key in ("primary", "secondary"):
            raw[key] = [Comparison(**c) for c in raw.get(key) or []]
        reg = Registration(**raw, path=path)
    except (KeyError, TypeError) as e:
        raise RegistrationError(f"{where}: {e}; its keys are listed in docs/registration.md") from None
    if reg.name != path.stem:
        raise RegistrationError(f"{where}: name {reg.name!r} must equal the file's stem {path.stem!r}")
    if reg.metanetwork.below_identity not in BELOW_IDENTITY:
        raise RegistrationError(f"{where}: metanetwork.below_identity "
                                f"{reg.metanetwork.below_identity!r}: one of {list(BELOW_IDENTITY)}")
    check_draws(reg, where)
    if reg.correction != "holm":
        raise RegistrationError(f"{where}: correction {reg.correction!r}: only 'holm' is implemented")
    if not reg.primary:
        raise RegistrationError(f"{where}: primary must name at least one comparison")
    if bool(reg.speed_ups) == bool(reg.weight_sparsities):
        raise RegistrationError(f"{where}: name the targets as speed_ups or as weight_sparsities "
                                f"(exactly one of them, a non-empty list)")
    missing = [str(p) for p in reg.recipe_paths() if not p.is_file()]
    if missing:
        raise RegistrationError(f"{where}: recipe files {missing} do not exist")
    return reg


def check_draws(reg: Registration, where: str) -> None:
    """The draws partition the registered networks, with distinct names and seeds, and are
    at least ``min_draws`` when listed."""
    draws = reg.metanetwork.draws
    if not draws:
        return
    networks = [s for d in draws for s in d.networks]
    if sorted(networks) != sorted(reg.target_seeds):
        raise RegistrationError(f"{where}: metanetwork.draws must list every registered network "
                                f"once; they list {sorted(networks)}, target_seeds are "
                                f"{sorted(reg.target_seeds)}")
    for key in ("name", "meta_seed"):
        values = [getattr(d, key) for d in draws]
        if len(set(values)) != len(values):
            raise RegistrationError(f"{where}: metanetwork.draws: each draw needs its own {key}, "
                                    f"got {values}")
    if len(draws) < reg.metanetwork.min_draws:
        raise RegistrationError(f"{where}: metanetwork.draws lists {len(draws)} draw(s), fewer "
                                f"than min_draws {reg.metanetwork.min_draws}")


def draw_of(reg: Registration, seed: int) -> Draw | None:
    """The registered draw that prunes network ``seed`` (None: one draw per machine)."""
    return next((d for d in reg.metanetwork.draws if seed in d.networks), None)


def recipe_sha256(composed: dict) -> str:
    """The sha256 of a composed benchmark config with the stage configs it names read in (so
    the hash is of content, not of a machine's paths; component files composed in)."""
    content = json.loads(json.dumps(composed))
    configs = content.get("demo", {}).get("configs", {})
    content["demo"]["configs"] = {k: load_config_file(v, RegistrationError, "stage")
                                  for k, v in sorted(configs.items())}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise RegistrationError(f"git {' '.join(args)} failed in {cwd}: {result.stderr.strip()}")
    return result.stdout.strip()


def registration_commit(reg: Registration) -> str:
    """The commit that last changed the registration file, once the file and its recipe are
    committed and unchanged in the work tree; refused otherwise."""
    top = Path(_git(reg.path.parent, "rev-parse", "--show-toplevel"))
    files = [reg.path, *reg.recipe_paths()]
    for f in files:
        rel = str(f.relative_to(top))
        if subprocess.run(["git", "ls-files", "--error-unmatch", rel], cwd=top,
                          capture_output=True).returncode:
            raise RegistrationError(f"{rel} is not committed: a registration and its recipe run only "
                                    "from a commit (git add, git commit), so that the results can "
                                    "name it")
        if _git(top, "status", "--porcelain", "--", rel):
            raise RegistrationError(f"{rel} has uncommitted changes: commit them (a new "
                                    "registration) or restore the file; a registration runs only "
                                    "as committed")
    return _git(top, "log", "-1", "--format=%H", "--", str(reg.path.relative_to(top)))


def read_ledgers(reg: Registration) -> dict[int, dict]:
    """Every result of the registration, by network seed."""
    ledgers = {}
    for f in sorted(reg.results_dir.glob("seed*.json")):
        ledger = json.loads(f.read_text())
        ledgers[int(ledger["seed"])] = ledger
    return ledgers


def check_ledgers(reg: Registration, commit: str, ledgers: dict[int, dict]) -> None:
    """Every result must come from this registration as committed now: a registration changed
    after its results exist is refused."""
    for seed, ledger in ledgers.items():
        if ledger.get("registration_commit") != commit or ledger.get("recipe_sha256") != reg.recipe_sha256:
            raise RegistrationError(
                f"registration {reg.path.name} changed after results exist: "
                f"{reg.results_dir / f'seed{seed}.json'} records registration commit "
                f"{ledger.get('registration_commit')} and recipe {ledger.get('recipe_sha256')}, the "
                f"file's last change is {commit} with recipe {reg.recipe_sha256}. A registration "
                "is fixed once it has results: register a new one under a new name")
        if ledger.get("seed") not in reg.target_seeds:
            raise RegistrationError(f"{reg.results_dir / f'seed{seed}.json'}: seed {seed} is not "
                                    f"a registered network ({reg.target_seeds})")


def ledger(reg: Registration, commit: str, code_commit: str, seed: int, reports: dict[str, dict],
           draw: dict, measures: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """One network's result record: its measures per method, the draw it was pruned with, the
    registration commit and the code commit, and the seconds each method cost."""
    network = f"seed{seed}"
    values = {m: {method: per[network] for method, per in by_method.items() if network in per}
              for m, by_method in measures.items()}
    seconds: dict[str, float] = {}
    for r in reports.values():
        seconds[r["method"]] = round(seconds.get(r["method"], 0.0) + r["time_s"], 1)
    return {"format": LEDGER_FORMAT, "registration": reg.name, "registration_commit": commit,
            "recipe_sha256": reg.recipe_sha256, "code_commit": code_commit, "seed": seed,
            "draw": draw, "values": values, "seconds": seconds}


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def paired_p(d: PairedDifference) -> float:
    """Two-sided p-value of the paired t test of ``d`` (mean difference 0)."""
    from scipy.stats import ttest_1samp

    values = list(d.differences.values())
    if len(set(values)) == 1:
        return 1.0 if values[0] == 0 else 0.0
    return float(ttest_1samp(values, 0.0).pvalue)


@dataclass
class Verdict:
    """One registered comparison, analysed."""

    comparison: Comparison
    difference: PairedDifference
    p: float
    p_adjusted: float
    verdict: str


def differences(reg: Registration, ledgers: dict[int, dict], comparisons: list[Comparison]
                ) -> list[PairedDifference]:
    """The paired differences of ``comparisons`` over the networks that have both methods."""
    out = []
    for c in comparisons:
        diffs = {}
        for seed, led in sorted(ledgers.items()):
            per = led["values"].get(c.measure, {})
            if c.first in per and c.second in per:
                diffs[f"seed{seed}"] = per[c.first] - per[c.second]
        out.append(PairedDifference(c.first, c.second, c.measure, diffs))
    return out


def verdicts(reg: Registration, ledgers: dict[int, dict]) -> list[Verdict]:
    """The primary family: paired t per comparison, Holm-adjusted, a verdict each."""
    diffs = differences(reg, ledgers, reg.primary)
    ps = [paired_p(d) if d.n >= 2 else 1.0 for d in diffs]
    rows = []
    for c, d, p, q in zip(reg.primary, diffs, ps, holm(ps)):
        if q < reg.level:
            text = f"{c.first} better" if d.mean > 0 else f"{c.second} better"
        else:
            text = "no difference shown"
        rows.append(Verdict(c, d, p, q, text))
    return rows


def completeness(reg: Registration, ledgers: dict[int, dict]) -> tuple[bool, str]:
    """Whether verdicts may be read: every registered network has a result, from at least
    ``min_draws`` draws; and a line saying where the run stands."""
    done = sorted(set(ledgers) & set(reg.target_seeds))
    draws = {led["draw"].get("checkpoint_sha256") for led in ledgers.values()}
    complete = len(done) == len(reg.target_seeds) and len(draws) >= reg.metanetwork.min_draws
    return complete, (f"{len(done)} of {len(reg.target_seeds)} registered networks, "
                      f"{len(draws)} metanetwork draw(s) (at least {reg.metanetwork.min_draws} "
                      "registered)")


def as_record(v: Verdict) -> dict:
    """A verdict as JSON."""
    ci = v.difference.ci95
    return {**asdict(v.comparison), "n": v.difference.n,
            "mean": v.difference.mean if v.difference.n else None,
            "ci95": list(ci) if ci else None, "p": v.p, "p_holm": v.p_adjusted, "verdict": v.verdict}
