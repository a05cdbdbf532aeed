# Shared by bench/compare-*.sh (sourced, with a name for the temporary directory): the work
# directory, the processes started there (killed by process id at exit, with the directory),
# and the median of the numbers on standard input.
WORK=$(mktemp -d -t "$1-XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
