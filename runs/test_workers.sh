#!/usr/bin/env bash
# pytest-xdist flags for the test legs: one worker per core, at most 8 (NANOCHAT_TEST_WORKERS
# overrides; 0 runs in one process). Each test file stays on one worker (--dist loadfile), so
# its module fixtures are built once. Compiling is most of the suite's time and is CPU-bound,
# so on the 2-core machine two workers take ~15 % off the wall time (bench/RESULTS.md, "Test suite").
n=${NANOCHAT_TEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}
[ "$n" -gt 8 ] && n=8
if [ "$n" -le 1 ]; then echo "-n 0"; else echo "-n $n --dist loadfile"; fi
