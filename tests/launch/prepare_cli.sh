#!/usr/bin/env bash
# loom-prepare: text and .jsonl inputs give an indexed dataset of the right
# sizes (u16 ids: 2 bytes per text byte plus one EOD per document); bad input
# is exit code 2 with one line on stderr naming the file and the problem.
set -u
bin=$1
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fails=0; passes=0
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
expect_size() {  # expect_size FILE BYTES
  local got; got=$(stat -c %s "$1" 2>/dev/null || echo missing)
  if [ "$got" = "$2" ]; then passes=$((passes + 1)); else fail "$1 is $got bytes, wanted $2"; fi
}
expect_error() {  # expect_error "substring" args...
  local want=$1; shift
  "$bin" "$@" >"$tmp/out" 2>"$tmp/err"; local rc=$?
  local lines; lines=$(wc -l <"$tmp/err")
  if [ $rc -ne 2 ] || [ "$lines" -ne 1 ] || ! grep -qF -- "$want" "$tmp/err"; then
    fail "loom-prepare $* -> rc $rc, stderr:"; cat "$tmp/err"; echo "(wanted exit 2 and one line containing: $want)"
  else
    passes=$((passes + 1))
  fi
}

# Plain text: 3 documents of 5 + 13 + 3 = 21 bytes (the empty line is skipped).
printf 'hello\nhéllo wörld\n\nxyz' >"$tmp/a.txt"
if "$bin" --input "$tmp/a.txt" --output-prefix "$tmp/a" 2>"$tmp/err"; then
  expect_size "$tmp/a.bin" $((2 * (21 + 3)))
  expect_size "$tmp/a.idx" $((34 + 12 * 3 + 8 * 4))
  grep -qF "done: $tmp/a.{bin,idx} | 3 documents, 24 tokens" "$tmp/err" && passes=$((passes + 1)) || fail "summary: $(cat "$tmp/err")"
else
  fail "text input: $(cat "$tmp/err")"
fi

# JSON lines, --json-key, escapes decoded before tokenizing: "a\nb" is 3 bytes.
printf '{"body": "one two", "id": 1}\n{"id": 2, "body": "a\\nb"}\n' >"$tmp/b.jsonl"
if "$bin" --input "$tmp/b.jsonl" --output-prefix "$tmp/b" --json-key body 2>"$tmp/err"; then
  expect_size "$tmp/b.bin" $((2 * (7 + 3 + 2)))
  expect_size "$tmp/b.idx" $((34 + 12 * 2 + 8 * 3))
else
  fail "jsonl input: $(cat "$tmp/err")"
fi

# Several inputs into one dataset.
if "$bin" --input "$tmp/a.txt,$tmp/b.jsonl" --output-prefix "$tmp/ab" --json_key=body 2>"$tmp/err"; then
  expect_size "$tmp/ab.bin" $((2 * (21 + 3 + 7 + 3 + 2)))
else
  fail "two inputs: $(cat "$tmp/err")"
fi

printf '{"text": "fine"}\n{"text": oops}\n' >"$tmp/bad.jsonl"
printf '{"text": "fine"}\n{"other": "x"}\n' >"$tmp/nokey.jsonl"
printf '{"text": 5}\n' >"$tmp/number.jsonl"
expect_error "missing.txt: cannot open input file" --input "$tmp/missing.txt" --output-prefix "$tmp/m"
expect_error "no_dir/x.bin.tmp: cannot create" --input "$tmp/a.txt" --output-prefix "$tmp/no_dir/x"
expect_error "bad.jsonl:2: bad JSON line" --input "$tmp/bad.jsonl" --output-prefix "$tmp/bad"
expect_error "nokey.jsonl:2: no string field \"text\"" --input "$tmp/nokey.jsonl" --output-prefix "$tmp/nokey"
expect_error "number.jsonl:1: no string field \"text\"" --input "$tmp/number.jsonl" --output-prefix "$tmp/number"
expect_error "--input FILE[,FILE...] and --output-prefix PREFIX are required" --input "$tmp/a.txt"
# A failed run leaves no file under the final names, nor temporaries.
for f in bad.bin bad.idx bad.bin.tmp bad.idx.tmp; do
  [ -e "$tmp/$f" ] && fail "$f left behind after an error" || passes=$((passes + 1))
done
echo "$passes passed, $fails failed"
[ $fails -eq 0 ]
