"""The command line's commands, one module each (limner.cli assembles them into the `limner` app)."""
