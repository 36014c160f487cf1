"""Census of the graph encoding over torchvision's classification models (issue 15) or over a
fixed list of timm classifiers across families (issue 29).

    python benchmarks/census.py [--source torchvision|timm] [--max_params 40] [--size 224] \
        [--swaps 4] [--models [resnet18,vgg11]] [--out runs/census[_timm].jsonl] \
        [--table runs/census[_timm].md]

Inputs are ``--size`` pixels square, by default each model's own default (timm's
``pretrained_cfg['input_size']``; 224 for torchvision).

Each model is built untrained (10 classes, its own random init, zero-initialized weight tensors
such as a ViT's head drawn at random so that every layer reaches the output; no download),
then, unless ``--perturb false``, every weight and statistic moved off its initial value so
that no two entries are equal by construction (an encoding that shares one feature column
between two constant-initialized tensors would otherwise round-trip), encoded and checked by
``graph.check_encoding`` in a fresh subprocess (so that peak memory is the model's own): exact
(bit-exact round trip, same outputs, every node swap tried that maps the graph onto itself is a
symmetry of the network), refused (with the reason the encoder gives), wrong or crash. It
records the parameter count, graph size, the time and the peak memory (resident set growth) of
trace + encode alone. Results are appended to ``--out`` one line per model, so a rerun resumes
where the last one stopped; ``--table`` gets the markdown table (docs/graph.md quotes it).
Training-only auxiliary classifiers (GoogLeNet, Inception v3) are built without them
(``aux_logits=False``), as they are never part of the network that gets pruned.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt

from pipeline.command_line import cli, summary

# constructor arguments that leave out training-only branches (their weights are unused at
# inference, which the encoder refuses with that reason)
_BUILD_ARGS = {"googlenet": {"aux_logits": False, "init_weights": False},
               "inception_v3": {"aux_logits": False, "init_weights": False}}
# the input size a model needs when it is not --size (Inception v3 wants at least 75 pixels)
_MIN_SIZE = {"inception_v3": 299}
# timm classifiers across families, fixed before the census ran (so its count means something):
# CNNs of every timm family up to ~30M parameters, then attention, MLP and hybrid models.
TIMM_MODELS = (
    "resnet18", "resnet26d", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "res2net50_14w_8s",
    "resnest14d", "ecaresnet26t", "skresnet18", "gcresnet33ts", "selecsls42b", "regnetx_002",
    "regnety_002", "regnetz_b16", "densenet121", "dpn68", "cspresnet50", "cspdarknet53",
    "ese_vovnet19b_dw", "vovnet39a", "dla34", "hrnet_w18_small", "efficientnet_b0",
    "efficientnet_lite0", "efficientnetv2_rw_t", "tf_efficientnetv2_b0", "mixnet_s", "mnasnet_100",
    "mobilenetv2_100", "mobilenetv3_small_100", "mobilenetv3_large_100", "mobilenetv4_conv_small",
    "lcnet_050", "fbnetc_100", "spnasnet_100", "tinynet_a", "ghostnet_100", "ghostnetv2_100",
    "rexnet_100", "hardcorenas_a", "convnext_atto", "convnext_femto", "convnext_nano",
    "convnextv2_atto", "repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "hgnetv2_b0",
    "hgnet_tiny", "starnet_s1", "xception41", "inception_v3", "nf_resnet26", "nf_regnet_b0",
    "eca_nfnet_l0", "botnet26t_256", "halonet26t", "sebotnet33ts_256", "efficientvit_m0",
    "efficientvit_b0", "efficientformer_l1", "efficientformerv2_s0", "vit_tiny_patch16_224",
    "deit_tiny_patch16_224", "vit_small_patch16_224", "deit3_small_patch16_224",
    "swin_tiny_patch4_window7_224", "pvt_v2_b0", "poolformer_s12", "coat_tiny", "levit_128s",
    "mobilevit_xxs", "mobilevitv2_050", "edgenext_xx_small", "tiny_vit_5m_224", "resmlp_12_224",
    "mixer_s32_224", "gmlp_ti16_224", "crossvit_tiny_240", "cait_xxs24_224", "convmixer_768_32",
)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _perturb(model) -> None:
    """Every parameter and floating-point buffer moved off its initial value entry by entry
    (scaled by exp(N(0, 0.05^2)), plus N(0, 1e-3^2) where not a variance), so that no two
    entries are equal by construction: an encoding that put two of them in one feature column
    (layer scales initialized to one constant, BN statistics at 0 and 1) would otherwise still
    round-trip bit for bit."""
    import torch

    for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point() or not tensor.numel():
            continue
        tensor.mul_(torch.exp(0.05 * torch.randn_like(tensor)))
        if not key.endswith("running_var"):
            tensor.add_(1e-3 * torch.randn_like(tensor))


def census_one(name: str, size: int | None, swaps: int, perturb: bool = True) -> dict:
    """Build, encode and check one model (run in its own process)."""
    import torch
    from torch import nn

    import networks
    from graph import NetworkGraph
    from graph.check import check_encoding

    torch.manual_seed(0)
    model: nn.Module = networks.build(name, 10, **_BUILD_ARGS.get(name, {})).eval()
    with torch.no_grad():  # zero-initialized weights (a ViT's head) would hide what follows
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, p.shape[-1] ** -0.5)
        if perturb:
            _perturb(model)
    params = sum(p.numel() for p in model.parameters())
    if size is None:  # the model's own default input (timm records it; torchvision: 224)
        size = int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1])
    size = max(size, _MIN_SIZE.get(name, 0))
    example = torch.randn(1, 3, size, size)
    before = _peak_mb()
    start = time.perf_counter()
    timing: dict = {}
    try:
        NetworkGraph.from_module(model, example).encode(model)
        timing = {"encode_s": round(time.perf_counter() - start, 2),
                  "encode_peak_mb": round(_peak_mb() - before)}
    except Exception:  # noqa: BLE001 - the check below gives the verdict and its reason
        pass
    # the check traces again: the cached graph holds the edge structure encoding built, which
    # the check does not need (ViT-H/14: 11 GB)
    NetworkGraph.clear_cache()
    verdict = check_encoding(model, example, swaps=swaps)
    return {"model": name, "params_m": round(params / 1e6, 1), "size": size,
            "status": verdict.status, "reason": verdict.reason, "nodes": verdict.nodes,
            "edges": verdict.edges, "swaps": verdict.swaps, **timing}


def _short(reason: str) -> str:
    """The encoder's reason without the pointer to the docs (the table is in the docs); where
    both walkers refuse, the ATen walk's reason (the last walker tried, and the one that
    models every spelling of an operation), the full text being in the jsonl file."""
    reason = reason.split("torch.export: ", 1)[-1]
    return reason.split(". docs/graph.md")[0].replace("|", "/").replace("\n", " ")


def census_table(rows: list[dict]) -> str:
    lines = ["| model | params (M) | input | verdict | nodes | edges | swaps | trace+encode s | "
             "peak MB | reason |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["status"], r["model"])):
        lines.append(f"| {r['model']} | {r['params_m']} | {r['size']} | {r['status']} | "
                     f"{r['nodes'] or ''} | {r['edges'] or ''} | {r['swaps'] if r['nodes'] else ''} | "
                     f"{r.get('encode_s', '')} | {r.get('encode_peak_mb', '')} | {_short(r['reason'])} |")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("exact", "refused", "wrong", "crash")}
    return "\n".join(lines) + "\n\n" + ", ".join(f"{n} {s}" for s, n in counts.items()) + "\n"


def census(*, source: Literal["torchvision", "timm"] = "torchvision",
           max_params: PositiveFloat | None = None, size: PositiveInt | None = None,
           swaps: NonNegativeInt = 4, models: list[str] | None = None, out: Path | None = None,
           table: Path | None = None, one: str | None = None, perturb: bool = True) -> int:
    """The census: every model checked in a process of its own, the table written.

    Args:
        source: torchvision's classifiers, or the fixed timm list TIMM_MODELS
        max_params: skip models with more parameters (millions); default: all
        size: input height and width (default: each model's own default)
        swaps: node swaps tried per model
        models: only these models (default: all)
        out: default runs/census[_timm].jsonl
        table: default runs/census[_timm].md
        one: internal: the child process that checks this one model and prints its row
        perturb: move every weight and statistic off its initial value first (``_perturb``)
    """
    if one:
        print(json.dumps(census_one(one, size, swaps, perturb)))
        return 0
    import torchvision

    import networks

    suffix = "_timm" if source == "timm" else ""
    out = out or Path(f"runs/census{suffix}.jsonl")
    table_file = table or Path(f"runs/census{suffix}.md")
    names = models or ([f"timm:{n}" for n in TIMM_MODELS] if source == "timm"
                       else torchvision.models.list_models(module=torchvision.models))
    done = {}
    if out.exists():
        done = {r["model"]: r for r in map(json.loads, out.read_text().splitlines())}
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        if name in done:
            continue
        if max_params is not None:
            params = sum(p.numel() for p in networks.build(name, 10, **_BUILD_ARGS.get(name, {}))
                         .parameters()) / 1e6
            if params > max_params:
                print(f"[{i + 1}/{len(names)}] {name}: {params:.0f}M parameters, skipped")
                continue
        size_args = [] if size is None else ["--size", str(size)]
        child = subprocess.run([sys.executable, __file__, "--one", name, *size_args,
                                "--swaps", str(swaps), f"--perturb={str(perturb).lower()}"],
                               capture_output=True, text=True)
        if child.returncode != 0:
            last = [line for line in child.stderr.splitlines() if "warn" not in line.lower()]
            why = (f"killed by signal {-child.returncode} (out of memory?)" if child.returncode < 0
                   else last[-1] if last else f"exit status {child.returncode}")
            row = {"model": name, "params_m": 0, "size": size or 0, "status": "crash",
                   "reason": f"the check's process failed: {why}", "nodes": 0, "edges": 0,
                   "swaps": 0}
        else:
            row = json.loads(child.stdout.strip().splitlines()[-1])
        done[name] = row
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{i + 1}/{len(names)}] {name}: {row['status']} {_short(row['reason'])[:120]}",
              flush=True)
    text = census_table(list(done.values()))
    table_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = table_file.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(table_file)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(census, argv, prog="census.py", description=summary(__doc__))


if __name__ == "__main__":
    sys.exit(main())
