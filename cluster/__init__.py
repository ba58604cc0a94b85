"""Cluster control plane: coordinator, scheduler, gRPC frontend, CLI and Ray bootstrap."""
