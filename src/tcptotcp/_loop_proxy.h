/* The PROXY protocol (haproxy's proxy-protocol.txt), v1 text and v2 binary, in C: the twin of
 * _proxy.py, accepting and refusing exactly what its parse() does, with the same error texts,
 * and encoding byte for byte what its encode_v1()/encode_v2() give.
 *
 * Self-contained (C99, POSIX sockets): no allocation, no state; everything is static, and the
 * only global is the constant table of error texts. tests/test_proxy_corpus.py holds the two
 * implementations to each other (through _core.proxy_parse/proxy_encode).
 *
 *   t2t_proxy_parse(data, n, &h)   everything received so far (MSG_PEEK style): 0 while it is a
 *                                  proper prefix of a header that may still become valid, the
 *                                  header's length once whole (bytes after it are not looked
 *                                  at), or -k for error k (t2t_proxy_errors[k]).
 *   t2t_proxy_error_text(...)      that error's text, as str() of _proxy's ProxyHeaderError.
 *   t2t_proxy_encode(...)          our header for an upstream, v1 or v2.
 */
#ifndef T2T_LOOP_PROXY_H
#define T2T_LOOP_PROXY_H

#include <stddef.h>
#include <string.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <netinet/in.h>

/* The API's functions: static, and no warning in a translation unit that leaves some unused. */
#if defined(__GNUC__) || defined(__clang__)
#define T2T_PROXY_API static __attribute__((unused))
#else
#define T2T_PROXY_API static
#endif
/* sockaddr_in/sockaddr_in6 have a length field (sin_len) there. */
#if defined(__APPLE__) || defined(__FreeBSD__) || defined(__NetBSD__) || defined(__OpenBSD__) || defined(__DragonFly__)
#define T2T_PROXY_SIN_LEN 1
#endif

#define T2T_PROXY_V1_MAX 107            /* "PROXY UNKNOWN <v6> <v6> 65535 65535\r\n" */
#define T2T_PROXY_V2_FIXED 16           /* signature, version/command, family/protocol, length */
#define T2T_PROXY_V2_MAX (16 + 1024)    /* _proxy.MAX_V2_LENGTH */
#define T2T_PROXY_MAX_HEADER_BYTES 1040 /* _proxy.MAX_HEADER_BYTES: parse decides within it */
#define T2T_PROXY_IN_MAX T2T_PROXY_MAX_HEADER_BYTES /* a reader's buffer: never 0 once full */
#define T2T_PROXY_OUT_MAX 108           /* any encoding: v1 is at most 104 bytes, v2 52 */
#define T2T_PROXY_ERROR_MAX 256         /* any error text, its NUL included */

/* A parsed header. Without a usable address (v1 UNKNOWN; v2 LOCAL, AF_UNSPEC, AF_UNIX) the
   family is AF_UNSPEC, has_addresses 0, both lengths 0 and both ss_family AF_UNSPEC. */
typedef struct t2t_proxy_header {
    size_t length;   /* bytes the header took: relay data[length:] */
    int version;     /* 1 (text) or 2 (binary) */
    int family;      /* AF_INET, AF_INET6 or AF_UNSPEC */
    int has_addresses;
    struct sockaddr_storage source, destination; /* sockaddr_in / sockaddr_in6, as received */
    socklen_t source_len, destination_len;
    /* After an error: what its text formats. "%d"/"%02x": detail; "%s": the bytes
       data[detail_at : detail_at + detail_len] in Python's bytes repr. */
    int detail;
    size_t detail_at, detail_len;
} t2t_proxy_header;

/* Error k is returned as -k; its text is t2t_proxy_errors[k] (see t2t_proxy_error_text). */
enum t2t_proxy_error {
    T2T_PROXY_NOT_PROXY = 1,
    T2T_PROXY_V1_NO_CRLF,
    T2T_PROXY_V1_STRAY_CRLF,
    T2T_PROXY_V1_UNKNOWN_PROTOCOL,
    T2T_PROXY_V1_FIELDS_TCP4,
    T2T_PROXY_V1_FIELDS_TCP6,
    T2T_PROXY_V1_CHARACTER_TCP4,
    T2T_PROXY_V1_CHARACTER_TCP6,
    T2T_PROXY_V1_TOO_MANY_TCP4,
    T2T_PROXY_V1_TOO_MANY_TCP6,
    T2T_PROXY_V1_BAD_SOURCE,
    T2T_PROXY_V1_BAD_DESTINATION,
    T2T_PROXY_V1_BAD_SOURCE_PORT,
    T2T_PROXY_V1_BAD_DESTINATION_PORT,
    T2T_PROXY_V2_VERSION,
    T2T_PROXY_V2_COMMAND,
    T2T_PROXY_V2_DATAGRAM,
    T2T_PROXY_V2_FAMILY,
    T2T_PROXY_V2_TOO_LONG,
    T2T_PROXY_V2_SHORT_TCP4,
    T2T_PROXY_V2_SHORT_TCP6,
    T2T_PROXY_V2_SHORT_UNIX,
    T2T_PROXY_NERRORS
};

static const char *const t2t_proxy_errors[T2T_PROXY_NERRORS] = {
    "no error",
    "not a PROXY protocol header",
    "v1: no CRLF within 107 bytes",
    "v1: stray CR or LF",
    "v1: unknown protocol %s",
    "v1: expected 4 fields after TCP4, got %d",
    "v1: expected 4 fields after TCP6, got %d",
    "v1: unexpected character in TCP4 line",
    "v1: unexpected character in TCP6 line",
    "v1: too many fields after TCP4",
    "v1: too many fields after TCP6",
    "v1: bad source address %s",
    "v1: bad destination address %s",
    "v1: bad source port %s",
    "v1: bad destination port %s",
    "v2: unsupported version %d",
    "v2: unknown command %d",
    "v2: datagram (UDP) connections are not supported",
    "v2: unknown family/protocol 0x%02x",
    "v2: header of %d bytes exceeds 1040",
    "v2: address block of %d bytes is too short for 0x11",
    "v2: address block of %d bytes is too short for 0x21",
    "v2: address block of %d bytes is too short for 0x31",
};

static const unsigned char t2t_proxy_v1_prefix[6] = {'P', 'R', 'O', 'X', 'Y', ' '};
static const unsigned char t2t_proxy_v2_signature[12] = {'\r', '\n', '\r', '\n', 0, '\r', '\n', 'Q', 'U', 'I', 'T',
                                                         '\n'};

/* ---- parsing -------------------------------------------------------------------------------- */

static int t2t_proxy_fail(t2t_proxy_header *h, int error, int detail) {
    h->detail = detail;
    return -error;
}

/* An error quoting data[at : at + min(n, most)] (Python's text[:most]!r). */
static int t2t_proxy_fail_quoting(t2t_proxy_header *h, int error, size_t at, size_t n, size_t most) {
    h->detail_at = at;
    h->detail_len = n < most ? n : most;
    return -error;
}

static int t2t_proxy_digit(unsigned char c) { return c >= '0' && c <= '9'; }

static int t2t_proxy_hex(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Dotted IPv4 as _proxy's v1 takes it: four of 0|[1-9][0-9]{0,2}, each at most 255. */
static int t2t_proxy_ipv4(const unsigned char *s, size_t n, unsigned char out[4]) {
    size_t i = 0;
    for (int k = 0; k < 4; k++) {
        if (k > 0) {
            if (i >= n || s[i] != '.') return -1;
            i++;
        }
        if (i >= n || !t2t_proxy_digit(s[i])) return -1;
        unsigned value = 0;
        if (s[i] == '0') {
            i++;
        } else {
            for (size_t start = i; i < n && i - start < 3 && t2t_proxy_digit(s[i]); i++)
                value = value * 10 + (unsigned)(s[i] - '0');
        }
        if (value > 255) return -1;
        out[k] = (unsigned char)value;
    }
    return i == n ? 0 : -1;
}

/* IPv6 text as _proxy's v1 takes it: its pattern ([0-9A-Fa-f:]{2,39}, or at most 29 of them, a
   colon and 7 to 15 of [0-9.]), a dotted tail valid as above, then what Python's
   ipaddress.IPv6Address accepts (its rules, step by step: parts, "::", hextets of 1-4 digits). */
static int t2t_proxy_ipv6(const unsigned char *s, size_t n, unsigned char out[16]) {
    size_t last_colon = n, colons = 0;
    int dots = 0, other = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == ':') {
            last_colon = i;
            colons++;
        } else if (s[i] == '.') {
            dots = 1;
        } else if (t2t_proxy_hex(s[i]) < 0) {
            other = 1;
        }
    }
    if (other) return -1;
    if (!dots) {
        if (n < 2 || n > 39) return -1;
    } else {
        /* The second alternative: the dots all after the last colon, digits only there. */
        if (last_colon == n || last_colon < 1 || last_colon > 29) return -1;
        size_t tail = n - last_colon - 1;
        if (tail < 7 || tail > 15) return -1;
        for (size_t i = 0; i < last_colon; i++)
            if (s[i] == '.') return -1;
        for (size_t i = last_colon + 1; i < n; i++)
            if (!t2t_proxy_digit(s[i]) && s[i] != '.') return -1;
    }
    /* ipaddress: split(':', maxsplit=9); more than 9 colons never parses. */
    if (colons > 9) return -1;
    size_t nparts = colons + 1;
    if (nparts < 3) return -1;
    size_t start[11], len[11];
    unsigned value[11];
    for (size_t i = 0, p = 0, from = 0; i <= n; i++) {
        if (i == n || s[i] == ':') {
            start[p] = from;
            len[p] = i - from;
            p++;
            from = i + 1;
        }
    }
    for (size_t i = 0; i < nparts; i++) { /* each part's hextet, if it is one: 1-4 hex digits */
        value[i] = 0;
        for (size_t k = 0; k < len[i] && k < 4; k++)
            value[i] = value[i] << 4 | (unsigned)t2t_proxy_hex(s[start[i] + k]);
    }
    if (dots) { /* the dotted tail is the last part: two hextets */
        unsigned char v4[4];
        if (t2t_proxy_ipv4(s + start[nparts - 1], len[nparts - 1], v4) != 0) return -1;
        value[nparts - 1] = (unsigned)v4[0] << 8 | v4[1];
        value[nparts] = (unsigned)v4[2] << 8 | v4[3];
        len[nparts - 1] = len[nparts] = 1; /* valid, not empty */
        nparts++;
    }
    if (nparts > 9) return -1;
    size_t skip = 0; /* the empty part between "::" (never the first); 0: none */
    for (size_t i = 1; i + 1 < nparts; i++) {
        if (len[i] == 0) {
            if (skip) return -1;
            skip = i;
        }
    }
    size_t hi, lo, skipped; /* parts before "::", parts after it, zero hextets it stands for */
    if (skip) {
        hi = skip;
        lo = nparts - skip - 1;
        if (len[0] == 0 && --hi) return -1;
        if (len[nparts - 1] == 0 && --lo) return -1;
        if (hi + lo >= 8) return -1;
        skipped = 8 - (hi + lo);
    } else {
        if (nparts != 8 || len[0] == 0 || len[nparts - 1] == 0) return -1;
        hi = nparts;
        lo = skipped = 0;
    }
    unsigned hextets[8];
    size_t h = 0;
    for (size_t i = 0; i < nparts; i++) {
        if (i == hi) {
            for (size_t z = 0; z < skipped; z++) hextets[h++] = 0;
            i = nparts - lo;
            if (i == nparts) break;
        }
        if (len[i] == 0 || len[i] > 4) return -1;
        hextets[h++] = value[i];
    }
    if (h != 8) return -1;
    for (h = 0; h < 8; h++) {
        out[2 * h] = (unsigned char)(hextets[h] >> 8);
        out[2 * h + 1] = (unsigned char)hextets[h];
    }
    return 0;
}

/* A v1 port: 0|[1-9][0-9]{0,4}, at most 65535. */
static int t2t_proxy_port(const unsigned char *s, size_t n, unsigned *port) {
    if (n < 1 || n > 5 || !t2t_proxy_digit(s[0]) || (s[0] == '0' && n > 1)) return -1;
    unsigned value = 0;
    for (size_t i = 0; i < n; i++) {
        if (!t2t_proxy_digit(s[i])) return -1;
        value = value * 10 + (unsigned)(s[i] - '0');
    }
    if (value > 65535) return -1;
    *port = value;
    return 0;
}

static void t2t_proxy_set(struct sockaddr_storage *sa, socklen_t *sa_len, int family, const unsigned char *ip,
                          const unsigned char port[2]) {
    memset(sa, 0, sizeof(*sa));
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)sa;
#ifdef T2T_PROXY_SIN_LEN
        a->sin_len = sizeof(*a);
#endif
        a->sin_family = AF_INET;
        memcpy(&a->sin_port, port, 2);
        memcpy(&a->sin_addr, ip, 4);
        *sa_len = sizeof(*a);
    } else {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)sa;
#ifdef T2T_PROXY_SIN_LEN
        a->sin6_len = sizeof(*a);
#endif
        a->sin6_family = AF_INET6;
        memcpy(&a->sin6_port, port, 2);
        memcpy(&a->sin6_addr, ip, 16);
        *sa_len = sizeof(*a);
    }
}

static int t2t_proxy_v1_token(const unsigned char *s, size_t n) {
    if (n == 4 && memcmp(s, "TCP4", 4) == 0) return 4;
    if (n == 4 && memcmp(s, "TCP6", 4) == 0) return 6;
    if (n == 7 && memcmp(s, "UNKNOWN", 7) == 0) return 1;
    return 0;
}

/* No CRLF yet: refuse the line as soon as no completion of it could be valid. `end` bounds
   what is looked at (at most T2T_PROXY_V1_MAX). */
static int t2t_proxy_v1_prefix_check(const unsigned char *data, size_t end, t2t_proxy_header *h) {
    for (size_t i = 6; i < end; i++)
        if (data[i] == '\n' || (data[i] == '\r' && i + 1 < end)) return -T2T_PROXY_V1_STRAY_CRLF;
    if (end > 6 && data[end - 1] == '\r') end--;
    size_t space = 6;
    while (space < end && data[space] != ' ') space++;
    size_t token_len = space - 6;
    if (space == end) {
        static const char *const tokens[3] = {"TCP4", "TCP6", "UNKNOWN"};
        for (int t = 0; t < 3; t++)
            if (token_len <= strlen(tokens[t]) && memcmp(tokens[t], data + 6, token_len) == 0) return 0;
        return t2t_proxy_fail_quoting(h, T2T_PROXY_V1_UNKNOWN_PROTOCOL, 6, token_len, 16);
    }
    int token = t2t_proxy_v1_token(data + 6, token_len);
    if (!token) return t2t_proxy_fail_quoting(h, T2T_PROXY_V1_UNKNOWN_PROTOCOL, 6, token_len, 16);
    if (token == 1) return 0;
    size_t spaces = 0;
    for (size_t i = space + 1; i < end; i++) {
        unsigned char c = data[i];
        if (c == ' ') {
            spaces++;
        } else if (!t2t_proxy_digit(c) && c != '.' && (token == 4 || (c != ':' && t2t_proxy_hex(c) < 0))) {
            return -(token == 4 ? T2T_PROXY_V1_CHARACTER_TCP4 : T2T_PROXY_V1_CHARACTER_TCP6);
        }
    }
    if (spaces > 3) return -(token == 4 ? T2T_PROXY_V1_TOO_MANY_TCP4 : T2T_PROXY_V1_TOO_MANY_TCP6);
    return 0;
}

static int t2t_proxy_v1(const unsigned char *data, size_t n, t2t_proxy_header *h) {
    size_t window = n < T2T_PROXY_V1_MAX ? n : T2T_PROXY_V1_MAX;
    size_t end = 0;
    while (end + 1 < window && !(data[end] == '\r' && data[end + 1] == '\n')) end++;
    if (end + 1 >= window) { /* no CRLF ending within the first 107 bytes */
        int rc = t2t_proxy_v1_prefix_check(data, window, h);
        if (rc) return rc;
        return n >= T2T_PROXY_V1_MAX ? -T2T_PROXY_V1_NO_CRLF : 0;
    }
    for (size_t i = 6; i < end; i++)
        if (data[i] == '\r' || data[i] == '\n') return -T2T_PROXY_V1_STRAY_CRLF;
    size_t space = 6;
    while (space < end && data[space] != ' ') space++;
    int token = t2t_proxy_v1_token(data + 6, space - 6);
    if (token == 1) { /* UNKNOWN: whatever follows it is ignored */
        h->version = 1;
        h->length = end + 2;
        return (int)h->length;
    }
    if (!token) return t2t_proxy_fail_quoting(h, T2T_PROXY_V1_UNKNOWN_PROTOCOL, 6, space - 6, 16);
    /* The fields after the token, split at every space (b"".split(b" ") == [b""]). */
    size_t fields = 1;
    for (size_t i = space + 1; i < end; i++) fields += data[i] == ' ';
    if (fields != 4)
        return t2t_proxy_fail(h, token == 4 ? T2T_PROXY_V1_FIELDS_TCP4 : T2T_PROXY_V1_FIELDS_TCP6, (int)fields);
    size_t at[5], count = 0; /* field k is data[at[k] : at[k + 1] - 1] */
    at[count++] = space + 1;
    for (size_t i = space + 1; i < end; i++)
        if (data[i] == ' ') at[count++] = i + 1;
    at[4] = end + 1;
    int family = token == 4 ? AF_INET : AF_INET6;
    unsigned char ip[2][16], port[2][2];
    /* In the pure parser's order: source address, source port, destination address, port. */
    static const int errors[2][2] = {{T2T_PROXY_V1_BAD_SOURCE, T2T_PROXY_V1_BAD_SOURCE_PORT},
                                     {T2T_PROXY_V1_BAD_DESTINATION, T2T_PROXY_V1_BAD_DESTINATION_PORT}};
    for (int side = 0; side < 2; side++) {
        size_t a = at[side], a_len = at[side + 1] - 1 - a;
        size_t p = at[side + 2], p_len = at[side + 3] - 1 - p;
        int bad = family == AF_INET ? t2t_proxy_ipv4(data + a, a_len, ip[side])
                                    : t2t_proxy_ipv6(data + a, a_len, ip[side]);
        if (bad) return t2t_proxy_fail_quoting(h, errors[side][0], a, a_len, 48);
        unsigned value;
        if (t2t_proxy_port(data + p, p_len, &value) != 0)
            return t2t_proxy_fail_quoting(h, errors[side][1], p, p_len, 16);
        port[side][0] = (unsigned char)(value >> 8);
        port[side][1] = (unsigned char)value;
    }
    h->version = 1;
    h->length = end + 2;
    h->family = family;
    h->has_addresses = 1;
    t2t_proxy_set(&h->source, &h->source_len, family, ip[0], port[0]);
    t2t_proxy_set(&h->destination, &h->destination_len, family, ip[1], port[1]);
    return (int)h->length;
}

static int t2t_proxy_v2(const unsigned char *data, size_t n, t2t_proxy_header *h) {
    if (n <= 12) return 0;
    int version = data[12] >> 4, command = data[12] & 0x0F;
    if (version != 2) return t2t_proxy_fail(h, T2T_PROXY_V2_VERSION, version);
    if (command > 1) return t2t_proxy_fail(h, T2T_PROXY_V2_COMMAND, command);
    if (n <= 13) return 0;
    int fam = data[13];
    size_t need = 0; /* the address block the family needs; the rest is TLVs, skipped */
    int short_error = 0;
    if (command == 1) { /* PROXY: a family we take (LOCAL discards the whole block, family included) */
        switch (fam) {
        case 0x00: break;
        case 0x11: need = 12; short_error = T2T_PROXY_V2_SHORT_TCP4; break;
        case 0x21: need = 36; short_error = T2T_PROXY_V2_SHORT_TCP6; break;
        case 0x31: need = 216; short_error = T2T_PROXY_V2_SHORT_UNIX; break;
        case 0x12: case 0x22: case 0x32: return -T2T_PROXY_V2_DATAGRAM;
        default: return t2t_proxy_fail(h, T2T_PROXY_V2_FAMILY, fam);
        }
    }
    if (n < T2T_PROXY_V2_FIXED) return 0;
    size_t declared = (size_t)data[14] << 8 | data[15];
    size_t length = T2T_PROXY_V2_FIXED + declared;
    if (length > T2T_PROXY_V2_MAX) return t2t_proxy_fail(h, T2T_PROXY_V2_TOO_LONG, (int)length);
    if (declared < need) return t2t_proxy_fail(h, short_error, (int)declared);
    if (n < length) return 0;
    h->version = 2;
    h->length = length;
    if (command == 1 && (fam == 0x11 || fam == 0x21)) {
        int family = fam == 0x11 ? AF_INET : AF_INET6;
        size_t size = fam == 0x11 ? 4 : 16;
        const unsigned char *block = data + T2T_PROXY_V2_FIXED;
        h->family = family;
        h->has_addresses = 1;
        t2t_proxy_set(&h->source, &h->source_len, family, block, block + 2 * size);
        t2t_proxy_set(&h->destination, &h->destination_len, family, block + size, block + 2 * size + 2);
    }
    return (int)length;
}

/* The header at the start of data[0:n]: 0 (a proper prefix, may still become one; read more and
   call again with all of it), its length (> 0), or -k for error k. */
T2T_PROXY_API int t2t_proxy_parse(const unsigned char *data, size_t n, t2t_proxy_header *out) {
    out->length = 0;
    out->version = 0;
    out->family = AF_UNSPEC;
    out->has_addresses = 0;
    memset(&out->source, 0, sizeof(out->source));
    memset(&out->destination, 0, sizeof(out->destination));
    out->source.ss_family = out->destination.ss_family = AF_UNSPEC;
    out->source_len = out->destination_len = 0;
    out->detail = 0;
    out->detail_at = out->detail_len = 0;
    if (n >= 6 && memcmp(data, t2t_proxy_v1_prefix, 6) == 0) return t2t_proxy_v1(data, n, out);
    if (n >= 12 && memcmp(data, t2t_proxy_v2_signature, 12) == 0) return t2t_proxy_v2(data, n, out);
    if (n < 6 && memcmp(data, t2t_proxy_v1_prefix, n) == 0) return 0;
    if (n < 12 && memcmp(data, t2t_proxy_v2_signature, n) == 0) return 0;
    return -T2T_PROXY_NOT_PROXY;
}

/* ---- error texts ---------------------------------------------------------------------------- */

typedef struct t2t_proxy_text {
    char *buf;
    size_t cap, len;
} t2t_proxy_text;

static void t2t_proxy_put(t2t_proxy_text *t, char c) {
    if (t->len + 1 < t->cap) t->buf[t->len] = c;
    t->len++;
}

/* Bytes as Python's repr() writes them: b'...', or b"..." when they hold ' and no ". */
static void t2t_proxy_put_repr(t2t_proxy_text *t, const unsigned char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    char quote = '\'';
    if (memchr(s, '\'', n) && !memchr(s, '"', n)) quote = '"';
    t2t_proxy_put(t, 'b');
    t2t_proxy_put(t, quote);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c == (unsigned char)quote || c == '\\') {
            t2t_proxy_put(t, '\\');
            t2t_proxy_put(t, (char)c);
        } else if (c == '\t' || c == '\n' || c == '\r') {
            t2t_proxy_put(t, '\\');
            t2t_proxy_put(t, c == '\t' ? 't' : c == '\n' ? 'n' : 'r');
        } else if (c < ' ' || c >= 0x7f) {
            t2t_proxy_put(t, '\\');
            t2t_proxy_put(t, 'x');
            t2t_proxy_put(t, hex[c >> 4]);
            t2t_proxy_put(t, hex[c & 15]);
        } else {
            t2t_proxy_put(t, (char)c);
        }
    }
    t2t_proxy_put(t, quote);
}

/* The text of error `code` (the parser's negative result) for the data it parsed, as str() of
   the pure parser's ProxyHeaderError, NUL-terminated in buf[0:cap] (T2T_PROXY_ERROR_MAX always
   suffices). Returns its length (without the NUL; >= cap when cut short). */
T2T_PROXY_API size_t t2t_proxy_error_text(int code, const t2t_proxy_header *h, const unsigned char *data, char *buf,
                                          size_t cap) {
    t2t_proxy_text t = {buf, cap, 0};
    int k = -code;
    const char *msg = k > 0 && k < T2T_PROXY_NERRORS ? t2t_proxy_errors[k] : "unknown PROXY header error";
    for (const char *p = msg; *p; p++) {
        if (p[0] != '%') {
            t2t_proxy_put(&t, *p);
        } else if (p[1] == 's') {
            t2t_proxy_put_repr(&t, data + h->detail_at, h->detail_len);
            p++;
        } else if (p[1] == 'd') {
            char digits[16];
            int i = 0;
            unsigned value = h->detail < 0 ? 0u - (unsigned)h->detail : (unsigned)h->detail;
            do digits[i++] = (char)('0' + value % 10);
            while ((value /= 10) && i < 15);
            if (h->detail < 0) t2t_proxy_put(&t, '-');
            while (i) t2t_proxy_put(&t, digits[--i]);
            p++;
        } else if (p[1] == '0' && p[2] == '2' && p[3] == 'x') {
            static const char hex[] = "0123456789abcdef";
            t2t_proxy_put(&t, hex[(h->detail >> 4) & 15]);
            t2t_proxy_put(&t, hex[h->detail & 15]);
            p += 3;
        } else {
            t2t_proxy_put(&t, *p);
        }
    }
    if (cap) buf[t.len < cap ? t.len : cap - 1] = 0;
    return t.len;
}

/* ---- encoding ------------------------------------------------------------------------------- */

static size_t t2t_proxy_put_decimal(unsigned char *out, unsigned value) {
    char digits[10];
    size_t i = 0, n = 0;
    do digits[i++] = (char)('0' + value % 10);
    while (value /= 10);
    while (i) out[n++] = (unsigned char)digits[--i];
    return n;
}

static size_t t2t_proxy_put_ipv4(unsigned char *out, const unsigned char ip[4]) {
    size_t n = 0;
    for (int k = 0; k < 4; k++) {
        if (k) out[n++] = '.';
        n += t2t_proxy_put_decimal(out + n, ip[k]);
    }
    return n;
}

/* IPv6 as Python's ipaddress compresses it: lowercase hextets without heading zeroes, the
   longest run of two or more zero hextets (the first of equals) as "::". (Since gh-87799, in
   3.13, Python writes an IPv4-mapped address ::ffff:a.b.c.d instead; encode_v1 shows it only for
   a mapped address next to a real IPv6 one. See tests/test_proxy_corpus.py.) */
static size_t t2t_proxy_put_ipv6(unsigned char *out, const unsigned char ip[16]) {
    static const char hex[] = "0123456789abcdef";
    unsigned hextets[8];
    int best = -1, best_len = 0, run = 0;
    for (int k = 0; k < 8; k++) {
        hextets[k] = (unsigned)ip[2 * k] << 8 | ip[2 * k + 1];
        run = hextets[k] == 0 ? run + 1 : 0;
        if (run > best_len) {
            best_len = run;
            best = k - run + 1;
        }
    }
    if (best_len < 2) best = -1;
    size_t n = 0;
    for (int k = 0; k < 8; k++) {
        if (k == best) {
            out[n++] = ':';
            out[n++] = ':';
            k += best_len - 1;
            continue;
        }
        if (k && k != best + best_len) out[n++] = ':';
        int shift = 12;
        while (shift > 0 && !(hextets[k] >> shift & 15)) shift -= 4;
        for (; shift >= 0; shift -= 4) out[n++] = (unsigned char)hex[hextets[k] >> shift & 15];
    }
    return n;
}

/* Our header for a connection from `source` to `destination` (getpeername()/getsockname() of
   the client's socket, with `family` their family): `version` 1 (text) or 2 (binary), byte for
   byte as _proxy.encode_v1/encode_v2. A family other than AF_INET/AF_INET6 or a NULL address
   gives "PROXY UNKNOWN\r\n" / a v2 LOCAL header; two IPv4-mapped IPv6 addresses go out as TCP
   over IPv4. Returns the bytes written to out (T2T_PROXY_OUT_MAX always suffices), or 0 when
   `version` is not 1 or 2, an address's family is not `family`, or cap is too small. */
T2T_PROXY_API size_t t2t_proxy_encode(int version, int family, const struct sockaddr *source,
                                      const struct sockaddr *destination, unsigned char *out, size_t cap) {
    unsigned char buf[T2T_PROXY_OUT_MAX];
    size_t n = 0;
    if (version != 1 && version != 2) return 0;
    if ((family != AF_INET && family != AF_INET6) || source == NULL || destination == NULL) {
        static const unsigned char local[4] = {0x20, 0x00, 0x00, 0x00};
        if (version == 1) {
            memcpy(buf, "PROXY UNKNOWN\r\n", 15);
            n = 15;
        } else {
            memcpy(buf, t2t_proxy_v2_signature, 12);
            memcpy(buf + 12, local, 4);
            n = 16;
        }
    } else {
        if (source->sa_family != family || destination->sa_family != family) return 0;
        unsigned char ip[2][16], port[2][2];
        size_t size = family == AF_INET ? 4 : 16;
        const struct sockaddr *ends[2] = {source, destination};
        for (int i = 0; i < 2; i++) {
            if (family == AF_INET) {
                const struct sockaddr_in *a = (const struct sockaddr_in *)(const void *)ends[i];
                memcpy(ip[i], &a->sin_addr, 4);
                memcpy(port[i], &a->sin_port, 2);
            } else {
                const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)(const void *)ends[i];
                memcpy(ip[i], &a->sin6_addr, 16);
                memcpy(port[i], &a->sin6_port, 2);
            }
        }
        if (size == 16) { /* both ::ffff:a.b.c.d: the connection is IPv4 */
            static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
            if (memcmp(ip[0], mapped, 12) == 0 && memcmp(ip[1], mapped, 12) == 0) {
                memmove(ip[0], ip[0] + 12, 4);
                memmove(ip[1], ip[1] + 12, 4);
                size = 4;
            }
        }
        if (version == 1) {
            memcpy(buf, size == 4 ? "PROXY TCP4 " : "PROXY TCP6 ", 11);
            n = 11;
            for (int i = 0; i < 2; i++) {
                n += size == 4 ? t2t_proxy_put_ipv4(buf + n, ip[i]) : t2t_proxy_put_ipv6(buf + n, ip[i]);
                buf[n++] = ' ';
            }
            for (int i = 0; i < 2; i++) {
                n += t2t_proxy_put_decimal(buf + n, (unsigned)port[i][0] << 8 | port[i][1]);
                buf[n++] = i ? '\r' : ' ';
            }
            buf[n++] = '\n';
        } else {
            memcpy(buf, t2t_proxy_v2_signature, 12);
            buf[12] = 0x21;
            buf[13] = size == 4 ? 0x11 : 0x21;
            buf[14] = 0;
            buf[15] = (unsigned char)(2 * size + 4);
            n = 16;
            memcpy(buf + n, ip[0], size);
            memcpy(buf + n + size, ip[1], size);
            memcpy(buf + n + 2 * size, port[0], 2);
            memcpy(buf + n + 2 * size + 2, port[1], 2);
            n += 2 * size + 4;
        }
    }
    if (n > cap) return 0;
    memcpy(out, buf, n);
    return n;
}

/* ---- for the bindings: sockaddrs to and from packed addresses ------------------------------- */

/* A sockaddr_in (4 bytes of `ip`) or sockaddr_in6 (16) for port; returns its length, or 0. */
T2T_PROXY_API socklen_t t2t_proxy_sockaddr(const unsigned char *ip, size_t size, unsigned port,
                                           struct sockaddr_storage *out) {
    unsigned char wire[2] = {(unsigned char)(port >> 8), (unsigned char)port};
    socklen_t len = 0;
    if (size != 4 && size != 16) return 0;
    t2t_proxy_set(out, &len, size == 4 ? AF_INET : AF_INET6, ip, wire);
    return len;
}

/* The address bytes (4 or 16, the return value; 0 for any other family) and port of a sockaddr. */
T2T_PROXY_API size_t t2t_proxy_address(const struct sockaddr_storage *sa, unsigned char ip[16], unsigned *port) {
    const unsigned char *p;
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)(const void *)sa;
        memcpy(ip, &a->sin_addr, 4);
        p = (const unsigned char *)&a->sin_port;
        *port = (unsigned)p[0] << 8 | p[1];
        return 4;
    }
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)(const void *)sa;
        memcpy(ip, &a->sin6_addr, 16);
        p = (const unsigned char *)&a->sin6_port;
        *port = (unsigned)p[0] << 8 | p[1];
        return 16;
    }
    return 0;
}

#endif /* T2T_LOOP_PROXY_H */
