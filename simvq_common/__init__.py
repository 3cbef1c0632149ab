"""What both stages need, one home each: configs, errors, atomic I/O, checkpoints, run directories, artifact
kinds, fingerprints, provenance, distribution (the one module that talks to torch.distributed), numerics, downloads.

Import the module you need (`from simvq_common import distributed`); nothing is imported here.
"""
