#!/bin/sh
# Runs promtool with the given arguments; exits 77 (skipped) where it is not installed.
command -v promtool >/dev/null || { echo "SKIP: promtool not installed (Debian package prometheus)"; exit 77; }
exec promtool "$@"
