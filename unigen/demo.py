"""`make demo`: the showcase of the fused loss (the training demo replaces it once it lands)."""

from unigen.demos.fused_loss import main

if __name__ == "__main__":
    main()
