"""Fuzzing of the parsers that read what peers send: Hypothesis properties (this package, run with the
suite) and the atheris targets in `fuzz/` at the top of the repository, which reuse the drivers and the
checks of `tests.fuzz.harness` and run for as long as one wants."""
