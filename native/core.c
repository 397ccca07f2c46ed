/* core.c -- status names, version, thread stripes, the native once-cell, CPU features. */
#include "knhk_internal.h"

/* The version is written once, in knhk_memory/_version.py; native/build_native.py
   passes it to every binary (-DKNHK_VERSION_STRING="x.y.z"). */
#ifndef KNHK_VERSION_STRING
#error "KNHK_VERSION_STRING is defined by native/build_native.py from knhk_memory/_version.py"
#endif

const char *knhk_version(void) { return KNHK_VERSION_STRING; }

const char *knhk_status_name(int status) {
    switch (status) {
    case KNHK_OK: return "ok";
    case KNHK_ERR_NOMEM: return "out of memory";
    case KNHK_ERR_INVALID: return "invalid argument";
    case KNHK_ERR_UNAVAILABLE: return "unavailable";
    case KNHK_ERR_UNSUPPORTED: return "unsupported";
    case KNHK_ERR_PYTHON: return "python error";
    case KNHK_ERR_STATE: return "wrong state";
    case KNHK_ERR_OVERFLOW: return "overflow";
    default: return "unknown status";
    }
}

/* ---- last error */

#include <stdarg.h>
#include <stdio.h>

static __thread char last_error[512];

const char *knhk_last_error(void) { return last_error; }

void _knhk_set_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
}

/* ---- stripes */

__thread int _knhk_tls_stripe = -1;
static _Atomic unsigned next_stripe;

unsigned _knhk_thread_stripe_slow(void) {
    unsigned s = atomic_fetch_add_explicit(&next_stripe, 1, memory_order_relaxed) & (KNHK_STRIPES - 1);
    _knhk_tls_stripe = (int)s;
    return s;
}

/* ---- once: _knhk_once_run is in once.c, beside knhk_once (one protocol, fork-safe). */

/* ---- cpu */

static _knhk_once cpu_once;
static uint64_t cpu_bits;

static int cpu_detect(void *unused) {
    (void)unused;
    uint64_t bits = 0;
    /* A KNHK_PORTABLE build detects nothing: it has no kernels to choose between. */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(KNHK_PORTABLE)
    /* libgcc's checks include the OS's XSAVE state (XGETBV), so AVX and
       AVX-512 are reported only when the kernel saves their registers. */
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) bits |= KNHK_CPU_SSE42;
    if (__builtin_cpu_supports("popcnt")) bits |= KNHK_CPU_POPCNT;
    if (__builtin_cpu_supports("avx2")) bits |= KNHK_CPU_AVX2;
    if (__builtin_cpu_supports("bmi2")) bits |= KNHK_CPU_BMI2;
    if (__builtin_cpu_supports("avx512f")) bits |= KNHK_CPU_AVX512F;
    if (__builtin_cpu_supports("avx512bw")) bits |= KNHK_CPU_AVX512BW;
    if (__builtin_cpu_supports("avx512vl")) bits |= KNHK_CPU_AVX512VL;
    /* Cores that take a lower clock licence for any 512-bit instruction
       (light integer ones included), for ~2 ms after the last one. */
    if ((bits & KNHK_CPU_AVX512F) &&
        (__builtin_cpu_is("skylake-avx512") || __builtin_cpu_is("cascadelake") || __builtin_cpu_is("cooperlake")))
        bits |= KNHK_CPU_AVX512_DOWNCLOCK;
#elif defined(__aarch64__) && !defined(KNHK_PORTABLE)
    bits |= KNHK_CPU_NEON; /* Advanced SIMD is mandatory on AArch64. */
#endif
    cpu_bits = bits;
    return KNHK_OK;
}

uint64_t knhk_cpu_features(void) {
    _knhk_once_run(&cpu_once, cpu_detect, NULL);
    return cpu_bits;
}
