#!/usr/bin/env bash
# Formats the C++ sources tracked by git (*.cpp, *.hpp, *.hpp.in under src/, include/ and
# tests/) with .clang-format, using clang-format 14 exactly (Debian 12's clang-format-14;
# other versions format differently, so no other binary is used).
#   scripts/format.sh           reformat the files in place
#   scripts/format.sh --check   change nothing; list the files that differ, exit 1 if any
set -euo pipefail
cd "$(dirname "$0")/.."

mode=fix
case "${1:-}" in
  "") ;;
  --check) mode=check ;;
  *) echo "usage: $0 [--check]" >&2; exit 64 ;;
esac
[ $# -le 1 ] || { echo "usage: $0 [--check]" >&2; exit 64; }

cf=clang-format-14
if ! command -v "$cf" >/dev/null; then
  echo "format: $cf not found: install the Debian package clang-format-14 (scripts/deps.sh test)" >&2
  exit 1
fi

files=()
while IFS= read -r -d '' f; do files+=("$f"); done \
  < <(git ls-files -z -- 'src/*.cpp' 'src/*.hpp' 'include/*.hpp' 'include/*.hpp.in' 'tests/*.cpp' 'tests/*.hpp')
[ ${#files[@]} -gt 0 ] || { echo "format: no C++ files found" >&2; exit 1; }

if [ "$mode" = fix ]; then
  "$cf" -i --style=file -- "${files[@]}"
  echo "format: formatted ${#files[@]} files with $("$cf" --version | sed 's/.*version //')"
  exit 0
fi

bad=()
for f in "${files[@]}"; do
  "$cf" --dry-run --Werror --style=file -- "$f" >/dev/null 2>&1 || bad+=("$f")
done
if [ ${#bad[@]} -gt 0 ]; then
  echo "format: ${#bad[@]} of ${#files[@]} files differ from .clang-format ($cf); run scripts/format.sh:" >&2
  printf '  %s\n' "${bad[@]}" >&2
  exit 1
fi
echo "format: ${#files[@]} files ok ($cf)"
