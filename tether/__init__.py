"""The ``tether`` console command (the product's code lives in edge, cloud and shared)."""
