"""What every op shares: backend selection, input checks and the autocast rule."""
