/* ---- TLS records: through the OpenSSL the interpreter's ssl module loaded ---------------------
 *
 * A TLS side of a bridge is an ssl.SSLSocket whose handshake Python did; the loop reads and
 * writes its records with the SSL object itself (SSL_read_ex/SSL_write_ex through the loop's
 * buffer, never splice). Nothing is linked: t2t_tls_bind finds the functions in the libssl and
 * libcrypto that _ssl's module file already mapped (dlopen with RTLD_NOLOAD), so the wheel carries
 * no OpenSSL and the records use the very library that made the SSL object. Only the API that
 * OpenSSL 1.1.1 and 3.x share. Without it (a static or non-OpenSSL ssl module), TLS bridges stay
 * on the pure engine.
 *
 * The SSL object is the loop's alone while the bridge runs: its socket BIO is moved to the
 * bridge's own dup of the fd (so that the Python object's close cannot close it under the loop),
 * _core.pyx holds a reference to the object, and Python does not touch it until the bridge
 * ended. */

#include <dlfcn.h>
#include <stdio.h>
#include <strings.h>

enum {
    T2T_SSL_ERROR_SSL = 1,
    T2T_SSL_ERROR_WANT_READ = 2,
    T2T_SSL_ERROR_WANT_WRITE = 3,
    T2T_SSL_ERROR_SYSCALL = 5,
    T2T_SSL_ERROR_ZERO_RETURN = 6,
    T2T_SSL_CTRL_MODE = 33,
    T2T_SSL_MODE_ENABLE_PARTIAL_WRITE = 1,
    T2T_SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER = 2,
    T2T_SSL_MODE_AUTO_RETRY = 4,
    T2T_BIO_TYPE_SOCKET = 5 | 0x0400 | 0x0100, /* a source/sink on a descriptor */
    T2T_BIO_C_SET_FD = 104,
    T2T_BIO_NOCLOSE = 0,
    T2T_SSL_CTRL_SET_TLSEXT_HOSTNAME = 55,
    T2T_TLSEXT_NAMETYPE_HOST_NAME = 0,
    T2T_X509_V_OK = 0,
};

typedef struct t2t_tls_api {
    int (*read_ex)(void *ssl, void *buf, size_t num, size_t *got);
    int (*write_ex)(void *ssl, const void *buf, size_t num, size_t *written);
    int (*get_error)(const void *ssl, int ret);
    int (*shutdown)(void *ssl);
    int (*get_fd)(const void *ssl);
    long (*ctrl)(void *ssl, int cmd, long larg, void *parg);
    void *(*get_rbio)(const void *ssl);
    void *(*get_wbio)(const void *ssl);
    int (*bio_type)(const void *bio);
    long (*bio_ctrl)(void *bio, int cmd, long larg, void *parg);
    void (*clear_errors)(void);
    unsigned long (*peek_error)(void);
    const char *(*reason_text)(unsigned long e);
    /* Handshakes (see t2t_tls_accepting, t2t_tls_connecting): */
    void *(*ssl_new)(void *ctx);
    void (*ssl_free)(void *ssl);
    int (*set_fd)(void *ssl, int fd);
    void (*set_accept_state)(void *ssl);
    void (*set_connect_state)(void *ssl);
    int (*do_handshake)(void *ssl);
    long (*verify_result)(const void *ssl);
    const char *(*verify_text)(long n);
    void *(*param)(void *ssl);
    int (*param_host)(void *param, const char *name, size_t len);
    int (*param_ip)(void *param, const char *ip);
    int (*ctx_up_ref)(void *ctx);
    void (*ctx_free)(void *ctx);
    unsigned long (*ctx_options)(const void *ctx);
    int (*ctx_verify_mode)(const void *ctx);
    /* What a handshake negotiated (see t2t_tls_describe): */
    const char *(*version)(const void *ssl);
    const void *(*current_cipher)(const void *ssl);
    const char *(*cipher_name)(const void *cipher);
    const char *(*servername)(const void *ssl, int type);
    void (*alpn_selected)(const void *ssl, const unsigned char **data, unsigned int *len);
    void *(*peer_certificate)(const void *ssl); /* a reference: x509_free */
    void (*x509_free)(void *x509);
    void *(*subject)(const void *x509);
    int (*name_count)(const void *name);
    void *(*name_entry)(const void *name, int i);
    void *(*entry_object)(const void *entry);
    void *(*entry_data)(const void *entry);
    int (*object_text)(char *buf, int len, const void *object, int no_name);
    int (*string_utf8)(unsigned char **out, const void *string);
    void (*crypto_free)(void *p, const char *file, int line);
    /* ALPN (see t2t_tls_serve_alpn): */
    int (*select_next_proto)(unsigned char **out, unsigned char *outlen, const unsigned char *server,
                             unsigned int server_len, const unsigned char *client, unsigned int client_len);
    void (*ctx_alpn_select)(void *ctx, int (*cb)(void *, const unsigned char **, unsigned char *,
                                                 const unsigned char *, unsigned int, void *),
                            void *arg);
} t2t_tls_api;

static t2t_tls_api t2t_tls;
static int t2t_tls_bound; /* atomic: 1 once every function was found */
static pthread_mutex_t t2t_tls_binding = PTHREAD_MUTEX_INITIALIZER;

static int t2t_tls_find(const char *path, const char **why);

/* Find the functions in the module at `path` (the _ssl extension) and what it links; 0, or -1
   with a reason in `why`. Once is enough; later calls answer at once. From any thread. */
static int t2t_tls_bind(const char *path, const char **why) {
    if (__atomic_load_n(&t2t_tls_bound, __ATOMIC_ACQUIRE)) return 0;
    pthread_mutex_lock(&t2t_tls_binding);
    int rc = __atomic_load_n(&t2t_tls_bound, __ATOMIC_ACQUIRE) ? 0 : t2t_tls_find(path, why);
    pthread_mutex_unlock(&t2t_tls_binding);
    return rc;
}

static int t2t_tls_find(const char *path, const char **why) {
    void *lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD | RTLD_LOCAL);
    if (!lib) {
        *why = "the ssl module's library is not loaded";
        return -1;
    }
    t2t_tls_api api;
    /* (through a union: ISO C has no cast from an object pointer to a function pointer) */
#define T2T_FIND(field, name)                          \
    do {                                               \
        union { void *p; __typeof__(api.field) f; } u; \
        u.p = dlsym(lib, name);                        \
        if (!u.p) {                                    \
            *why = "its OpenSSL lacks " name;          \
            dlclose(lib);                              \
            return -1;                                 \
        }                                              \
        api.field = u.f;                               \
    } while (0)
    T2T_FIND(read_ex, "SSL_read_ex");
    T2T_FIND(write_ex, "SSL_write_ex");
    T2T_FIND(get_error, "SSL_get_error");
    T2T_FIND(shutdown, "SSL_shutdown");
    T2T_FIND(get_fd, "SSL_get_fd");
    T2T_FIND(ctrl, "SSL_ctrl");
    T2T_FIND(get_rbio, "SSL_get_rbio");
    T2T_FIND(get_wbio, "SSL_get_wbio");
    T2T_FIND(bio_type, "BIO_method_type");
    T2T_FIND(bio_ctrl, "BIO_ctrl");
    T2T_FIND(clear_errors, "ERR_clear_error");
    T2T_FIND(peek_error, "ERR_peek_error");
    T2T_FIND(reason_text, "ERR_reason_error_string");
    T2T_FIND(ssl_new, "SSL_new");
    T2T_FIND(ssl_free, "SSL_free");
    T2T_FIND(set_fd, "SSL_set_fd");
    T2T_FIND(set_accept_state, "SSL_set_accept_state");
    T2T_FIND(set_connect_state, "SSL_set_connect_state");
    T2T_FIND(do_handshake, "SSL_do_handshake");
    T2T_FIND(verify_result, "SSL_get_verify_result");
    T2T_FIND(verify_text, "X509_verify_cert_error_string");
    T2T_FIND(param, "SSL_get0_param");
    T2T_FIND(param_host, "X509_VERIFY_PARAM_set1_host");
    T2T_FIND(param_ip, "X509_VERIFY_PARAM_set1_ip_asc");
    T2T_FIND(ctx_up_ref, "SSL_CTX_up_ref");
    T2T_FIND(ctx_free, "SSL_CTX_free");
    T2T_FIND(ctx_options, "SSL_CTX_get_options");
    T2T_FIND(ctx_verify_mode, "SSL_CTX_get_verify_mode");
    T2T_FIND(version, "SSL_get_version");
    T2T_FIND(current_cipher, "SSL_get_current_cipher");
    T2T_FIND(cipher_name, "SSL_CIPHER_get_name");
    T2T_FIND(servername, "SSL_get_servername");
    T2T_FIND(alpn_selected, "SSL_get0_alpn_selected");
    /* (3.x renamed it; 1.1.1 has only the old name, which 3.x keeps as a macro) */
    if (!dlsym(lib, "SSL_get1_peer_certificate")) T2T_FIND(peer_certificate, "SSL_get_peer_certificate");
    else T2T_FIND(peer_certificate, "SSL_get1_peer_certificate");
    T2T_FIND(x509_free, "X509_free");
    T2T_FIND(subject, "X509_get_subject_name");
    T2T_FIND(name_count, "X509_NAME_entry_count");
    T2T_FIND(name_entry, "X509_NAME_get_entry");
    T2T_FIND(entry_object, "X509_NAME_ENTRY_get_object");
    T2T_FIND(entry_data, "X509_NAME_ENTRY_get_data");
    T2T_FIND(object_text, "OBJ_obj2txt");
    T2T_FIND(string_utf8, "ASN1_STRING_to_UTF8");
    T2T_FIND(crypto_free, "CRYPTO_free");
    T2T_FIND(select_next_proto, "SSL_select_next_proto");
    T2T_FIND(ctx_alpn_select, "SSL_CTX_set_alpn_select_cb");
#undef T2T_FIND
    t2t_tls = api; /* (the handle stays open: the library must outlive every bridge) */
    __atomic_store_n(&t2t_tls_bound, 1, __ATOMIC_RELEASE);
    return 0;
}

/* Whether a pointer found by layout is an SSL object the loops can take over: it reads and
   writes `fd` through one plain socket BIO (the one CPython's ssl module gives it; no memory
   BIO, no filter in between). */
static int t2t_tls_usable(void *ssl, int fd) {
    if (t2t_tls.get_fd(ssl) != fd) return 0;
    void *bio = t2t_tls.get_rbio(ssl);
    return bio && bio == t2t_tls.get_wbio(ssl) && t2t_tls.bio_type(bio) == T2T_BIO_TYPE_SOCKET;
}

/* Give a usable SSL object to a bridge: its socket BIO now uses `fd` (the bridge's dup, so the
   Python object's close cannot close it under the loop; the BIO itself, with its flags, stays,
   and this cannot fail), and a write may complete record by record (so a short write counts
   what went out). */
static void t2t_tls_adopt(void *ssl, int fd) {
    t2t_tls.bio_ctrl(t2t_tls.get_rbio(ssl), T2T_BIO_C_SET_FD, T2T_BIO_NOCLOSE, &fd);
    t2t_tls.ctrl(ssl, T2T_SSL_CTRL_MODE, T2T_SSL_MODE_ENABLE_PARTIAL_WRITE, NULL);
}

/* Why an SSL call failed, as an errno: EAGAIN (wait to read), EINPROGRESS (wait to write),
   0 for the peer's close_notify, ENODATA for an EOF without it (a cut: OpenSSL 1.1.1 says
   SYSCALL with no errno, 3.x names it), EPROTO for any other TLS failure. */
static int t2t_tls_errno(void *ssl, int ret) {
    int e = t2t_tls.get_error(ssl, ret);
    int saved = errno;
    int ragged = 0;
    if (e == T2T_SSL_ERROR_SYSCALL && saved == 0 && !t2t_tls.peek_error()) ragged = 1;
    if (e == T2T_SSL_ERROR_SSL) {
        const char *why = t2t_tls.reason_text(t2t_tls.peek_error());
        ragged = why && strcmp(why, "unexpected eof while reading") == 0;
    }
    t2t_tls.clear_errors();
    if (ragged) return ENODATA;
    switch (e) {
    case T2T_SSL_ERROR_WANT_READ: return EAGAIN;
    case T2T_SSL_ERROR_WANT_WRITE: return EINPROGRESS;
    case T2T_SSL_ERROR_ZERO_RETURN: return 0;
    case T2T_SSL_ERROR_SYSCALL: return saved && !T2T_WOULD_BLOCK(saved) ? saved : EPROTO;
    default: return EPROTO;
    }
}

/* Plaintext from a TLS side, like recv: bytes, 0 at its close_notify (or at a cut, where its
   socket takes that for an end: then side->cut), or -1 with errno (EINPROGRESS: a read that
   must first write, so wait until the side is writable). */
static ssize_t t2t_tls_recv(t2t_side *side, void *buf, size_t n) {
    size_t got = 0;
    t2t_tls.clear_errors();
    if (t2t_tls.read_ex(side->tls, buf, n, &got) == 1) return (ssize_t)got;
    int e = t2t_tls_errno(side->tls, 0);
    if (e == ENODATA) {
        if (side->ragged_eof_is_end) {
            side->cut = 1;
            return 0;
        }
        e = EPROTO;
    }
    if (e == 0) return 0;
    errno = e;
    return -1;
}

/* Plaintext to a TLS side, like send: bytes taken, or -1 with errno (EAGAIN: wait to write).
   A write retried after EAGAIN must offer the same bytes again (OpenSSL's rule), which the
   unsent tail does. One that must first read (a renegotiation, which the forwarder refuses
   anyway) fails. */
static ssize_t t2t_tls_send(void *ssl, const void *buf, size_t n) {
    size_t written = 0;
    t2t_tls.clear_errors();
    if (t2t_tls.write_ex(ssl, buf, n, &written) == 1) return (ssize_t)written;
    int e = t2t_tls_errno(ssl, 0);
    errno = e == EINPROGRESS ? EAGAIN : e ? (e == EAGAIN || e == ENODATA ? EPROTO : e) : EPIPE;
    return -1;
}

/* The close_notify alert: 1 once sent (or not worth waiting for: the peer is gone), 0 to try
   again when the side is writable. */
static int t2t_tls_close_notify(void *ssl) {
    t2t_tls.clear_errors();
    int r = t2t_tls.shutdown(ssl);
    if (r >= 0) return 1;
    return t2t_tls_errno(ssl, r) == EINPROGRESS ? 0 : 1;
}

/* ---- handshakes in the loops -------------------------------------------------------------------
 *
 * A forward's client (termination) or upstream (origination) handshakes as a state of its
 * bridge (T2T_HANDSHAKE, see _loop_listener.h): an SSL object made here from an SSL_CTX that a
 * Python ssl.SSLContext built from the forward's files (_core.pyx takes it by CPython's layout
 * and holds a reference of its own). Those contexts carry no Python callback (no sni_callback,
 * ALPN, keylog or message callback), so nothing in a handshake runs Python; the certificate
 * for a client's SNI is chosen before the object is made, from its peeked ClientHello. */

enum { T2T_TLS_INFO_MAX = 256, T2T_TLS_SHORT_MAX = 64 };

/* What a bridge's handshakes negotiated, or why one failed: read by Python at the bridge's
   report (the open, the refusal or the failed upstream). */
typedef struct t2t_tls_work {
    char version[T2T_TLS_SHORT_MAX], cipher[T2T_TLS_SHORT_MAX];
    char sni[T2T_TLS_INFO_MAX], subject[T2T_TLS_INFO_MAX], alpn[T2T_TLS_INFO_MAX];
    char up_version[T2T_TLS_SHORT_MAX], up_cipher[T2T_TLS_SHORT_MAX];
    /* A failed handshake: `failure` its words (OpenSSL's reason, the verification's own words
       after "certificate verify failed: "); closed: the peer closed or reset during it;
       timed_out: it took longer than the forward allows. */
    char failure[T2T_TLS_INFO_MAX];
    unsigned char failed_side, closed, timed_out; /* failed_side: 1 client, 2 upstream */
} t2t_tls_work;

/* Whether a pointer found by layout is the SSL_CTX of a Python context whose options and
   verify mode are these. */
static int t2t_tls_context_is(void *ctx, unsigned long long options, int verify_mode) {
    return ctx && (unsigned long long)t2t_tls.ctx_options(ctx) == options && (t2t_tls.ctx_verify_mode(ctx) & 3) == verify_mode;
}

/* A new SSL object on `fd` from `ctx`: a server's (accepting) or a client's, writes that may
   complete record by record. NULL: out of memory. */
static void *t2t_tls_new(void *ctx, int fd, int accepting) {
    void *ssl = t2t_tls.ssl_new(ctx);
    if (!ssl) return NULL;
    if (t2t_tls.set_fd(ssl, fd) != 1) {
        t2t_tls.ssl_free(ssl);
        return NULL;
    }
    if (accepting) t2t_tls.set_accept_state(ssl);
    else t2t_tls.set_connect_state(ssl);
    /* As the ssl module's objects have it (a write retried from a buffer elsewhere: the unsent
       tail may have moved), and record by record. */
    t2t_tls.ctrl(ssl, T2T_SSL_CTRL_MODE,
                 T2T_SSL_MODE_ENABLE_PARTIAL_WRITE | T2T_SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | T2T_SSL_MODE_AUTO_RETRY, NULL);
    return ssl;
}

/* Origination: the host name to send as SNI (none for an IP literal, as ssl does) and, where
   the context verifies host names, to check the upstream's certificate against. 0, or -1. */
static int t2t_tls_name_upstream(void *ssl, const char *host, int is_ip, int check) {
    if (!host || !*host) return 0;
    if (!is_ip && !t2t_tls.ctrl(ssl, T2T_SSL_CTRL_SET_TLSEXT_HOSTNAME, T2T_TLSEXT_NAMETYPE_HOST_NAME, (void *)host))
        return -1;
    if (!check) return 0;
    void *param = t2t_tls.param(ssl);
    int ok = is_ip ? t2t_tls.param_ip(param, host) : t2t_tls.param_host(param, host, strlen(host));
    return ok == 1 ? 0 : -1;
}

enum { T2T_X509_V_ERR_HOSTNAME_MISMATCH = 62, T2T_X509_V_ERR_IP_ADDRESS_MISMATCH = 64 };

/* One step of a handshake: 0 once done, EAGAIN (wait to read), EINPROGRESS (wait to write),
   or -1 with its words in w->failure (and w->closed for a peer that went away): the ssl
   module's words, `host` the name an upstream's certificate was checked against. */
static int t2t_tls_step(void *ssl, t2t_tls_work *w, const char *host) {
    t2t_tls.clear_errors();
    int r = t2t_tls.do_handshake(ssl);
    if (r == 1) return 0;
    int e = t2t_tls.get_error(ssl, r);
    unsigned long code = t2t_tls.peek_error();
    if (e == T2T_SSL_ERROR_WANT_READ || e == T2T_SSL_ERROR_WANT_WRITE) {
        t2t_tls.clear_errors();
        return e == T2T_SSL_ERROR_WANT_READ ? EAGAIN : EINPROGRESS;
    }
    const char *why = code ? t2t_tls.reason_text(code) : NULL;
    if (!why || e == T2T_SSL_ERROR_SYSCALL || strcmp(why, "unexpected eof while reading") == 0) {
        /* An EOF or a reset mid-handshake (1.1.1: SYSCALL, no queued error; 3.x names the EOF). */
        w->closed = 1;
        snprintf(w->failure, sizeof(w->failure), "closed during the handshake");
    } else if (strcmp(why, "certificate verify failed") == 0) {
        long v = t2t_tls.verify_result(ssl);
        const char *words = v != T2T_X509_V_OK ? t2t_tls.verify_text(v) : NULL;
        if (host && (v == T2T_X509_V_ERR_HOSTNAME_MISMATCH || v == T2T_X509_V_ERR_IP_ADDRESS_MISMATCH))
            snprintf(w->failure, sizeof(w->failure), "%s: %s mismatch, certificate is not valid for '%s'.", why,
                     v == T2T_X509_V_ERR_HOSTNAME_MISMATCH ? "Hostname" : "IP address", host);
        else if (words) snprintf(w->failure, sizeof(w->failure), "%s: %s", why, words);
        else snprintf(w->failure, sizeof(w->failure), "%s", why);
    } else {
        snprintf(w->failure, sizeof(w->failure), "%s", why);
    }
    t2t_tls.clear_errors();
    return -1;
}

/* _tls.subject_text's short names for the attributes getpeercert() names long. */
static const char *t2t_tls_short_name(const char *name) {
    static const char *const names[][2] = {
        {"commonName", "CN"}, {"organizationName", "O"}, {"organizationalUnitName", "OU"}, {"countryName", "C"},
        {"stateOrProvinceName", "ST"}, {"localityName", "L"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strcmp(name, names[i][0]) == 0) return names[i][1];
    return name;
}

/* A certificate subject as the forwarder logs it (as _tls.subject_text words getpeercert()'s):
   "CN=client,O=Example", in the certificate's order. */
static void t2t_tls_subject(const void *x509, char *out, size_t max) {
    size_t at = 0;
    out[0] = 0;
    const void *name = t2t_tls.subject(x509);
    int n = name ? t2t_tls.name_count(name) : 0;
    for (int i = 0; i < n; i++) {
        const void *entry = t2t_tls.name_entry(name, i);
        char long_name[128];
        unsigned char *value = NULL;
        if (t2t_tls.object_text(long_name, sizeof(long_name), t2t_tls.entry_object(entry), 0) <= 0) continue;
        const char *key = t2t_tls_short_name(long_name);
        if (t2t_tls.string_utf8(&value, t2t_tls.entry_data(entry)) < 0) continue;
        int wrote = snprintf(out + at, max - at, "%s%s=%s", at ? "," : "", key, (const char *)value);
        t2t_tls.crypto_free(value, __FILE__, __LINE__);
        if (wrote < 0 || (size_t)wrote >= max - at) {
            out[at] = 0; /* (cut at a whole entry) */
            break;
        }
        at += (size_t)wrote;
    }
}

static void t2t_tls_copy(char *out, size_t max, const char *text) { snprintf(out, max, "%s", text ? text : ""); }

/* Fill w with what the handshake of `ssl` negotiated: as the server (the client's side) or
   as the client (the upstream's). */
static void t2t_tls_describe(void *ssl, t2t_tls_work *w, int server) {
    const void *cipher = t2t_tls.current_cipher(ssl);
    const char *name = cipher ? t2t_tls.cipher_name(cipher) : NULL;
    if (!server) {
        t2t_tls_copy(w->up_version, sizeof(w->up_version), t2t_tls.version(ssl));
        t2t_tls_copy(w->up_cipher, sizeof(w->up_cipher), name);
        return;
    }
    t2t_tls_copy(w->version, sizeof(w->version), t2t_tls.version(ssl));
    t2t_tls_copy(w->cipher, sizeof(w->cipher), name);
    t2t_tls_copy(w->sni, sizeof(w->sni), t2t_tls.servername(ssl, T2T_TLSEXT_NAMETYPE_HOST_NAME));
    const unsigned char *alpn = NULL;
    unsigned int alpn_len = 0;
    t2t_tls.alpn_selected(ssl, &alpn, &alpn_len);
    snprintf(w->alpn, sizeof(w->alpn), "%.*s", (int)alpn_len, alpn ? (const char *)alpn : "");
    void *peer = t2t_tls.peer_certificate(ssl);
    if (peer) {
        t2t_tls_subject(peer, w->subject, sizeof(w->subject));
        t2t_tls.x509_free(peer);
    }
}

/* A --tls-cert pattern matches a client's server name as _tls._matches does: the same name
   (ASCII case aside), or "*.rest" for one label more than rest. */
static int t2t_tls_name_matches(const char *pattern, const char *name) {
    if (strcasecmp(pattern, name) == 0) return 1;
    if (pattern[0] != '*' || pattern[1] != '.') return 0;
    const char *dot = strchr(name, '.');
    return dot && dot != name && strcasecmp(dot + 1, pattern + 2) == 0;
}

/* ALPN for termination in the loops (--tls-alpn): the forward's protocols in wire form, the
   first one the client also offers chosen, none agreed: no ALPN (as the ssl module does). A
   context points at its list for as long as it lives, which can outlast any config, so the
   lists are kept for the process: one per distinct --tls-alpn value. */
typedef struct t2t_alpn {
    struct t2t_alpn *next;
    unsigned int len;
    unsigned char wire[];
} t2t_alpn;

static t2t_alpn *t2t_alpns; /* under t2t_tls_binding */

enum { T2T_NPN_NEGOTIATED = 1, T2T_TLSEXT_ERR_OK = 0, T2T_TLSEXT_ERR_NOACK = 3 };

static int t2t_alpn_select(void *ssl, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
                           unsigned int inlen, void *arg) {
    const t2t_alpn *a = (const t2t_alpn *)arg;
    unsigned char *chosen = NULL, chosen_len = 0;
    (void)ssl;
    if (t2t_tls.select_next_proto(&chosen, &chosen_len, a->wire, a->len, in, inlen) != T2T_NPN_NEGOTIATED)
        return T2T_TLSEXT_ERR_NOACK;
    *out = chosen;
    *outlen = chosen_len;
    return T2T_TLSEXT_ERR_OK;
}

/* Let `ctx` (a context built for the loops, before its first handshake) choose among `wire`'s
   protocols. 0, or -1 (ENOMEM). */
static int t2t_tls_serve_alpn(void *ctx, const unsigned char *wire, unsigned int len) {
    pthread_mutex_lock(&t2t_tls_binding);
    t2t_alpn *a = t2t_alpns;
    while (a && !(a->len == len && memcmp(a->wire, wire, len) == 0)) a = a->next;
    if (!a && (a = (t2t_alpn *)malloc(sizeof(t2t_alpn) + len))) {
        a->len = len;
        memcpy(a->wire, wire, len);
        a->next = t2t_alpns;
        t2t_alpns = a;
    }
    pthread_mutex_unlock(&t2t_tls_binding);
    if (!a) {
        errno = ENOMEM;
        return -1;
    }
    t2t_tls.ctx_alpn_select(ctx, t2t_alpn_select, a);
    return 0;
}
