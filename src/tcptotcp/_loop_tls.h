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

enum {
    T2T_SSL_ERROR_SSL = 1,
    T2T_SSL_ERROR_WANT_READ = 2,
    T2T_SSL_ERROR_WANT_WRITE = 3,
    T2T_SSL_ERROR_SYSCALL = 5,
    T2T_SSL_ERROR_ZERO_RETURN = 6,
    T2T_SSL_CTRL_MODE = 33,
    T2T_SSL_MODE_ENABLE_PARTIAL_WRITE = 1,
    T2T_BIO_TYPE_SOCKET = 5 | 0x0400 | 0x0100, /* a source/sink on a descriptor */
    T2T_BIO_C_SET_FD = 104,
    T2T_BIO_NOCLOSE = 0,
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
