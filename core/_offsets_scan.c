/* The events consumer's fast path for `step.offsets` records (see core/offsets_scan.py).
 *
 * A Scanner reads a poll's records slice by slice (`feed`) and takes the ones it can read
 * exactly: a `step.offsets` event in compact JSON (no whitespace, no escapes, ASCII only,
 * the known fields once each), whose ids, offsets and `ts` pass every check the msgspec
 * decode and `core.messages.check_event` make, keyed by its batch id. Of those it keeps
 * only what `core.applier.script_entries` would make of them: per (pipeline, batch, step)
 * each partition's highest offset and its latest total. Everything else (another kind, a
 * field it does not know, a value out of range, anything it is not certain of) is left to
 * the usual decode, which also gives the reason of a refusal: `feed` returns those records'
 * places. It never refuses a record itself.
 *
 * Ids are [A-Za-z0-9._-]{1,128}, so a NUL never occurs in one and joins them unambiguously
 * into the table's keys.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ID 128
#define MAX_PARTS 64  /* partitions in one record beyond this: left to the usual decode */
#define MAX_NUMBER 40 /* bytes of a `ts` beyond this: likewise */

static unsigned char ID_BYTE[256];

static void init_tables(void) {
    const char *ok = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-";
    for (const char *c = ok; *c; c++) ID_BYTE[(unsigned char)*c] = 1;
}

/* --- the merge tables ------------------------------------------------------------------
 *
 * Groups: (pipeline, batch, step), the key "pipeline\0batch\0step". Values: (group, kind,
 * partition) -> int, kind 'o' (the highest wins) or 't' (the latest wins). Each is a dense
 * array in the order first met (drained in that order) with an open-addressing index of
 * positions + 1 (0: free); key bytes live in one arena, by offset. */

typedef struct {
    uint64_t hash;
    size_t key;         /* arena offset */
    uint32_t len;
} Group;

typedef struct {
    uint64_t hash;
    size_t name;        /* arena offset */
    uint32_t len;
    uint32_t group;
    char kind;
    int64_t value;
} Value;

typedef struct {
    uint32_t *slots;
    size_t cap;         /* a power of two, or 0 */
} Index;

typedef struct {
    PyObject_HEAD
    char *arena;
    size_t arena_used, arena_cap;
    Group *groups;
    size_t n_groups, groups_cap;
    Value *values;
    size_t n_values, values_cap;
    Index group_index, value_index;
    uint64_t k0, k1;    /* the hash key */
    int64_t max_offset;
    Py_ssize_t taken;
} Scanner;

/* SipHash-1-3 (as CPython's str hash), keyed per process by the caller: the ids come from
 * producers, and a hash anyone can invert would let crafted ones pile into one probe run
 * (each insert then walks all the others: quadratic). Little-endian loads, as on x86. */
#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                              \
    do {                                                                                      \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                             \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                                \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                                \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                             \
    } while (0)

static uint64_t siphash13(uint64_t k0, uint64_t k1, const char *s, size_t n) {
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
    uint64_t last = (uint64_t)n << 56;
    for (; n >= 8; s += 8, n -= 8) {
        uint64_t m;
        memcpy(&m, s, 8);
        v3 ^= m;
        SIPROUND;
        v0 ^= m;
    }
    uint64_t tail = 0;
    memcpy(&tail, s, n);
    last |= tail;
    v3 ^= last;
    SIPROUND;
    v0 ^= last;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static int grow(void **items, size_t *cap, size_t need, size_t size) {
    if (need <= *cap) return 0;
    size_t cap2 = *cap ? *cap : 1024;
    while (cap2 < need) cap2 *= 2;
    void *grown = realloc(*items, cap2 * size);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *items = grown;
    *cap = cap2;
    return 0;
}

static long arena_put(Scanner *self, const char *p, size_t n) {
    if (grow((void **)&self->arena, &self->arena_cap, self->arena_used + n, 1) < 0) return -1;
    size_t at = self->arena_used;
    memcpy(self->arena + at, p, n);
    self->arena_used += n;
    return (long)at;
}

/* The index rebuilt at twice the size once half full, from the hashes kept in the items. */
static int index_room(Index *index, size_t count, const void *items, size_t size) {
    if ((count + 1) * 2 <= index->cap) return 0;
    size_t cap = index->cap ? index->cap * 2 : 4096;
    uint32_t *slots = calloc(cap, sizeof(uint32_t));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < count; i++) {
        uint64_t h = *(const uint64_t *)((const char *)items + i * size);  /* hash first */
        size_t j = h & (cap - 1);
        while (slots[j]) j = (j + 1) & (cap - 1);
        slots[j] = (uint32_t)(i + 1);
    }
    free(index->slots);
    index->slots = slots;
    index->cap = cap;
    return 0;
}

/* The group's position, added if new; -1 on error. */
static long group_of(Scanner *self, const char *key, size_t len) {
    if (index_room(&self->group_index, self->n_groups, self->groups, sizeof(Group)) < 0)
        return -1;
    uint64_t h = siphash13(self->k0, self->k1, key, len);
    size_t mask = self->group_index.cap - 1;
    for (size_t j = h & mask;; j = (j + 1) & mask) {
        uint32_t at = self->group_index.slots[j];
        if (at == 0) {
            if (grow((void **)&self->groups, &self->groups_cap, self->n_groups + 1,
                     sizeof(Group)) < 0)
                return -1;
            long offset = arena_put(self, key, len);
            if (offset < 0) return -1;
            self->groups[self->n_groups] = (Group){h, (size_t)offset, (uint32_t)len};
            self->group_index.slots[j] = (uint32_t)++self->n_groups;
            return (long)self->n_groups - 1;
        }
        const Group *g = &self->groups[at - 1];
        if (g->hash == h && g->len == len && memcmp(self->arena + g->key, key, len) == 0)
            return (long)at - 1;
    }
}

static int value_put(Scanner *self, uint32_t group, char kind, const char *name, size_t len,
                     int64_t value) {
    if (index_room(&self->value_index, self->n_values, self->values, sizeof(Value)) < 0)
        return -1;
    /* hashed as group, kind and name in a row: the group's number and the kind mixed in
     * like the name's bytes, not folded into them */
    char key[4 + 1 + MAX_ID];
    memcpy(key, &group, 4);
    key[4] = kind;
    memcpy(key + 5, name, len);
    uint64_t h = siphash13(self->k0, self->k1, key, 5 + len);
    size_t mask = self->value_index.cap - 1;
    for (size_t j = h & mask;; j = (j + 1) & mask) {
        uint32_t at = self->value_index.slots[j];
        if (at == 0) {
            if (grow((void **)&self->values, &self->values_cap, self->n_values + 1,
                     sizeof(Value)) < 0)
                return -1;
            long offset = arena_put(self, name, len);
            if (offset < 0) return -1;
            self->values[self->n_values] =
                (Value){h, (size_t)offset, (uint32_t)len, group, kind, value};
            self->value_index.slots[j] = (uint32_t)++self->n_values;
            return 0;
        }
        Value *v = &self->values[at - 1];
        if (v->hash == h && v->group == group && v->kind == kind && v->len == len &&
            memcmp(self->arena + v->name, name, len) == 0) {
            if (kind == 't' || value > v->value) v->value = value;
            return 0;
        }
    }
}

static void tables_clear(Scanner *self) {
    free(self->arena);
    free(self->groups);
    free(self->values);
    free(self->group_index.slots);
    free(self->value_index.slots);
    self->arena = NULL;
    self->groups = NULL;
    self->values = NULL;
    self->group_index = (Index){NULL, 0};
    self->value_index = (Index){NULL, 0};
    self->arena_used = self->arena_cap = 0;
    self->n_groups = self->groups_cap = 0;
    self->n_values = self->values_cap = 0;
}

/* --- one record ------------------------------------------------------------------------- */

typedef struct {
    const char *p;
    size_t n;
} Span;

typedef struct {
    Span name;
    int64_t value;
} Part;

typedef struct {
    const char *s, *end;
} Cursor;

/* A string of 1..128 id bytes, its quotes consumed. */
static int read_id(Cursor *c, Span *out) {
    if (c->s >= c->end || *c->s != '"') return 0;
    const char *start = ++c->s;
    while (c->s < c->end && ID_BYTE[(unsigned char)*c->s]) c->s++;
    if (c->s >= c->end || *c->s != '"') return 0;  /* another byte inside, or no end */
    size_t n = (size_t)(c->s - start);
    if (n < 1 || n > MAX_ID) return 0;
    c->s++;
    out->p = start;
    out->n = n;
    return 1;
}

/* A JSON integer 0 <= v <= max: digits only, no leading zero. */
static int read_offset(Cursor *c, int64_t max, int64_t *out) {
    const char *start = c->s;
    int64_t v = 0;
    while (c->s < c->end && *c->s >= '0' && *c->s <= '9') {
        if (c->s - start >= 16) return 0;
        v = v * 10 + (*c->s - '0');
        c->s++;
    }
    size_t n = (size_t)(c->s - start);
    if (n == 0 || (n > 1 && *start == '0') || v > max) return 0;
    *out = v;
    return 1;
}

/* A JSON number in the strict grammar, without a sign, at most `limit` as a double. */
static int read_ts(Cursor *c, double limit) {
    const char *start = c->s;
    const char *s = c->s;
    if (s < c->end && *s == '0') {
        s++;
    } else {
        if (s >= c->end || *s < '1' || *s > '9') return 0;
        while (s < c->end && *s >= '0' && *s <= '9') s++;
    }
    if (s < c->end && *s == '.') {
        const char *d = ++s;
        while (s < c->end && *s >= '0' && *s <= '9') s++;
        if (s == d) return 0;
    }
    if (s < c->end && (*s == 'e' || *s == 'E')) {
        s++;
        if (s < c->end && (*s == '+' || *s == '-')) s++;
        const char *d = s;
        while (s < c->end && *s >= '0' && *s <= '9') s++;
        if (s == d) return 0;
    }
    size_t n = (size_t)(s - start);
    if (n > MAX_NUMBER) return 0;
    /* Most stamps are decided by their integer part (a plain decimal of at most 15 digits,
     * so exact as a double): the value lies in [ip, ip + 1]. strtod only for the rest. */
    size_t int_n = 0;
    while (int_n < n && start[int_n] >= '0' && start[int_n] <= '9') int_n++;
    if (int_n <= 15 && (int_n == n || (start[int_n] == '.' &&
                                       memchr(start, 'e', n) == NULL &&
                                       memchr(start, 'E', n) == NULL))) {
        double ip = 0;
        for (size_t i = 0; i < int_n; i++) ip = ip * 10 + (start[i] - '0');
        if (ip + 1 <= limit) {
            c->s = s;
            return 1;
        }
        if (ip > limit) return 0;
    }
    char buf[MAX_NUMBER + 1];
    memcpy(buf, start, n);
    buf[n] = '\0';
    char *stop;
    double v = strtod(buf, &stop);
    if (stop != buf + n || !isfinite(v) || v < 0 || v > limit) return 0;
    c->s = s;
    return 1;
}

/* {"id":int,...}: at most MAX_PARTS entries, no name twice. */
static int read_parts(Cursor *c, int64_t max, Part *parts, int *count, int allow_empty) {
    if (c->s >= c->end || *c->s != '{') return 0;
    c->s++;
    *count = 0;
    if (c->s < c->end && *c->s == '}') {
        c->s++;
        return allow_empty;
    }
    for (;;) {
        if (*count >= MAX_PARTS) return 0;
        Part *p = &parts[*count];
        if (!read_id(c, &p->name)) return 0;
        if (c->s >= c->end || *c->s != ':') return 0;
        c->s++;
        if (!read_offset(c, max, &p->value)) return 0;
        for (int i = 0; i < *count; i++) {
            if (parts[i].name.n == p->name.n && memcmp(parts[i].name.p, p->name.p, p->name.n) == 0)
                return 0;
        }
        (*count)++;
        if (c->s >= c->end) return 0;
        if (*c->s == '}') {
            c->s++;
            return 1;
        }
        if (*c->s != ',') return 0;
        c->s++;
    }
}

enum { F_TYPE = 1, F_SCHEMA = 2, F_EVENT = 4, F_BATCH = 8, F_PIPELINE = 16, F_TS = 32,
       F_STEP = 64, F_OFFSETS = 128, F_TOTALS = 256 };
#define F_REQUIRED (F_TYPE | F_SCHEMA | F_EVENT | F_BATCH | F_PIPELINE | F_TS | F_STEP | F_OFFSETS)

typedef struct {
    Span batch, pipeline, step;
    Part offsets[MAX_PARTS], totals[MAX_PARTS];
    int n_offsets, n_totals;
} Record;

static int is_name(const char *p, size_t n, const char *name) {
    return strlen(name) == n && memcmp(p, name, n) == 0;
}

static int read_record(const char *s, size_t n, double limit, int64_t max, Record *r) {
    Cursor c = {s, s + n};
    unsigned seen = 0;
    Span id, tag;
    r->n_totals = 0;
    if (c.s >= c.end || *c.s != '{') return 0;
    c.s++;
    for (;;) {
        /* a field name: lower-case letters and '_' only */
        if (c.s >= c.end || *c.s != '"') return 0;
        const char *name = ++c.s;
        while (c.s < c.end && ((*c.s >= 'a' && *c.s <= 'z') || *c.s == '_')) c.s++;
        if (c.s >= c.end || *c.s != '"') return 0;
        size_t name_n = (size_t)(c.s - name);
        c.s++;
        if (c.s >= c.end || *c.s != ':') return 0;
        c.s++;
        unsigned field = 0;
        /* dispatched on the name's length first: most lengths name one field */
        switch (name_n) {
        case 2: if (memcmp(name, "ts", 2) == 0) field = F_TS; break;
        case 4:
            if (memcmp(name, "type", 4) == 0) field = F_TYPE;
            else if (memcmp(name, "step", 4) == 0) field = F_STEP;
            break;
        case 6:
            if (memcmp(name, "schema", 6) == 0) field = F_SCHEMA;
            else if (memcmp(name, "totals", 6) == 0) field = F_TOTALS;
            break;
        case 7: if (memcmp(name, "offsets", 7) == 0) field = F_OFFSETS; break;
        case 8:
            if (memcmp(name, "event_id", 8) == 0) field = F_EVENT;
            else if (memcmp(name, "batch_id", 8) == 0) field = F_BATCH;
            break;
        case 11: if (memcmp(name, "pipeline_id", 11) == 0) field = F_PIPELINE; break;
        }
        if (field == 0 || (seen & field)) return 0;  /* unknown to the fast path, or twice */
        seen |= field;
        int ok;
        switch (field) {
        case F_TYPE: ok = read_id(&c, &tag) && is_name(tag.p, tag.n, "step.offsets"); break;
        case F_SCHEMA: ok = c.s < c.end && *c.s == '1'; c.s += ok; break;
        case F_EVENT: ok = read_id(&c, &id); break;
        case F_BATCH: ok = read_id(&c, &r->batch); break;
        case F_PIPELINE: ok = read_id(&c, &r->pipeline); break;
        case F_STEP: ok = read_id(&c, &r->step); break;
        case F_TS: ok = read_ts(&c, limit); break;
        case F_OFFSETS: ok = read_parts(&c, max, r->offsets, &r->n_offsets, 0); break;
        default: ok = read_parts(&c, max, r->totals, &r->n_totals, 1); break;
        }
        if (!ok) return 0;
        if (c.s >= c.end) return 0;
        if (*c.s == '}') {
            c.s++;
            break;
        }
        if (*c.s != ',') return 0;
        c.s++;
    }
    return c.s == c.end && (seen & F_REQUIRED) == F_REQUIRED;
}

/* --- the Python type -------------------------------------------------------------------- */

static int record_into_table(Scanner *self, const Record *r) {
    char key[3 * (MAX_ID + 1)];
    size_t len = 0;
    memcpy(key, r->pipeline.p, r->pipeline.n);
    len += r->pipeline.n;
    key[len++] = '\0';
    memcpy(key + len, r->batch.p, r->batch.n);
    len += r->batch.n;
    key[len++] = '\0';
    memcpy(key + len, r->step.p, r->step.n);
    len += r->step.n;
    long group = group_of(self, key, len);
    if (group < 0) return -1;
    for (int i = 0; i < r->n_offsets; i++) {
        const Part *p = &r->offsets[i];
        if (value_put(self, (uint32_t)group, 'o', p->name.p, p->name.n, p->value) < 0) return -1;
    }
    for (int i = 0; i < r->n_totals; i++) {
        const Part *p = &r->totals[i];
        if (value_put(self, (uint32_t)group, 't', p->name.p, p->name.n, p->value) < 0) return -1;
    }
    return 0;
}

static int Scanner_init(Scanner *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"max_offset", "key", NULL};
    long long max_offset;
    const char *key;
    Py_ssize_t key_n;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Ly#", names, &max_offset, &key, &key_n))
        return -1;
    if (key_n != 16) {
        PyErr_SetString(PyExc_ValueError, "key: 16 bytes");
        return -1;
    }
    tables_clear(self);
    memcpy(&self->k0, key, 8);
    memcpy(&self->k1, key + 8, 8);
    self->max_offset = max_offset;
    self->taken = 0;
    return 0;
}

static void Scanner_dealloc(Scanner *self) {
    tables_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* feed(values, keys, ts_limit) -> list of the places of the records not taken */
static PyObject *Scanner_feed(Scanner *self, PyObject *args) {
    PyObject *values, *keys;
    double limit;
    if (!PyArg_ParseTuple(args, "O!O!d", &PyList_Type, &values, &PyList_Type, &keys, &limit))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(values);
    if (PyList_GET_SIZE(keys) != n) {
        PyErr_SetString(PyExc_ValueError, "values and keys differ in length");
        return NULL;
    }
    PyObject *left = PyList_New(0);
    if (left == NULL) return NULL;
    Record r;
    /* The sizes read again each round: the allocations below may run other code. */
    for (Py_ssize_t i = 0; i < n && i < PyList_GET_SIZE(values) && i < PyList_GET_SIZE(keys);
         i++) {
        PyObject *value = PyList_GET_ITEM(values, i);
        PyObject *key = PyList_GET_ITEM(keys, i);
        int ok = PyBytes_CheckExact(value) && PyBytes_CheckExact(key) &&
                 read_record(PyBytes_AS_STRING(value), (size_t)PyBytes_GET_SIZE(value), limit,
                             self->max_offset, &r) &&
                 (size_t)PyBytes_GET_SIZE(key) == r.batch.n &&
                 memcmp(PyBytes_AS_STRING(key), r.batch.p, r.batch.n) == 0;
        if (ok) {
            if (record_into_table(self, &r) < 0) {
                Py_DECREF(left);
                return NULL;
            }
            self->taken++;
            continue;
        }
        PyObject *place = PyLong_FromSsize_t(i);
        if (place == NULL || PyList_Append(left, place) < 0) {
            Py_XDECREF(place);
            Py_DECREF(left);
            return NULL;
        }
        Py_DECREF(place);
    }
    return left;
}

static PyObject *text(const char *p, size_t n) {
    return PyUnicode_DecodeASCII(p, (Py_ssize_t)n, NULL);
}

/* drain() -> [(pipeline_id, batch_id, step, offsets, totals)], in the order first met; the
 * tables are emptied. */
static PyObject *Scanner_drain(Scanner *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New((Py_ssize_t)self->n_groups);
    if (out == NULL) return NULL;
    for (size_t i = 0; i < self->n_groups; i++) {
        const Group *g = &self->groups[i];
        const char *s = self->arena + g->key;
        size_t a = strlen(s), b = strlen(s + a + 1), c = g->len - a - b - 2;
        PyObject *group = Py_BuildValue("(NNNNN)", text(s, a), text(s + a + 1, b),
                                        text(s + a + b + 2, c), PyDict_New(), PyDict_New());
        if (group == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, group);
    }
    for (size_t i = 0; i < self->n_values; i++) {
        const Value *v = &self->values[i];
        PyObject *group = PyList_GET_ITEM(out, (Py_ssize_t)v->group);
        PyObject *target = PyTuple_GET_ITEM(group, v->kind == 't' ? 4 : 3);
        PyObject *name = text(self->arena + v->name, v->len);
        PyObject *value = PyLong_FromLongLong(v->value);
        int failed = name == NULL || value == NULL || PyDict_SetItem(target, name, value) < 0;
        Py_XDECREF(name);
        Py_XDECREF(value);
        if (failed) {
            Py_DECREF(out);
            return NULL;
        }
    }
    tables_clear(self);
    return out;
}

static PyObject *Scanner_get_taken(Scanner *self, void *Py_UNUSED(closure)) {
    return PyLong_FromSsize_t(self->taken);
}

static PyMethodDef Scanner_methods[] = {
    {"feed", (PyCFunction)Scanner_feed, METH_VARARGS,
     "feed(values, keys, ts_limit): takes what it can read exactly; returns the places of "
     "the records left to the usual decode."},
    {"drain", (PyCFunction)Scanner_drain, METH_NOARGS,
     "drain(): [(pipeline_id, batch_id, step, offsets, totals)] of the records taken, each "
     "partition's highest offset and latest total; empties the scanner."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Scanner_getset[] = {
    {"taken", (getter)Scanner_get_taken, NULL, "records taken since the scanner was made", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "core._offsets_scan.Scanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Scanner_init,
    .tp_dealloc = (destructor)Scanner_dealloc,
    .tp_methods = Scanner_methods,
    .tp_getset = Scanner_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_offsets_scan",
    "The events consumer's fast path for step.offsets records (core.offsets_scan).", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__offsets_scan(void) {
    init_tables();
    if (PyType_Ready(&ScannerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&ScannerType);
    if (PyModule_AddObject(m, "Scanner", (PyObject *)&ScannerType) < 0) {
        Py_DECREF(&ScannerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
