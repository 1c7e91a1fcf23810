/* derive: values computed from the others of the same reading.
 *
 * Config: {"outputs": [{"name": "apparent_power", "expr": "voltage * current"}, ...]}
 * An expression has + - * /, unary minus (and plus), parentheses, numbers (1, 2.5,
 * 1e-3), property names ([A-Za-z_][A-Za-z0-9_.]*) and the functions sqrt(x), abs(x),
 * min(a, b), max(a, b). Expressions are compiled once, in init, to a small stack
 * program; a syntax error refuses the config (logged with its column).
 *
 * Outputs are evaluated in order, so an output may use earlier ones. An output whose
 * inputs are missing (absent, bad quality, not a number) or whose result (or any
 * intermediate) is not finite is not added to values but to quality as "bad", unless
 * none of its inputs is in the reading at all (another kind of device): then it is
 * left out. An output whose name the reading already has (in values or quality) is
 * left out too: input values pass through unchanged.
 */
#include "edge_plugin.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_OUTPUTS 64
#define MAX_VARS 256
#define MAX_CODE 4096
#define MAX_CONSTS 1024
#define MAX_STACK 64
#define MAX_DEPTH 32
#define NAME_ARENA (16 * 1024)

enum { OP_CONST, OP_VAR, OP_NEG, OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_SQRT, OP_ABS, OP_MIN, OP_MAX };

typedef struct {
    uint8_t op;
    uint16_t arg;
} insn;

static insn code[MAX_CODE];
static uint32_t n_code;
static double consts[MAX_CONSTS];
static uint32_t n_consts;

static struct {
    uint32_t off, len;
} vars[MAX_VARS];
static uint32_t n_vars;
static char names[NAME_ARENA];
static uint32_t names_used;

static struct {
    uint32_t var;        /* the output's own name */
    uint32_t code, ncode; /* its program */
    uint32_t n_inputs;   /* distinct variables it reads */
} outputs[MAX_OUTPUTS];
static uint32_t n_outputs;

/* per reading */
enum { V_ABSENT = 0, V_NUM, V_OTHER, V_BAD };
static uint8_t var_state[MAX_VARS];
static double var_num[MAX_VARS];

static int var_index(const char *s, size_t len, int create)
{
    for (uint32_t i = 0; i < n_vars; i++)
        if (ep_memeq(names + vars[i].off, vars[i].len, s, len))
            return (int)i;
    if (!create || n_vars == MAX_VARS || len > NAME_ARENA - names_used)
        return -1;
    memcpy(names + names_used, s, len);
    vars[n_vars].off = names_used;
    vars[n_vars].len = (uint32_t)len;
    names_used += (uint32_t)len;
    return (int)n_vars++;
}

/* ---- the compiler: recursive descent ---- */
typedef struct {
    const char *s, *p, *end;
    const char *err;
    const char *err_at;
    int depth;
    int max_sp, sp;
} compiler;

static int is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
static int is_digit(char c) { return c >= '0' && c <= '9'; }

static void skip(compiler *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

static int fail(compiler *c, const char *msg)
{
    if (!c->err) {
        c->err = msg;
        c->err_at = c->p;
    }
    return -1;
}

static int emit(compiler *c, int op, int arg, int stack_delta)
{
    if (n_code == MAX_CODE)
        return fail(c, "expressions too long");
    code[n_code].op = (uint8_t)op;
    code[n_code].arg = (uint16_t)arg;
    n_code++;
    c->sp += stack_delta;
    if (c->sp > c->max_sp)
        c->max_sp = c->sp;
    if (c->max_sp > MAX_STACK)
        return fail(c, "expression too deep");
    return 0;
}

static int expr(compiler *c);

static int primary(compiler *c)
{
    skip(c);
    if (c->p >= c->end)
        return fail(c, "expected a number, a name or '('");
    char ch = *c->p;
    if (ch == '(') {
        c->p++;
        if (expr(c))
            return -1;
        skip(c);
        if (c->p >= c->end || *c->p != ')')
            return fail(c, "expected ')'");
        c->p++;
        return 0;
    }
    if (is_digit(ch) || (ch == '.' && c->p + 1 < c->end && is_digit(c->p[1]))) {
        const char *start = c->p;
        while (c->p < c->end && is_digit(*c->p))
            c->p++;
        if (c->p < c->end && *c->p == '.') {
            c->p++;
            while (c->p < c->end && is_digit(*c->p))
                c->p++;
        }
        if (c->p < c->end && (*c->p == 'e' || *c->p == 'E')) {
            const char *q = c->p + 1;
            if (q < c->end && (*q == '+' || *q == '-'))
                q++;
            if (q >= c->end || !is_digit(*q))
                return fail(c, "bad exponent in a number");
            while (q < c->end && is_digit(*q))
                q++;
            c->p = q;
        }
        char buf[128];
        size_t n = (size_t)(c->p - start);
        if (n >= sizeof buf)
            return fail(c, "number too long");
        memcpy(buf, start, n);
        buf[n] = 0;
        double v = strtod(buf, NULL);
        if (!isfinite(v))
            return fail(c, "number out of range");
        if (n_consts == MAX_CONSTS)
            return fail(c, "too many numbers");
        consts[n_consts] = v;
        return emit(c, OP_CONST, (int)n_consts++, 1);
    }
    if (ch == '[') { /* [voltage-l1]: a name of any characters but ']' (KubeEdge's have '-') */
        const char *start = ++c->p;
        while (c->p < c->end && *c->p != ']')
            c->p++;
        if (c->p >= c->end)
            return fail(c, "expected ']' to end a [name]");
        size_t n = (size_t)(c->p - start);
        c->p++;
        if (n == 0)
            return fail(c, "an empty [name]");
        int vi = var_index(start, n, 1);
        if (vi < 0)
            return fail(c, "too many names");
        return emit(c, OP_VAR, vi, 1);
    }
    if (is_alpha(ch)) {
        const char *start = c->p;
        while (c->p < c->end && (is_alpha(*c->p) || is_digit(*c->p) || *c->p == '.'))
            c->p++;
        size_t n = (size_t)(c->p - start);
        const char *after = c->p;
        skip(c);
        if (c->p < c->end && *c->p == '(') {
            int op, nargs;
            if (ep_memeq(start, n, "sqrt", 4))
                op = OP_SQRT, nargs = 1;
            else if (ep_memeq(start, n, "abs", 3))
                op = OP_ABS, nargs = 1;
            else if (ep_memeq(start, n, "min", 3))
                op = OP_MIN, nargs = 2;
            else if (ep_memeq(start, n, "max", 3))
                op = OP_MAX, nargs = 2;
            else {
                c->p = start;
                return fail(c, "unknown function (known: sqrt, abs, min, max)");
            }
            c->p++;
            for (int i = 0; i < nargs; i++) {
                if (i) {
                    skip(c);
                    if (c->p >= c->end || *c->p != ',')
                        return fail(c, "expected ',' (min and max take two arguments)");
                    c->p++;
                }
                if (expr(c))
                    return -1;
            }
            skip(c);
            if (c->p >= c->end || *c->p != ')')
                return fail(c, nargs == 1 ? "expected ')' (sqrt and abs take one argument)"
                                          : "expected ')'");
            c->p++;
            return emit(c, op, 0, 1 - nargs);
        }
        c->p = after;
        int vi = var_index(start, n, 1);
        if (vi < 0)
            return fail(c, "too many names");
        return emit(c, OP_VAR, vi, 1);
    }
    return fail(c, "expected a number, a name or '('");
}

static int unary(compiler *c)
{
    skip(c);
    if (c->p < c->end && (*c->p == '-' || *c->p == '+')) {
        int neg = *c->p == '-';
        c->p++;
        if (++c->depth > MAX_DEPTH)
            return fail(c, "expression too deep");
        if (unary(c))
            return -1;
        c->depth--;
        return neg ? emit(c, OP_NEG, 0, 0) : 0;
    }
    return primary(c);
}

static int term(compiler *c)
{
    if (unary(c))
        return -1;
    for (;;) {
        skip(c);
        if (c->p >= c->end || (*c->p != '*' && *c->p != '/'))
            return 0;
        int op = *c->p == '*' ? OP_MUL : OP_DIV;
        c->p++;
        if (unary(c) || emit(c, op, 0, -1))
            return -1;
    }
}

static int expr(compiler *c)
{
    if (++c->depth > MAX_DEPTH)
        return fail(c, "expression too deep");
    if (term(c))
        return -1;
    for (;;) {
        skip(c);
        if (c->p >= c->end || (*c->p != '+' && *c->p != '-'))
            break;
        int op = *c->p == '+' ? OP_ADD : OP_SUB;
        c->p++;
        if (term(c) || emit(c, op, 0, -1))
            return -1;
    }
    c->depth--;
    return 0;
}

static int compile(uint32_t index, const char *name, size_t name_len, const char *src,
                   size_t len)
{
    compiler c = {src, src, src + len, NULL, NULL, 0, 0, 0};
    uint32_t start = n_code;
    if (expr(&c) == 0) {
        skip(&c);
        if (c.p < c.end)
            fail(&c, "unexpected text (an operator missing?)");
    }
    if (c.err) {
        ep_log(EP_ERROR, "config refused: outputs[%u] (%.*s): %s at column %d of \"%.*s\"",
               (unsigned)index, (int)name_len, name, c.err, (int)(c.err_at - src) + 1, (int)len,
               src);
        return -1;
    }
    outputs[index].code = start;
    outputs[index].ncode = n_code - start;
    /* count the distinct variables it reads */
    uint32_t n = 0;
    for (uint32_t i = start; i < n_code; i++) {
        if (code[i].op != OP_VAR)
            continue;
        int seen = 0;
        for (uint32_t j = start; j < i; j++)
            if (code[j].op == OP_VAR && code[j].arg == code[i].arg)
                seen = 1;
        n += !seen;
    }
    outputs[index].n_inputs = n;
    return 0;
}

int plugin_init(const ep_val *cfg)
{
    n_code = n_consts = n_vars = names_used = n_outputs = 0;
    ep_iter it;
    ep_val k, v;
    ep_iter_init(&it, cfg);
    while (ep_next(&it, &k, &v)) {
        if (!ep_str_is(&k, "outputs")) {
            ep_log(EP_ERROR, "config refused: unknown key %.*s (known: outputs)", (int)k.n, k.s);
            return 1;
        }
        if (v.type != EP_ARR) {
            ep_log(EP_ERROR, "config refused: outputs must be a list of {name, expr}");
            return 1;
        }
        ep_iter oi;
        ep_val o;
        ep_iter_init(&oi, &v);
        while (ep_next(&oi, NULL, &o)) {
            uint32_t i = n_outputs;
            ep_val name = {0}, ex = {0}, ok, ov;
            if (o.type == EP_OBJ) {
                ep_iter fi;
                ep_iter_init(&fi, &o);
                while (ep_next(&fi, &ok, &ov)) {
                    if (ep_str_is(&ok, "name"))
                        name = ov;
                    else if (ep_str_is(&ok, "expr"))
                        ex = ov;
                    else {
                        ep_log(EP_ERROR, "config refused: outputs[%u]: unknown key %.*s "
                                         "(known: name, expr)", (unsigned)i, (int)ok.n, ok.s);
                        return 1;
                    }
                }
            }
            if (name.type != EP_STR || ex.type != EP_STR || name.n <= 2) {
                ep_log(EP_ERROR, "config refused: outputs[%u] must be {\"name\": a non-empty "
                                 "string, \"expr\": a string}", (unsigned)i);
                return 1;
            }
            if (i == MAX_OUTPUTS) {
                ep_log(EP_ERROR, "config refused: more than %d outputs", MAX_OUTPUTS);
                return 1;
            }
            size_t nlen, elen;
            char *nm = ep_str_dup(&name, &nlen);
            char *src = ep_str_dup(&ex, &elen);
            if (compile(i, nm, nlen, src, elen) != 0)
                return 1;
            for (uint32_t j = 0; j < i; j++)
                if (ep_memeq(names + vars[outputs[j].var].off, vars[outputs[j].var].len, nm,
                             nlen)) {
                    ep_log(EP_ERROR, "config refused: two outputs are named %s", nm);
                    return 1;
                }
            int vi = var_index(nm, nlen, 1);
            if (vi < 0) {
                ep_log(EP_ERROR, "config refused: too many names");
                return 1;
            }
            outputs[i].var = (uint32_t)vi;
            n_outputs++;
        }
    }
    return 0;
}

/* Evaluate output o: 1 with *res, or 0 when an input is missing or a value not finite. */
static int eval(uint32_t o, double *res)
{
    double st[MAX_STACK];
    int sp = 0;
    for (uint32_t i = outputs[o].code, end = i + outputs[o].ncode; i < end; i++) {
        insn in = code[i];
        double a, b;
        switch (in.op) {
        case OP_CONST: st[sp++] = consts[in.arg]; continue;
        case OP_VAR:
            if (var_state[in.arg] != V_NUM)
                return 0;
            st[sp++] = var_num[in.arg];
            continue;
        case OP_NEG: st[sp - 1] = -st[sp - 1]; continue;
        case OP_SQRT: st[sp - 1] = sqrt(st[sp - 1]); break;
        case OP_ABS: st[sp - 1] = fabs(st[sp - 1]); break;
        default:
            b = st[--sp];
            a = st[sp - 1];
            switch (in.op) {
            case OP_ADD: a = a + b; break;
            case OP_SUB: a = a - b; break;
            case OP_MUL: a = a * b; break;
            case OP_DIV: a = a / b; break;
            case OP_MIN: a = a < b ? a : b; break;
            default: a = a > b ? a : b; break;
            }
            st[sp - 1] = a;
        }
        if (!isfinite(st[sp - 1]))
            return 0;
    }
    *res = st[0];
    return isfinite(*res);
}

/* Whether any input of output o is in the reading (in values or quality). */
static int any_input_present(uint32_t o)
{
    for (uint32_t i = outputs[o].code, end = i + outputs[o].ncode; i < end; i++)
        if (code[i].op == OP_VAR && var_state[code[i].arg] != V_ABSENT)
            return 1;
    return 0;
}

static void mark(const ep_val *k, int state, const ep_val *v)
{
    char buf[128];
    size_t len = ep_str_len(k);
    char *s = len <= sizeof buf ? buf : ep_xalloc(len);
    ep_str_copy(k, s);
    int vi = var_index(s, len, 0);
    if (vi < 0)
        return;
    if (state == V_NUM) {
        double d = ep_num(v);
        if (!isfinite(d))
            state = V_OTHER;
        var_num[vi] = d;
    }
    var_state[vi] = (uint8_t)state; /* quality comes after values: bad wins */
}

static void put_members(ep_out *out, const ep_val *obj, int *count)
{
    ep_iter it;
    ep_val k, v;
    if (obj->type != EP_OBJ)
        return;
    ep_iter_init(&it, obj);
    while (ep_next(&it, &k, &v)) {
        if ((*count)++)
            ep_putc(out, ',');
        ep_put_raw(out, &k);
        ep_putc(out, ':');
        ep_put_raw(out, &v);
    }
}

void plugin_process(const ep_val *batch, ep_out *out)
{
    ep_iter readings;
    ep_reading rd;
    int first = 1;
    static uint8_t result[MAX_OUTPUTS]; /* 0 left out, 1 value, 2 bad */
    static double value[MAX_OUTPUTS];
    ep_putc(out, '[');
    ep_iter_init(&readings, batch);
    while (ep_next_reading(&readings, &rd)) {
        ep_val values = rd.values, quality = rd.quality, k, v;

        memset(var_state, 0, n_vars);
        ep_iter it;
        if (values.type == EP_OBJ) {
            ep_iter_init(&it, &values);
            while (ep_next(&it, &k, &v))
                mark(&k, v.type == EP_NUM ? V_NUM : V_OTHER, &v);
        }
        if (quality.type == EP_OBJ) {
            ep_iter_init(&it, &quality);
            while (ep_next(&it, &k, &v))
                mark(&k, V_BAD, &v);
        }
        for (uint32_t o = 0; o < n_outputs; o++) {
            uint32_t var = outputs[o].var;
            result[o] = 0;
            if (var_state[var] != V_ABSENT)
                continue; /* the reading has it already */
            if (outputs[o].n_inputs > 0 && !any_input_present(o))
                continue; /* another kind of device */
            if (eval(o, &value[o])) {
                result[o] = 1;
                var_state[var] = V_NUM;
                var_num[var] = value[o];
            } else {
                result[o] = 2;
                var_state[var] = V_BAD;
            }
        }

        if (!first)
            ep_putc(out, ',');
        first = 0;
        ep_put_reading_head(out, &rd);
        ep_puts(out, ",\"values\":{");
        int count = 0;
        put_members(out, &values, &count);
        for (uint32_t o = 0; o < n_outputs; o++) {
            if (result[o] != 1)
                continue;
            if (count++)
                ep_putc(out, ',');
            ep_put_str(out, names + vars[outputs[o].var].off, vars[outputs[o].var].len);
            ep_putc(out, ':');
            ep_put_num(out, value[o]);
        }
        ep_puts(out, "},\"quality\":{");
        count = 0;
        put_members(out, &quality, &count);
        for (uint32_t o = 0; o < n_outputs; o++) {
            if (result[o] != 2)
                continue;
            if (count++)
                ep_putc(out, ',');
            ep_put_str(out, names + vars[outputs[o].var].off, vars[outputs[o].var].len);
            ep_puts(out, ":\"bad\"");
        }
        ep_puts(out, "}}");
    }
    ep_putc(out, ']');
}
