/* The C interface of libloom_sentencepiece.so, a small shared library that
 * wraps Debian's libsentencepiece for loom-prepare.
 *
 * Why a wrapper loaded at run time: libsentencepiece (0.1.97) carries its own
 * copies of Abseil (absl::ParseCommandLine, absl::Flag, ...) and of
 * protobuf-lite, exported under the same names as the Abseil Loom links
 * statically and the libprotobuf it links dynamically. Linked into a Loom tool
 * the two copies interpose and flag parsing deadlocks. Instead the tool
 * dlopen()s this library with RTLD_LOCAL | RTLD_DEEPBIND: DEEPBIND makes the
 * wrapper and libsentencepiece resolve their own symbols first, LOCAL keeps
 * them out of the tool's namespace, and this interface passes only C types,
 * so no Abseil or protobuf object ever crosses the boundary.
 *
 * Thread safety: once loaded, a model may encode and decode from several
 * threads at once (SentencePieceProcessor's Encode/Decode are const).
 * Error text goes to `error` (NUL-terminated, cut to `error_size` bytes). */
#ifndef LOOM_DATA_SENTENCEPIECE_LOOM_SENTENCEPIECE_H_
#define LOOM_DATA_SENTENCEPIECE_LOOM_SENTENCEPIECE_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Only these functions are exported; everything else in the library is hidden. */
#define LOOM_SENTENCEPIECE_API __attribute__((visibility("default")))

/* Bumped on any change below; the loader refuses a library of another one. */
#define LOOM_SENTENCEPIECE_ABI 1

typedef struct LoomSentencePiece LoomSentencePiece;

LOOM_SENTENCEPIECE_API int loom_sentencepiece_abi(void);

/* The model in `model_path`, or NULL with the reason in `error`. */
LOOM_SENTENCEPIECE_API LoomSentencePiece* loom_sentencepiece_load(const char* model_path, char* error, size_t error_size);
LOOM_SENTENCEPIECE_API void loom_sentencepiece_free(LoomSentencePiece* model);

LOOM_SENTENCEPIECE_API int32_t loom_sentencepiece_vocab_size(const LoomSentencePiece* model);
/* The id of </s>, or -1 if the model has none. */
LOOM_SENTENCEPIECE_API int32_t loom_sentencepiece_eos_id(const LoomSentencePiece* model);

/* Encodes `text` (`size` bytes). Returns the number of ids, n; they are
 * written to `ids` only when n <= capacity (call again with room for n
 * otherwise). Returns -1 on error. */
LOOM_SENTENCEPIECE_API int64_t loom_sentencepiece_encode(const LoomSentencePiece* model, const char* text, size_t size, int32_t* ids,
                                  int64_t capacity, char* error, size_t error_size);

/* Decodes `count` ids. Returns the text's length, n; the text is written to
 * `text` only when n <= capacity. Returns -1 on error (e.g. an id out of range). */
LOOM_SENTENCEPIECE_API int64_t loom_sentencepiece_decode(const LoomSentencePiece* model, const int32_t* ids, size_t count, char* text,
                                  int64_t capacity, char* error, size_t error_size);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif  /* LOOM_DATA_SENTENCEPIECE_LOOM_SENTENCEPIECE_H_ */
