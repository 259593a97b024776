"""The Notice record and its sources: IMDS polling and parsing (no Kubernetes here)."""
