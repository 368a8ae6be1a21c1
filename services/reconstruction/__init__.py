"""The reconstruction service: the Gatys optimisation in PyTorch, streaming previews."""
