"""spotd: a Spot-lifecycle daemon for Kubernetes on AWS."""

__version__ = "0.1.0"
