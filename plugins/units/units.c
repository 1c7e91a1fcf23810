/* units: unit conversion.
 *
 * Config: {"convert": {"temperature": {"from": "degC", "to": "degF"},
 *                      "energy": {"from": "Wh", "to": "kWh", "rename": "energy_kwh"}}}
 * A converted number replaces the original, or goes under `rename` with the original
 * removed (a quality entry of a renamed property is renamed too). A non-numeric value
 * of a listed property is left untouched. A conversion whose result is beyond a double
 * (e.g. 1e308 Wh to J) gives quality "bad" instead. init refuses unknown units and
 * units of different kinds.
 */
#include "edge_plugin.h"

#include <math.h>
#include <string.h>

#define MAX_CONV 256
#define NAME_ARENA (16 * 1024)

enum { TEMPERATURE = 1, ENERGY, POWER, PRESSURE, LENGTH, VOLUME, FLOW, SPEED };
static const char *const kind_names[] = {"",       "temperature", "energy", "power",
                                         "pressure", "length",      "volume", "flow",
                                         "speed"};

/* A unit is num/den of its kind's base unit (exact integers); temperatures are
 * converted by formula. */
static const struct {
    const char *name;
    int kind;
    int64_t num, den;
} units[] = {
    {"degC", TEMPERATURE, 0, 0},
    {"degF", TEMPERATURE, 0, 0},
    {"K", TEMPERATURE, 0, 0},
    {"J", ENERGY, 1, 1}, /* base J */
    {"kJ", ENERGY, 1000, 1},
    {"MJ", ENERGY, 1000000, 1},
    {"Wh", ENERGY, 3600, 1},
    {"kWh", ENERGY, 3600000, 1},
    {"MWh", ENERGY, 3600000000, 1},
    {"W", POWER, 1, 1}, /* base W */
    {"kW", POWER, 1000, 1},
    {"MW", POWER, 1000000, 1},
    {"Pa", PRESSURE, 1, 1}, /* base Pa */
    {"hPa", PRESSURE, 100, 1},
    {"kPa", PRESSURE, 1000, 1},
    {"MPa", PRESSURE, 1000000, 1},
    {"mbar", PRESSURE, 100, 1},
    {"bar", PRESSURE, 100000, 1},
    {"psi", PRESSURE, 44482216152605, 6451600000}, /* lbf/in2, exactly */
    {"mm", LENGTH, 1, 1000},                       /* base m */
    {"cm", LENGTH, 1, 100},
    {"m", LENGTH, 1, 1},
    {"km", LENGTH, 1000, 1},
    {"in", LENGTH, 254, 10000},
    {"ft", LENGTH, 3048, 10000},
    {"mL", VOLUME, 1, 1000000}, /* base m3 */
    {"L", VOLUME, 1, 1000},
    {"m3", VOLUME, 1, 1},
    {"gal", VOLUME, 3785411784, 1000000000000}, /* US gallon, 231 in3 */
    {"L/s", FLOW, 1, 1000},                     /* base m3/s */
    {"L/min", FLOW, 1, 60000},
    {"L/h", FLOW, 1, 3600000},
    {"m3/s", FLOW, 1, 1},
    {"m3/h", FLOW, 1, 3600},
    {"gal/min", FLOW, 3785411784, 60000000000000},
    {"m/s", SPEED, 1, 1}, /* base m/s */
    {"km/h", SPEED, 1000, 3600},
    {"mph", SPEED, 1609344, 3600000},
};
#define N_UNITS (sizeof units / sizeof units[0])

static struct {
    uint32_t name_off, name_len;
    uint32_t rename_off, rename_len; /* rename_len 0: keeps its name */
    int from, to;
    double p, q; /* linear: value * p / q */
} conv[MAX_CONV];
static uint32_t n_conv;
static char names[NAME_ARENA];
static uint32_t names_used;

static int64_t gcd(int64_t a, int64_t b)
{
    while (b) {
        int64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

static int unit_index(const ep_val *v)
{
    for (size_t i = 0; i < N_UNITS; i++)
        if (ep_str_is(v, units[i].name))
            return (int)i;
    return -1;
}

static int store(const ep_val *s, uint32_t *off, uint32_t *len)
{
    size_t n = ep_str_len(s);
    if (n > NAME_ARENA - names_used)
        return -1;
    *off = names_used;
    *len = (uint32_t)ep_str_copy(s, names + names_used);
    names_used += *len;
    return 0;
}

static int name_is(uint32_t off, uint32_t len, const char *s, size_t n)
{
    return ep_memeq(names + off, len, s, n);
}

int plugin_init(const ep_val *cfg)
{
    n_conv = names_used = 0;
    ep_iter it;
    ep_val k, v;
    ep_iter_init(&it, cfg);
    while (ep_next(&it, &k, &v)) {
        if (!ep_str_is(&k, "convert")) {
            ep_log(EP_ERROR, "config refused: unknown key %.*s (known: convert)", (int)k.n, k.s);
            return 1;
        }
        if (v.type != EP_OBJ) {
            ep_log(EP_ERROR, "config refused: convert must map property names to "
                             "{from, to, rename}");
            return 1;
        }
        ep_iter ci;
        ep_val prop, spec;
        ep_iter_init(&ci, &v);
        while (ep_next(&ci, &prop, &spec)) {
            int pn = (int)prop.n - 2;
            const char *ps = prop.s + 1;
            ep_val from = {0}, to = {0}, rename = {0}, sk, sv;
            if (n_conv == MAX_CONV) {
                ep_log(EP_ERROR, "config refused: more than %d conversions", MAX_CONV);
                return 1;
            }
            if (spec.type != EP_OBJ) {
                ep_log(EP_ERROR, "config refused: convert.%.*s must be {from, to, rename}", pn,
                       ps);
                return 1;
            }
            ep_iter si;
            ep_iter_init(&si, &spec);
            while (ep_next(&si, &sk, &sv)) {
                if (ep_str_is(&sk, "from"))
                    from = sv;
                else if (ep_str_is(&sk, "to"))
                    to = sv;
                else if (ep_str_is(&sk, "rename"))
                    rename = sv;
                else {
                    ep_log(EP_ERROR, "config refused: convert.%.*s: unknown key %.*s (known: "
                                     "from, to, rename)", pn, ps, (int)sk.n, sk.s);
                    return 1;
                }
            }
            int f = from.type == EP_STR ? unit_index(&from) : -1;
            int t = to.type == EP_STR ? unit_index(&to) : -1;
            if (f < 0 || t < 0) {
                const ep_val *bad = f < 0 ? &from : &to;
                const char *which = f < 0 ? "from" : "to";
                if (bad->type != EP_STR)
                    ep_log(EP_ERROR, "config refused: convert.%.*s: '%s' must be a unit name",
                           pn, ps, which);
                else
                    ep_log(EP_ERROR, "config refused: convert.%.*s: unknown unit %.*s in '%s' "
                                     "(known: degC degF K, J kJ MJ Wh kWh MWh, W kW MW, Pa hPa "
                                     "kPa MPa mbar bar psi, mm cm m km in ft, mL L m3 gal, L/s "
                                     "L/min L/h m3/s m3/h gal/min, m/s km/h mph)",
                           pn, ps, (int)bad->n, bad->s, which);
                return 1;
            }
            if (units[f].kind != units[t].kind) {
                ep_log(EP_ERROR, "config refused: convert.%.*s: %s is a unit of %s, %s of %s",
                       pn, ps, units[f].name, kind_names[units[f].kind], units[t].name,
                       kind_names[units[t].kind]);
                return 1;
            }
            if (rename.type && (rename.type != EP_STR || rename.n <= 2)) {
                ep_log(EP_ERROR, "config refused: convert.%.*s: rename must be a non-empty "
                                 "string", pn, ps);
                return 1;
            }
            uint32_t i = n_conv;
            if (store(&prop, &conv[i].name_off, &conv[i].name_len) != 0 ||
                (rename.type && store(&rename, &conv[i].rename_off, &conv[i].rename_len) != 0)) {
                ep_log(EP_ERROR, "config refused: names too long");
                return 1;
            }
            if (!rename.type)
                conv[i].rename_len = 0;
            else if (name_is(conv[i].name_off, conv[i].name_len,
                             names + conv[i].rename_off, conv[i].rename_len))
                conv[i].rename_len = 0; /* renamed to itself */
            conv[i].from = f;
            conv[i].to = t;
            if (units[f].kind != TEMPERATURE) {
                /* value * (nf/df) / (nt/dt) = value * (nf*dt) / (df*nt), reduced */
                int64_t nf = units[f].num, df = units[f].den, nt = units[t].num,
                        dt = units[t].den;
                int64_t g1 = gcd(nf, nt), g2 = gcd(dt, df), p, q;
                if (__builtin_mul_overflow(nf / g1, dt / g2, &p) ||
                    __builtin_mul_overflow(df / g2, nt / g1, &q)) {
                    conv[i].p = ((double)nf / (double)df) / ((double)nt / (double)dt);
                    conv[i].q = 1;
                } else {
                    int64_t g = gcd(p, q);
                    conv[i].p = (double)(p / g);
                    conv[i].q = (double)(q / g);
                }
            }
            n_conv++;
        }
    }
    /* a name may be the target of one conversion only, and not another's source */
    for (uint32_t i = 0; i < n_conv; i++) {
        if (!conv[i].rename_len)
            continue;
        for (uint32_t j = 0; j < n_conv; j++) {
            if (j == i)
                continue;
            const char *r = names + conv[i].rename_off;
            uint32_t rl = conv[i].rename_len;
            if (name_is(conv[j].name_off, conv[j].name_len, r, rl) ||
                (j < i && conv[j].rename_len && name_is(conv[j].rename_off, conv[j].rename_len, r, rl))) {
                ep_log(EP_ERROR, "config refused: convert.%.*s: rename %.*s is used by another "
                                 "conversion", (int)conv[i].name_len, names + conv[i].name_off,
                       (int)rl, r);
                return 1;
            }
        }
    }
    return 0;
}

static double convert(uint32_t i, double v)
{
    int f = conv[i].from, t = conv[i].to;
    if (units[f].kind == TEMPERATURE) {
        double c = v; /* to degC */
        if (f == 1)
            c = (v - 32) * 5 / 9;
        else if (f == 2)
            c = v - 273.15;
        if (t == 1)
            return c * 9 / 5 + 32;
        if (t == 2)
            return c + 273.15;
        return c;
    }
    double p = conv[i].p, q = conv[i].q;
    if (q == 1)
        return v * p;
    if (p == 1)
        return v / q;
    double r = v * p / q;
    return isfinite(r) ? r : v * (p / q);
}

/* The conversion of a property name (-1: none), and whether it is some conversion's
 * rename target (*target, else -1). */
static int find(const ep_val *key, int *target)
{
    char buf[128];
    size_t n = ep_str_len(key);
    char *s = n <= sizeof buf ? buf : ep_xalloc(n);
    ep_str_copy(key, s);
    int found = -1;
    *target = -1;
    for (uint32_t i = 0; i < n_conv; i++) {
        if (found < 0 && name_is(conv[i].name_off, conv[i].name_len, s, n))
            found = (int)i;
        if (conv[i].rename_len && name_is(conv[i].rename_off, conv[i].rename_len, s, n))
            *target = (int)i;
    }
    return found;
}

static void put_key(ep_out *out, int *count, uint32_t c, const ep_val *raw)
{
    if ((*count)++)
        ep_putc(out, ',');
    if (conv[c].rename_len)
        ep_put_str(out, names + conv[c].rename_off, conv[c].rename_len);
    else
        ep_put_raw(out, raw);
    ep_putc(out, ':');
}

void plugin_process(const ep_val *batch, ep_out *out)
{
    static uint8_t renamed_here[MAX_CONV]; /* its rename target is written in this reading */
    static uint8_t overflow[MAX_CONV];
    ep_iter readings;
    ep_reading rd;
    int first = 1;
    ep_putc(out, '[');
    ep_iter_init(&readings, batch);
    while (ep_next_reading(&readings, &rd)) {
        ep_val values = rd.values, quality = rd.quality, k, v;

        memset(renamed_here, 0, n_conv);
        memset(overflow, 0, n_conv);
        ep_iter it;
        int c, target;
        if (values.type == EP_OBJ) {
            ep_iter_init(&it, &values);
            while (ep_next(&it, &k, &v))
                if ((c = find(&k, &target)) >= 0 && v.type == EP_NUM && conv[c].rename_len)
                    renamed_here[c] = 1;
        }
        if (quality.type == EP_OBJ) {
            ep_iter_init(&it, &quality);
            while (ep_next(&it, &k, &v))
                if ((c = find(&k, &target)) >= 0 && conv[c].rename_len)
                    renamed_here[c] = 1;
        }

        if (!first)
            ep_putc(out, ',');
        first = 0;
        ep_put_reading_head(out, &rd);
        ep_puts(out, ",\"values\":{");
        int count = 0;
        if (values.type == EP_OBJ) {
            ep_iter_init(&it, &values);
            while (ep_next(&it, &k, &v)) {
                c = find(&k, &target);
                if (c >= 0 && v.type == EP_NUM) {
                    double x = convert((uint32_t)c, ep_num(&v));
                    if (!isfinite(x)) {
                        overflow[c] = 1;
                        continue;
                    }
                    put_key(out, &count, (uint32_t)c, &k);
                    ep_put_num(out, x);
                    continue;
                }
                if (c < 0 && target >= 0 && renamed_here[target])
                    continue; /* replaced by the converted value renamed to it */
                if (count++)
                    ep_putc(out, ',');
                ep_put_raw(out, &k);
                ep_putc(out, ':');
                ep_put_raw(out, &v);
            }
        }
        ep_puts(out, "},\"quality\":{");
        count = 0;
        if (quality.type == EP_OBJ) {
            ep_iter_init(&it, &quality);
            while (ep_next(&it, &k, &v)) {
                c = find(&k, &target);
                if (c >= 0) {
                    put_key(out, &count, (uint32_t)c, &k);
                    ep_put_raw(out, &v);
                    continue;
                }
                if (target >= 0 && renamed_here[target])
                    continue;
                if (count++)
                    ep_putc(out, ',');
                ep_put_raw(out, &k);
                ep_putc(out, ':');
                ep_put_raw(out, &v);
            }
        }
        for (uint32_t i = 0; i < n_conv; i++) {
            if (!overflow[i])
                continue;
            if (count++)
                ep_putc(out, ',');
            if (conv[i].rename_len)
                ep_put_str(out, names + conv[i].rename_off, conv[i].rename_len);
            else
                ep_put_str(out, names + conv[i].name_off, conv[i].name_len);
            ep_puts(out, ":\"bad\"");
        }
        ep_puts(out, "}}");
    }
    ep_putc(out, ']');
}
