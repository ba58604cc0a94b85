"""Model code and Ray worker actors: layers, checkpoint IO, KV cache, attention and expert workers."""
