/* edge_plugin.c: the ABI glue, heap, JSON scanner and writer of edge_plugin.h. */
#include "edge_plugin.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- no WASI ----
 * wasi-libc's snprintf and strtod pull in its stdio, whose (never taken) error paths
 * reference three WASI functions. Defining them here resolves them inside the module,
 * so it imports nothing from wasi_snapshot_preview1. They answer EBADF (8). */
int32_t __imported_wasi_snapshot_preview1_fd_write(int32_t a, int32_t b, int32_t c, int32_t d);
int32_t __imported_wasi_snapshot_preview1_fd_close(int32_t a);
int32_t __imported_wasi_snapshot_preview1_fd_seek(int32_t a, int64_t b, int32_t c, int32_t d);
int32_t __imported_wasi_snapshot_preview1_fd_write(int32_t a, int32_t b, int32_t c, int32_t d)
{
    (void)a, (void)b, (void)c, (void)d;
    return 8;
}
int32_t __imported_wasi_snapshot_preview1_fd_close(int32_t a)
{
    (void)a;
    return 8;
}
int32_t __imported_wasi_snapshot_preview1_fd_seek(int32_t a, int64_t b, int32_t c, int32_t d)
{
    (void)a, (void)b, (void)c, (void)d;
    return 8;
}

/* ---- log ---- */
static char log_buf[512];

static void vlog(int level, const char *fmt, va_list ap)
{
    int n = vsnprintf(log_buf, sizeof log_buf, fmt, ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof log_buf)
        n = sizeof log_buf - 1;
    ep_host_log(level, log_buf, n);
}

void ep_log(int level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(level, fmt, ap);
    va_end(ap);
}

_Noreturn void ep_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(EP_ERROR, fmt, ap);
    va_end(ap);
    __builtin_trap();
}

/* ---- heap ---- */
extern unsigned char __heap_base;
static uintptr_t heap_top;

static void heap_reset(void) { heap_top = (uintptr_t)&__heap_base; }

void *ep_alloc(size_t n)
{
    if (heap_top == 0)
        heap_reset();
    uint64_t p = ((uint64_t)heap_top + 7) & ~(uint64_t)7;
    uint64_t end = p + n;
    uint64_t have = (uint64_t)__builtin_wasm_memory_size(0) * 65536;
    if (end > 0xFFFFFFFFu)
        return NULL;
    if (end > have) {
        uint64_t pages = (end - have + 65535) / 65536;
        if (__builtin_wasm_memory_grow(0, (size_t)pages) == (size_t)-1)
            return NULL;
    }
    heap_top = (uintptr_t)end;
    return (void *)(uintptr_t)p;
}

void *ep_xalloc(size_t n)
{
    void *p = ep_alloc(n);
    if (!p)
        ep_fail("out of memory (%zu bytes more wanted): raise limits.memory_pages", n);
    return p;
}

/* Grow the block [p, p+old) to `want` bytes; in place when it is the last one. */
static void *heap_grow(void *p, size_t old, size_t want)
{
    if ((uintptr_t)p + old == heap_top) {
        uintptr_t save = heap_top;
        heap_top = (uintptr_t)p + old;
        if (ep_alloc(want - old)) {
            heap_top = (uintptr_t)p + want;
            return p;
        }
        heap_top = save;
    }
    void *q = ep_xalloc(want);
    memcpy(q, p, old);
    return q;
}

/* ---- ABI exports ---- */
EP_EXPORT("alloc") uint32_t ep_abi_alloc(uint32_t len)
{
    heap_reset();
    void *p = ep_alloc(len ? len : 1);
    return (uint32_t)(uintptr_t)p;
}

EP_EXPORT("init") int32_t ep_abi_init(uint32_t ptr, uint32_t len)
{
    ep_val cfg;
    size_t at = 0;
    if (ep_parse((const char *)(uintptr_t)ptr, len, &cfg, &at) != 0) {
        ep_log(EP_ERROR, "config refused: invalid JSON at byte %zu", at);
        return 1;
    }
    if (cfg.type != EP_OBJ) {
        ep_log(EP_ERROR, "config refused: not a JSON object");
        return 1;
    }
    return plugin_init(&cfg) == 0 ? 0 : 1;
}

EP_EXPORT("process") int64_t ep_abi_process(uint32_t ptr, uint32_t len)
{
    ep_val batch;
    size_t at = 0;
    if (ep_parse((const char *)(uintptr_t)ptr, len, &batch, &at) != 0)
        ep_fail("process: the input is not valid JSON (byte %zu)", at);
    if (batch.type != EP_ARR)
        ep_fail("process: the input is not a JSON array");
    ep_out out;
    ep_out_init(&out, (size_t)len + 256);
    plugin_process(&batch, &out);
    if (out.n == 0)
        return 0;
    return (int64_t)(((uint64_t)(uintptr_t)out.p << 32) | (uint64_t)out.n);
}

/* ---- helpers ---- */
uint32_t ep_hash32(const char *s, size_t n, uint32_t h)
{
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 16777619u;
    return h;
}

uint64_t ep_hash64(const char *s, size_t n)
{
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

size_t ep_strlen(const char *s) { return strlen(s); }

int ep_memeq(const char *a, size_t an, const char *b, size_t bn)
{
    return an == bn && (an == 0 || memcmp(a, b, an) == 0);
}

/* ---- JSON scanner ---- */
typedef struct {
    const char *s, *p, *end;
    int depth;
} parser;

static void skip_ws(parser *ps)
{
    while (ps->p < ps->end &&
           (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
        ps->p++;
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int parse_string(parser *ps)
{
    ps->p++; /* the opening quote */
    while (ps->p < ps->end) {
        unsigned char c = (unsigned char)*ps->p;
        if (c == '"') {
            ps->p++;
            return 0;
        }
        if (c < 0x20)
            return -1;
        if (c == '\\') {
            if (++ps->p >= ps->end)
                return -1;
            char e = *ps->p;
            if (e == 'u') {
                if (ps->end - ps->p < 5)
                    return -1;
                for (int i = 1; i <= 4; i++)
                    if (hexval(ps->p[i]) < 0)
                        return -1;
                ps->p += 5;
                continue;
            }
            if (!strchr("\"\\/bfnrt", e) || e == 0)
                return -1;
        }
        ps->p++;
    }
    return -1;
}

static int parse_number(parser *ps)
{
    const char *p = ps->p, *end = ps->end;
    if (p < end && *p == '-')
        p++;
    if (p >= end)
        return -1;
    if (*p == '0')
        p++;
    else if (*p >= '1' && *p <= '9')
        while (p < end && is_digit(*p))
            p++;
    else
        return -1;
    if (p < end && *p == '.') {
        p++;
        if (p >= end || !is_digit(*p))
            return -1;
        while (p < end && is_digit(*p))
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (p >= end || !is_digit(*p))
            return -1;
        while (p < end && is_digit(*p))
            p++;
    }
    ps->p = p;
    return 0;
}

static int parse_literal(parser *ps, const char *lit)
{
    size_t n = strlen(lit);
    if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, lit, n) != 0)
        return -1;
    ps->p += n;
    return 0;
}

static int parse_value(parser *ps, ep_val *v)
{
    skip_ws(ps);
    if (ps->p >= ps->end)
        return -1;
    const char *start = ps->p;
    int r;
    switch (*ps->p) {
    case '"':
        v->type = EP_STR;
        r = parse_string(ps);
        break;
    case 't':
        v->type = EP_TRUE;
        r = parse_literal(ps, "true");
        break;
    case 'f':
        v->type = EP_FALSE;
        r = parse_literal(ps, "false");
        break;
    case 'n':
        v->type = EP_NULL;
        r = parse_literal(ps, "null");
        break;
    case '[':
    case '{': {
        int obj = *ps->p == '{';
        v->type = obj ? EP_OBJ : EP_ARR;
        if (++ps->depth > 64)
            return -1;
        ps->p++;
        skip_ws(ps);
        if (ps->p < ps->end && *ps->p == (obj ? '}' : ']')) {
            ps->p++;
        } else {
            for (;;) {
                ep_val item;
                if (obj) {
                    skip_ws(ps);
                    if (ps->p >= ps->end || *ps->p != '"' || parse_string(ps) != 0)
                        return -1;
                    skip_ws(ps);
                    if (ps->p >= ps->end || *ps->p != ':')
                        return -1;
                    ps->p++;
                }
                if (parse_value(ps, &item) != 0)
                    return -1;
                skip_ws(ps);
                if (ps->p >= ps->end)
                    return -1;
                if (*ps->p == ',') {
                    ps->p++;
                    continue;
                }
                if (*ps->p != (obj ? '}' : ']'))
                    return -1;
                ps->p++;
                break;
            }
        }
        ps->depth--;
        r = 0;
        break;
    }
    default:
        v->type = EP_NUM;
        r = parse_number(ps);
    }
    if (r != 0)
        return -1;
    v->s = start;
    v->n = (size_t)(ps->p - start);
    return 0;
}

int ep_parse(const char *s, size_t n, ep_val *out, size_t *err_at)
{
    parser ps = {s, s, s + n, 0};
    if (parse_value(&ps, out) == 0) {
        skip_ws(&ps);
        if (ps.p == ps.end)
            return 0;
    }
    if (err_at)
        *err_at = (size_t)(ps.p - s);
    return -1;
}

/* The iterators run on validated text: they only find where each part ends. */
static const char *skip_ws_fast(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static const char *value_end(const char *p, const char *end, int *type)
{
    switch (*p) {
    case '"':
        *type = EP_STR;
        for (p++; *p != '"'; p++)
            if (*p == '\\')
                p++;
        return p + 1;
    case '{':
    case '[': {
        *type = *p == '{' ? EP_OBJ : EP_ARR;
        int depth = 0;
        for (; p < end; p++) {
            char c = *p;
            if (c == '"') {
                for (p++; *p != '"'; p++)
                    if (*p == '\\')
                        p++;
            } else if (c == '{' || c == '[') {
                depth++;
            } else if (c == '}' || c == ']') {
                if (--depth == 0)
                    return p + 1;
            }
        }
        return p;
    }
    case 't':
        *type = EP_TRUE;
        return p + 4;
    case 'f':
        *type = EP_FALSE;
        return p + 5;
    case 'n':
        *type = EP_NULL;
        return p + 4;
    default:
        *type = EP_NUM;
        while (p < end && (is_digit(*p) || *p == '-' || *p == '+' || *p == '.' || *p == 'e' ||
                           *p == 'E'))
            p++;
        return p;
    }
}

void ep_iter_init(ep_iter *it, const ep_val *c)
{
    it->p = c->s + 1;
    it->end = c->s + c->n - 1;
    it->obj = c->type == EP_OBJ;
}

int ep_next(ep_iter *it, ep_val *key, ep_val *val)
{
    const char *p = skip_ws_fast(it->p, it->end);
    if (p < it->end && *p == ',')
        p = skip_ws_fast(p + 1, it->end);
    if (p >= it->end)
        return 0;
    if (it->obj) {
        /* the key, then ':' */
        ep_val k;
        k.s = p;
        p = value_end(p, it->end, &k.type);
        k.n = (size_t)(p - k.s);
        if (key)
            *key = k;
        p = skip_ws_fast(p, it->end);
        p = skip_ws_fast(p + 1, it->end); /* the ':' */
    }
    val->s = p;
    p = value_end(p, it->end, &val->type);
    val->n = (size_t)(p - val->s);
    it->p = p;
    return 1;
}

/* Decode one unit of a string body at *pp: returns its bytes in out[0..3]. */
static size_t str_unit(const char **pp, char out[4])
{
    const char *p = *pp;
    if (*p != '\\') {
        out[0] = *p;
        *pp = p + 1;
        return 1;
    }
    p++;
    char e = *p++;
    uint32_t cp;
    switch (e) {
    case 'b': out[0] = '\b'; break;
    case 'f': out[0] = '\f'; break;
    case 'n': out[0] = '\n'; break;
    case 'r': out[0] = '\r'; break;
    case 't': out[0] = '\t'; break;
    case 'u':
        cp = (uint32_t)(hexval(p[0]) << 12 | hexval(p[1]) << 8 | hexval(p[2]) << 4 |
                        hexval(p[3]));
        p += 4;
        if (cp >= 0xD800 && cp < 0xDC00 && p[0] == '\\' && p[1] == 'u') {
            uint32_t lo = (uint32_t)(hexval(p[2]) << 12 | hexval(p[3]) << 8 |
                                     hexval(p[4]) << 4 | hexval(p[5]));
            if (lo >= 0xDC00 && lo < 0xE000) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p += 6;
            }
        }
        *pp = p;
        if (cp < 0x80) {
            out[0] = (char)cp;
            return 1;
        }
        if (cp < 0x800) {
            out[0] = (char)(0xC0 | cp >> 6);
            out[1] = (char)(0x80 | (cp & 0x3F));
            return 2;
        }
        if (cp < 0x10000) {
            out[0] = (char)(0xE0 | cp >> 12);
            out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
            out[2] = (char)(0x80 | (cp & 0x3F));
            return 3;
        }
        out[0] = (char)(0xF0 | cp >> 18);
        out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[3] = (char)(0x80 | (cp & 0x3F));
        return 4;
    default: out[0] = e; /* " \ / */
    }
    *pp = p;
    return 1;
}

static int has_escape(const ep_val *s) { return memchr(s->s + 1, '\\', s->n - 2) != NULL; }

size_t ep_str_len(const ep_val *s)
{
    if (!has_escape(s))
        return s->n - 2;
    const char *p = s->s + 1, *end = s->s + s->n - 1;
    size_t n = 0;
    char u[4];
    while (p < end)
        n += str_unit(&p, u);
    return n;
}

size_t ep_str_copy(const ep_val *s, char *dst)
{
    if (!has_escape(s)) {
        memcpy(dst, s->s + 1, s->n - 2);
        return s->n - 2;
    }
    const char *p = s->s + 1, *end = s->s + s->n - 1;
    size_t n = 0;
    while (p < end)
        n += str_unit(&p, dst + n);
    return n;
}

char *ep_str_dup(const ep_val *s, size_t *len)
{
    char *d = ep_xalloc(ep_str_len(s) + 1);
    size_t n = ep_str_copy(s, d);
    d[n] = 0;
    if (len)
        *len = n;
    return d;
}

int ep_str_eq(const ep_val *s, const char *b, size_t len)
{
    if (s->type != EP_STR)
        return 0;
    if (!has_escape(s))
        return ep_memeq(s->s + 1, s->n - 2, b, len);
    const char *p = s->s + 1, *end = s->s + s->n - 1;
    size_t i = 0;
    char u[4];
    while (p < end) {
        size_t k = str_unit(&p, u);
        if (i + k > len || memcmp(u, b + i, k) != 0)
            return 0;
        i += k;
    }
    return i == len;
}

int ep_str_is(const ep_val *s, const char *lit) { return ep_str_eq(s, lit, strlen(lit)); }

/* Clinger's fast path (W. D. Clinger, "How to read floating point numbers accurately",
 * PLDI 1990): a decimal m * 10^k with m <= 2^53 and |k| <= 22 is one IEEE operation on two
 * exact doubles, so correctly rounded, as strtod would give. Most Modbus values (up to 16
 * significant digits) take it; the rest go to strtod. */
static const double POW10[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                 1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
#define MANTISSA_MAX (UINT64_C(1) << 53)

static int fast_num(const char *p, const char *end, double *out)
{
    int neg = 0, exp10 = 0;
    uint64_t m = 0;
    if (p < end && *p == '-') {
        neg = 1;
        p++;
    }
    for (; p < end && is_digit(*p); p++) {
        if (m > (MANTISSA_MAX - 9) / 10)
            return 0;
        m = m * 10 + (uint64_t)(*p - '0');
    }
    if (p < end && *p == '.')
        for (p++; p < end && is_digit(*p); p++) {
            if (m > (MANTISSA_MAX - 9) / 10)
                return 0;
            m = m * 10 + (uint64_t)(*p - '0');
            exp10--;
        }
    if (p < end && (*p == 'e' || *p == 'E')) {
        int eneg = 0, e = 0;
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            eneg = *p++ == '-';
        for (; p < end && is_digit(*p); p++) {
            if (e > 1000)
                return 0;
            e = e * 10 + (*p - '0');
        }
        exp10 += eneg ? -e : e;
    }
    if (p != end || exp10 < -22 || exp10 > 22)
        return 0;
    double d = (double)m;
    d = exp10 < 0 ? d / POW10[-exp10] : d * POW10[exp10];
    *out = neg ? -d : d;
    return 1;
}

double ep_num(const ep_val *v)
{
    double fast;
    if (fast_num(v->s, v->s + v->n, &fast))
        return fast;
    char buf[64];
    char *b = v->n < sizeof buf ? buf : ep_xalloc(v->n + 1);
    memcpy(b, v->s, v->n);
    b[v->n] = 0;
    return strtod(b, NULL);
}

int ep_get(const ep_val *obj, const char *key, ep_val *val)
{
    ep_iter it;
    ep_val k, v;
    ep_iter_init(&it, obj);
    while (ep_next(&it, &k, &v))
        if (ep_str_is(&k, key)) {
            *val = v;
            return 1;
        }
    return 0;
}

/* ---- writer ---- */
void ep_out_init(ep_out *o, size_t cap)
{
    o->p = ep_xalloc(cap);
    o->n = 0;
    o->cap = cap;
}

static void reserve(ep_out *o, size_t more)
{
    if (o->n + more <= o->cap)
        return;
    size_t want = o->cap * 2;
    if (want < o->n + more)
        want = o->n + more;
    o->p = heap_grow(o->p, o->cap, want);
    o->cap = want;
}

void ep_put(ep_out *o, const char *s, size_t n)
{
    reserve(o, n);
    memcpy(o->p + o->n, s, n);
    o->n += n;
}

void ep_putc(ep_out *o, char c)
{
    reserve(o, 1);
    o->p[o->n++] = c;
}

void ep_puts(ep_out *o, const char *s) { ep_put(o, s, strlen(s)); }

void ep_put_raw(ep_out *o, const ep_val *v) { ep_put(o, v->s, v->n); }

void ep_put_str(ep_out *o, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    reserve(o, n + 2);
    ep_putc(o, '"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[7] = {'\\', 0};
        size_t k = 2;
        if (c == '"' || c == '\\') {
            esc[1] = (char)c;
        } else if (c == '\n') {
            esc[1] = 'n';
        } else if (c == '\r') {
            esc[1] = 'r';
        } else if (c == '\t') {
            esc[1] = 't';
        } else if (c < 0x20) {
            memcpy(esc + 1, "u00", 3);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            k = 6;
        } else if (c == 0xED && i + 2 < n && ((unsigned char)s[i + 1] & 0xE0) == 0xA0) {
            /* a lone surrogate (WTF-8): not valid UTF-8, so \uXXXX */
            uint32_t cp = 0xD000u | ((uint32_t)(s[i + 1] & 0x3F) << 6) | (uint32_t)(s[i + 2] & 0x3F);
            esc[1] = 'u';
            esc[2] = hex[cp >> 12];
            esc[3] = hex[(cp >> 8) & 15];
            esc[4] = hex[(cp >> 4) & 15];
            esc[5] = hex[cp & 15];
            k = 6;
            i += 2;
        } else {
            ep_putc(o, (char)c);
            continue;
        }
        ep_put(o, esc, k);
    }
    ep_putc(o, '"');
}

void ep_put_num(ep_out *o, double v)
{
    char buf[40];
    if (!isfinite(v))
        ep_fail("internal: a non-finite number to write");
    if (v == 0) {
        ep_puts(o, signbit(v) ? "-0.0" : "0");
        return;
    }
    if (v == floor(v) && fabs(v) < 9007199254740992.0) {
        long long i = (long long)v;
        snprintf(buf, sizeof buf, "%lld", i);
        ep_puts(o, buf);
        return;
    }
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, v);
        if (prec == 17 || strtod(buf, NULL) == v)
            break;
    }
    ep_puts(o, buf);
}

int ep_next_reading(ep_iter *it, ep_reading *r)
{
    ep_val obj, k, v;
    if (!ep_next(it, NULL, &obj))
        return 0;
    if (obj.type != EP_OBJ)
        ep_fail("process: a reading is not an object");
    memset(r, 0, sizeof *r);
    ep_iter f;
    ep_iter_init(&f, &obj);
    while (ep_next(&f, &k, &v)) {
        if (ep_str_is(&k, "namespace"))
            r->ns = v;
        else if (ep_str_is(&k, "device"))
            r->dev = v;
        else if (ep_str_is(&k, "seq"))
            r->seq = v;
        else if (ep_str_is(&k, "ts"))
            r->ts = v;
        else if (ep_str_is(&k, "values"))
            r->values = v;
        else if (ep_str_is(&k, "quality"))
            r->quality = v;
    }
    if (r->ns.type != EP_STR || r->dev.type != EP_STR || !r->seq.type)
        ep_fail("process: a reading without namespace, device or seq");
    return 1;
}

void ep_put_reading_head(ep_out *o, const ep_reading *r)
{
    ep_puts(o, "{\"namespace\":");
    ep_put_raw(o, &r->ns);
    ep_puts(o, ",\"device\":");
    ep_put_raw(o, &r->dev);
    if (r->ts.type) {
        ep_puts(o, ",\"ts\":");
        ep_put_raw(o, &r->ts);
    }
    ep_puts(o, ",\"seq\":");
    ep_put_raw(o, &r->seq);
}
