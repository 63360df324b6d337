"""The proxy that injects an object store's faults in the tests: it lives in the package
(deeprecognition/netsim.py), where `deeprec bench checkpoint` uses its slow link too."""

from deeprecognition.bench.netsim import FaultProxy

__all__ = ["FaultProxy"]
