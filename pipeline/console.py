"""What our commands print: a quiet console by default, everything with ``--verbose``.

Quiet means: Lightning's info messages (seed, accelerators, tips, model summaries) and a few
known third-party warnings that nobody can act on are not shown, and the demo prints one line
per stage, a numbered header with a progress bar ("[3/5] meta-training: 100%|###| 1/1"), while
each stage's own output (training progress bars, per-stage summaries, remaining warnings)
goes to ``<out>/logs/<stage>.log``. Only the entry point (``prune.py``'s ``pipeline.cli.cli``)
calls :func:`configure`; library code never changes warning filters or log levels.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator, TextIO

# Third-party warnings filtered in quiet mode (message patterns), each with why it is noise here.
KNOWN_NOISE = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of torch internals
    r"`torch.jit.script` is deprecated",  # raised while importing torchvision/torchmetrics
    r"The number of training batches .* is smaller than the logging interval",  # CPU-sized epochs
    r".*does not have many workers",  # decoded images in memory: workers would only add overhead
    r"LightningCLI's args parameter",  # we pass configs as args on purpose (pipeline stages)
)
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
# Third-party loggers quieted to errors in quiet mode, each with why its warnings are noise here.
QUIET_LOGGERS = (
    "torch.utils.cpp_extension",  # "No CUDA runtime is found" on every CPU machine, imported by
                                  # torch.utils.benchmark (latency timing); we build no extension
)

_verbose = True  # library default: nothing hidden unless an entry point asks for it


def configure(verbose: bool) -> None:
    """Quiet (``verbose=False``) or everything; called once by an entry point. Quiet disables
    info-level logging (Lightning resets its own loggers' levels when imported, so levels
    cannot do it) and filters :data:`KNOWN_NOISE`."""
    global _verbose
    _verbose = verbose
    logging.disable(logging.NOTSET if verbose else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    if not verbose:
        for pattern in KNOWN_NOISE:
            warnings.filterwarnings("ignore", message=pattern)


@contextlib.contextmanager
def _captured(log: TextIO) -> Iterator[None]:
    """Everything a stage writes, its Lightning log messages included, into ``log``."""
    import lightning.pytorch  # noqa: F401  (its log handler must exist before streams move)

    consoles = {id(sys.stdout), id(sys.stderr), id(sys.__stdout__), id(sys.__stderr__)}
    handlers = [h for name in LIGHTNING_LOGGERS for h in logging.getLogger(name).handlers
                if type(h) is logging.StreamHandler]  # Lightning's own console handlers
    handlers += [h for h in logging.getLogger().handlers
                 if type(h) is logging.StreamHandler and id(h.stream) in consoles]
    streams = [h.setStream(log) for h in handlers]
    disabled = logging.root.manager.disable
    logging.disable(logging.NOTSET)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        logging.disable(disabled)
        for handler, stream in zip(handlers, streams):
            handler.setStream(stream)


class Stages:
    """Numbered stages of a long command, each one console line with a progress bar.

    ``with stages.stage("meta-training", total=1) as step:`` prints ``[k/N] meta-training``
    with a bar that ``step()`` advances; in quiet mode the stage's own stdout/stderr go to
    ``<log_dir>/<slug>.log`` (appended; its path is printed when the stage fails).
    """

    def __init__(self, names: list[str], log_dir: Path, console: TextIO | None = None) -> None:
        self.names, self.log_dir = list(names), Path(log_dir)
        self.console = console or sys.stderr

    def log_file(self, name: str) -> Path:
        return self.log_dir / (name.replace(" ", "_") + ".log")

    @contextlib.contextmanager
    def stage(self, name: str, total: int, unit: str = "step") -> Iterator[Callable[[], None]]:
        from tqdm import tqdm

        header = f"[{self.names.index(name) + 1}/{len(self.names)}] {name}"
        if _verbose:
            print(f"\n{header}", file=self.console, flush=True)
            yield lambda: None
            return
        log = self.log_file(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=total, desc=header, unit=unit, file=self.console, dynamic_ncols=True,
                   bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} {unit} "
                              "[{elapsed}]")
        try:
            with open(log, "a") as f, _captured(f):
                yield bar.update
        except BaseException:
            bar.close()
            print(f"{header} failed; its output: {log}", file=self.console, flush=True)
            raise
        bar.close()
