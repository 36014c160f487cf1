"""Orchestration of the pruning pipeline (docs/method.md) behind ``prune.py``: each command
chains ordinary Lightning runs (built by ``pipeline.train.main`` from YAML configs) with the callbacks of
callbacks/. ``cli`` (the command line), ``zoo``, ``run`` (prune one network), ``demo`` (the
whole pipeline), ``common`` (configs, stages, atomic result files), ``command_line`` (command
lines from typed functions: benchmarks/ and prune.py's shared pieces). Importing this package
loads no torch: finished runs are answered from their files alone."""
