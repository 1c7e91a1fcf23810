/* deadband: report by exception.
 *
 * Per (namespace, device, property) it remembers the last value it reported and that
 * report's ts. A number is reported when there is no last value, when it moved by more
 * than its deadband, or when heartbeat_s has passed since the last report; a bool or a
 * string when it differs from the last one reported (or first time, or heartbeat).
 * Every quality entry passes through, and a "bad" property forgets its last value, so
 * the first good value after it is reported. A reading left with no values and no
 * quality is left out; a batch left empty is dropped (output length 0).
 *
 * Config (all optional): {"deadband": 0.5, "properties": {"voltage": 1.0},
 *                         "heartbeat_s": 300}
 * The state table holds MAX_ENTRIES properties; beyond that, values are always
 * reported (nothing is suppressed that is not tracked).
 */
#include "edge_plugin.h"

#include <math.h>
#include <string.h>

#define MAX_ENTRIES 4096
#define SLOTS 8192 /* open addressing, power of two, load <= 1/2 */
#define KEY_ARENA (192 * 1024)
#define INLINE_STR 16
#define MAX_OVERRIDES 256
#define NAME_ARENA (8 * 1024)

enum { K_NONE = 0, K_NUM, K_BOOL, K_STR };

typedef struct {
    uint32_t hash;
    uint32_t key_off;
    uint16_t key_len;
    uint8_t kind; /* of the last reported value; K_NONE: none to compare with */
    uint8_t has_ts;
    uint32_t slen; /* strings: length; compared exactly up to INLINE_STR bytes, */
    union {        /* beyond by length and 64-bit hash */
        double num;
        uint64_t shash;
        int boolean;
    } v;
    uint64_t nhash; /* numbers: the reported text's length (slen) and 64-bit hash: the */
                    /* same text again is the same number, with nothing to parse */
    double ts;
    char s[INLINE_STR];
} entry;

static entry entries[MAX_ENTRIES];
static uint16_t slots[SLOTS]; /* entry index + 1; 0 = empty */
static uint32_t n_entries;
static char key_arena[KEY_ARENA];
static uint32_t key_used;

/* config */
static double deadband_default;
static double heartbeat_ms;
static uint32_t n_overrides;
static struct {
    uint32_t off, len;
    double deadband;
} overrides[MAX_OVERRIDES];
static char names[NAME_ARENA];
static uint32_t names_used;

static int number_ok(const ep_val *v, double *out)
{
    if (v->type != EP_NUM)
        return 0;
    *out = ep_num(v);
    return isfinite(*out) && *out >= 0;
}

int plugin_init(const ep_val *cfg)
{
    ep_iter it;
    ep_val k, v;
    deadband_default = 0;
    heartbeat_ms = 0;
    n_overrides = 0;
    names_used = 0;
    memset(slots, 0, sizeof slots);
    n_entries = 0;
    key_used = 0;
    ep_iter_init(&it, cfg);
    while (ep_next(&it, &k, &v)) {
        double d;
        if (ep_str_is(&k, "deadband")) {
            if (!number_ok(&v, &d)) {
                ep_log(EP_ERROR, "config refused: deadband must be a number >= 0");
                return 1;
            }
            deadband_default = d;
        } else if (ep_str_is(&k, "heartbeat_s")) {
            if (!number_ok(&v, &d)) {
                ep_log(EP_ERROR, "config refused: heartbeat_s must be a number >= 0");
                return 1;
            }
            heartbeat_ms = d * 1000.0;
        } else if (ep_str_is(&k, "properties")) {
            if (v.type != EP_OBJ) {
                ep_log(EP_ERROR, "config refused: properties must be an object "
                                 "(property name: deadband)");
                return 1;
            }
            ep_iter pi;
            ep_val pk, pv;
            ep_iter_init(&pi, &v);
            while (ep_next(&pi, &pk, &pv)) {
                size_t len = ep_str_len(&pk);
                if (!number_ok(&pv, &d)) {
                    ep_log(EP_ERROR, "config refused: properties.%.*s must be a number >= 0",
                           (int)(pk.n - 2), pk.s + 1);
                    return 1;
                }
                if (n_overrides == MAX_OVERRIDES || len > NAME_ARENA - names_used) {
                    ep_log(EP_ERROR, "config refused: more than %d properties (or names too "
                                     "long)", MAX_OVERRIDES);
                    return 1;
                }
                overrides[n_overrides].off = names_used;
                overrides[n_overrides].len = (uint32_t)len;
                overrides[n_overrides].deadband = d;
                ep_str_copy(&pk, names + names_used);
                names_used += (uint32_t)len;
                n_overrides++;
            }
        } else {
            ep_log(EP_ERROR, "config refused: unknown key %.*s (known: deadband, properties, "
                             "heartbeat_s)", (int)k.n, k.s);
            return 1;
        }
    }
    return 0;
}

static double deadband_of(const char *name, size_t len)
{
    for (uint32_t i = n_overrides; i-- > 0;) /* the last one given wins */
        if (ep_memeq(names + overrides[i].off, overrides[i].len, name, len))
            return overrides[i].deadband;
    return deadband_default;
}

/* The entry for key, created when absent; NULL when the table is full. */
static entry *lookup(const char *key, size_t len, int create)
{
    uint32_t h = ep_hash32(key, len, 2166136261u);
    for (uint32_t i = h & (SLOTS - 1);; i = (i + 1) & (SLOTS - 1)) {
        uint16_t s = slots[i];
        if (s == 0) {
            if (!create || n_entries == MAX_ENTRIES || len > 0xFFFF ||
                len > KEY_ARENA - key_used)
                return NULL;
            entry *e = &entries[n_entries];
            memset(e, 0, sizeof *e);
            e->hash = h;
            e->key_off = key_used;
            e->key_len = (uint16_t)len;
            memcpy(key_arena + key_used, key, len);
            key_used += (uint32_t)len;
            slots[i] = (uint16_t)++n_entries;
            return e;
        }
        entry *e = &entries[s - 1];
        if (e->hash == h && ep_memeq(key_arena + e->key_off, e->key_len, key, len))
            return e;
    }
}

/* Whether value v (of property `name`) at ts is to be reported; updates the entry. */
static int report(entry *e, const ep_val *v, const char *name, size_t name_len, int has_ts,
                  double ts)
{
    if (!e)
        return 1;
    int kind;
    double num = 0;
    int boolean = 0;
    const char *s = NULL;
    size_t slen = 0;
    uint64_t shash = 0;
    char *sbuf = NULL;
    switch (v->type) {
    case EP_NUM:
        kind = K_NUM;
        shash = ep_hash64(v->s, v->n);
        if (e->kind == K_NUM && e->slen == v->n && e->nhash == shash &&
            !(heartbeat_ms > 0 && has_ts && e->has_ts && ts - e->ts >= heartbeat_ms))
            return 0;
        num = ep_num(v);
        if (!isfinite(num)) { /* beyond a double: cannot compare, so always */
            e->kind = K_NONE;
            return 1;
        }
        break;
    case EP_TRUE:
    case EP_FALSE:
        kind = K_BOOL;
        boolean = v->type == EP_TRUE;
        break;
    case EP_STR:
        kind = K_STR;
        sbuf = ep_str_dup(v, &slen);
        s = sbuf;
        shash = ep_hash64(s, slen);
        break;
    default: /* null, arrays, objects: not tracked */
        e->kind = K_NONE;
        return 1;
    }
    int send = 0;
    if (e->kind != kind)
        send = 1;
    else if (heartbeat_ms > 0 && has_ts && e->has_ts && ts - e->ts >= heartbeat_ms)
        send = 1;
    else if (kind == K_NUM)
        send = fabs(num - e->v.num) > deadband_of(name, name_len);
    else if (kind == K_BOOL)
        send = boolean != e->v.boolean;
    else
        send = slen != e->slen ||
               (slen <= INLINE_STR ? memcmp(s, e->s, slen) != 0 : shash != e->v.shash);
    if (!send)
        return 0;
    e->kind = (uint8_t)kind;
    e->has_ts = (uint8_t)has_ts;
    e->ts = ts;
    if (kind == K_NUM) {
        e->v.num = num;
        e->slen = (uint32_t)v->n;
        e->nhash = shash;
    } else if (kind == K_BOOL) {
        e->v.boolean = boolean;
    } else {
        e->slen = (uint32_t)slen;
        if (slen <= INLINE_STR)
            memcpy(e->s, s, slen);
        else
            e->v.shash = shash;
    }
    return 1;
}

/* key = namespace 0xFF device 0xFF property (0xFF never occurs in UTF-8) */
typedef struct {
    char *buf;
    size_t prefix, cap;
} keybuf;

static const char *make_key(keybuf *kb, const ep_val *prop, size_t *len, size_t *name_at)
{
    size_t plen = ep_str_len(prop);
    if (kb->prefix + plen > kb->cap) {
        size_t cap = (kb->prefix + plen) * 2;
        char *nb = ep_xalloc(cap);
        memcpy(nb, kb->buf, kb->prefix);
        kb->buf = nb;
        kb->cap = cap;
    }
    ep_str_copy(prop, kb->buf + kb->prefix);
    *len = kb->prefix + plen;
    *name_at = kb->prefix;
    return kb->buf;
}

void plugin_process(const ep_val *batch, ep_out *out)
{
    ep_iter readings;
    ep_reading rd;
    int first_reading = 1;
    keybuf kb = {ep_xalloc(256), 0, 256};
    ep_iter_init(&readings, batch);
    while (ep_next_reading(&readings, &rd)) {
        ep_val ns = rd.ns, dev = rd.dev, ts = rd.ts, values = rd.values, quality = rd.quality, k, v;
        int has_ts = ts.type == EP_NUM;
        double tsv = has_ts ? ep_num(&ts) : 0;
        if (!isfinite(tsv))
            has_ts = 0;

        kb.prefix = 0;
        size_t nl = ep_str_len(&ns), dl = ep_str_len(&dev);
        if (nl + dl + 2 > kb.cap) {
            kb.cap = (nl + dl + 2) * 2;
            kb.buf = ep_xalloc(kb.cap);
        }
        ep_str_copy(&ns, kb.buf);
        kb.buf[nl] = (char)0xFF;
        ep_str_copy(&dev, kb.buf + nl + 1);
        kb.buf[nl + 1 + dl] = (char)0xFF;
        kb.prefix = nl + dl + 2;

        size_t mark = out->n;
        if (first_reading)
            ep_putc(out, '[');
        else
            ep_putc(out, ',');
        ep_put_reading_head(out, &rd);
        ep_puts(out, ",\"values\":{");
        int kept = 0;
        if (values.type == EP_OBJ) {
            ep_iter vi;
            ep_iter_init(&vi, &values);
            while (ep_next(&vi, &k, &v)) {
                size_t klen, name_at;
                const char *key = make_key(&kb, &k, &klen, &name_at);
                entry *e = lookup(key, klen, 1);
                if (!report(e, &v, key + name_at, klen - name_at, has_ts, tsv))
                    continue;
                if (kept++)
                    ep_putc(out, ',');
                ep_put_raw(out, &k);
                ep_putc(out, ':');
                ep_put_raw(out, &v);
            }
        }
        ep_puts(out, "},\"quality\":{");
        int bad = 0;
        if (quality.type == EP_OBJ) {
            ep_iter qi;
            ep_iter_init(&qi, &quality);
            while (ep_next(&qi, &k, &v)) {
                size_t klen, name_at;
                const char *key = make_key(&kb, &k, &klen, &name_at);
                entry *e = lookup(key, klen, 0);
                if (e)
                    e->kind = K_NONE; /* report the next good value */
                if (bad++)
                    ep_putc(out, ',');
                ep_put_raw(out, &k);
                ep_putc(out, ':');
                ep_put_raw(out, &v);
            }
        }
        ep_puts(out, "}}");
        if (kept == 0 && bad == 0) {
            out->n = mark; /* nothing left of this reading */
            continue;
        }
        first_reading = 0;
    }
    if (!first_reading)
        ep_putc(out, ']');
}
