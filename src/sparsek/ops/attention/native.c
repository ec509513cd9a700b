/* gathered.py's block attention for float32 CPU tensors, forward and backward (loaded by native.py).

   The PyTorch version spends most of its time in the fixed cost of a few hundred small tensor operations; here a
   query block costs its arithmetic. One block at a time: its keys are its list of selected keys, then its window
   band (empty slots and positions before 0 dropped); its logits against all of them come from small matrix
   products, then SPEC section 3's mask and weight per (query, key), and the softmax. The backward takes each
   block's logits, masks and probabilities from the forward where the caller gave memory for them (`saved`), else
   recomputes them from the forward's log-sum-exp (flash-attention's recipe). Blocks split between OpenMP
   threads; in the backward each thread adds its key gradients into buffers of its own. sparsek_forward and
   sparsek_backward (at the end) run a whole call each way, the selection of ops/select/native.c included, so
   that Python pays one call's fixed cost in each direction.

   A block's matrices are held key-major, [L keys, M = P queries x G heads], so the softmax runs down columns with
   whole vectors and no horizontal sums, and the products read k, v, q and the gradients in place through row
   pointers: nothing is gathered, transposed or scattered, except the block's q and grad_out (M x D) once.
   The products are register-tiled over GCC/Clang vector types of 16 floats (one AVX-512 register; the compiler
   splits them on narrower CPUs), and exp is a polynomial on the same vectors, so no loop calls libm. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
typedef float vec __attribute__((vector_size(4 * LANES)));
typedef int32_t ivec __attribute__((vector_size(4 * LANES)));

enum { GATE_KV = 0, GATE_V = 1, GATE_NONE = 2 };          /* common.GATE_IDS */

/* What every block needs; native.py's _Problem mirrors it field by field. Tensors are contiguous in the layouts
   of `sparsek_attention` (B batch, T positions, Hk KV heads, G query heads per KV head, D head dim); a row
   r = b * Hk + h is one (batch, KV head) pair. */
struct problem {
    const float *q;                 /* [B, T, Hk * G, D] */
    const float *k, *v;             /* [B, T, Hk, D] */
    const double *u;                /* [R, T] scores, by row (the selection's layout) */
    const double *tau;              /* [R, T] thresholds */
    const int64_t *start, *end;     /* [R, T] key j is selected by queries start_j <= i < end_j */
    const int32_t *lists;           /* [R, NB, K] keys selected at each block's first query; < 0 or >= T: empty */
    int64_t rows, kv_heads, t_len, group, head_dim, n_slots, block, window, gate;
    float scale;
};

/* Offsets of row r at position t: of its scores (and thresholds, ranges); of its keys and values, D floats per
   (b, t, h) entry; of its first query head in q (and out and their gradients), G x D. */
static int64_t score_at(const struct problem *pb, int64_t r, int64_t t) { return r * pb->t_len + t; }

/* The (b, t, h) entry of row r = b * Hk + h at position t in a [B, T, Hk] tensor (the caller's scores). */
static int64_t entry_at(const struct problem *pb, int64_t r, int64_t t) {
    return (r / pb->kv_heads * pb->t_len + t) * pb->kv_heads + r % pb->kv_heads;
}

static int64_t kv_at(const struct problem *pb, int64_t r, int64_t t) { return entry_at(pb, r, t) * pb->head_dim; }

static int64_t q_at(const struct problem *pb, int64_t r, int64_t t) { return kv_at(pb, r, t) * pb->group; }

static inline vec load(const float *p) { vec x; memcpy(&x, p, sizeof x); return x; }
static inline void store(float *p, vec x) { memcpy(p, &x, sizeof x); }
static inline vec splat(float x) { return (vec){0} + x; }
static inline vec blend(ivec mask, vec a, vec b) { return (vec)((mask & (ivec)a) | (~mask & (ivec)b)); }

/* e^x for x <= 0 (softmax arguments): 2^n e^r with n = round(x / ln 2), |r| <= ln(2) / 2, and a degree-6 Taylor
   polynomial for e^r (relative error below 2e-7). Below -87, and for -inf, 0. */
static inline vec exp_nonpositive(vec x) {
    ivec tiny = x < -87.0f;
    x = blend(tiny, splat(-87.0f), x);
    vec n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;               /* round to nearest */
    vec r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;    /* ln 2 in two parts */
    vec p = splat(1.0f / 720);
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    ivec exponent = (__builtin_convertvector(n, ivec) + 127) << 23;
    return blend(tiny, splat(0), p * (vec)exponent);
}

/* A matrix read through row pointers: entry (m, kk) is rows[m][kk * step]. A key-major block matrix read
   query-major is rows[m] = base + m with step = its row length. */
struct rows_of {
    const float *const *rows;
    int64_t step;
};

/* One register tile of gemm: n_rows x (nv * LANES) entries. always_inline so each call site's constant n_rows
   and nv unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile(int n_rows, int nv, int64_t k_len, struct rows_of a,
                                                       int64_t m, const float *const *b, int64_t n, float *const *c,
                                                       int accumulate) {
    vec acc[4][4];
    for (int r = 0; r < n_rows; r++)
        for (int x = 0; x < nv; x++) acc[r][x] = accumulate ? load(c[m + r] + n + x * LANES) : splat(0);
    for (int64_t kk = 0; kk < k_len; kk++) {
        vec bk[4];
        for (int x = 0; x < nv; x++) bk[x] = load(b[kk] + n + x * LANES);
        for (int r = 0; r < n_rows; r++) {
            float s = a.rows[m + r][kk * a.step];
            for (int x = 0; x < nv; x++) acc[r][x] += s * bk[x];
        }
    }
    for (int r = 0; r < n_rows; r++)
        for (int x = 0; x < nv; x++) store(c[m + r] + n + x * LANES, acc[r][x]);
}

#define TILES(ROWS)                                                                                  \
    do {                                                                                             \
        int64_t n = 0;                                                                               \
        for (; n + 4 * LANES <= n_len; n += 4 * LANES) tile(ROWS, 4, k_len, a, m, b, n, c, accumulate); \
        for (; n + 2 * LANES <= n_len; n += 2 * LANES) tile(ROWS, 2, k_len, a, m, b, n, c, accumulate); \
        for (; n + LANES <= n_len; n += LANES) tile(ROWS, 1, k_len, a, m, b, n, c, accumulate);      \
        for (int r = 0; r < ROWS; r++)                                                               \
            for (int64_t nn = n; nn < n_len; nn++) {                                                 \
                float s = accumulate ? c[m + r][nn] : 0;                                             \
                for (int64_t kk = 0; kk < k_len; kk++) s += a.rows[m + r][kk * a.step] * b[kk][nn];  \
                c[m + r][nn] = s;                                                                    \
            }                                                                                        \
    } while (0)

/* c[m][n] (+)= sum_kk a(m, kk) b[kk][n] for m < m_len, n < n_len, kk < k_len. */
static void gemm(int64_t m_len, int64_t n_len, int64_t k_len, struct rows_of a, const float *const *b,
                 float *const *c, int accumulate) {
    int64_t m = 0;
    for (; m + 4 <= m_len; m += 4) TILES(4);
    for (; m < m_len; m++) TILES(1);
}

/* Scratch of one thread, sized for the largest block. Key-major matrices have rows of Mp = M rounded up to
   LANES floats; the padding columns have bias -inf, so probability 0, and no row of q, out or grad_out. */
struct scratch {
    int64_t *keys;                                     /* [L] positions */
    const float **k_rows, **v_rows;                    /* [L] pointers into k and v */
    float **grad_k_rows, **grad_v_rows;                /* [L] pointers into the gradient buffers */
    const float **q_rows, **out_rows, **grad_out_rows; /* [Mp] pointers to the block's query rows */
    float **grad_q_rows;                               /* [Mp] */
    const float **by_query, **by_key, **by_dim;        /* [max(L, Mp, D)] row pointers for gemm */
    float **c_rows;                                    /* [max(L, Mp, D)] */
    float *x_t;                                        /* [D, Mp] the block's q or grad_out, transposed */
    float *bias, *weight, *free_;                      /* [L, Mp]: 0 or -inf; m_ij; 1 where m_ij has a gradient */
    float *logits, *probs, *grad;                      /* [L, Mp] */
    float *work;                                       /* [L, Mp] p m: where probs starts, never moved to saved */
    float *lse, *delta, *grad_tau, *tau;               /* [Mp] per column */
    void *memory;
};

static int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

static int64_t lanes_up(int64_t n) { return (n + LANES - 1) / LANES * LANES; }

static int64_t max_keys(const struct problem *pb) {
    int64_t band = pb->window < pb->t_len ? pb->window : pb->t_len;
    return pb->n_slots + pb->block + band;
}

static int scratch_alloc(struct scratch *s, const struct problem *pb) {
    int64_t l = max_keys(pb), mp = lanes_up(pb->block * pb->group), d = pb->head_dim;
    int64_t n_ptr = l + mp + d;
    int64_t floats = d * mp + 6 * l * mp + 4 * mp;
    char *memory = malloc(l * sizeof(int64_t) + (4 * l + 4 * mp + 4 * n_ptr) * sizeof(float *) +
                          floats * sizeof(float));
    if (!memory) return 1;
    s->memory = memory;
    s->keys = (int64_t *)memory;
    const float **p = (const float **)(memory + l * sizeof(int64_t));
    s->k_rows = p; p += l;
    s->v_rows = p; p += l;
    s->grad_k_rows = (float **)p; p += l;
    s->grad_v_rows = (float **)p; p += l;
    s->q_rows = p; p += mp;
    s->out_rows = p; p += mp;
    s->grad_out_rows = p; p += mp;
    s->grad_q_rows = (float **)p; p += mp;
    s->by_query = p; p += n_ptr;
    s->by_key = p; p += n_ptr;
    s->by_dim = p; p += n_ptr;
    s->c_rows = (float **)p; p += n_ptr;
    float *f = (float *)p;
    float **parts[] = {&s->x_t, &s->bias, &s->weight, &s->free_, &s->logits, &s->probs, &s->grad, &s->lse,
                       &s->delta, &s->grad_tau, &s->tau};
    int64_t sizes[] = {d * mp, l * mp, l * mp, l * mp, l * mp, l * mp, l * mp, mp, mp, mp, mp};
    for (int i = 0; i < 11; i++) {
        *parts[i] = f;
        f += sizes[i];
    }
    s->work = s->probs;
    return 0;
}

/* Rows x[m] [D] of the block (m < M) -> x_t [D, Mp] with zero padding columns, and its rows for gemm's b. */
static const float *const *transposed(struct scratch *s, const float *const *x, int64_t m_len, int64_t mp,
                                      int64_t d) {
    for (int64_t e = 0; e < d; e++) {
        for (int64_t m = 0; m < m_len; m++) s->x_t[e * mp + m] = x[m][e];
        for (int64_t m = m_len; m < mp; m++) s->x_t[e * mp + m] = 0;
        s->by_dim[e] = s->x_t + e * mp;
    }
    return s->by_dim;
}

/* Pointers to the M query rows (position i0 + m / G, head m % G) of row r of a q-shaped tensor. */
static void query_rows(const struct problem *pb, int64_t r, int64_t i0, int64_t m_len, const float *x,
                       const float **rows) {
    for (int64_t m = 0; m < m_len; m++) rows[m] = x + q_at(pb, r, i0 + m / pb->group) + m % pb->group * pb->head_dim;
}

/* The block's key-major matrix x [L, Mp] read query-major, as gemm's a. */
static struct rows_of by_query(struct scratch *s, const float *x, int64_t m_len, int64_t mp) {
    for (int64_t m = 0; m < m_len; m++) s->by_query[m] = x + m;
    return (struct rows_of){s->by_query, mp};
}

/* The block's key-major matrix x [L, Mp] read key-major, as gemm's a. */
static struct rows_of by_key(struct scratch *s, const float *x, int64_t n_keys, int64_t mp) {
    for (int64_t l = 0; l < n_keys; l++) s->by_key[l] = x + l * mp;
    return (struct rows_of){s->by_key, 1};
}

/* The rows of the block's key-major matrix x [L, Mp], as gemm's c. */
static float *const *key_major(struct scratch *s, float *x, int64_t n_keys, int64_t mp) {
    for (int64_t l = 0; l < n_keys; l++) s->c_rows[l] = x + l * mp;
    return s->c_rows;
}

struct block {
    int64_t r, i0, p_len, m_len, mp, n_keys;
};

/* Block b of row r: its keys, and the row pointers of its keys, values and queries. */
static struct block block_keys(const struct problem *pb, struct scratch *s, int64_t r, int64_t b) {
    int64_t t_len = pb->t_len, g = pb->group;
    struct block bl = {.r = r, .i0 = b * pb->block};
    bl.p_len = t_len - bl.i0 < pb->block ? t_len - bl.i0 : pb->block;
    bl.m_len = bl.p_len * g;
    bl.mp = lanes_up(bl.m_len);
    int64_t band = pb->window < t_len ? pb->window : t_len;
    int64_t n_blocks = (t_len + pb->block - 1) / pb->block;
    const int32_t *list = pb->lists + (r * n_blocks + b) * pb->n_slots;
    int64_t n = 0;
    for (int64_t slot = 0; slot < pb->n_slots; slot++)
        if (list[slot] >= 0 && list[slot] < t_len) s->keys[n++] = list[slot];
    for (int64_t j = bl.i0 - band + 1 < 0 ? 0 : bl.i0 - band + 1; j < bl.i0 + bl.p_len; j++) s->keys[n++] = j;
    bl.n_keys = n;
    for (int64_t l = 0; l < n; l++) {
        s->k_rows[l] = pb->k + kv_at(pb, r, s->keys[l]);
        s->v_rows[l] = pb->v + kv_at(pb, r, s->keys[l]);
    }
    query_rows(pb, r, bl.i0, bl.m_len, pb->q, s->q_rows);
    return bl;
}

/* The block's masks and weights, and its logits k q^T (unscaled), into s->bias, s->weight, s->free_ and
   s->logits. */
static void block_logits(const struct problem *pb, struct scratch *s, struct block bl) {
    int64_t r = bl.r, n = bl.n_keys, g = pb->group;

    /* SPEC section 3: i attends j when j is selected at i (start_j <= i < end_j) or lies in i's window
       (j <= i < j + window); both are ranges of the block's query columns m (query i0 + m / G).
       m_ij = clip(u_j - tau_i, 0, 1) where selected (a tau of -inf gives 1), else 1; its gradient flows only
       strictly inside (0, 1). */
    /* In float32, as the fused kernels: u holds float32 scores, and the selection checked that rounding tau to
       float32 moves no fractional m_ij by more than 2^-10. */
    for (int64_t m = 0; m < bl.mp; m++)
        s->tau[m] = m < bl.m_len ? (float)pb->tau[score_at(pb, r, bl.i0 + m / g)] : 0;
    ivec lane;
    for (int i = 0; i < LANES; i++) lane[i] = i;
    for (int64_t l = 0; l < n; l++) {
        int64_t j = s->keys[l], at = score_at(pb, r, j);
        int32_t sel_lo = (int32_t)(clamp(pb->start[at] - bl.i0, 0, bl.p_len) * g);
        int32_t sel_hi = (int32_t)(clamp(pb->end[at] - bl.i0, 0, bl.p_len) * g);
        int32_t win_lo = (int32_t)(clamp(j - bl.i0, 0, bl.p_len) * g);
        int32_t win_hi = (int32_t)(clamp(j - bl.i0 + pb->window, 0, bl.p_len) * g);
        for (int64_t x = 0; x < bl.mp; x += LANES) {
            ivec m = lane + (int32_t)x;
            ivec selected = (m >= sel_lo) & (m < sel_hi), seen = selected | ((m >= win_lo) & (m < win_hi));
            vec weight = splat(1), free_ = splat(0);
            if (pb->gate != GATE_NONE) {
                vec gap = (float)pb->u[at] - load(s->tau + x);
                vec clipped = blend(gap < 0.0f, splat(0), blend(gap > 1.0f, splat(1), gap));
                weight = blend(selected, clipped, weight);
                free_ = blend(selected & (gap > 0.0f) & (gap < 1.0f), splat(1), free_);
            }
            store(s->bias + l * bl.mp + x, blend(seen, splat(0), splat(-INFINITY)));
            store(s->weight + l * bl.mp + x, weight);
            store(s->free_ + l * bl.mp + x, free_);
        }
    }
    gemm(n, bl.mp, pb->head_dim, (struct rows_of){s->k_rows, 1}, transposed(s, s->q_rows, bl.m_len, bl.mp,
                                                                            pb->head_dim),
         key_major(s, s->logits, n, bl.mp), 0);
}

/* Softmax logits at offset `at` of the block's [L, Mp] matrices: bias + scale * logit, times m_ij under the
   "kv" gate. */
static inline vec logits_at(const struct problem *pb, const struct scratch *s, int64_t at) {
    vec z = load(s->logits + at) * pb->scale;
    if (pb->gate == GATE_KV) z *= load(s->weight + at);
    return z + load(s->bias + at);
}

/* Where a block keeps what its backward needs (`saved`, 4 x L x Mp floats per block, sized for the largest):
   its logits, m_ij, where m_ij has a gradient, and its probabilities before m_ij. */
int64_t sparsek_saved_per_block(const struct problem *pb) {
    return 4 * max_keys(pb) * lanes_up(pb->block * pb->group);
}

static void point_at_saved(struct scratch *s, float *saved, int64_t n_keys, int64_t mp) {
    s->logits = saved;
    s->weight = saved + n_keys * mp;
    s->free_ = saved + 2 * n_keys * mp;
    s->probs = saved + 3 * n_keys * mp;
}

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

/* Whether x[0 .. n) sums to a finite float: then every entry is finite. A sum that overflows sends finite inputs
   to the caller's slower path, which handles them too (and whose products would not overflow first). */
int sparsek_finite_sum(const float *x, int64_t n) {
    vec acc = splat(0);
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) acc += load(x + i);
    float total = 0;
    for (; i < n; i++) total += x[i];
    for (int lane = 0; lane < LANES; lane++) total += acc[lane];
    return isfinite(total);
}

/* Whether this build splits blocks between threads (compiled with OpenMP). */
int sparsek_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Block `item` of the flattened (row, block) order: its rows of out (q's shape) and lse [R, T, G]; with saved
   (not NULL) its state for the backward too. */
static void forward_block(const struct problem *pb, struct scratch *s, int64_t item, float *out, float *lse,
                          float *saved) {
    float *probs = s->work;
    int64_t d = pb->head_dim, n_blocks = (pb->t_len + pb->block - 1) / pb->block;
    struct block bl = block_keys(pb, s, item / n_blocks, item % n_blocks);
    int64_t mp = bl.mp, n = bl.n_keys;
    if (saved) point_at_saved(s, saved + item * sparsek_saved_per_block(pb), n, mp);
    block_logits(pb, s, bl);
    vec top[mp / LANES], total[mp / LANES];                /* per query column: max, then sum */
    for (int64_t x = 0; x < mp; x += LANES) {
        top[x / LANES] = splat(-INFINITY);
        total[x / LANES] = splat(0);
    }
    for (int64_t l = 0; l < n; l++)
        for (int64_t x = 0; x < mp; x += LANES) {
            vec z = logits_at(pb, s, l * mp + x);
            store(s->probs + l * mp + x, z);
            top[x / LANES] = blend(z > top[x / LANES], z, top[x / LANES]);
        }
    /* A column no key reaches (padding past M) gets probabilities 0, not NaN: the backward reads them. */
    for (int64_t x = 0; x < mp; x += LANES) top[x / LANES] = blend(top[x / LANES] == -INFINITY, splat(0),
                                                                   top[x / LANES]);
    for (int64_t l = 0; l < n; l++)
        for (int64_t x = 0; x < mp; x += LANES) {
            vec e = exp_nonpositive(load(s->probs + l * mp + x) - top[x / LANES]);
            store(s->probs + l * mp + x, e);
            total[x / LANES] += e;
        }
    for (int64_t x = 0; x < mp; x += LANES)
        total[x / LANES] = blend(total[x / LANES] == 0, splat(0), 1 / total[x / LANES]);
    for (int64_t l = 0; l < n; l++)
        for (int64_t x = 0; x < mp; x += LANES) {
            vec p = load(s->probs + l * mp + x) * total[x / LANES];
            if (saved) store(s->probs + l * mp + x, p);
            if (pb->gate != GATE_NONE) p *= load(s->weight + l * mp + x);
            store(probs + l * mp + x, p);           /* p m, for the output */
        }
    int64_t lse0 = (bl.r * pb->t_len + bl.i0) * pb->group;
    for (int64_t m = 0; m < bl.m_len; m++)
        lse[lse0 + m] = top[m / LANES][m % LANES] - logf(total[m / LANES][m % LANES]);
    query_rows(pb, bl.r, bl.i0, bl.m_len, out, s->out_rows);
    gemm(bl.m_len, d, n, by_query(s, probs, bl.m_len, mp), s->v_rows, (float *const *)s->out_rows, 0);
}

/* All blocks, on `threads` OpenMP threads (one where the build has no OpenMP), each with scratch of its own.
   Returns 1 where scratch could not be allocated, else 0. */
int sparsek_gathered_forward(const struct problem *pb, float *out, float *lse, float *saved, int threads) {
    int64_t n_items = pb->rows * ((pb->t_len + pb->block - 1) / pb->block);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        struct scratch s;
        int ready = scratch_alloc(&s, pb) == 0;
        failed = !ready;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < n_items; item++)
            if (ready) forward_block(pb, &s, item, out, lse, saved);
        if (ready) free(s.memory);
    }
    return failed;
}

/* Block `item`'s gradients: its rows of grad_q and grad_tau written, its keys' rows of grad_k, grad_v and
   grad_u added to. grad_u and grad_tau are NULL when the scores need no gradient; saved is the forward's, or
   NULL to recompute it. */
static void backward_block(const struct problem *pb, struct scratch *s, int64_t item, const float *out,
                           const float *grad_out, const float *lse, float *saved, float *grad_q, float *grad_k,
                           float *grad_v, double *grad_u, double *grad_tau) {
    float *weighted = s->work;                                   /* p m, for grad_v */
    int64_t g = pb->group, d = pb->head_dim, n_blocks = (pb->t_len + pb->block - 1) / pb->block;
    int scores = grad_u != NULL && pb->gate != GATE_NONE;
    struct block bl = block_keys(pb, s, item / n_blocks, item % n_blocks);
    int64_t mp = bl.mp, n = bl.n_keys, m_len = bl.m_len, lse0 = (bl.r * pb->t_len + bl.i0) * g;
    if (saved) point_at_saved(s, saved + item * sparsek_saved_per_block(pb), n, mp);
    else block_logits(pb, s, bl);
    query_rows(pb, bl.r, bl.i0, m_len, out, s->out_rows);
    query_rows(pb, bl.r, bl.i0, m_len, grad_out, s->grad_out_rows);
    query_rows(pb, bl.r, bl.i0, m_len, grad_q, (const float **)s->grad_q_rows);
    for (int64_t m = 0; m < mp; m++) {
        float delta = 0;                    /* sum_j p_ij dp_ij = dout_i . out_i */
        if (m < m_len)
            for (int64_t e = 0; e < d; e++) delta += s->grad_out_rows[m][e] * s->out_rows[m][e];
        s->delta[m] = delta;
        s->lse[m] = m < m_len ? lse[lse0 + m] : 0;
        s->grad_tau[m] = 0;
    }
    /* the gradient of the weighted probabilities p_ij m_ij: v_j . dout_i */
    gemm(n, mp, d, (struct rows_of){s->v_rows, 1}, transposed(s, s->grad_out_rows, m_len, mp, d),
         key_major(s, s->grad, n, mp), 0);
    for (int64_t l = 0; l < n; l++) {
        vec grad_u_l = splat(0);
        for (int64_t x = 0; x < mp; x += LANES) {
            int64_t at = l * mp + x;
            vec prob = saved ? load(s->probs + at)
                             : exp_nonpositive(logits_at(pb, s, at) - load(s->lse + x));
            vec weight = load(s->weight + at), grad_weighted = load(s->grad + at);
            vec grad_z = prob * (grad_weighted * weight - load(s->delta + x));
            vec grad_logit = grad_z * pb->scale;
            if (pb->gate == GATE_KV) grad_logit *= weight;
            if (scores) {
                vec grad_weight = grad_weighted * prob;
                if (pb->gate == GATE_KV) grad_weight += grad_z * load(s->logits + at) * pb->scale;
                vec grad_gap = grad_weight * load(s->free_ + at);
                grad_u_l += grad_gap;
                store(s->grad_tau + x, load(s->grad_tau + x) - grad_gap);
            }
            store(weighted + at, prob * weight);
            store(s->grad + at, grad_logit);
        }
        if (scores) {
            double sum = 0;
            for (int i = 0; i < LANES; i++) sum += grad_u_l[i];
            grad_u[score_at(pb, bl.r, s->keys[l])] += sum;
        }
    }
    if (scores)
        for (int64_t p = 0; p < bl.p_len; p++) {
            double sum = 0;
            for (int64_t h = 0; h < g; h++) sum += s->grad_tau[p * g + h];
            grad_tau[score_at(pb, bl.r, bl.i0 + p)] = sum;
        }
    /* grad_q = grad_logit k; grad_k += grad_logit^T q; grad_v += (p m)^T dout */
    gemm(m_len, d, n, by_query(s, s->grad, m_len, mp), s->k_rows, s->grad_q_rows, 0);
    for (int64_t l = 0; l < n; l++) {
        s->grad_k_rows[l] = grad_k + kv_at(pb, bl.r, s->keys[l]);
        s->grad_v_rows[l] = grad_v + kv_at(pb, bl.r, s->keys[l]);
    }
    gemm(n, d, m_len, by_key(s, s->grad, n, mp), s->q_rows, s->grad_k_rows, 1);
    gemm(n, d, m_len, by_key(s, weighted, n, mp), s->grad_out_rows, s->grad_v_rows, 1);
}

/* All gradients, on `threads` OpenMP threads (one where the build has no OpenMP): grad_q and grad_tau written,
   grad_k, grad_v (k's shape) and grad_u (u's, in double like grad_tau) zeroed and added to. Key gradients
   gather from many blocks: threads past the first add into buffers of their own, summed at the end. Returns 1
   where memory could not be allocated, else 0. */
int sparsek_gathered_backward(const struct problem *pb, const float *out, const float *grad_out, const float *lse,
                              float *saved, float *grad_q, float *grad_k, float *grad_v, double *grad_u,
                              double *grad_tau, int threads) {
    int64_t n_keys = pb->rows * pb->t_len, kv = n_keys * pb->head_dim;
    int64_t n_items = pb->rows * ((pb->t_len + pb->block - 1) / pb->block);
    /* per extra thread: grad_u (doubles first, for alignment), then grad_k and grad_v */
    size_t per_thread = (size_t)n_keys * sizeof(double) + 2 * (size_t)kv * sizeof(float);
    char *extra = threads > 1 ? malloc((size_t)(threads - 1) * per_thread) : NULL;
    if (threads > 1 && !extra) return 1;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int id = omp_get_thread_num(), team = omp_get_num_threads();   /* OpenMP may give fewer than asked */
        char *mine = id ? extra + (size_t)(id - 1) * per_thread : NULL;
        double *my_u = grad_u == NULL ? NULL : id ? (double *)mine : grad_u;
        float *my_k = id ? (float *)(mine + (size_t)n_keys * sizeof(double)) : grad_k;
        float *my_v = id ? my_k + kv : grad_v;
        memset(my_k, 0, (size_t)kv * sizeof(float));
        memset(my_v, 0, (size_t)kv * sizeof(float));
        if (my_u) memset(my_u, 0, (size_t)n_keys * sizeof(double));
        struct scratch s;
        int ready = scratch_alloc(&s, pb) == 0;
        failed = !ready;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < n_items; item++)
            if (ready) backward_block(pb, &s, item, out, grad_out, lse, saved, grad_q, my_k, my_v, my_u, grad_tau);
        if (ready) free(s.memory);
        /* the implicit barrier above: every thread's buffers are complete */
        int others = team - 1;                  /* only the buffers of threads that ran were zeroed */
#pragma omp for schedule(static)
        for (int64_t e = 0; e < kv; e++)
            for (int t = 0; t < others; t++) {
                float *k_t = (float *)(extra + (size_t)t * per_thread + (size_t)n_keys * sizeof(double));
                grad_k[e] += k_t[e];
                grad_v[e] += k_t[kv + e];
            }
        if (grad_u) {
#pragma omp for schedule(static)
            for (int64_t e = 0; e < n_keys; e++)
                for (int t = 0; t < others; t++) grad_u[e] += ((double *)(extra + (size_t)t * per_thread))[e];
        }
    }
    free(extra);
    return failed;
}

/* ops/select/native.c, linked into this library: the selection the one-call entry points below run first. */
int sparsek_row_medians(const double *u, int64_t rows, int64_t t_len, int64_t n, double *median);
int sparsek_select_rows(const double *u, const double *shift, int64_t rows, int64_t t_len, int64_t topk,
                        int64_t window, int float32, double tau_rounding, double *tau, double *worst, int64_t *start,
                        int64_t *end, int64_t work_per_row, int threads);
int sparsek_block_lists(const int64_t *start, const int64_t *end, int64_t rows, int64_t t_len, int64_t topk,
                        int64_t block, int64_t n_slots, int32_t *lists);
int sparsek_threshold_backward(const double *u, const double *tau, const double *grad_tau, int64_t rows,
                               int64_t t_len, int64_t window, double *grad_u, int threads);

/* The whole forward from float32 scores [B, T, Hk] (topk >= 1): the rows u, their thresholds, ranges and block
   key lists into pb's buffers (the caller's, filled here), then sparsek_gathered_forward. Returns
   sparsek_select_rows' status where it is not 0, before any attention (the caller raises, or takes the
   reference thresholds and calls sparsek_gathered_forward itself), -1 where memory failed, else 0. */
int sparsek_forward(const struct problem *pb, const float *scores, int64_t topk, double tau_rounding,
                    int64_t work_per_row, double *worst, int select_threads, float *out, float *lse, float *saved,
                    int threads) {
    int64_t rows = pb->rows, t_len = pb->t_len;
    if (topk > t_len) topk = t_len;                       /* the same selection: every key */
    double *u = (double *)pb->u;                          /* the caller's buffers, const for the attention */
    for (int64_t r = 0; r < rows; r++)
        for (int64_t t = 0; t < t_len; t++)
            u[score_at(pb, r, t)] = scores[entry_at(pb, r, t)];
    double *shift = malloc((size_t)rows * sizeof(double));
    if (!shift || sparsek_row_medians(u, rows, t_len, t_len - pb->window, shift)) {
        free(shift);
        return -1;
    }
    int status = sparsek_select_rows(u, shift, rows, t_len, topk, pb->window, 1, tau_rounding, (double *)pb->tau,
                                     worst, (int64_t *)pb->start, (int64_t *)pb->end, work_per_row, select_threads);
    free(shift);
    if (status) return status;
    if (sparsek_block_lists(pb->start, pb->end, rows, t_len, topk, pb->block, pb->n_slots, (int32_t *)pb->lists))
        return -1;
    return sparsek_gathered_forward(pb, out, lse, saved, threads) ? -1 : 0;
}

/* The whole backward: sparsek_gathered_backward, then the thresholds' backward, and the scores' gradient as
   float32 [B, T, Hk] into grad_scores (NULL where the scores need none). Returns 1 where memory failed. */
int sparsek_backward(const struct problem *pb, const float *out, const float *grad_out, const float *lse,
                     float *saved, float *grad_q, float *grad_k, float *grad_v, float *grad_scores, int threads,
                     int threshold_threads) {
    int64_t rows = pb->rows, t_len = pb->t_len;
    double *grad_u = NULL, *grad_tau = NULL;
    if (grad_scores) {
        grad_u = calloc(2 * (size_t)(rows * t_len), sizeof(double));    /* grad_tau stays 0 under gate "none" */
        if (!grad_u) return 1;
        grad_tau = grad_u + rows * t_len;
    }
    int failed = sparsek_gathered_backward(pb, out, grad_out, lse, saved, grad_q, grad_k, grad_v, grad_u, grad_tau,
                                           threads);
    if (!failed && grad_scores) {
        failed = sparsek_threshold_backward(pb->u, pb->tau, grad_tau, rows, t_len, pb->window, grad_u,
                                            threshold_threads);
        for (int64_t r = 0; r < rows; r++)
            for (int64_t t = 0; t < t_len; t++)
                grad_scores[entry_at(pb, r, t)] = (float)grad_u[score_at(pb, r, t)];
    }
    free(grad_u);
    return failed;
}
