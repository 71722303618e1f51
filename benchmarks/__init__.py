"""Speed and memory benchmarks of deqrobust (``python -m benchmarks`` / ``make bench``).

Every figure is a ratio measured in one run on this machine (median of repeats), so it stays
meaningful on a noisy 2-core box. Each figure runs in its own process, once with the glibc malloc
tuning the CLI uses and once without. See docs/performance.md.
"""
