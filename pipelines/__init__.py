"""The jobs that compose the stages (pretokenize, sample, evaluate, run, verify) and the `simvq` CLI.

Each job is `from pipelines.<job> import <job>` with its schema in pipelines.config; nothing is imported here,
so that `simvq --help` starts without torch.
"""
