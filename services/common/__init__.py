"""What the four services share: the wire format, images, config, errors, the model manifest."""
