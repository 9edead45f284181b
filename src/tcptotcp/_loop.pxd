# The C engine's declarations that _core.pyx uses (the definitions are in _loop*.h).
from libc.stdint cimport int64_t, uint64_t


cdef extern from "_loop.h" nogil:
    ctypedef struct sockaddr_storage "struct sockaddr_storage":
        pass
    ctypedef struct sockaddr "struct sockaddr":
        pass
    ctypedef unsigned int socklen_t
    ctypedef struct t2t_dir:
        unsigned char spliced
    ctypedef struct t2t_idle_state:
        uint64_t idle_checks
        int64_t next_check_in_ns
        unsigned char moved[2]
    ctypedef struct t2t_tls_work:
        char version[64]
        char cipher[64]
        char sni[256]
        char subject[256]
        char alpn[256]
        char up_version[64]
        char up_cipher[64]
        char failure[256]
        unsigned char failed_side, closed, timed_out
    ctypedef struct t2t_bridge:
        t2t_tls_work *tlsw
        t2t_dir dir[2]
        int64_t started_ns
        int64_t ended_ns
        unsigned char reason
        int error
        t2t_bridge *done_next
        t2t_bridge *open_next
        void *owner
        unsigned long long conn_id
        unsigned char opened
        unsigned char open_untaken
        unsigned char refusal
        unsigned char timed_out
        unsigned char lent_once
        sockaddr_storage peer
        socklen_t peer_len
    ctypedef struct t2t_listener:
        pass
    ctypedef struct t2t_access:
        int active
        int closed
        const unsigned char *lists[4]
        size_t counts[4]
    ctypedef struct t2t_config:
        unsigned char balance, send_proxy, accept_proxy
        unsigned char activity_both, half_close, may_splice
        int64_t backoff_ns, connect_timeout_ns, proxy_timeout_ns, interval_ns
        uint64_t idle_limit
        uint64_t rate, burst, quantum
        int max_active
        int max_fails
        int64_t fail_window_ns
        int max_per_client
        int64_t rate_spacing_ns, rate_burst
        int prefix6
        int sockopts[8][3]
        int nsockopts
        int64_t tls_timeout_ns
    ctypedef struct t2t_failure:
        t2t_failure *next
        int error
        unsigned char timed_out
        unsigned char marked_down
        unsigned long long conn_id
        sockaddr_storage peer
        socklen_t peer_len
        char tls_failure[256]
        unsigned char tls_closed, tls_timed_out
    enum:
        T2T_REFUSED_ACCESS
        T2T_REFUSED_PROXY_BAD
        T2T_REFUSED_PROXY_LONG
        T2T_REFUSED_PROXY_LATE
        T2T_REFUSED_PROXY_CLOSED
        T2T_REFUSED_PROXY_READ
        T2T_REFUSED_PER_CLIENT
        T2T_REFUSED_RATE
        T2T_REFUSED_CLIENTS_FULL
        T2T_REFUSED_HELLO_BAD
        T2T_REFUSED_HELLO_LATE
        T2T_REFUSED_HELLO_CLOSED
        T2T_REFUSED_HELLO_READ
        T2T_REFUSED_NO_ROUTE
        T2T_REFUSED_TLS
        T2T_BALANCE_FIRST
        T2T_BALANCE_ROUNDROBIN
        T2T_BALANCE_LEASTCONN
        T2T_BALANCE_SOURCE
    t2t_config *t2t_config_new(int nupstreams)
    int t2t_config_upstream(t2t_config *c, int i, const sockaddr *address, socklen_t length, const char *text,
                            size_t text_length, int weight, int down)
    int t2t_config_access(t2t_config *c, const t2t_access *access)
    int t2t_config_routes(t2t_config *c, int nserving, const char *const *patterns, int n, int strict)
    void t2t_config_release(t2t_config *c)
    int t2t_config_tls_cert(t2t_config *c, void *ctx, const char *const *names, int nnames)
    int t2t_config_tls_client(t2t_config *c, void *ctx, int check_host)
    int t2t_config_tls_name(t2t_config *c, int i, const char *name, int is_ip)
    int t2t_tls_context_is(void *ctx, unsigned long long options, int verify_mode)
    int t2t_tls_serve_alpn(void *ctx, const unsigned char *wire, unsigned int length)
    t2t_listener *t2t_listen(int fd, t2t_config *cfg, unsigned long long first_id)
    void t2t_listener_configure(t2t_listener *lst, t2t_config *cfg)
    int t2t_listener_fd(t2t_listener *lst)
    int t2t_listener_active(t2t_listener *lst)
    unsigned long long t2t_listener_next_id(t2t_listener *lst)
    void t2t_listener_take(t2t_listener *lst, t2t_bridge **opened, t2t_bridge **done, t2t_failure **failed,
                           int *accept_error)
    void t2t_listener_stop(t2t_listener *lst, int cancel_connects)
    void t2t_listener_recheck(t2t_listener *lst)
    void t2t_listener_set_checked(t2t_listener *lst, int i, int down)
    void t2t_listener_reserve(t2t_listener *lst, int n)
    int t2t_listener_upstream_down(t2t_listener *lst, int i)
    size_t t2t_listener_clients(t2t_listener *lst)
    int t2t_listener_free(t2t_listener *lst)
    const char *t2t_failure_upstream(const t2t_failure *f)
    void t2t_failure_free(t2t_failure *f)
    const char *t2t_bridge_upstream(const t2t_bridge *b)
    const char *t2t_bridge_proxy_error(const t2t_bridge *b)
    const char *t2t_bridge_hello_error(const t2t_bridge *b)
    const char *t2t_bridge_hello_name(const t2t_bridge *b)
    int t2t_sockaddr_ip(int family, const char *host, int port, unsigned int flowinfo, unsigned int scope_id,
                        sockaddr_storage *out, socklen_t *length)
    int t2t_sockaddr_unix(const char *path, size_t n, sockaddr_storage *out, socklen_t *length)
    int t2t_address_text(const sockaddr_storage *address, socklen_t address_len, char *host, size_t n, int *port,
                         unsigned int *flowinfo, unsigned int *scope_id)
    const int MAX_SOCKOPTS "T2T_MAX_SOCKOPTS"
    const int MAX_UPSTREAMS "T2T_MAX_UPSTREAMS"
    const int MAX_WEIGHT "T2T_MAX_WEIGHT"
    const long long ACCEPT_BACKOFF_NS "T2T_ACCEPT_BACKOFF_NS"
    const int HAVE_SPLICE "T2T_HAVE_SPLICE"
    const int BUFFER_BYTES "T2T_BUFFER_BYTES"
    const int MAX_LOOPS "T2T_MAX_LOOPS"
    int t2t_engine_start(int nloops)
    int t2t_loop_count()
    int t2t_loop_load(int i)
    t2t_bridge *t2t_start(int fd1, int fd2, int adopt, int64_t interval_ns, uint64_t idle_limit, int activity_both,
                          int half_close, int may_splice, uint64_t rate, uint64_t burst, uint64_t quantum,
                          const t2t_idle_state *resume, void *tls1, void *tls2, int ragged_eofs_are_ends,
                          void *owner)
    int t2t_tls_bind(const char *path, const char **why)
    int t2t_tls_usable(void *ssl, int fd)
    void t2t_stop(t2t_bridge *b)
    int t2t_detach(t2t_bridge *b, int64_t timeout_ns, int fds[2], t2t_idle_state *state)
    void t2t_release(t2t_bridge *b)
    unsigned long long t2t_bytes(t2t_bridge *b, int i)
    t2t_bridge *t2t_done_take()
    t2t_bridge *t2t_done_take_now()
    int t2t_done_claim()
    void t2t_done_unclaim()
    t2t_bridge *t2t_forget_after_fork()
    int t2t_pooled_pipes()
    int t2t_bridges_open()
    int t2t_engine_fds()
