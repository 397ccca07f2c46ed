/* ticks.c -- a cycle-level tick counter and the batch harness that times hot paths.
 *
 * Counters, in order of preference:
 *   x86_64   rdtscp (waits for earlier instructions; TSC_AUX names the CPU, so a
 *            batch that migrated is dropped), else lfence-fenced rdtsc. Used by
 *            default only when the TSC is invariant (CPUID 0x80000007 EDX bit 8):
 *            a TSC that stops or changes rate with power states measures nothing.
 *   aarch64  cntvct_el0 after an isb, at cntfrq_el0 (the generic timer is
 *            constant-rate by architecture, but usually slower than the core).
 *   anywhere clock_gettime(CLOCK_MONOTONIC_RAW), in nanoseconds. The only
 *            counter of a KNHK_PORTABLE build (see knhk.h), on any machine.
 *
 * The harness runs fn(ctx, n) in many short batches, each timed on its own;
 * before each one it times the empty operation (the same loop and barrier as
 * a real hot op, no work), so what it reports per operation is the op's own
 * cost. Medians over batches shrug off the interrupts, page faults and
 * neighbours a shared machine throws at a few batches.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <time.h>

#include "knhk_internal.h"

#if (defined(__x86_64__) || defined(__i386__)) && !defined(KNHK_PORTABLE)
#include <cpuid.h>
#include <x86intrin.h>
#define KNHK_X86 1
#elif defined(__aarch64__) && !defined(KNHK_PORTABLE)
#define KNHK_AARCH64 1
#endif

/* ------------------------------------------------------------------ counters */

static inline uint64_t clock_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_RAW, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#ifdef KNHK_X86
/* rdtscp waits until every earlier instruction has executed; the lfence after
   it keeps later ones from starting early. TSC_AUX holds the kernel's CPU id. */
static inline uint64_t read_rdtscp(unsigned *cpu) {
    uint64_t t = __rdtscp(cpu);
    _mm_lfence();
    return t;
}
static inline uint64_t read_rdtsc_fenced(void) {
    _mm_lfence();
    uint64_t t = __rdtsc();
    _mm_lfence();
    return t;
}
#endif

#ifdef KNHK_AARCH64
static inline uint64_t read_cntvct(void) {
    uint64_t t;
    __asm__ volatile("isb\n\tmrs %0, cntvct_el0" : "=r"(t) : : "memory");
    return t;
}
static inline uint64_t read_cntfrq(void) {
    uint64_t f;
    __asm__ volatile("mrs %0, cntfrq_el0" : "=r"(f));
    return f;
}
#endif

/* One counter read. cpu gets the CPU id where the counter reports one, else ~0u. */
static inline uint64_t read_counter(int source, unsigned *cpu) {
    *cpu = ~0u;
    switch (source) {
#ifdef KNHK_X86
    case KNHK_TICKS_RDTSCP: return read_rdtscp(cpu);
    case KNHK_TICKS_RDTSC_LFENCE: return read_rdtsc_fenced();
#endif
#ifdef KNHK_AARCH64
    case KNHK_TICKS_CNTVCT: return read_cntvct();
#endif
    default: return clock_ns();
    }
}

/* ------------------------------------------------------------------ detection */

static _knhk_once detect_once;
static knhk_tick_counter facts; /* filled once; .source/.hz/.invariant follow the selection */
static _Atomic int current_source;

#if defined(KNHK_X86) || defined(KNHK_AARCH64)
/* Ticks per second of the TSC (or the virtual counter) against CLOCK_MONOTONIC_RAW:
   the median of five 2 ms windows, so one preempted window does not skew it. */
static double calibrate(int source) {
    double rates[5];
    for (int r = 0; r < 5; r++) {
        unsigned cpu;
        uint64_t n0 = clock_ns(), t0 = read_counter(source, &cpu);
        uint64_t n1;
        do n1 = clock_ns();
        while (n1 - n0 < 2000000u);
        uint64_t t1 = read_counter(source, &cpu);
        rates[r] = (double)(t1 - t0) * 1e9 / (double)(n1 - n0);
    }
    for (int i = 1; i < 5; i++) /* insertion sort of five */
        for (int j = i; j > 0 && rates[j] < rates[j - 1]; j--) {
            double t = rates[j];
            rates[j] = rates[j - 1];
            rates[j - 1] = t;
        }
    return rates[2];
}
#endif

static int detect(void *unused) {
    (void)unused;
    knhk_tick_counter f;
    memset(&f, 0, sizeof f);
#ifdef KNHK_X86
    unsigned a, b, c, d, max_leaf = 0, max_ext = 0;
    if (__get_cpuid(0, &a, &b, &c, &d)) max_leaf = a;
    if (max_leaf >= 1) {
        __cpuid(1, a, b, c, d);
        f.has_tsc = (d >> 4) & 1;
        f.hypervisor = (c >> 31) & 1;
    }
    __cpuid(0x80000000u, a, b, c, d);
    max_ext = a;
    if (max_ext >= 0x80000001u) {
        __cpuid(0x80000001u, a, b, c, d);
        f.has_rdtscp = (d >> 27) & 1;
    }
    if (max_ext >= 0x80000007u) {
        __cpuid(0x80000007u, a, b, c, d);
        f.invariant_tsc = (d >> 8) & 1;
    }
    /* The TSC's rate: leaf 0x15 (crystal * ratio), then leaf 0x16's base
       frequency, then a hypervisor's timing leaf, then measurement. Most
       VMs clear 0x15/0x16, so calibration is the common case there. */
    if (max_leaf >= 0x15) {
        __cpuid_count(0x15, 0, a, b, c, d);
        if (a != 0 && b != 0 && c != 0) {
            f.tsc_hz = (double)c * (double)b / (double)a;
            f.tsc_hz_method = KNHK_TICKS_HZ_CPUID_15;
        }
    }
    if (f.tsc_hz == 0 && max_leaf >= 0x16) {
        __cpuid_count(0x16, 0, a, b, c, d);
        if ((a & 0xffff) != 0) {
            f.tsc_hz = (double)(a & 0xffff) * 1e6;
            f.tsc_hz_method = KNHK_TICKS_HZ_CPUID_16;
        }
    }
    if (f.tsc_hz == 0 && f.hypervisor) {
        __cpuid(0x40000000u, a, b, c, d);
        if (a >= 0x40000010u) {
            __cpuid(0x40000010u, a, b, c, d);
            if (a != 0) {
                f.tsc_hz = (double)a * 1e3;
                f.tsc_hz_method = KNHK_TICKS_HZ_HYPERVISOR;
            }
        }
    }
    if (f.has_tsc) {
        f.tsc_calibrated_hz = calibrate(KNHK_TICKS_RDTSC_LFENCE);
        if (f.tsc_hz == 0) {
            f.tsc_hz = f.tsc_calibrated_hz;
            f.tsc_hz_method = KNHK_TICKS_HZ_CALIBRATED;
        }
    }
#endif
#ifdef KNHK_AARCH64
    f.has_cntvct = 1;
    f.cntvct_hz = (double)read_cntfrq();
    if (f.cntvct_hz == 0) f.cntvct_hz = calibrate(KNHK_TICKS_CNTVCT);
#endif
    facts = f;
    return KNHK_OK;
}

static void ensure_detected(void) { _knhk_once_run(&detect_once, detect, NULL); }

static double counter_hz(int source) {
    switch (source) {
    case KNHK_TICKS_RDTSCP:
    case KNHK_TICKS_RDTSC_LFENCE: return facts.tsc_hz;
    case KNHK_TICKS_CNTVCT: return facts.cntvct_hz;
    default: return 1e9;
    }
}

static int auto_source(void) {
    if (facts.has_tsc && facts.invariant_tsc) return facts.has_rdtscp ? KNHK_TICKS_RDTSCP : KNHK_TICKS_RDTSC_LFENCE;
    if (facts.has_cntvct) return KNHK_TICKS_CNTVCT;
    return KNHK_TICKS_CLOCK_GETTIME;
}

static int source_or_auto(void) {
    int s = atomic_load_explicit(&current_source, memory_order_relaxed);
    return s != KNHK_TICKS_AUTO ? s : auto_source();
}

const char *knhk_ticks_source_name(int source) {
    switch (source) {
    case KNHK_TICKS_AUTO: return "auto";
    case KNHK_TICKS_RDTSCP: return "rdtscp";
    case KNHK_TICKS_RDTSC_LFENCE: return "lfence+rdtsc";
    case KNHK_TICKS_CNTVCT: return "cntvct_el0";
    case KNHK_TICKS_CLOCK_GETTIME: return "clock_gettime";
    default: return "unknown";
    }
}

int knhk_ticks_select(int source) {
    ensure_detected();
    const char *why = NULL;
    switch (source) {
    case KNHK_TICKS_AUTO: break;
    case KNHK_TICKS_RDTSCP:
        if (!facts.has_tsc || !facts.has_rdtscp) why = "this CPU has no rdtscp";
        break;
    case KNHK_TICKS_RDTSC_LFENCE:
        if (!facts.has_tsc) why = "this CPU has no TSC (x86 only)";
        break;
    case KNHK_TICKS_CNTVCT:
        if (!facts.has_cntvct) why = "cntvct_el0 exists on aarch64 only";
        break;
    case KNHK_TICKS_CLOCK_GETTIME: break;
    default:
        _knhk_set_error("tick source %d is not one of KNHK_TICKS_AUTO..KNHK_TICKS_CLOCK_GETTIME (0..4)", source);
        return KNHK_ERR_INVALID;
    }
    if (why != NULL) {
        _knhk_set_error("tick source %s: %s", knhk_ticks_source_name(source), why);
        return KNHK_ERR_UNAVAILABLE;
    }
    atomic_store_explicit(&current_source, source, memory_order_relaxed);
    return KNHK_OK;
}

int knhk_ticks_counter(knhk_tick_counter *out) {
    ensure_detected();
    knhk_tick_counter f = facts;
    f.source = source_or_auto();
    f.hz = counter_hz(f.source);
    switch (f.source) {
    case KNHK_TICKS_RDTSCP:
    case KNHK_TICKS_RDTSC_LFENCE:
        f.hz_method = f.tsc_hz_method;
        f.invariant = f.invariant_tsc;
        break;
    case KNHK_TICKS_CNTVCT:
        f.hz_method = KNHK_TICKS_HZ_CNTFRQ;
        f.invariant = 1;
        break;
    default:
        f.hz_method = KNHK_TICKS_HZ_NANOSECONDS;
        f.invariant = 1; /* nanoseconds do not change rate; they are just not cycles */
        break;
    }
    *out = f;
    return KNHK_OK;
}

uint64_t knhk_ticks_now(void) {
    ensure_detected();
    unsigned cpu;
    return read_counter(source_or_auto(), &cpu);
}

/* ------------------------------------------------------------------ the harness */

void knhk_ticks_hotop_empty(void *ctx, uint64_t iterations) {
    /* The shape every hot op has: a counted loop around a compiler barrier. */
    for (uint64_t i = 0; i < iterations; i++) __asm__ volatile("" : : "r"(ctx) : "memory");
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double _knhk_median_of(double *v, size_t n) {
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Ticks one batch took, or UINT64_MAX when it migrated between CPUs or the
   counter went backwards (both mean the difference is not a duration). */
static inline uint64_t time_batch(int source, knhk_hotop_fn fn, void *ctx, uint64_t n) {
    unsigned c0, c1;
    uint64_t t0 = read_counter(source, &c0);
    fn(ctx, n);
    uint64_t t1 = read_counter(source, &c1);
    if (_knhk_unlikely(c0 != c1 || t1 < t0)) return UINT64_MAX;
    return t1 - t0;
}

int knhk_ticks_measure(knhk_hotop_fn fn, void *ctx, const knhk_ticks_params *params, knhk_ticks_result *out) {
    if (fn == NULL || params == NULL || out == NULL) {
        _knhk_set_error("knhk_ticks_measure: fn, params and out must not be NULL");
        return KNHK_ERR_INVALID;
    }
    if (params->batches < 3 || params->batches > KNHK_TICKS_MAX_BATCHES) {
        _knhk_set_error("batches must be in [3, %d], got %u", KNHK_TICKS_MAX_BATCHES, params->batches);
        return KNHK_ERR_INVALID;
    }
    if (params->iterations > KNHK_TICKS_MAX_ITERATIONS) {
        _knhk_set_error("iterations must be 0 (automatic) or at most %llu, got %llu",
                        (unsigned long long)KNHK_TICKS_MAX_ITERATIONS, (unsigned long long)params->iterations);
        return KNHK_ERR_INVALID;
    }
    ensure_detected();
    memset(out, 0, sizeof *out);
    const int source = source_or_auto();
    out->source = source;

    /* Batch size: given, or doubled until one batch of the real op takes
       batch_ns (default 8 us): long enough that the counter reads are noise,
       short enough that a timer interrupt (every 1-4 ms) hits few batches. */
    uint64_t n = params->iterations;
    if (n == 0) {
        double hz = counter_hz(source);
        uint64_t ns = params->batch_ns ? params->batch_ns : KNHK_TICKS_DEFAULT_BATCH_NS;
        uint64_t target = hz > 0 ? (uint64_t)((double)ns * hz / 1e9) : ns;
        if (target < 1) target = 1;
        n = 1;
        for (;;) {
            uint64_t best = UINT64_MAX;
            for (int r = 0; r < 3; r++) {
                uint64_t t = time_batch(source, fn, ctx, n);
                if (t < best) best = t;
            }
            if ((best != UINT64_MAX && best >= target) || n >= KNHK_TICKS_MAX_ITERATIONS) break;
            n *= 2;
        }
    }
    out->iterations = n;

    const uint32_t batches = params->batches;
    double *op = malloc(sizeof(double) * batches * 2);
    if (op == NULL) {
        _knhk_set_error("knhk_ticks_measure: no memory for %u batch samples", batches);
        return KNHK_ERR_NOMEM;
    }
    double *empty = op + batches;

    for (uint32_t w = 0; w < params->warmup; w++) {
        (void)time_batch(source, knhk_ticks_hotop_empty, ctx, n);
        (void)time_batch(source, fn, ctx, n);
    }
    /* The empty op runs right before each real batch, so both see the same
       machine; a batch lost to migration is retried, up to as many again. */
    uint32_t kept = 0, lost = 0;
    while (kept < batches && lost < batches) {
        uint64_t e = time_batch(source, knhk_ticks_hotop_empty, ctx, n);
        uint64_t t = time_batch(source, fn, ctx, n);
        if (e == UINT64_MAX || t == UINT64_MAX) {
            lost++;
            continue;
        }
        empty[kept] = (double)e / (double)n;
        op[kept] = (double)t / (double)n;
        kept++;
    }
    out->discarded = lost;
    if (kept < 3) {
        free(op);
        _knhk_set_error("only %u of %u batches stayed on one CPU; pin the process (taskset) and retry", kept, batches);
        return KNHK_ERR_STATE;
    }
    out->batches = kept;
    out->overhead = _knhk_median_of(empty, kept);
    out->raw_median = _knhk_median_of(op, kept);
    out->raw_min = op[0];
    /* Both figures less the same overhead estimate, so min <= median always
       holds (the fastest empty batch would let min pass the median when the
       op's batches barely vary). */
    out->median = out->raw_median - out->overhead;
    out->min = out->raw_min - out->overhead;
    if (out->median < 0) out->median = 0;
    if (out->min < 0) out->min = 0;
    free(op);
    return KNHK_OK;
}
