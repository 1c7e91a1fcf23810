/* edge_plugin.h: what the shipped plugins share (plugins/README.md describes the ABI).
 *
 * edge_plugin.c holds the ABI glue: it exports alloc, init and process, and calls the
 * two functions every plugin defines:
 *
 *   int  plugin_init(const ep_val *config);          config: a JSON object; 0 accepts it
 *   void plugin_process(const ep_val *batch, ep_out *out);  batch: a JSON array
 *
 * plugin_process writes its output (a JSON array) to `out`; writing nothing (out->n
 * stays 0) drops the whole batch. The input was fully validated before either is
 * called, so the iterators below need no error checks. Memory: a bump heap from
 * __heap_base, rewound by every alloc call; what must outlive a call (parsed config,
 * state) goes in static storage. On an internal error (memory exhausted, malformed
 * input) ep_fail logs and traps: the host counts the failure.
 *
 * The error paths log, so a plugin built on this needs the "log" capability.
 */
#ifndef EDGE_PLUGIN_H
#define EDGE_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#define EP_EXPORT(name) __attribute__((export_name(name)))
#define EP_IMPORT(name) __attribute__((import_module("edge"), import_name(name)))

enum { EP_DEBUG = 0, EP_INFO = 1, EP_WARNING = 2, EP_ERROR = 3 };

/* ---- host imports (each needs its capability in the manifest) ---- */
EP_IMPORT("log") void ep_host_log(int32_t level, const char *ptr, int32_t len);

/* printf-style message to the host's log (truncated at 511 bytes). */
void ep_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Log at error level and trap. */
_Noreturn void ep_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- the per-call heap ---- */
void *ep_alloc(size_t n);          /* 8-aligned, NULL when memory cannot grow */
void *ep_xalloc(size_t n);         /* ep_alloc or ep_fail */

/* ---- JSON scanner ----
 * A value is a span of the input text (strings include their quotes). */
enum { EP_NULL = 1, EP_FALSE, EP_TRUE, EP_NUM, EP_STR, EP_ARR, EP_OBJ };
typedef struct {
    int type;
    const char *s;
    size_t n;
} ep_val;

/* Parse and validate a whole document (one value, whitespace around it). 0 = ok;
 * else -1 and *err_at = the offset of the error. Nesting deeper than 64 is refused. */
int ep_parse(const char *s, size_t n, ep_val *out, size_t *err_at);

typedef struct {
    const char *p, *end;
    int obj;
} ep_iter;
/* Iterate the members of an object (key and val) or the items of an array (key is
 * left alone and may be NULL). ep_next returns 1 with the next one, 0 at the end. */
void ep_iter_init(ep_iter *it, const ep_val *container);
int ep_next(ep_iter *it, ep_val *key, ep_val *val);

/* A string value: equal (after unescaping) to the NUL-terminated lit? */
int ep_str_is(const ep_val *str, const char *lit);
/* Equal to the len bytes at b? */
int ep_str_eq(const ep_val *str, const char *b, size_t len);
/* Unescaped length of a string value. */
size_t ep_str_len(const ep_val *str);
/* Unescape into dst (at least ep_str_len bytes); returns the length. Lone surrogates
 * (\ud800 alone) become their 3-byte WTF-8 form, which ep_put_str escapes back. */
size_t ep_str_copy(const ep_val *str, char *dst);
/* Unescape onto the heap, NUL-terminated. */
char *ep_str_dup(const ep_val *str, size_t *len);
/* A number value as a double (correctly rounded; may be +-inf when out of range). */
double ep_num(const ep_val *num);

/* One reading of the batch, its parts as scanned (type 0 when absent). */
typedef struct {
    ep_val ns, dev, seq, ts, values, quality;
} ep_reading;
/* The next reading of the batch iterator `it` into *r; 0 after the last. Fails (traps)
 * on a reading that is not an object or has no namespace, device or seq. */
int ep_next_reading(ep_iter *it, ep_reading *r);
/* Find member `key` of an object; 1 if found. */
int ep_get(const ep_val *obj, const char *key, ep_val *val);

/* ---- JSON writer: a growing buffer on the heap ---- */
typedef struct {
    char *p;
    size_t n, cap;
} ep_out;
void ep_out_init(ep_out *o, size_t cap);
void ep_put(ep_out *o, const char *s, size_t n);
void ep_putc(ep_out *o, char c);
void ep_puts(ep_out *o, const char *s);                  /* raw text, NUL-terminated */
void ep_put_raw(ep_out *o, const ep_val *v);             /* a scanned value, verbatim */
/* Writes `{"namespace":…,"device":…,"ts":…,"seq":…` of r, verbatim (ts only if it came);
 * the caller goes on with `,"values":{…},"quality":{…}}`. */
void ep_put_reading_head(ep_out *o, const ep_reading *r);
void ep_put_str(ep_out *o, const char *s, size_t n);     /* a JSON string, escaped */
/* A finite double: integers of magnitude below 2^53 as integers, others in the
 * shortest of %.15g/%.16g/%.17g that reads back exactly. Non-finite: ep_fail. */
void ep_put_num(ep_out *o, double v);

/* ---- small helpers ---- */
uint32_t ep_hash32(const char *s, size_t n, uint32_t h);  /* FNV-1a; start with 2166136261u */
uint64_t ep_hash64(const char *s, size_t n);             /* FNV-1a 64 */
size_t ep_strlen(const char *s);
int ep_memeq(const char *a, size_t an, const char *b, size_t bn);

/* ---- what each plugin defines ---- */
int plugin_init(const ep_val *config);
void plugin_process(const ep_val *batch, ep_out *out);

#endif
