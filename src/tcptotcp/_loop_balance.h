/* ---- listeners: who a client is, what it may open, and which upstream it gets -----------------

   Per-client limits (--max-per-client, --rate-per-client) and the upstream choice (--balance
   first|roundrobin|leastconn|source, weights, passive and active health). The pure twin is
   _balance.py: the same keys, hashes, bucket arithmetic and choices, so a forward behaves the
   same whichever listener serves it.

   A client is its address: an IPv4 host (an IPv4-mapped IPv6 client included), an IPv6 client's
   first --client-prefix6 bits, or, for a client without an IP address, one key for all. */

#ifndef T2T_LOOP_BALANCE_H
#define T2T_LOOP_BALANCE_H

#include <math.h>

enum { T2T_CLIENT_KEY_MAX = 17 }; /* a family byte (4, 6 or 0), then the address bytes */

enum t2t_balance { T2T_BALANCE_FIRST = 0, T2T_BALANCE_ROUNDROBIN, T2T_BALANCE_LEASTCONN, T2T_BALANCE_SOURCE };

/* The most entries a forward's client table holds: past it a new client is refused ("client
   table full"). Entries go once their client has nothing open and a full bucket. */
#define T2T_CLIENTS_MAX (1u << 18)
#define T2T_CLIENTS_MIN_SWEEP 1024u

static size_t t2t_client_key(const struct sockaddr_storage *peer, int prefix6, unsigned char *key) {
    static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (peer->ss_family == AF_INET) {
        key[0] = 4;
        memcpy(key + 1, &((const struct sockaddr_in *)peer)->sin_addr, 4);
        return 5;
    }
    if (peer->ss_family == AF_INET6) {
        const unsigned char *bytes = ((const struct sockaddr_in6 *)peer)->sin6_addr.s6_addr;
        if (memcmp(bytes, mapped, 12) == 0) {
            key[0] = 4;
            memcpy(key + 1, bytes + 12, 4);
            return 5;
        }
        key[0] = 6;
        for (int i = 0; i < 16; i++) {
            int bits = prefix6 - 8 * i;
            key[1 + i] = bits >= 8 ? bytes[i] : bits <= 0 ? 0 : (unsigned char)(bytes[i] & (0xff << (8 - bits)));
        }
        return 17;
    }
    key[0] = 0;
    return 1;
}

/* FNV-1a over the bytes, then a finalizer that spreads every input bit over the whole word
   (FNV alone leaves the high bits of short keys poor, and rendezvous hashing compares them). */
static uint64_t t2t_mix64(uint64_t h) {
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebULL;
    h ^= h >> 31;
    return h;
}

static uint64_t t2t_hash_bytes(const unsigned char *data, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= data[i];
        h *= 0x100000001b3ULL;
    }
    return t2t_mix64(h);
}

/* ---- the client table: open bridges and a rate bucket per client, under the listener's lock ---- */

typedef struct t2t_client {
    unsigned char key[T2T_CLIENT_KEY_MAX];
    unsigned char key_len; /* 0: a free slot */
    int open;              /* bridges counted against --max-per-client */
    int64_t tat;           /* the bucket, as the time it is next full (GCRA); 0: full */
} t2t_client;

typedef struct t2t_clients {
    t2t_client *slots;
    size_t cap, count, sweep_at; /* cap: a power of two, or 0 before the first client */
} t2t_clients;

static t2t_client *t2t_clients_slot(t2t_client *slots, size_t cap, const unsigned char *key, size_t len) {
    size_t i = (size_t)t2t_hash_bytes(key, len) & (cap - 1);
    while (slots[i].key_len && (slots[i].key_len != len || memcmp(slots[i].key, key, len) != 0))
        i = (i + 1) & (cap - 1);
    return &slots[i];
}

/* Rebuild into `cap` slots, without the entries that hold nothing: nothing open, bucket full. */
static int t2t_clients_rebuild(t2t_clients *t, size_t cap, int64_t now) {
    t2t_client *slots = (t2t_client *)calloc(cap, sizeof(t2t_client));
    if (!slots) return -1;
    size_t count = 0;
    for (size_t i = 0; i < t->cap; i++) {
        t2t_client *e = &t->slots[i];
        if (!e->key_len || (e->open == 0 && e->tat <= now)) continue;
        *t2t_clients_slot(slots, cap, e->key, e->key_len) = *e;
        count++;
    }
    free(t->slots);
    t->slots = slots;
    t->cap = cap;
    t->count = count;
    t->sweep_at = count * 2 > T2T_CLIENTS_MIN_SWEEP ? count * 2 : T2T_CLIENTS_MIN_SWEEP;
    if (t->sweep_at > cap / 2) t->sweep_at = cap / 2;
    return 0;
}

/* The client's entry, made if new (NULL: the table is full, or out of memory). A sweep runs
   whenever the table doubled since the last: amortised O(1) per client. */
static t2t_client *t2t_clients_get(t2t_clients *t, const unsigned char *key, size_t len, int64_t now) {
    if (t->cap) {
        t2t_client *e = t2t_clients_slot(t->slots, t->cap, key, len);
        if (e->key_len) return e;
    }
    if (!t->cap || t->count + 1 > t->sweep_at) {
        size_t live = 0;
        for (size_t i = 0; i < t->cap; i++)
            live += t->slots[i].key_len && (t->slots[i].open > 0 || t->slots[i].tat > now);
        size_t cap = 2 * T2T_CLIENTS_MIN_SWEEP;
        while (cap < 4 * (live + 1) && cap < 2 * T2T_CLIENTS_MAX) cap *= 2;
        if (live + 1 > T2T_CLIENTS_MAX || t2t_clients_rebuild(t, cap, now) != 0) return NULL;
    }
    t2t_client *e = t2t_clients_slot(t->slots, t->cap, key, len);
    memcpy(e->key, key, len);
    e->key_len = (unsigned char)len;
    e->open = 0;
    e->tat = 0;
    t->count++;
    return e;
}

/* Entries still held (a sweep first): for tests and stats. */
static size_t t2t_clients_held(t2t_clients *t, int64_t now) {
    if (t->cap) t2t_clients_rebuild(t, t->cap, now);
    return t->count;
}

static void t2t_clients_free(t2t_clients *t) {
    free(t->slots);
    memset(t, 0, sizeof(*t));
}

/* The rate bucket (GCRA): a client may open `burst` connections at once, then one per
   `spacing_ns`. It takes one if it may; 0 if not (nothing changes then). */
static int t2t_bucket_take(int64_t *tat, int64_t now, int64_t spacing_ns, int64_t burst) {
    int64_t start = *tat > now ? *tat : now;
    if (start + spacing_ns - now > burst * spacing_ns) return 0;
    *tat = start + spacing_ns;
    return 1;
}

/* ---- upstream state, shared by every config of a listener that names the same address ---- */

typedef struct t2t_upstream_state {
    int refs;            /* atomic: configs naming it */
    int64_t down_until;  /* atomic: marked down by failed connects until then (passive) */
    int checked_down;    /* atomic: marked down by the active checks (Python's) */
    int open;            /* atomic: bridges open to it (leastconn) */
    int fails;           /* under the listener's lock: failed connects in this window */
    int64_t fails_since; /* under the listener's lock: the window's start */
    int64_t current;     /* under the listener's balance lock: smooth weighted round robin */
} t2t_upstream_state;

static t2t_upstream_state *t2t_upstream_state_new(void) {
    t2t_upstream_state *s = (t2t_upstream_state *)calloc(1, sizeof(t2t_upstream_state));
    if (s) s->refs = 1;
    return s;
}

static void t2t_upstream_state_release(t2t_upstream_state *s) {
    if (s && __atomic_sub_fetch(&s->refs, 1, __ATOMIC_ACQ_REL) == 0) free(s);
}

static int t2t_upstream_is_down(const t2t_upstream_state *s, int64_t now) {
    return __atomic_load_n(&s->checked_down, __ATOMIC_RELAXED) ||
           __atomic_load_n(&s->down_until, __ATOMIC_RELAXED) > now;
}

/* Rendezvous hashing: the upstream with the highest score serves the client, the next highest
   is its failover. Weighted as w / -ln(u), u uniform in (0, 1) from the hash: an upstream's
   share is its weight's, and removing one moves only its own clients. */
static double t2t_rendezvous_score(uint64_t client_hash, uint64_t upstream_hash, int weight) {
    uint64_t h = t2t_mix64(client_hash ^ upstream_hash);
    double u = ((double)(h >> 11) + 0.5) / 9007199254740992.0; /* 2^53 */
    return (double)weight / -log(u);
}

#endif /* T2T_LOOP_BALANCE_H */
