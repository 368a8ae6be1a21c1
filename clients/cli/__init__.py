"""The `styleblend` command: start the graph, blend images, export feature models."""
