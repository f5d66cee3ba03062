#!/bin/bash
# readme-examples.sh: every ```sql block of README.md runs as shown.
#
# Usage: test/pg/readme-examples.sh   (with PGHOST, PGPORT, PGUSER of a
# running test cluster where osv5m is installed, as test/run sets them)
#
# The blocks run in README order, each in a new session, in a fresh
# database readme_examples, after two substitutions: the model directory of
# the examples, /srv/osv5m/baseline, becomes the test model tiny-gelu, and
# /path/to/photo.jpg a test image.  A block passes when psql runs it
# without error.  The last line is "readme examples: N passed, N failed".
set -u
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
MODEL=$ROOT/test/models/tiny-gelu
PHOTO=$ROOT/test/data/images/jpeg_224x224.jpg
DB=readme_examples
WORK=$ROOT/build/readme-examples
rm -rf "$WORK"
mkdir -p "$WORK"

passed=0
failed=0

# Split README.md into one file per ```sql block, with the substitutions.
awk -v dir="$WORK" -v model="$MODEL" -v photo="$PHOTO" '
	/^```sql[ \t]*$/ { n++; file = sprintf("%s/block%02d.sql", dir, n); inside = 1; next }
	/^```/ && inside { inside = 0; close(file); next }
	inside { gsub("/srv/osv5m/baseline", model); gsub("/path/to/photo.jpg", photo); print > file }
' README.md

psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB" || {
	echo "readme examples: 0 passed, 1 failed"
	exit 1
}

for block in "$WORK"/block*.sql; do
	name=$(basename "$block" .sql)
	first=$(grep -m1 -v '^\s*--' "$block" | cut -c1-60)
	if psql -X -q -v ON_ERROR_STOP=1 -d "$DB" -f "$block" >"$block.out" 2>&1; then
		echo "ok - $name: $first"
		passed=$((passed + 1))
	else
		echo "FAIL - $name: $first"
		sed 's/^/    /' "$block.out" | tail -n 5
		failed=$((failed + 1))
	fi
done

# the examples' ALTER SYSTEM must not leak into the other tests
psql -X -q -d postgres -c "ALTER SYSTEM RESET osv5m.model_path" -c "SELECT pg_reload_conf()" >/dev/null
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $DB" >/dev/null

echo "readme examples: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
