"""The gateway: the public StyleBlend service, orchestrating the three internal services."""
