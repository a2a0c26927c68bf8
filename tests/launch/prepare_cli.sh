#!/usr/bin/env bash
# loom-prepare: text and .jsonl inputs give an indexed dataset of the right
# sizes (u16 ids: 2 bytes per text byte plus one EOD per document); bad input
# is exit code 2 with one line on stderr naming the file and the problem;
# --workers N writes the same bytes for any N; "-" reads standard input;
# a SentencePiece model works from the command line (the wrapper library is
# loaded at run time, never linked: see data/sentencepiece/).
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
# --workers: the same bytes for 1, 2 and 5 threads; standard input as "-".
awk 'BEGIN { for (i = 1; i <= 3000; i++) { s = ""; for (j = 0; j < i % 97; j++) s = s "z"; print "document " i " " s } }' >"$tmp/many.txt"
for w in 1 2 5; do
  "$bin" --input "$tmp/many.txt" --output-prefix "$tmp/many_w$w" --workers $w 2>"$tmp/err" || fail "--workers $w: $(cat "$tmp/err")"
done
"$bin" --input=- --output-prefix "$tmp/many_stdin" --workers 2 <"$tmp/many.txt" 2>"$tmp/err" || fail "stdin: $(cat "$tmp/err")"
for w in 2 5 stdin; do
  for ext in bin idx; do
    cmp -s "$tmp/many_w1.$ext" "$tmp/many_$([ $w = stdin ] && echo stdin || echo w$w).$ext" \
      && passes=$((passes + 1)) || fail "many.$ext differs between --workers 1 and $w"
  done
done
grep -qE "\| byte, 2 workers \| peak RSS [0-9.]+ MB$" "$tmp/err" && passes=$((passes + 1)) || fail "no peak RSS: $(cat "$tmp/err")"
expect_error "--workers: 300 is not in 1..256" --input "$tmp/a.txt" --output-prefix "$tmp/w" --workers 300
expect_error "--tokenizer: unknown tokenizer 'gpt2'" --input "$tmp/a.txt" --output-prefix "$tmp/t" --tokenizer gpt2
expect_error "nope.model: cannot open SentencePiece model (No such file or directory)" \
  --input "$tmp/a.txt" --output-prefix "$tmp/t" --tokenizer "sentencepiece:$tmp/nope.model"

# SentencePiece from the command line (skipped without spm_train or the
# wrapper). A deadlock in flag parsing, the symptom of linking
# libsentencepiece, would hit the timeout.
if ldd "$bin" | grep -q sentencepiece; then fail "loom-prepare links libsentencepiece (it must dlopen the wrapper)"; fi
if command -v spm_train >/dev/null && [ -f "$(dirname "$bin")/../lib/libloom_sentencepiece.so" ]; then
  spm_train --input="$tmp/many.txt" --model_prefix="$tmp/sp" --vocab_size=200 --minloglevel=2 >/dev/null 2>&1 \
    || fail "spm_train failed"
  if timeout 60 "$bin" --input "$tmp/many.txt" --output-prefix "$tmp/sp" --tokenizer "sentencepiece:$tmp/sp.model" \
       --workers 2 2>"$tmp/err"; then
    grep -qF "3000 documents" "$tmp/err" && grep -qF "sentencepiece:$tmp/sp.model (200 pieces)" "$tmp/err" \
      && passes=$((passes + 1)) || fail "sentencepiece summary: $(cat "$tmp/err")"
    # u16 ids (dtype code 8 at byte 17), one sequence per line.
    [ "$(od -An -tu1 -j17 -N1 "$tmp/sp.idx" | tr -d ' ')" = 8 ] && passes=$((passes + 1)) || fail "sp.idx dtype is not u16"
  else
    fail "sentencepiece run (exit $?): $(cat "$tmp/err")"
  fi
  printf 'not a model' >"$tmp/junk.model"
  expect_error "junk.model: not a valid SentencePiece model" \
    --input "$tmp/a.txt" --output-prefix "$tmp/t" --tokenizer "sentencepiece:$tmp/junk.model"
else
  echo "note: SentencePiece part skipped (spm_train or libloom_sentencepiece.so missing)"
fi
echo "$passes passed, $fails failed"
[ $fails -eq 0 ]
