/* The server name (SNI) of a TLS ClientHello in C, read without terminating TLS: the twin of
 * _sni.py, accepting and refusing exactly what its parse_client_hello() does, with the same
 * error texts, and routing by name as its match_route() does. _sni.py's docstring says what is
 * accepted; tests/test_sni.py holds the two implementations to one corpus and to random input.
 *
 * Self-contained (C99): no allocation, no globals, everything static; included into one
 * translation unit after the other headers.
 *
 *   t2t_sni_parse(data, len, name, name_max, &hello_len)
 *                          everything the client sent so far (MSG_PEEK style): 0 while more bytes
 *                          are needed, 1 once the ClientHello's records are whole (name: its host
 *                          name, lower case, no trailing dot, NUL-terminated; "" without one;
 *                          hello_len: the bytes its records take), or -k for error k. Input of
 *                          T2T_SNI_IN_MAX bytes always gets 1 or an error.
 *   t2t_sni_error_text(code, data, len, out, out_max)
 *                          that error's text for that input, as str() of _sni's SniError.
 *   t2t_sni_match(name, patterns, npatterns)
 *                          the most specific matching route pattern's index, or -1.
 */
#ifndef T2T_LOOP_SNI_H
#define T2T_LOOP_SNI_H

#include <stddef.h>
#include <stdio.h>
#include <string.h>

/* The API's functions: static, and no warning in a translation unit that leaves some unused. */
#if defined(__GNUC__) || defined(__clang__)
#define T2T_SNI_API static __attribute__((unused))
#else
#define T2T_SNI_API static
#endif

#define T2T_SNI_HELLO_MAX 16384  /* _sni.MAX_HELLO: the handshake message, its header included */
#define T2T_SNI_RECORD_MAX 16384 /* _sni.MAX_RECORD_LENGTH: RFC 8446 5.1, 2^14 */
#define T2T_SNI_RECORDS_MAX 64   /* _sni.MAX_RECORDS: records one ClientHello may span */
#define T2T_SNI_RECORD_HEADER 5
/* _sni.MAX_INPUT (16704): a peek buffer of this size always gets an answer. */
#define T2T_SNI_IN_MAX (T2T_SNI_HELLO_MAX + T2T_SNI_RECORD_HEADER * T2T_SNI_RECORDS_MAX)
#define T2T_SNI_NAME_MAX 256  /* a name buffer: a host name (at most 255 bytes) and its NUL */
#define T2T_SNI_ERROR_MAX 128 /* any error text, its NUL included */
#define T2T_SNI_LABEL_MAX 63
#define T2T_SNI_SESSION_ID_MAX 32

/* Error k is returned as -k; t2t_sni_error_text words it. */
enum t2t_sni_error {
    T2T_SNI_NOT_TLS = 1,
    T2T_SNI_SSLV2,
    T2T_SNI_RECORD_TYPE,
    T2T_SNI_RECORD_VERSION,
    T2T_SNI_RECORD_EMPTY,
    T2T_SNI_RECORD_TOO_LONG,
    T2T_SNI_RECORD_PAST_END,
    T2T_SNI_TOO_MANY_RECORDS,
    T2T_SNI_NOT_HELLO,
    T2T_SNI_HELLO_TOO_LONG,
    T2T_SNI_HELLO_VERSION,
    T2T_SNI_TRUNCATED, /* detail: which field (enum t2t_sni_field) */
    T2T_SNI_SESSION_ID,
    T2T_SNI_CIPHERS,
    T2T_SNI_NO_COMPRESSION,
    T2T_SNI_AFTER_EXTENSIONS,
    T2T_SNI_TRUNCATED_EXTENSION,
    T2T_SNI_DUPLICATE_EXTENSION,
    T2T_SNI_LIST_LENGTH_MISSING,
    T2T_SNI_LIST_LENGTH,
    T2T_SNI_LIST_EMPTY,
    T2T_SNI_ENTRY_TRUNCATED,
    T2T_SNI_TWO_HOST_NAMES,
    T2T_SNI_NAME_EMPTY,
    T2T_SNI_NAME_TOO_LONG,
    T2T_SNI_NAME_CHARACTER,
    T2T_SNI_NAME_EMPTY_LABEL,
    T2T_SNI_NAME_LONG_LABEL
};

enum t2t_sni_field {
    T2T_SNI_F_VERSION,
    T2T_SNI_F_RANDOM,
    T2T_SNI_F_SESSION_ID,
    T2T_SNI_F_CIPHERS,
    T2T_SNI_F_COMPRESSION,
    T2T_SNI_F_EXTENSIONS,
    T2T_SNI_F_EXTENSION_HEADER
};

/* The handshake message as the records carry it: fragment k is data[at[k] : at[k] + (from[k+1]
   - from[k])], message bytes from[k] on. */
typedef struct t2t_sni_msg {
    const unsigned char *data;
    size_t at[T2T_SNI_RECORDS_MAX];
    size_t from[T2T_SNI_RECORDS_MAX];
    int n;
    int cur; /* the fragment the last byte came from: reads mostly go forward */
} t2t_sni_msg;

/* Message byte i (i below the bytes the fragments hold). */
static unsigned t2t_sni_byte(t2t_sni_msg *m, size_t i) {
    int k = m->cur;
    if (i < m->from[k]) k = 0;
    while (k + 1 < m->n && i >= m->from[k + 1]) k++;
    m->cur = k;
    return m->data[m->at[k] + (i - m->from[k])];
}

static unsigned t2t_sni_u16(t2t_sni_msg *m, size_t i) { return t2t_sni_byte(m, i) << 8 | t2t_sni_byte(m, i + 1); }

static int t2t_sni_supported_version(unsigned major, unsigned minor) { return major == 3 && minor <= 4; }

static int t2t_sni_fail(unsigned long *detail, unsigned long value, int error) {
    *detail = value;
    return -error;
}

/* A host name, message bytes [p, p + size): checked, then copied lower-cased into name without
   its trailing dot. 0 or -error. */
static int t2t_sni_name(t2t_sni_msg *m, size_t p, size_t size, char *name, size_t name_max, unsigned long *detail) {
    size_t i, label = 0, keep;
    if (size == 0) return -T2T_SNI_NAME_EMPTY;
    if (size > T2T_SNI_NAME_MAX - 1) return t2t_sni_fail(detail, size, T2T_SNI_NAME_TOO_LONG);
    for (i = 0; i < size; i++) {
        unsigned c = t2t_sni_byte(m, p + i);
        if (c == '.') {
            if (label == 0) return -T2T_SNI_NAME_EMPTY_LABEL;
            label = 0;
        } else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
                   c == '_') {
            if (++label > T2T_SNI_LABEL_MAX) return -T2T_SNI_NAME_LONG_LABEL;
        } else {
            return t2t_sni_fail(detail, c, T2T_SNI_NAME_CHARACTER);
        }
    }
    keep = label == 0 ? size - 1 : size; /* a trailing dot is dropped */
    if (name_max == 0) return 0;
    if (keep > name_max - 1) keep = name_max - 1;
    for (i = 0; i < keep; i++) {
        unsigned c = t2t_sni_byte(m, p + i);
        name[i] = (char)(c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c);
    }
    name[keep] = '\0';
    return 0;
}

/* The server_name extension's data, message bytes [p, end). */
static int t2t_sni_server_name(t2t_sni_msg *m, size_t p, size_t end, char *name, size_t name_max,
                               unsigned long *detail, unsigned long *detail2) {
    size_t size;
    int host_names = 0;
    if (end - p < 2) return -T2T_SNI_LIST_LENGTH_MISSING;
    size = t2t_sni_u16(m, p);
    p += 2;
    if (size != end - p) {
        *detail2 = end - p;
        return t2t_sni_fail(detail, size, T2T_SNI_LIST_LENGTH);
    }
    if (size == 0) return -T2T_SNI_LIST_EMPTY;
    while (p < end) {
        unsigned kind;
        if (end - p < 3) return -T2T_SNI_ENTRY_TRUNCATED;
        kind = t2t_sni_byte(m, p);
        size = t2t_sni_u16(m, p + 1);
        p += 3;
        if (end - p < size) return -T2T_SNI_ENTRY_TRUNCATED;
        if (kind == 0) {
            int r;
            if (host_names++) return -T2T_SNI_TWO_HOST_NAMES;
            r = t2t_sni_name(m, p, size, name, name_max, detail);
            if (r) return r;
        }
        p += size;
    }
    return 0;
}

/* The ClientHello's fields after its 4-byte header, message bytes [4, end). */
static int t2t_sni_body(t2t_sni_msg *m, size_t end, char *name, size_t name_max, unsigned long *detail,
                        unsigned long *detail2) {
    unsigned char seen[65536 / 8]; /* extension types met */
    size_t p = 4, size;
    if (end - p < 2) return t2t_sni_fail(detail, T2T_SNI_F_VERSION, T2T_SNI_TRUNCATED);
    if (!t2t_sni_supported_version(t2t_sni_byte(m, p), t2t_sni_byte(m, p + 1)))
        return t2t_sni_fail(detail, t2t_sni_u16(m, p), T2T_SNI_HELLO_VERSION);
    p += 2;
    if (end - p < 32) return t2t_sni_fail(detail, T2T_SNI_F_RANDOM, T2T_SNI_TRUNCATED);
    p += 32;
    if (end - p < 1) return t2t_sni_fail(detail, T2T_SNI_F_SESSION_ID, T2T_SNI_TRUNCATED);
    size = t2t_sni_byte(m, p);
    if (size > T2T_SNI_SESSION_ID_MAX) return t2t_sni_fail(detail, size, T2T_SNI_SESSION_ID);
    if (end - p - 1 < size) return t2t_sni_fail(detail, T2T_SNI_F_SESSION_ID, T2T_SNI_TRUNCATED);
    p += 1 + size;
    if (end - p < 2) return t2t_sni_fail(detail, T2T_SNI_F_CIPHERS, T2T_SNI_TRUNCATED);
    size = t2t_sni_u16(m, p);
    if (size == 0 || size % 2) return t2t_sni_fail(detail, size, T2T_SNI_CIPHERS);
    if (end - p - 2 < size) return t2t_sni_fail(detail, T2T_SNI_F_CIPHERS, T2T_SNI_TRUNCATED);
    p += 2 + size;
    if (end - p < 1) return t2t_sni_fail(detail, T2T_SNI_F_COMPRESSION, T2T_SNI_TRUNCATED);
    size = t2t_sni_byte(m, p);
    if (size == 0) return -T2T_SNI_NO_COMPRESSION;
    if (end - p - 1 < size) return t2t_sni_fail(detail, T2T_SNI_F_COMPRESSION, T2T_SNI_TRUNCATED);
    p += 1 + size;
    if (p == end) return 0; /* no extensions (TLS 1.0-1.2) */
    if (end - p < 2) return t2t_sni_fail(detail, T2T_SNI_F_EXTENSIONS, T2T_SNI_TRUNCATED);
    size = t2t_sni_u16(m, p);
    p += 2;
    if (end - p < size) return t2t_sni_fail(detail, T2T_SNI_F_EXTENSIONS, T2T_SNI_TRUNCATED);
    if (end - p > size) return t2t_sni_fail(detail, end - p - size, T2T_SNI_AFTER_EXTENSIONS);
    memset(seen, 0, sizeof seen);
    while (p < end) {
        unsigned kind;
        if (end - p < 4) return t2t_sni_fail(detail, T2T_SNI_F_EXTENSION_HEADER, T2T_SNI_TRUNCATED);
        kind = t2t_sni_u16(m, p);
        size = t2t_sni_u16(m, p + 2);
        p += 4;
        if (end - p < size) return t2t_sni_fail(detail, kind, T2T_SNI_TRUNCATED_EXTENSION);
        if (seen[kind >> 3] & (1u << (kind & 7))) return t2t_sni_fail(detail, kind, T2T_SNI_DUPLICATE_EXTENSION);
        seen[kind >> 3] |= (unsigned char)(1u << (kind & 7));
        if (kind == 0) {
            int r = t2t_sni_server_name(m, p, p + size, name, name_max, detail, detail2);
            if (r) return r;
        }
        p += size;
    }
    return 0;
}

/* t2t_sni_parse, with the values an error's text shows. */
static int t2t_sni_run(const unsigned char *data, size_t len, char *name, size_t name_max, size_t *hello_len,
                       unsigned long *detail, unsigned long *detail2) {
    t2t_sni_msg m;
    size_t pos = 0, have = 0, total = 0;
    int known = 0, records = 0;
    if (name_max > 0) name[0] = '\0';
    if (len == 0) return 0;
    if (data[0] != 22) {
        if (data[0] & 0x80) { /* maybe SSLv2's 2-byte record length; its message type follows */
            if (len < 3) return 0;
            if (data[2] == 1) return -T2T_SNI_SSLV2;
        }
        return t2t_sni_fail(detail, data[0], T2T_SNI_NOT_TLS);
    }
    m.data = data;
    m.n = 0;
    m.cur = 0;
    for (;;) {
        size_t length, start, body, avail;
        if (pos == len) return 0;
        if (data[pos] != 22) return t2t_sni_fail(detail, data[pos], T2T_SNI_RECORD_TYPE);
        if (len - pos < 3) return 0;
        if (!t2t_sni_supported_version(data[pos + 1], data[pos + 2]))
            return t2t_sni_fail(detail, (unsigned long)data[pos + 1] << 8 | data[pos + 2], T2T_SNI_RECORD_VERSION);
        if (len - pos < T2T_SNI_RECORD_HEADER) return 0;
        length = (size_t)data[pos + 3] << 8 | data[pos + 4];
        if (length == 0) return -T2T_SNI_RECORD_EMPTY;
        if (length > T2T_SNI_RECORD_MAX) return t2t_sni_fail(detail, length, T2T_SNI_RECORD_TOO_LONG);
        records++;
        start = have;
        if (known && start + length > total)
            return t2t_sni_fail(detail, start + length - total, T2T_SNI_RECORD_PAST_END);
        body = pos + T2T_SNI_RECORD_HEADER;
        avail = len - body < length ? len - body : length;
        if (avail > 0) { /* at most one fragment a record, at most T2T_SNI_RECORDS_MAX records */
            m.at[m.n] = body;
            m.from[m.n] = have;
            m.n++;
            have += avail;
        }
        if (!known) {
            unsigned type;
            if (have == 0) return 0;
            type = t2t_sni_byte(&m, 0);
            if (type != 1) return t2t_sni_fail(detail, type, T2T_SNI_NOT_HELLO);
            if (have >= 4) {
                total = (size_t)t2t_sni_byte(&m, 1) << 16 | (size_t)t2t_sni_byte(&m, 2) << 8 | t2t_sni_byte(&m, 3);
                total += 4;
                known = 1;
                if (total > T2T_SNI_HELLO_MAX) return t2t_sni_fail(detail, total, T2T_SNI_HELLO_TOO_LONG);
                if (start + length > total)
                    return t2t_sni_fail(detail, start + length - total, T2T_SNI_RECORD_PAST_END);
            }
        }
        if (avail < length) return 0;
        pos = body + length;
        if (known && have == total) {
            int r = t2t_sni_body(&m, total, name, name_max, detail, detail2);
            if (r) return r;
            *hello_len = pos;
            return 1;
        }
        if (records == T2T_SNI_RECORDS_MAX) return -T2T_SNI_TOO_MANY_RECORDS;
    }
}

T2T_SNI_API int t2t_sni_parse(const unsigned char *data, size_t len, char *name, size_t name_max,
                              size_t *hello_len) {
    unsigned long detail = 0, detail2 = 0;
    return t2t_sni_run(data, len, name, name_max, hello_len, &detail, &detail2);
}

T2T_SNI_API void t2t_sni_error_text(int code, const unsigned char *data, size_t len, char *out, size_t out_max) {
    char name[T2T_SNI_NAME_MAX];
    size_t hello_len = 0;
    unsigned long d = 0, d2 = 0;
    const char *field = "?";
    if (out_max == 0) return;
    if (t2t_sni_run(data, len, name, sizeof name, &hello_len, &d, &d2) != code || code >= 0) {
        snprintf(out, out_max, "no SNI error %d for this input", code);
        return;
    }
    switch (-code) {
    case T2T_SNI_NOT_TLS: snprintf(out, out_max, "not TLS (first byte 0x%02lx)", d); break;
    case T2T_SNI_SSLV2: snprintf(out, out_max, "unsupported SSLv2-style ClientHello"); break;
    case T2T_SNI_RECORD_TYPE:
        snprintf(out, out_max, "malformed ClientHello: record of content type 0x%02lx inside it", d);
        break;
    case T2T_SNI_RECORD_VERSION: snprintf(out, out_max, "unsupported TLS record version 0x%04lx", d); break;
    case T2T_SNI_RECORD_EMPTY: snprintf(out, out_max, "empty TLS record"); break;
    case T2T_SNI_RECORD_TOO_LONG:
        snprintf(out, out_max, "TLS record too long (%lu bytes, at most %d)", d, T2T_SNI_RECORD_MAX);
        break;
    case T2T_SNI_RECORD_PAST_END:
        snprintf(out, out_max, "malformed ClientHello: %lu byte%s more in its last record", d, d == 1 ? "" : "s");
        break;
    case T2T_SNI_TOO_MANY_RECORDS:
        snprintf(out, out_max, "ClientHello spans too many records (more than %d)", T2T_SNI_RECORDS_MAX);
        break;
    case T2T_SNI_NOT_HELLO: snprintf(out, out_max, "not a ClientHello (handshake type %lu)", d); break;
    case T2T_SNI_HELLO_TOO_LONG:
        snprintf(out, out_max, "ClientHello too long (%lu bytes, at most %d)", d, T2T_SNI_HELLO_MAX);
        break;
    case T2T_SNI_HELLO_VERSION: snprintf(out, out_max, "unsupported ClientHello version 0x%04lx", d); break;
    case T2T_SNI_TRUNCATED:
        switch (d) {
        case T2T_SNI_F_VERSION: field = "version"; break;
        case T2T_SNI_F_RANDOM: field = "random"; break;
        case T2T_SNI_F_SESSION_ID: field = "session id"; break;
        case T2T_SNI_F_CIPHERS: field = "cipher suites"; break;
        case T2T_SNI_F_COMPRESSION: field = "compression methods"; break;
        case T2T_SNI_F_EXTENSIONS: field = "extensions"; break;
        case T2T_SNI_F_EXTENSION_HEADER: field = "extension header"; break;
        default: break;
        }
        snprintf(out, out_max, "malformed ClientHello: truncated %s", field);
        break;
    case T2T_SNI_SESSION_ID:
        snprintf(out, out_max, "malformed ClientHello: session id of %lu bytes (at most %d)", d,
                 T2T_SNI_SESSION_ID_MAX);
        break;
    case T2T_SNI_CIPHERS: snprintf(out, out_max, "malformed ClientHello: bad cipher suites length %lu", d); break;
    case T2T_SNI_NO_COMPRESSION: snprintf(out, out_max, "malformed ClientHello: no compression methods"); break;
    case T2T_SNI_AFTER_EXTENSIONS:
        snprintf(out, out_max, "malformed ClientHello: %lu byte%s after the extensions", d, d == 1 ? "" : "s");
        break;
    case T2T_SNI_TRUNCATED_EXTENSION:
        snprintf(out, out_max, "malformed ClientHello: truncated extension 0x%04lx", d);
        break;
    case T2T_SNI_DUPLICATE_EXTENSION:
        snprintf(out, out_max, "malformed ClientHello: duplicate extension 0x%04lx", d);
        break;
    case T2T_SNI_LIST_LENGTH_MISSING:
        snprintf(out, out_max, "malformed server_name extension: truncated list length");
        break;
    case T2T_SNI_LIST_LENGTH:
        snprintf(out, out_max, "malformed server_name extension: list length %lu in %lu byte%s", d, d2,
                 d2 == 1 ? "" : "s");
        break;
    case T2T_SNI_LIST_EMPTY: snprintf(out, out_max, "malformed server_name extension: empty list"); break;
    case T2T_SNI_ENTRY_TRUNCATED: snprintf(out, out_max, "malformed server_name extension: truncated entry"); break;
    case T2T_SNI_TWO_HOST_NAMES:
        snprintf(out, out_max, "malformed server_name extension: more than one host name");
        break;
    case T2T_SNI_NAME_EMPTY: snprintf(out, out_max, "malformed server_name extension: empty name"); break;
    case T2T_SNI_NAME_TOO_LONG:
        snprintf(out, out_max, "malformed server_name extension: name too long (%lu bytes, at most %d)", d,
                 T2T_SNI_NAME_MAX - 1);
        break;
    case T2T_SNI_NAME_CHARACTER:
        snprintf(out, out_max, "malformed server_name extension: bad character 0x%02lx in name", d);
        break;
    case T2T_SNI_NAME_EMPTY_LABEL:
        snprintf(out, out_max, "malformed server_name extension: empty label in name");
        break;
    case T2T_SNI_NAME_LONG_LABEL:
        snprintf(out, out_max, "malformed server_name extension: label longer than %d bytes in name",
                 T2T_SNI_LABEL_MAX);
        break;
    default: snprintf(out, out_max, "no SNI error %d for this input", code); break;
    }
}

/* ---- routing by name ------------------------------------------------------------------------ */

static int t2t_sni_same(const char *a, const char *b, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) {
        unsigned char x = (unsigned char)a[i], y = (unsigned char)b[i];
        if (x >= 'A' && x <= 'Z') x = (unsigned char)(x + ('a' - 'A'));
        if (y >= 'A' && y <= 'Z') y = (unsigned char)(y + ('a' - 'A'));
        if (x != y) return 0;
    }
    return 1;
}

/* strlen without one trailing dot. */
static size_t t2t_sni_trimmed(const char *s) {
    size_t n = strlen(s);
    return n > 0 && s[n - 1] == '.' ? n - 1 : n;
}

/* _sni.match_route: the index of the most specific pattern matching name ("" or NULL: no name,
   -1), -1 if none. An exact name beats any "*.suffix"; the longest suffix beats shorter ones; the
   earliest pattern wins a tie. ASCII case-insensitive; one trailing dot ignored on either. */
T2T_SNI_API int t2t_sni_match(const char *name, const char *const *patterns, int npatterns) {
    size_t n, best_suffix = 0;
    int i, best = -1;
    if (name == NULL) return -1;
    n = t2t_sni_trimmed(name);
    if (n == 0) return -1;
    for (i = 0; i < npatterns; i++) {
        const char *p = patterns[i];
        size_t pn = t2t_sni_trimmed(p);
        if (pn >= 2 && p[0] == '*' && p[1] == '.') {
            size_t sn = pn - 1; /* ".example.com" */
            if (n > sn && t2t_sni_same(name + n - sn, p + 1, sn) && (best < 0 || sn > best_suffix)) {
                best = i;
                best_suffix = sn;
            }
        } else if (pn == n && t2t_sni_same(name, p, n)) {
            return i;
        }
    }
    return best;
}

#endif /* T2T_LOOP_SNI_H */
