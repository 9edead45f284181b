/* ---- small helpers ------------------------------------------------------------------------ */

static int64_t t2t_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t t2t_add(int64_t a, int64_t b) { return a > T2T_NEVER - b ? T2T_NEVER : a + b; }

static void t2t_count(t2t_dir *d, size_t n) {
    __atomic_fetch_add(&d->bytes, (unsigned long long)n, __ATOMIC_RELAXED);
    __atomic_store_n(&d->active, 1, __ATOMIC_RELAXED); /* a lent direction's: another thread */
}

static int t2t_set_nonblocking(int fd) {
    int on = 1;
    return ioctl(fd, FIONBIO, &on); /* one syscall, where F_GETFL + F_SETFL take two */
}

/* The bridge's own fd for the caller's fd: a private dup, or (adopt) the fd itself. */
static int t2t_own_fd(int fd, int adopt) {
    int own = adopt ? fd : fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0) return -1;
    if (t2t_set_nonblocking(own) != 0) {
        int saved = errno;
        if (!adopt) close(own);
        errno = saved;
        return -1;
    }
    return own;
}

/* Whether a short read proves fd empty (see t2t_pump): plain TCP, whose recv stops short only
   at the urgent mark or at the end of its queue. Not with an upper-layer protocol (kernel TLS);
   a socket a BPF sockmap redirects is not detected: such sockets belong to the pure engine. */
static int t2t_is_tcp(int fd) {
#if T2T_EPOLL && defined(SO_PROTOCOL)
    int protocol = 0;
    socklen_t len = sizeof(protocol);
    if (getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &protocol, &len) != 0 || protocol != IPPROTO_TCP) return 0;
#ifdef TCP_ULP
    char ulp[16] = {0};
    len = sizeof(ulp);
    if (getsockopt(fd, IPPROTO_TCP, TCP_ULP, ulp, &len) == 0 && len > 0 && ulp[0]) return 0;
#endif
    return 1;
#else
    (void)fd;
    return 0; /* kqueue: keep the EAGAIN rule */
#endif
}

/* Whether the connection behind fd was reset rather than closed with a FIN. A reset reaches
   one caller as ECONNRESET, and a splice that had moved bytes before the send failed drops
   even that: the reader then sees a plain EOF. Until we send our own FIN, a connection that
   got the peer's FIN is in CLOSE_WAIT, and one that got a reset is closed outright. */
static int t2t_was_reset(int fd) {
#if defined(__linux__) && defined(TCP_INFO)
    struct tcp_info info;
    socklen_t len = sizeof(info);
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) == 0 && len > 0)
        return info.tcpi_state == 7; /* TCP_CLOSE */
#else
    (void)fd;
#endif
    return 0; /* not TCP (a Unix socket), or no TCP_INFO here */
}

/* Bytes sent on fd that its peer has not acknowledged yet (Linux; 0 where unknown). An RST
   purges them, while what the peer already received stays readable there before the error. */
static int t2t_unacked(int fd) {
#if defined(__linux__) && defined(SIOCOUTQ)
    int n = 0, domain = 0;
    socklen_t len = sizeof(domain);
    /* TCP only: on a Unix socket SIOCOUTQ counts what the peer has not read, and no RST comes. */
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 || (domain != AF_INET && domain != AF_INET6))
        return 0;
    if (ioctl(fd, SIOCOUTQ, &n) == 0) return n;
#else
    (void)fd;
#endif
    return 0;
}

/* ---- the poller ------------------------------------------------------------------------------ */

static int t2t_poller_new(void) {
#if T2T_EPOLL
    return epoll_create1(EPOLL_CLOEXEC);
#else
    int fd = kqueue();
    if (fd >= 0) fcntl(fd, F_SETFD, FD_CLOEXEC);
    return fd;
#endif
}

/* Watch fd for both readiness kinds, edge-triggered, for the whole life of the bridge. */
static int t2t_poller_add(t2t_loop *L, int fd, void *tag) {
#if T2T_EPOLL
    struct epoll_event ev;
    ev.events = EPOLLIN | EPOLLPRI | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.ptr = tag;
    return epoll_ctl(L->poller, EPOLL_CTL_ADD, fd, &ev);
#else
    struct kevent ev[2];
    EV_SET(&ev[0], fd, EVFILT_READ, EV_ADD | EV_CLEAR, 0, 0, tag);
    EV_SET(&ev[1], fd, EVFILT_WRITE, EV_ADD | EV_CLEAR, 0, 0, tag);
    return kevent(L->poller, ev, 2, NULL, 0, NULL);
#endif
}

/* Watch fd for input or stop: a direction that holds bytes its destination cannot take yet
   reads nothing, so its source's input would only wake the loop for nothing (one wake-up per
   arriving segment in a bulk stream). Output stays watched (out), unless the direction writing
   fd is lent to another loop. Turning input back on reports it at once if the fd is readable,
   so no edge is lost. */
static int t2t_poller_watch_input(t2t_loop *L, int fd, void *tag, int on, int out) {
#if T2T_EPOLL
    struct epoll_event ev;
    ev.events = (on ? EPOLLIN | EPOLLPRI | EPOLLRDHUP : 0) | (out ? EPOLLOUT : 0) | EPOLLET;
    ev.data.ptr = tag;
    return epoll_ctl(L->poller, EPOLL_CTL_MOD, fd, &ev);
#else
    struct kevent ev;
    (void)out; /* kqueue: no lending (no splice), so output stays watched */
    EV_SET(&ev, fd, EVFILT_READ, on ? EV_ENABLE : EV_DISABLE, 0, 0, tag);
    return kevent(L->poller, &ev, 1, NULL, 0, NULL);
#endif
}

/* Before close: epoll keys its entries by open file, and the caller may still hold a dup of
   ours, so a plain close would leave events coming for a freed bridge. */
static void t2t_poller_del(t2t_loop *L, int fd) {
#if T2T_EPOLL
    struct epoll_event unused;
    epoll_ctl(L->poller, EPOLL_CTL_DEL, fd, &unused);
#else
    (void)L;
    (void)fd; /* kqueue drops a descriptor's events when it is closed */
#endif
}

/* A non-blocking eventfd (one fd in both) or, off Linux, a pipe; 0, or -1 with errno. */
static int t2t_signal_new(int *r, int *w) {
#if T2T_EPOLL
    *r = *w = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return *r < 0 ? -1 : 0;
#else
    int fds[2];
    if (pipe(fds) != 0) return -1;
    for (int i = 0; i < 2; i++) {
        fcntl(fds[i], F_SETFD, FD_CLOEXEC);
        fcntl(fds[i], F_SETFL, fcntl(fds[i], F_GETFL) | O_NONBLOCK);
    }
    *r = fds[0];
    *w = fds[1];
    return 0;
#endif
}

static void t2t_signal_fd(int fd) {
#if T2T_EPOLL
    uint64_t one = 1;
    ssize_t unused = write(fd, &one, sizeof(one));
#else
    char one = 1;
    ssize_t unused = write(fd, &one, 1);
#endif
    (void)unused; /* a full counter or pipe wakes its reader just as well */
}

static void t2t_drain_fd(int fd) {
    char scratch[64];
    while (read(fd, scratch, sizeof(scratch)) > 0) {
    }
}

/* Every loop's wake fd has this tag. */
static t2t_side t2t_wake_tag = {.kind = T2T_TAG_WAKE};

static int t2t_wake_new(t2t_loop *L) {
    if (t2t_signal_new(&L->wake_r, &L->wake_w) != 0) return -1;
#if T2T_EPOLL
    struct epoll_event ev;
    ev.events = EPOLLIN;
    ev.data.ptr = &t2t_wake_tag;
    return epoll_ctl(L->poller, EPOLL_CTL_ADD, L->wake_r, &ev);
#else
    struct kevent ev;
    EV_SET(&ev, L->wake_r, EVFILT_READ, EV_ADD, 0, 0, &t2t_wake_tag);
    return kevent(L->poller, &ev, 1, NULL, 0, NULL);
#endif
}

static void t2t_wake(t2t_loop *L) { t2t_signal_fd(L->wake_w); }

/* Whether the caller must wake L for what it just queued (it holds L->lock): once per take of
   L's inbox, which clears wake_pending. */
static int t2t_wake_due(t2t_loop *L) {
    int wake = !L->wake_pending;
    L->wake_pending = 1;
    return wake;
}

static void t2t_unwake(t2t_loop *L) { t2t_drain_fd(L->wake_r); }

