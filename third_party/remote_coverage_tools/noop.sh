#!/bin/sh
# No-op: coverage is not supported in the offline Bazel set-up.
exit 0
