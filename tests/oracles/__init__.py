"""Reference implementations that the tests and benchmarks compare the package against; not shipped in distill/."""
