"""Data plane between attention and expert workers: placement, wire format, dispatch and serve loops."""
