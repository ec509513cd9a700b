/* The prefix selection of prefix.py as one sequential pass per row, for the CPU (loaded by native.py).

   PyTorch runs prefix.py's O(T log T) selection as a few hundred small tensor operations; on a CPU their fixed
   cost outweighs the attention for rows up to thousands of keys. Here each row costs one pass over its keys.

   Thresholds. tau of a prefix solves sum_l clip(u_l - tau, 0, 1) = topk. Adding a key can only raise it, so a
   key at or below the current tau never counts again: the pass keeps the "live" keys (above tau, plus the best
   topk + 1, which decide the flat case) sorted best-first, and solves each prefix by sweeping the breakpoints
   u_l and u_l - 1 from the top until f reaches topk. A prefix costs O(topk + live keys).

   Ranges. The top-k set of a growing prefix is a heap of topk keys: a new key (always the newest, so it wins
   ties) evicts the worst key when it is at least as good, and key j's range ends at the query where its
   evictor becomes a candidate. Keys never admitted have an empty range.

   The rule itself (ties to the newer key, the midpoint tau where f is flat, cummax, sums of scores centred on
   the row's median and clamped) is prefix.py's; tests hold this file to it by name. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Whether key a (score ua, position pa) ranks below key b: lower score, or equal score and older. */
static int worse(double ua, int64_t pa, double ub, int64_t pb) {
    return ua < ub || (ua == ub && pa < pb);
}

static void sift_down(int64_t *heap, int64_t size, const double *u) {
    int64_t i = 0;
    for (;;) {
        int64_t left = 2 * i + 1, right = left + 1, low = i;
        if (left < size && worse(u[heap[left]], heap[left], u[heap[low]], heap[low])) low = left;
        if (right < size && worse(u[heap[right]], heap[right], u[heap[low]], heap[low])) low = right;
        if (low == i) return;
        int64_t t = heap[i]; heap[i] = heap[low]; heap[low] = t;
        i = low;
    }
}

static void sift_up(int64_t *heap, int64_t i, const double *u) {
    while (i > 0) {
        int64_t parent = (i - 1) / 2;
        if (!worse(u[heap[i]], heap[i], u[heap[parent]], heap[parent])) return;
        int64_t t = heap[i]; heap[i] = heap[parent]; heap[parent] = t;
        i = parent;
    }
}

/* Key ranges of one row: start_j = min(j + window, T); end_j as in prefix.key_ranges. heap: topk scratch. */
static void row_ranges(const double *u, int64_t t_len, int64_t topk, int64_t window, int64_t *start,
                       int64_t *end, int64_t *heap) {
    int64_t size = 0;
    for (int64_t j = 0; j < t_len; j++) {
        start[j] = j + window < t_len ? j + window : t_len;
        end[j] = t_len;                      /* still selected at the last query, unless evicted below */
        if (size < topk) {
            heap[size] = j;
            sift_up(heap, size++, u);
        } else if (u[j] >= u[heap[0]]) {     /* j is newer than every key in the heap: ties go to j */
            end[heap[0]] = j + window;
            heap[0] = j;
            sift_down(heap, size, u);
        } else {
            end[j] = start[j];
        }
    }
    for (int64_t j = 0; j < t_len; j++) {
        if (end[j] > t_len) end[j] = t_len;
        if (end[j] < start[j]) end[j] = start[j];
    }
}

/* Centred scores enter the sweep clamped, as in prefix._prefix_thresholds: one far key (3e38 among values near
   0) must not swamp the sums, and a tau beyond the clamp is flagged with an infinite error. */
#define SPREAD 1048576.0   /* 2^20, prefix._SPREAD */

static double centred(double x, double shift) {
    double c = x - shift;
    return c > SPREAD ? SPREAD : c < -SPREAD ? -SPREAD : c;
}

/* What the sweep found wrong, as bits of sparsek_select_rows' status (prefix.py raises for them). */
enum { TOO_MUCH_WORK = 1, ROUNDING = 2, SPREAD_EXCEEDED = 4 };

/* Half a unit in the last place of |tau| rounded to the dtype the thresholds are returned in (float32 or
   float64), as prefix._check_rounding computes it. */
static double half_unit(double tau, int float32) {
    if (float32) {
        float magnitude = (float)fabs(tau);
        return 0.5 * (double)(nextafterf(magnitude, INFINITY) - magnitude);
    }
    return 0.5 * (nextafter(fabs(tau), INFINITY) - fabs(tau));
}

/* tau of every prefix of one row, as prefix._prefix_thresholds: u [n] and the row's median `shift` -> tau [n]
   (entry c - 1 for the prefix of length c; -inf while c <= topk). The sweep works on u - shift, so that a large
   common offset does not cancel the differences that decide tau; the flat case's midpoint uses u itself.
   Where f is not flat at tau, prefix._check_rounding's test runs here: the error of adding the shift back
   (infinite beyond the clamp: SPREAD_EXCEEDED) plus the rounding to the returned dtype must stay within
   tau_rounding (else ROUNDING, and *worst takes the largest such |tau|); those bits go into *status. live:
   n + 1 scratch. Returns the work done (sweep steps and moved keys), or -1 as soon as it passes max_work. */
static int64_t row_thresholds(const double *u, double shift, int64_t n, int64_t topk, double *tau, int float32,
                              double tau_rounding, int *status, double *worst, double *live, int64_t max_work) {
    int64_t m = 0, work = 0;                   /* live keys, best first */
    double current = -INFINITY, running = -INFINITY;   /* centred tau of the last prefix; the cummax */
    for (int64_t c = 1; c <= n; c++) {
        double x = u[c - 1];
        int64_t lo = 0, hi = m;                /* first live key below x: ties keep their order */
        while (lo < hi) {
            int64_t mid = (lo + hi) / 2;
            if (live[mid] >= x) lo = mid + 1; else hi = mid;
        }
        if (lo <= topk || centred(x, shift) > current) {   /* else neither among the best topk + 1 nor above tau */
            memmove(live + lo + 1, live + lo, (size_t)(m - lo) * sizeof(double));
            live[lo] = x;
            m++;
            work += m - lo;
        }
        double error = 0;
        int fractional = 0;
        if (c <= topk) {
            tau[c - 1] = -INFINITY;
            continue;
        }
        double theta = live[topk - 1], below = live[topk], t;
        if (theta - below >= 1) {
            t = 0.5 * (below + theta - 1);    /* f == topk on [below, theta - 1]: its midpoint */
            current = centred(t, shift);
        } else {
            /* Sweep t down from the best key. Keys [ones, frac_end) are fractional, those before are ones:
               f(t) = ones + sum - (frac_end - ones) * t, summing the fractional keys' centred scores. Once
               every live key is a one, f = m > topk: the loop ends there at the latest. */
            int64_t ones = 0, frac_end = 0;
            double sum = 0;
            current = NAN;
            while (ones < m) {
                double next_fractional = frac_end < m ? centred(live[frac_end], shift) : -INFINITY;
                double next_one = ones < frac_end ? centred(live[ones], shift) - 1 : -INFINITY;
                int becomes_fractional = next_fractional >= next_one;
                double next = becomes_fractional ? next_fractional : next_one;
                if (frac_end > ones && ones + sum - (double)(frac_end - ones) * next >= topk) {
                    current = (sum + ones - topk) / (double)(frac_end - ones);
                    break;
                }
                if (becomes_fractional) {
                    sum += centred(live[frac_end++], shift);
                } else {
                    sum -= centred(live[ones++], shift);
                }
                work++;
            }
            double absolute = current + shift;
            error = fabs(current) <= SPREAD - 2 ? fabs(absolute - shift - current) : INFINITY;
            t = absolute > theta - 1 ? absolute : theta - 1;
            fractional = 1;
        }
        if (work > max_work) return -1;
        running = t > running ? t : running;  /* cummax: rounding must not let tau fall */
        tau[c - 1] = running;
        if (fractional && isinf(error)) *status |= SPREAD_EXCEEDED;
        else if (fractional && error + half_unit(running, float32) > tau_rounding) {
            *status |= ROUNDING;
            *worst = fabs(running) > *worst ? fabs(running) : *worst;
        }
        while (m > topk + 1 && centred(live[m - 1], shift) <= current) m--;   /* never above tau again */
    }
    return work;
}

/* All rows: u [rows, t_len] and each row's median shift [rows] -> tau [rows, t_len] for every query (-inf before
   the first candidates, at i < window), start and end [rows, t_len], the rows split between `threads` OpenMP
   threads (one where the build has no OpenMP). The sweep costs O(topk + live keys) per prefix, and the live keys
   grow with the row where scores bunch within 1 of each other (an untrained scorer): past work_per_row steps a
   row's thresholds stop (its ranges are still written) and the status has TOO_MUCH_WORK, so that the caller
   takes the O(T log T) reference for them. Returns the status bits (row_thresholds), 0 when all is well, or -1
   where scratch could not be allocated. */
int sparsek_select_rows(const double *u, const double *shift, int64_t rows, int64_t t_len, int64_t topk,
                        int64_t window, int float32, double tau_rounding, double *tau, double *worst, int64_t *start,
                        int64_t *end, int64_t work_per_row, int threads) {
    if (topk > t_len) topk = t_len;              /* the same selection (topk >= T: every key), and a heap of T */
    if (window > t_len) window = t_len;
    int64_t n = t_len - window;
    int status = 0, failed = 0;
    double largest = 0;
#pragma omp parallel num_threads(threads) reduction(| : status, failed) reduction(max : largest)
    {
        double *live = malloc((size_t)(t_len + 1) * sizeof(double));
        int64_t *heap = malloc((size_t)(topk > 0 ? topk : 1) * sizeof(int64_t));
        failed = !live || !heap;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (failed) continue;
            const double *row = u + r * t_len;
            double *row_tau = tau + r * t_len;
            for (int64_t i = 0; i < t_len - n; i++) row_tau[i] = -INFINITY;
            if (row_thresholds(row, shift[r], n, topk, row_tau + t_len - n, float32, tau_rounding, &status,
                               &largest, live, work_per_row) < 0)
                status |= TOO_MUCH_WORK;
            row_ranges(row, t_len, topk, window, start + r * t_len, end + r * t_len, heap);
        }
        free(live);
        free(heap);
    }
    *worst = largest;
    return failed ? -1 : status;
}

/* The median of the first n entries of each row, u [rows, t_len] -> median [rows] (0 where n = 0): for an even
   n the lower middle value, as torch.median. prefix._prefix_thresholds centres a row's sums on the median of
   its candidates, the first t_len - window keys. Returns 1 where its scratch could not be allocated, else 0. */
int sparsek_row_medians(const double *u, int64_t rows, int64_t t_len, int64_t n, double *median) {
    double *scratch = malloc((size_t)(n > 0 ? n : 1) * sizeof(double));
    if (!scratch) return 1;
    int64_t want = n > 0 ? (n - 1) / 2 : 0;
    for (int64_t r = 0; r < rows; r++) {
        if (n <= 0) {
            median[r] = 0;
            continue;
        }
        memcpy(scratch, u + r * t_len, (size_t)n * sizeof(double));
        int64_t lo = 0, hi = n - 1;              /* quickselect: the want-th smallest lies in [lo, hi] */
        while (lo < hi) {
            double pivot = scratch[lo + (hi - lo) / 2];
            int64_t i = lo, j = hi;
            while (i <= j) {
                while (scratch[i] < pivot) i++;
                while (scratch[j] > pivot) j--;
                if (i <= j) {
                    double t = scratch[i]; scratch[i] = scratch[j]; scratch[j] = t;
                    i++;
                    j--;
                }
            }
            if (want <= j) hi = j;
            else if (want >= i) lo = i;
            else break;                          /* j < want < i: scratch[want] == pivot */
        }
        median[r] = scratch[want];
    }
    free(scratch);
    return 0;
}

/* Keys selected by the first query of each block, by slot, as blocks.block_key_lists: start, end [rows, t_len]
   -> lists [rows, n_blocks, n_slots] int32 (-1 for an empty slot). The first topk keys hold slots
   0 .. topk - 1; a later key takes the slot of the key it evicts, the one whose range ends where its own
   starts. Returns 1 where its scratch could not be allocated, else 0. */
int sparsek_block_lists(const int64_t *start, const int64_t *end, int64_t rows, int64_t t_len, int64_t topk,
                        int64_t block, int64_t n_slots, int32_t *lists) {
    int64_t n_blocks = (t_len + block - 1) / block;
    int64_t *slot = malloc((size_t)(2 * t_len + 1) * sizeof(int64_t)), *victim = slot + t_len;
    if (!slot) return 1;
    for (int64_t x = 0; x < rows * n_blocks * n_slots; x++) lists[x] = -1;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t *s = start + r * t_len, *e = end + r * t_len;
        int32_t *out = lists + r * n_blocks * n_slots;
        for (int64_t q = 0; q < t_len; q++) victim[q] = -1;
        for (int64_t j = 0; j < t_len; j++)
            if (e[j] > s[j] && e[j] < t_len) victim[e[j]] = j;   /* evicted at query e[j] */
        for (int64_t j = 0; j < t_len; j++) {
            slot[j] = -1;
            if (e[j] <= s[j]) continue;                           /* never selected */
            int64_t evicted = victim[s[j]];
            slot[j] = j < topk ? j : evicted >= 0 && evicted < j ? slot[evicted] : -1;
            if (slot[j] < 0) continue;                            /* ranges not from a selection */
            for (int64_t b = (s[j] + block - 1) / block; b * block < e[j]; b++)
                out[b * n_slots + slot[j]] = (int32_t)j;
        }
    }
    free(slot);
    return 0;
}

/* First i in [0, n) with tau[i] > x (strictly) or >= x, tau non-decreasing (a cummax): searchsorted. */
static int64_t first_above(const double *tau, int64_t n, double x, int strictly) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (strictly ? tau[mid] > x : tau[mid] >= x) hi = mid; else lo = mid + 1;
    }
    return lo;
}

/* The scores' gradient through the thresholds, as prefix.threshold_backward: u, tau, grad_tau [rows, t_len] ->
   added to grad_u [rows, t_len]. Key l is fractional for the queries lo_l <= i < hi_l (a candidate, and
   tau_i < u_l < tau_i + 1); each fractional key of query i receives grad_tau_i / |F_i|, so grad_u_l is a
   difference of prefix sums over queries. Rows split between `threads` OpenMP threads. Returns 1 where scratch
   could not be allocated, else 0. */
int sparsek_threshold_backward(const double *u, const double *tau, const double *grad_tau, int64_t rows,
                               int64_t t_len, int64_t window, double *grad_u, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t *lo = malloc((size_t)(3 * t_len + 1) * sizeof(int64_t)), *hi = lo + t_len, *count = hi + t_len;
        double *shares = malloc((size_t)(t_len + 1) * sizeof(double));
        failed = !lo || !shares;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (failed) continue;
            const double *ur = u + r * t_len, *tr = tau + r * t_len, *gr = grad_tau + r * t_len;
            memset(count, 0, (size_t)(t_len + 1) * sizeof(int64_t));
            for (int64_t l = 0; l < t_len; l++) {
                int64_t low = first_above(tr, t_len, ur[l] - 1, 1);
                int64_t candidate = l + window < t_len ? l + window : t_len;
                lo[l] = low > candidate ? low : candidate;
                int64_t high = first_above(tr, t_len, ur[l], 0);
                hi[l] = high > lo[l] ? high : lo[l];
                count[lo[l]]++;
                count[hi[l]]--;
            }
            int64_t covering = 0;
            shares[0] = 0;
            for (int64_t i = 0; i < t_len; i++) {
                covering += count[i];
                shares[i + 1] = shares[i] + (covering > 0 ? gr[i] / (double)covering : 0);
            }
            for (int64_t l = 0; l < t_len; l++) grad_u[r * t_len + l] += shares[hi[l]] - shares[lo[l]];
        }
        free(lo);
        free(shares);
    }
    return failed;
}
