"""Typed errors of the cluster's control plane, carrying what an operator needs to act."""


class ClusterError(RuntimeError):
    """Base class of cluster errors."""


class ClusterStartError(ClusterError):
    """Workers could not be placed or loaded (missing resources, bad checkpoint, timeout)."""


class WorkerFailure(ClusterError):
    """A worker died or a step failed on it (e.g. an expert worker stopped answering)."""
