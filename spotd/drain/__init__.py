"""The drain engine the agent and the controller share: which pods to evict (plan, pure) and the eviction
loop against the API server (executor)."""
